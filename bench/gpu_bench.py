"""GPU benchmark: the seed's padded step vs ours (packed varlen + GradCache), Qwen3-0.6B-sized, one GPU, bf16.

    python bench/gpu_bench.py --out gpu_bench.json             # on one H100/H200: at most --budget-s (480 s)
    python bench/gpu_bench.py --dry-run --out dry.json         # CPU, tiny Qwen3, same code path (tested in CI)

Sections, in this order, each skipped (and recorded as skipped) once the time budget is spent: varlen check, seed,
the bf16 gradient check (``pipeline.gradcheck --dtype bf16``), ours under ZeRO-2 (the trainer's step:
``model.kernels`` and ``model.compile`` auto - liger-kernel and regional torch.compile on CUDA, a dynamic token
dimension, balanced unpadded chunks, fp32 chunk-gradient sums), the same step without GradCache (plain backward of
the same packed, compiled chunks, when it fits), the global-batch-4096 fit, ours under ZeRO-3, and a
Qwen3-4B-shaped model under ZeRO-3: the largest global batch of ``big_batches`` that fits, with its samples/s and
MFU. The sections that build models with ``model.kernels: none`` (varlen check, seed, gradient check) run before the
first liger-patched model: with eager layers liger's RoPE stays patched for the whole process
(:mod:`pipeline.model.kernels`).

Memory between sections: each DeepSpeed engine is destroyed and every reference the benchmark holds to it (engine,
optimizer, model) dropped, then ``gc.collect()`` and ``torch.cuda.empty_cache()``; an engine that DeepSpeed itself
still references afterwards (ZeRO-3's hooks) has its tensors emptied. ``memory_release`` records, per engine,
whether it was collected and the memory still allocated after it.

The 4B section's size (:func:`size_big_model`): a full fine-tune of 4.0B parameters holds 24 bytes per parameter
with the trainer's defaults before any activation - bf16 weights 2, fp32 master weights and Adam moments 12, the
reduced gradient partition in fp32 4, and under coalesced reduction the bf16 gradients on the parameters 2 plus
their fp32 sums 4 - 97 GB, more than an H100 has at any batch (GradCache: the chunk, not the batch, sets the
activation memory). The section therefore takes the first of: the trainer's defaults; coalescing off (DeepSpeed
reduces every chunk and sums the reduced partitions in fp32: 18 bytes per parameter, 72 GB); coalescing off with
gradient checkpointing - whose fixed memory plus the measured activation memory of a chunk fits in 90% of the GPU's
memory, with the largest such chunk up to ``chunk_tokens``; when none fits it is skipped with the computed reason.

Model: a Qwen3-0.6B-shaped decoder built from its config with random weights (28 layers, hidden 1024, 16 query and
8 key/value heads of dim 128, MLP 3072, vocabulary 151,936; 596M parameters, 440M without the embedding table),
bf16 weights under a DeepSpeed engine (ZeRO stage ``--zero-stage``, 2 by default: F2LLM's stage; on one GPU
stage 3 only adds per-module parameter gathers), the same engine type and optimizer (torch AdamW, fused) for both
methods, one process.

Data: random token ids with lengths drawn like retrieval data at F2LLM's max length 1024: queries log-normal with
median 24 tokens (sigma 0.5, clipped to [6, 128]), passages log-normal with median 160 (sigma 0.7, clipped to
[16, 1024]); each sequence ends in EOS; 7 hard negatives per query (F2LLM's retrieval setting), dataset type
retrieval (in-batch + hard-negative InfoNCE, Matryoshka on, as configs/f2llm-v2-0.6b.yaml).

Methods, each step timed between CUDA synchronisations, `train_step` + ``engine.step()``:

* seed (``bench/seed_step.py``, F2LLM's step): 16 queries x (1 positive + 7 negatives) = 144 sequences right-padded
  to the longest into ONE tensor, sdpa with the padding mask, gradient checkpointing on (F2LLM needs it for 16 x 9 at
  1024 tokens), one backward of the whole batch, no GradCache. flash-attn is not installed here, so the seed runs
  sdpa, not FlashAttention-2 (which would unpad the attention but not the MLPs).
* ours (``pipeline.training.gradcache.cached_step``): global batch 512 on one GPU = 512 queries + 4,608 passages, packed
  into chunks of ``--chunk-tokens`` real tokens (no padding), varlen attention (flash-attn's kernel when installed,
  else PyTorch's ``varlen_attn``), GradCache (exact full-batch gradient; one extra no-grad forward), no gradient
  checkpointing (a chunk's activations fit).
* fit: one step of ours at global batch 4096 (36,864 sequences): does it fit, and its peak memory.

Reported per method: samples/s (queries per second), real tokens/s, peak GPU memory (max_memory_allocated), MFU =
real tokens/s x (6 N + 12 L a s) / peak bf16 FLOP/s (N non-embedding parameters, L layers, a attention width, s mean
sequence length; PaLM's formula: padding, recomputation and GradCache's extra forward are not useful work and not
counted), and hardware FLOPs utilisation HFU = computed tokens/s x (8 N + 16 L a s) / peak for a step with one extra
forward (GradCache's no-grad pass, or the seed's recomputation under gradient checkpointing), (6 N + 12 L a s)
otherwise: padding and the extra forward counted as the work the GPU did. Medians over the measured steps. ``varlen_check``: embeddings of the same sequences through the packed
varlen path and the padded sdpa path (same weights): max |difference| and min cosine, bf16 tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

QWEN3_06B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_dropout=0.0,
    pad_token_id=151643, eos_token_id=151645,
)
QWEN3_4B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_dropout=0.0,
    pad_token_id=151643, eos_token_id=151645,
)
TINY_QWEN3 = dict(
    model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, attention_dropout=0.0,
    pad_token_id=0, eos_token_id=2,
)
QUERY_LEN = dict(median=24, sigma=0.5, low=6, high=128)
PASSAGE_LEN = dict(median=160, sigma=0.7, low=16, high=1024)
N_NEG = 7


@dataclass
class Plan:
    """Sizes of one benchmark run (full on a GPU, shrunk for --dry-run)."""

    model: dict[str, Any]
    seed_batch: int = 16
    ours_batch: int = 512
    fit_batch: int = 4096
    chunk_tokens: int = 16384
    warmup: int = 2
    steps: int = 5
    ours_steps: int = 3
    max_len: int = 1024
    check_sequences: int = 48
    big_model: dict[str, Any] = field(default_factory=lambda: dict(QWEN3_4B))
    big_batches: tuple[int, ...] = (2048, 1024, 512, 256, 128)
    gradcheck_batch: int = 16
    compile: str = "auto"  # model.compile of ours: auto (on for CUDA), true, false

    @classmethod
    def dry_run(cls) -> "Plan":
        return cls(model=TINY_QWEN3, seed_batch=4, ours_batch=16, fit_batch=64, chunk_tokens=1024, warmup=1,
                   steps=2, ours_steps=2, max_len=256, check_sequences=12, big_model=dict(TINY_QWEN3, num_hidden_layers=3),
                   big_batches=(32, 16), gradcheck_batch=4)


@dataclass
class MethodResult:
    name: str
    global_batch: int
    sequences_per_step: int
    step_seconds: list[float] = field(default_factory=list)
    real_tokens_per_step: int = 0
    computed_tokens_per_step: int = 0
    chunks_per_step: int = 0
    peak_memory_gib: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    hfu: float | None = None
    extra_forward: bool = False  # GradCache's no-grad pass or activation recomputation (counted in hfu)
    recompiles: int | None = None  # graphs compiled after the first measured step (compiled layers)
    status: str = "ok"


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def sample_lengths(rng: np.random.Generator, n: int, spec: dict[str, float], max_len: int) -> np.ndarray:
    raw = rng.lognormal(np.log(spec["median"]), spec["sigma"], size=n)
    return np.clip(np.rint(raw), spec["low"], min(spec["high"], max_len)).astype(np.int64)


def make_batch(rng: np.random.Generator, batch_size: int, model_cfg: dict[str, Any], max_len: int):
    """A retrieval ContrastiveBatch of random ids with the documented length distributions, EOS-terminated."""
    from pipeline.data.batch import ContrastiveBatch

    vocab, eos = model_cfg["vocab_size"], model_cfg["eos_token_id"]

    def seqs(lengths: np.ndarray) -> list[np.ndarray]:
        out = []
        for n in lengths:
            ids = rng.integers(3, min(vocab, 151000), size=int(n), dtype=np.int64)  # no special tokens
            ids[-1] = eos
            out.append(ids)
        return out

    queries = seqs(sample_lengths(rng, batch_size, QUERY_LEN, max_len))
    positives = seqs(sample_lengths(rng, batch_size, PASSAGE_LEN, max_len))
    negatives = seqs(sample_lengths(rng, batch_size * N_NEG, PASSAGE_LEN, max_len))
    return ContrastiveBatch(queries, positives, negatives, N_NEG, "retrieval")


# ---------------------------------------------------------------------------------------------------------------
# Model and engine
# ---------------------------------------------------------------------------------------------------------------
def model_config(plan: Plan, *, attn: str, packing: str, checkpointing: bool, fast: bool = False,
                 model: dict[str, Any] | None = None):
    """`fast`: the trainer's GPU defaults (kernels and compile auto); else both off (the seed, the varlen check)."""
    from pipeline.config import ModelConfig

    return ModelConfig(from_config=dict(model or plan.model), pooling="last_token", attn_implementation=attn,
                       dtype="auto", gradient_checkpointing=checkpointing, packing=packing,
                       kernels="auto" if fast else "none",
                       compile={"auto": "auto", "true": True, "false": False}[plan.compile] if fast else False)


