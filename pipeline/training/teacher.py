"""The distillation teacher (``loss.distill``): loaded once at start, frozen, partitioned like the student.

F2LLM v2 kept "a full unsharded copy per GPU" of its teacher. Here, under ZeRO-3 the teacher is wrapped in an
inference-only DeepSpeed engine (no optimizer): its parameters are partitioned over the ranks like the student's and
gathered layer by layer during its forward, so a teacher larger than one GPU's share still fits. Under ZeRO-0/1/2 it
is a plain module (each rank holds it whole, as the student's weights). The trainer loads it before the student's
``gradcache.chunk_tokens`` probe (the GPU memory it holds is not free for chunks:
:mod:`pipeline.training.chunk_budget`) and before the student's DeepSpeed engine, with the ZeRO stage of the run's
DeepSpeed config (:func:`pipeline.training.chunk_budget.optimizer_residency`, read as the engine reads it); the
process group exists by then, and every rank makes the same calls.

The teacher embeds the same chunks as the student in GradCache's no-grad pass (:mod:`pipeline.training.gradcache`),
so it reads the same token ids: its tokenizer must be the shards' (checked at start: one line naming the teacher),
and its hidden size must be at least the student's (its states are truncated to the student's width).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import DistillConfig, ModelConfig
from pipeline.data.shard_format import tokenizer_fingerprint
from pipeline.logs import log


def check_teacher_tokenizer(cfg: DistillConfig, shards_tokenizer: dict[str, Any], *,
                            trust_remote_code: bool = False) -> None:
    """The teacher's tokenizer must be the one the shards were built with (vocabulary hash); ValueError otherwise.
    `trust_remote_code` (``model.trust_remote_code``): run the code the teacher directory ships."""
    from pipeline.data.tokenization import load_tokenizer
    from pipeline.model.embedding import remote_code_hint

    try:
        tokenizer = load_tokenizer(cfg.teacher, trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError: all mean "cannot load"
        raise ValueError(f"loss.distill.teacher: cannot load the tokenizer of {cfg.teacher!r} "
                         f"({type(exc).__name__}{remote_code_hint(exc, trust_remote_code)})") from None
    given = tokenizer_fingerprint(tokenizer, cfg.teacher)
    if given["vocab_sha256"] != shards_tokenizer["vocab_sha256"]:
        raise ValueError(
            f"loss.distill.teacher: {cfg.teacher}: its tokenizer (vocab {given['vocab_size']}, sha256 "
            f"{given['vocab_sha256'][:12]}) differs from the shards' {shards_tokenizer['name_or_path']!r} (vocab "
            f"{shards_tokenizer['vocab_size']}, sha256 {shards_tokenizer['vocab_sha256'][:12]}); the teacher must read "
            "the same token ids as the student"
        )


def load_teacher(
    cfg: DistillConfig, device: torch.device, *, student_hidden: int, zero_stage: int, world_size: int,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The frozen teacher on `device`: an EmbeddingModel, or an inference-only ZeRO-3 engine around one.
    `trust_remote_code` (``model.trust_remote_code``): run the code the teacher directory ships."""
    from pipeline.model.embedding import EmbeddingModel

    model_cfg = ModelConfig(name_or_path=cfg.teacher, dtype=cfg.dtype, compile=False,
                            trust_remote_code=trust_remote_code)
    try:
        teacher = EmbeddingModel.from_config(model_cfg, device)
    except (OSError, KeyError) as exc:
        raise ValueError(f"loss.distill.teacher: cannot load {cfg.teacher!r} ({type(exc).__name__})") from None
    if teacher.hidden_size < student_hidden:
        raise ValueError(f"loss.distill.teacher: {cfg.teacher}: hidden size {teacher.hidden_size} is smaller than "
                         f"the student's {student_hidden} (its states are truncated to the student's width)")
    teacher.eval()
    teacher.requires_grad_(False)
    if zero_stage == 3:
        import deepspeed

        bf16 = next(teacher.parameters()).dtype == torch.bfloat16
        engine, *_ = deepspeed.initialize(model=teacher, config={
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world_size,
            "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16},
        })
        engine.eval()
        log(f"distillation teacher {cfg.teacher}: hidden {teacher.hidden_size}, partitioned over {world_size} ranks "
            f"(ZeRO-3, inference only)")
        return engine
    log(f"distillation teacher {cfg.teacher}: hidden {teacher.hidden_size}, a frozen copy on every rank "
        f"(ZeRO stage {zero_stage})")
    return teacher