def build_engine(module: torch.nn.Module, *, micro_batch: int, zero_stage: int, device: torch.device,
                 fp32_grad_accum: bool = False) -> Any:
    """A DeepSpeed engine of `module` with torch's AdamW. `fp32_grad_accum` (ours): the reduced gradient partitions
    summed in fp32 (``data_types.grad_accum_dtype``), as the trainer's DeepSpeed config does for
    ``gradcache.fp32_accumulation`` (:func:`pipeline.training.ds_config.training_ds_config`)."""
    import deepspeed

    from pipeline.training.ds_config import load_ds_config

    ds_cfg = load_ds_config(REPO / "ds_configs" / f"zero{zero_stage}.json", micro_batch=micro_batch, world_size=1,
                            use_bf16=device.type == "cuda")
    ds_cfg.pop("optimizer", None)
    ds_cfg.pop("scheduler", None)
    if fp32_grad_accum and ds_cfg["bf16"]["enabled"]:
        ds_cfg.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), weight_decay=0.01,
                                  fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg)
    return engine


def non_embedding_params(module: torch.nn.Module) -> int:
    backbone = getattr(module, "backbone", module)
    embedding = backbone.get_input_embeddings().weight
    return sum(p.numel() for p in module.parameters() if p is not embedding)


def flops_per_token(model: dict[str, Any], n_params: int, mean_len: float) -> float:
    from types import SimpleNamespace

    from pipeline.training.metrics import attention_width, model_flops_per_token

    config = SimpleNamespace(**model)
    return model_flops_per_token(n_params, config.num_hidden_layers, attention_width(config), mean_len)


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def finish(result: MethodResult, model: dict[str, Any], n_params: int, mean_len: float, device: torch.device
           ) -> MethodResult:
    from pipeline.training.metrics import mfu, peak_flops

    if result.step_seconds:
        median = statistics.median(result.step_seconds)
        result.samples_per_s = result.global_batch / median
        result.tokens_per_s = result.real_tokens_per_step / median
        peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        useful = flops_per_token(model, n_params, mean_len)
        result.mfu = mfu(result.tokens_per_s, useful, peak, 1)
        hardware = useful * (4 / 3 if result.extra_forward else 1.0)  # one more forward: 2N + 4Las of 6N + 12Las
        result.hfu = mfu(result.computed_tokens_per_step / median, hardware, peak, 1)
    if device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# Modules whose objects the memory release follows to find an engine's tensors (not functions or modules: their
# globals reach the whole process).
OWNED_MODULES = ("deepspeed", "torch.nn", "torch.optim", "transformers", "peft", "liger_kernel", "pipeline", "bench")
RELEASE_TOLERANCE_GIB = 0.5  # memory still allocated after a release that is logged as a warning


def owned_tensors(root: object) -> list[torch.Tensor]:
    """Every tensor reachable from `root` (an engine) through containers and the attributes of objects of the
    training stack (:data:`OWNED_MODULES`): parameters and their ZeRO partitions, gradients, optimizer states, flat
    buffers."""
    seen: set[int] = set()
    found: dict[int, torch.Tensor] = {}
    stack: list[Any] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
            stack.extend(getattr(obj, "__dict__", {}).values())
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif type(obj).__module__.startswith(OWNED_MODULES) and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return list(found.values())


def empty_tensors(tensors: list[torch.Tensor]) -> int:
    """Point every tensor at an empty one (``tensor.data = torch.empty(0)``, as ZeRO-3 releases a parameter), so that
    their storage is freed whoever still holds the tensor objects; returns the bytes of the distinct storages."""
    storages: dict[tuple[str, int], int] = {}
    with torch.no_grad():
        for t in tensors:
            if t.numel():
                storage = t.untyped_storage()
                storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
            if t.is_leaf:
                t.grad = None
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return sum(storages.values())


def release(holder: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Destroy the engine in ``holder["engine"]`` and drop every reference the benchmark holds to it (`holder` is
    emptied: engine, model, compile watch), then ``gc.collect()`` and ``torch.cuda.empty_cache()``. A ZeRO-3 engine
    stays referenced from inside DeepSpeed after ``destroy()`` (its hooks; deepspeedai/DeepSpeed#5674, #7204): when
    the engine survives the collection, the tensors it reaches are emptied (:func:`empty_tensors`). Returns whether
    the engine was collected, the bytes emptied and, on CUDA, the memory still allocated (a WARNING above
    :data:`RELEASE_TOLERANCE_GIB`)."""
    import gc
    import logging
    import weakref

    from pipeline.logs import log

    engine = holder.pop("engine")
    engine_ref = weakref.ref(engine)
    engine.destroy()
    del engine
    holder.clear()
    gc.collect()
    emptied = 0
    survivor = engine_ref()
    if survivor is not None:
        emptied = empty_tensors(owned_tensors(survivor))
        del survivor
        gc.collect()
    out: dict[str, Any] = {"engine_collected": engine_ref() is None, "bytes_emptied": emptied,
                           "memory_allocated_gib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        out["memory_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
        if out["memory_allocated_gib"] > RELEASE_TOLERANCE_GIB:
            log(f"memory release: {out['memory_allocated_gib']:.2f} GiB still allocated after releasing an engine",
                level=logging.WARNING)
    return out


def varlen_check(plan: Plan, device: torch.device, rng: np.random.Generator) -> dict[str, Any]:
    """Packed varlen vs padded sdpa embeddings of the same sequences with the same weights."""
    from pipeline.model.embedding import EmbeddingModel
    from pipeline.model.packing import pack, pad

    with torch.device(device):
        packed_model = EmbeddingModel.from_config(model_config(plan, attn="varlen", packing="packed",
                                                               checkpointing=False), device)
        padded_model = EmbeddingModel.from_config(model_config(plan, attn="sdpa", packing="padded",
                                                               checkpointing=False), device)
    padded_model.load_state_dict(packed_model.state_dict())
    packed_model.eval()
    padded_model.eval()
    batch = make_batch(rng, plan.check_sequences // (2 + N_NEG) + 1, plan.model, plan.max_len)
    seqs = batch.sequences()[: plan.check_sequences]
    with torch.no_grad():
        a = packed_model(pack(seqs))
        b = padded_model(pad(seqs, pad_id=padded_model.pad_id))
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    # Gradients through both paths: d/dtheta sum(e * r) for a fixed random r, compared on every weight matrix.
    r = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (packed_model(pack(seqs)) * r).sum().backward()
    (padded_model(pad(seqs, pad_id=padded_model.pad_id)) * r).sum().backward()
    grad_cos = []
    for (name, p1), (_, p2) in zip(packed_model.named_parameters(), padded_model.named_parameters()):
        if p1.grad is not None and p2.grad is not None and p1.ndim == 2 and "embed" not in name:
            g1, g2 = p1.grad.float().flatten(), p2.grad.float().flatten()
            grad_cos.append(float(torch.nn.functional.cosine_similarity(g1, g2, dim=0)))
    from pipeline.model.attention import kernel_for

    out = {
        "attn_implementation": packed_model.attn_implementation,
        "kernel": "flash_attention_2" if packed_model.attn_implementation == "flash_attention_2"
        else kernel_for(device, next(packed_model.parameters()).dtype, 0.0),
        "sequences": len(seqs),
        "max_abs_diff": float((a - b).abs().max()),
        "min_cosine": float(cos.min()),
        "min_grad_cosine": min(grad_cos),
        "weight_matrices_compared": len(grad_cos),
        "dtype": str(next(packed_model.parameters()).dtype).removeprefix("torch."),
    }
    tol, grad_tol = (0.995, 0.99) if device.type == "cuda" else (0.99999, 0.9999)  # bf16 on CUDA, fp32 on CPU
    out["ok"] = out["min_cosine"] >= tol and out["min_grad_cosine"] >= grad_tol
    del packed_model, padded_model
    return out


def run_seed(plan: Plan, device: torch.device, rng: np.random.Generator, zero_stage: int,
             releases: dict[str, Any]) -> MethodResult:
    from bench.seed_step import SeedEmbedder, seed_collate, seed_step
    from pipeline.config import LossConfig
    from pipeline.model.embedding import build_backbone, enable_checkpointing, resolve_dtype

    cfg = model_config(plan, attn="sdpa", packing="padded", checkpointing=True)
    with torch.device(device):
        backbone = build_backbone(cfg, attn_implementation="sdpa", dtype=resolve_dtype("auto", device))
    enable_checkpointing(backbone)
    module = SeedEmbedder(backbone.to(device))
    n_params = non_embedding_params(module)
    holder = {"engine": build_engine(module, micro_batch=plan.seed_batch, zero_stage=zero_stage, device=device)}
    del module, backbone
    holder["engine"].train()
    loss_cfg = LossConfig(hard_negatives={"retrieval": N_NEG}, in_batch_types=["retrieval"])
    pad_id = plan.model["pad_token_id"]
    result = MethodResult("seed", plan.seed_batch, plan.seed_batch * (2 + N_NEG), extra_forward=True)
    reset_peak(device)
    real, computed, lens = [], [], []
    for i in range(plan.warmup + plan.steps):
        batch = make_batch(rng, plan.seed_batch, plan.model, plan.max_len)
        padded = seed_collate(batch, pad_id, "batch")  # collate runs in F2LLM's data loader: not timed

        def step() -> None:
            seed_step(holder["engine"], padded, loss_cfg, device)
            holder["engine"].step()

        seconds, _ = timed(step, device)
        if i >= plan.warmup:
            result.step_seconds.append(seconds)
            real.append(padded.real_tokens)
            computed.append(padded.computed_tokens)
            lens.extend(len(s) for s in batch.sequences())
    result.real_tokens_per_step = int(np.median(real))
    result.computed_tokens_per_step = int(np.median(computed))
    result.chunks_per_step = 1
    finish(result, plan.model, n_params, float(np.mean(lens)), device)
    releases["seed"] = release(holder, device)
    return result


def gradcache_config(plan: Plan, *, enabled: bool = True):
    from pipeline.config import GradCacheConfig

    return GradCacheConfig(enabled=enabled, chunk_tokens=plan.chunk_tokens, coalesce_grad_reduction=True,
                           fp32_accumulation=True)


def ours_model(plan: Plan, device: torch.device, model_shape: dict[str, Any] | None = None):
    """The trainer's model (kernels and compile auto), not compiled yet."""
    from pipeline.model.embedding import EmbeddingModel

    with torch.device(device):
        return EmbeddingModel.from_config(model_config(plan, attn="varlen", packing="packed", checkpointing=False,
                                                       fast=True, model=model_shape), device)


def ours_engine(plan: Plan, model: Any, device: torch.device, zero_stage: int, micro_batch: int, gc_cfg: Any
                ) -> dict[str, Any]:
    """`model`'s layers compiled when its settings say so (dynamic token dimension), under a DeepSpeed engine of
    `zero_stage`: {"engine", "n_params", "watch"} (a dict, so that :func:`release` can drop the engine)."""
    from pipeline.model.compiled import CompileWatch

    n_params = non_embedding_params(model)
    watch = CompileWatch.start(model, gc_cfg, max_len=plan.max_len)
    engine = build_engine(model, micro_batch=micro_batch, zero_stage=zero_stage, device=device,
                          fp32_grad_accum=gc_cfg.fp32_accumulation)
    engine.train()
    return {"engine": engine, "n_params": n_params, "watch": watch}


def build_ours(plan: Plan, device: torch.device, zero_stage: int, micro_batch: int) -> dict[str, Any]:
    """The trainer's model (kernels and compile auto, dynamic token dimension) under a DeepSpeed engine of
    `zero_stage` (:func:`ours_engine`)."""
    return ours_engine(plan, ours_model(plan, device), device, zero_stage, micro_batch, gradcache_config(plan))


def run_ours(plan: Plan, engine: Any, n_params: int, device: torch.device, rng: np.random.Generator, *,
             name: str, batch_size: int, warmup: int, steps: int, gradcache: bool = True, watch: Any = None,
             model_shape: dict[str, Any] | None = None, gc_settings: Any = None) -> MethodResult:
    """`gc_settings`: the GradCache settings (default :func:`gradcache_config`); `gradcache` False disables them."""
    import dataclasses

    from pipeline.config import LossConfig
    from pipeline.training.gradcache import train_step

    shape = model_shape or plan.model
    loss_cfg = LossConfig(hard_negatives={"retrieval": N_NEG}, in_batch_types=["retrieval"], matryoshka=True)
    gc_cfg = gradcache_config(plan) if gc_settings is None else gc_settings
    gc_cfg = dataclasses.replace(gc_cfg, enabled=gradcache)
    result = MethodResult(name, batch_size, batch_size * (2 + N_NEG), extra_forward=gradcache)
    reset_peak(device)
    real, computed, chunks, lens = [], [], [], []
    try:
        for i in range(warmup + steps):
            batch = make_batch(rng, batch_size, shape, plan.max_len)

            def step():
                stats = train_step(engine, batch, loss_cfg, gc_cfg)
                engine.step()
                return stats

            seconds, stats = timed(step, device)
            if watch is not None:
                watch.after_step()
            if i >= warmup:
                result.step_seconds.append(seconds)
                real.append(stats.real_tokens)
                computed.append(stats.computed_tokens)
                chunks.append(stats.chunks_run)
                lens.extend(len(s) for s in batch.sequences())
    except torch.cuda.OutOfMemoryError as exc:
        result.status = f"out of memory: {str(exc).splitlines()[0]}"
        engine.zero_grad()
        return finish(result, shape, n_params, 1.0, device)
    result.real_tokens_per_step = int(np.median(real))
    result.computed_tokens_per_step = int(np.median(computed))
    result.chunks_per_step = int(np.median(chunks))
    if watch is not None and watch.values():
        result.recompiles = watch.values()["recompiles"]
    return finish(result, shape, n_params, float(np.mean(lens)), device)


def bf16_gradcheck(plan: Plan, tmp: Path) -> dict[str, Any]:
    """``pipeline.gradcheck --dtype bf16`` on the benchmark's model shape, one process: the errors of GradCache in
    bf16 (>= 32 chunks) and of a plain bf16 backward against fp32."""
    import contextlib
    import io

    import yaml

    from pipeline.gradcheck import main as gradcheck

    config = tmp / "gradcheck.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"from_config": dict(plan.model), "tokenizer": None, "pooling": "last_token", "compile": False,
                  "kernels": "none"},
        "loss": {"hard_negatives": {"retrieval": N_NEG}, "matryoshka": True},
        "train": {"per_device_batch_size": plan.gradcheck_batch},
    }))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gradcheck(["--config", str(config), "--dtype", "bf16", "--chunks", "32"])
    line = out.getvalue().strip().splitlines()[-1] if out.getvalue().strip() else ""
    return {"exit_code": code, "result": line}


@dataclass(frozen=True)
class BigSetting:
    """One way to run the 4B section (:func:`size_big_model`)."""

    name: str
    coalesce: bool  # gradcache.coalesce_grad_reduction
    checkpointing: bool  # model.gradient_checkpointing


BIG_SETTINGS = (
    BigSetting("defaults", coalesce=True, checkpointing=False),
    BigSetting("no-coalescing", coalesce=False, checkpointing=False),
    BigSetting("no-coalescing-checkpointing", coalesce=False, checkpointing=True),
)


@dataclass
class BigSizing:
    """The 4B section's setting and chunk, and why (recorded in the output)."""

    setting: str | None  # a BigSetting name; None: nothing fits
    coalesce: bool = True
    checkpointing: bool = False
    chunk_tokens: int | None = None
    usable_gib: float | None = None
    fixed_gib: float | None = None
    activations_gib: float | None = None
    reason: str = ""


def fixed_bytes(n_params: int, *, coalesce: bool, bucket_bytes: int) -> int:
    """GPU bytes of a full bf16 fine-tune of `n_params` parameters on one GPU under ZeRO, activations aside (the
    mixed-precision Adam accounting of Rajbhandari et al. 2020, "ZeRO", arXiv:1910.02054, section 3.1): bf16 weights
    2 per parameter, fp32 master weights and Adam moments 12, the reduced gradient partition in fp32 4
    (``grad_accum_dtype: fp32``); with coalesced reduction also the bf16 gradients on the parameters 2 and their fp32
    sums 4 (:mod:`pipeline.training.backward`); plus DeepSpeed's fp32 reduce bucket (`bucket_bytes`)."""
    return (2 + 12 + 4 + (2 + 4 if coalesce else 0)) * n_params + bucket_bytes


def size_big_model(n_params: int, usable_bytes: int, activation_bytes: Callable[[bool, int], int | None],
                   chunks: list[int], *, bucket_bytes: int) -> BigSizing:
    """The first of :data:`BIG_SETTINGS` whose fixed memory (:func:`fixed_bytes`) plus the activation memory of a
    chunk fits in `usable_bytes`, with the largest such chunk of `chunks` (descending); `activation_bytes(
    checkpointing, tokens)` is that memory (None: it ran out of memory). Nothing fits: ``setting`` None and the
    reason of every setting."""
    gib = 2**30
    rejected = []
    for setting in BIG_SETTINGS:
        fixed = fixed_bytes(n_params, coalesce=setting.coalesce, bucket_bytes=bucket_bytes)
        room = usable_bytes - fixed
        if room <= 0:
            rejected.append(f"{setting.name}: weights, optimizer and gradients alone take {fixed / gib:.1f} GiB")
            continue
        for tokens in chunks:
            activations = activation_bytes(setting.checkpointing, tokens)
            if activations is not None and activations <= room:
                return BigSizing(
                    setting.name, setting.coalesce, setting.checkpointing, tokens, usable_bytes / gib, fixed / gib,
                    activations / gib,
                    f"{setting.name}: {fixed / gib:.1f} GiB fixed + {activations / gib:.1f} GiB of activations of a "
                    f"{tokens}-token chunk <= {usable_bytes / gib:.1f} GiB usable"
                    + (f" (rejected: {'; '.join(rejected)})" if rejected else ""))
        rejected.append(f"{setting.name}: no chunk of >= {chunks[-1]} tokens fits the {room / gib:.1f} GiB left "
                        f"after {fixed / gib:.1f} GiB fixed")
    return BigSizing(None, usable_gib=usable_bytes / gib,
                     reason=f"does not fit in {usable_bytes / gib:.1f} GiB usable: {'; '.join(rejected)}")


def chunk_activation_bytes(model: Any, device: torch.device, tokens: int, max_len: int) -> int | None:
    """Peak GPU memory of one packed chunk of `tokens` tokens (sequences of `max_len`) through `model`, forward and
    backward, above what was allocated before it; None when it runs out of memory. The backward stops at the first
    layer's first weight: activations and their gradients are measured, not the parameter gradients, which
    :func:`fixed_bytes` counts."""
    from pipeline.model.compiled import repeated_layers

    anchor = next(p for p in repeated_layers(model.backbone)[0].parameters() if p.requires_grad)
    seqs = [np.full(min(max_len, tokens - start), 7, dtype=np.int64) for start in range(0, tokens, max_len)]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        emb = model(model.make_inputs(seqs))
        (grad,) = torch.autograd.grad(emb.float().sum(), [anchor])
        del emb, grad
        return torch.cuda.max_memory_allocated(device) - before
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def checkpointing_on(backbone: Any) -> bool:
    """Whether the transformers model runs its layers under activation checkpointing (transformers >= 5 names it
    ``is_activation_checkpointing``, earlier releases ``is_gradient_checkpointing``)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(backbone), name):
            return bool(getattr(backbone, name))
    return False


def big_sizing(plan: Plan, model: Any, device: torch.device, forced: str) -> BigSizing:
    """How the 4B section runs: `forced` (a BigSetting name, at ``chunk_tokens``), else sized for the GPU's memory
    (:func:`size_big_model`, :data:`pipeline.training.chunk_budget.HEADROOM` kept free, activations measured), else
    (no GPU) the trainer's defaults."""
    from pipeline.model.embedding import enable_checkpointing
    from pipeline.training.chunk_budget import HEADROOM, candidates

    if forced != "auto" or device.type != "cuda":
        name = "defaults" if forced == "auto" else forced
        setting = next(s for s in BIG_SETTINGS if s.name == name)
        why = "--big-setting" if forced != "auto" else f"not sized: no GPU memory on {device.type}"
        return BigSizing(setting.name, setting.coalesce, setting.checkpointing, plan.chunk_tokens, reason=why)
    import json

    zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    bucket = int(float(zero3["zero_optimization"]["reduce_bucket_size"]) * 4)
    usable = int(torch.cuda.get_device_properties(device).total_memory * (1 - HEADROOM))
    measured: dict[tuple[bool, int], int | None] = {}

    def activations(checkpointing: bool, tokens: int) -> int | None:
        if (checkpointing, tokens) not in measured:
            if checkpointing and not checkpointing_on(model.backbone):
                enable_checkpointing(model.backbone)  # settings without it come first: it is never turned off
            measured[(checkpointing, tokens)] = chunk_activation_bytes(model, device, tokens, plan.max_len)
        return measured[(checkpointing, tokens)]

    n_params = sum(p.numel() for p in model.parameters())
    return size_big_model(n_params, usable, activations, candidates(plan.max_len, plan.chunk_tokens),
                          bucket_bytes=bucket)


def largest_batch(plan: Plan, device: torch.device, rng: np.random.Generator, releases: dict[str, Any], *,
                  forced: str = "auto") -> dict[str, Any]:
    """The 4B-shaped model under ZeRO-3, sized to fit (:func:`big_sizing`): one step at each of ``big_batches``
    (largest first) until one fits; that batch is then measured for samples/s and MFU. Skipped, with the computed
    reason, when no setting fits."""
    import dataclasses
    import gc

    from pipeline.model.embedding import enable_checkpointing

    model = ours_model(plan, device, plan.big_model)
    sizing = big_sizing(plan, model, device, forced)
    if sizing.setting is None:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"status": f"skipped: {sizing.reason}", "sizing": asdict(sizing), "largest_global_batch": None}
    if sizing.checkpointing and not checkpointing_on(model.backbone):
        enable_checkpointing(model.backbone)
    gc_cfg = dataclasses.replace(gradcache_config(plan), chunk_tokens=sizing.chunk_tokens,
                                 coalesce_grad_reduction=sizing.coalesce)
    holder = ours_engine(plan, model, device, 3, plan.big_batches[-1], gc_cfg)
    del model
    tried = {}
    try:
        for batch in plan.big_batches:
            result = run_ours(plan, holder["engine"], holder["n_params"], device, rng, name=f"4b_{batch}",
                              batch_size=batch, warmup=0, steps=1, watch=holder["watch"], model_shape=plan.big_model,
                              gc_settings=gc_cfg)
            tried[batch] = result.status
            if result.status == "ok":
                measured = run_ours(plan, holder["engine"], holder["n_params"], device, rng, name=f"4b_{batch}",
                                    batch_size=batch, warmup=0, steps=1, watch=holder["watch"],
                                    model_shape=plan.big_model, gc_settings=gc_cfg)
                return {"sizing": asdict(sizing), "tried": tried, "largest_global_batch": batch,
                        "result": asdict(measured)}
        return {"sizing": asdict(sizing), "tried": tried, "largest_global_batch": None}
    finally:
        releases["big_model"] = release(holder, device)


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    from pipeline.model.attention import torch_varlen_available
    from pipeline.model.embedding import flash_attn_available

    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": ds,
        "python": platform.python_version(), "flash_attn": flash_attn_available(),
        "torch_varlen_attn": torch_varlen_available(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Sizes and methods: see the module docstring (python -c 'help(...)').")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny Qwen3, small batches: the same code path in about a minute")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--zero-stage", type=int, choices=(2, 3), default=2,
                        help="DeepSpeed ZeRO stage of the seed and of ours (ours is also measured under ZeRO-3)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget: sections not started by then are skipped (default 480)")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="GradCache chunk size in tokens (ours)")
    parser.add_argument("--skip-fit", action="store_true", help="skip the global-batch-4096 step")
    parser.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                        help="model.compile of ours (auto: on CUDA); --dry-run --compile true runs the compiled path on CPU")
    parser.add_argument("--big-setting", choices=("auto", *(b.name for b in BIG_SETTINGS)), default="auto",
                        help="how the 4B section runs (auto: sized for the GPU's memory; the trainer's defaults "
                        "without a GPU); a name forces that setting at --chunk-tokens")
    parser.add_argument("--seed", type=int, default=0, help="data RNG seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = Plan.dry_run() if args.dry_run else Plan(model=QWEN3_06B)
    if args.chunk_tokens:
        plan.chunk_tokens = args.chunk_tokens
    plan.compile = args.compile
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.dry_run else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from pipeline.training.distributed import init_distributed, teardown
    from pipeline.logs import log

    init_distributed(use_deepspeed=True)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    results: dict[str, Any] = {"environment": environment(device), "plan": asdict(plan),
                               "zero_stage": args.zero_stage, "lengths": {"query": QUERY_LEN,
                                                                          "passage": PASSAGE_LEN}}
    started = time.perf_counter()

    def save() -> None:
        results["wall_seconds"] = time.perf_counter() - started
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))

    def section(name: str, fn: Callable[[], Any]) -> Any:
        """Run a section unless the time budget is spent; record its result (or why it was skipped)."""
        if time.perf_counter() - started > args.budget_s:
            results[name] = {"status": f"skipped: time budget of {args.budget_s:.0f} s spent"}
        else:
            value = fn()
            results[name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
        log(f"{name}: {results[name]}")
        save()
        return results[name]

    releases: dict[str, Any] = {}
    results["memory_release"] = releases
    section("varlen_check", lambda: varlen_check(plan, device, rng))
    section("seed", lambda: run_seed(plan, device, rng, args.zero_stage, releases))
    import tempfile

    # Before the first liger-patched model: with eager layers liger's RoPE stays patched process-wide.
    with tempfile.TemporaryDirectory() as tmp:
        section("bf16_gradcheck", lambda: bf16_gradcheck(plan, Path(tmp)))
    ours_run = build_ours(plan, device, args.zero_stage, plan.ours_batch)
    section("ours", lambda: run_ours(plan, ours_run["engine"], ours_run["n_params"], device, rng, name="ours",
                                     batch_size=plan.ours_batch, warmup=1, steps=plan.ours_steps,
                                     watch=ours_run["watch"]))
    section("ours_without_gradcache", lambda: run_ours(
        plan, ours_run["engine"], ours_run["n_params"], device, rng, name="ours_without_gradcache",
        batch_size=plan.ours_batch, warmup=1, steps=plan.ours_steps, gradcache=False, watch=ours_run["watch"]))
    if not args.skip_fit:
        section("fit", lambda: run_ours(plan, ours_run["engine"], ours_run["n_params"], device, rng, name="fit",
                                        batch_size=plan.fit_batch, warmup=0, steps=1, watch=ours_run["watch"]))
    releases["ours"] = release(ours_run, device)

    def ours_zero3() -> MethodResult:
        zero3 = build_ours(plan, device, 3, plan.ours_batch)
        try:
            return run_ours(plan, zero3["engine"], zero3["n_params"], device, rng, name="ours_zero3",
                            batch_size=plan.ours_batch, warmup=1, steps=plan.ours_steps, watch=zero3["watch"])
        finally:
            releases["ours_zero3"] = release(zero3, device)

    section("ours_zero3", ours_zero3)
    section("big_model", lambda: largest_batch(plan, device, rng, releases, forced=args.big_setting))

    seed, ours, nogc = results["seed"], results["ours"], results.get("ours_without_gradcache", {})
    if seed.get("samples_per_s") and ours.get("samples_per_s"):
        results["ratio_samples_per_s"] = ours["samples_per_s"] / seed["samples_per_s"]
        results["ratio_tokens_per_s"] = ours["tokens_per_s"] / seed["tokens_per_s"]
    if ours.get("samples_per_s") and nogc.get("samples_per_s"):
        results["gradcache_time_per_sample_ratio"] = nogc["samples_per_s"] / ours["samples_per_s"]
    zero3 = results.get("ours_zero3", {})
    if ours.get("samples_per_s") and zero3.get("samples_per_s"):
        results["zero3_vs_zero2_samples_per_s"] = zero3["samples_per_s"] / ours["samples_per_s"]
    save()
    log(json.dumps({k: results.get(k) for k in ("ratio_samples_per_s", "ratio_tokens_per_s",
                                                "gradcache_time_per_sample_ratio", "zero3_vs_zero2_samples_per_s")}))
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
