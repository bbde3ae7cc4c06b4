"""Export a consolidated Hugging Face + sentence-transformers model directory from a (ZeRO-3 sharded) engine.

Every rank must call :func:`export_model` (under ZeRO-3 each parameter is all-gathered, one at a time, so peak
memory is one parameter, not the model). Rank 0 writes into a temporary directory and renames it into place:

* ``config.json``, ``model.safetensors``: the backbone, loadable with ``transformers.AutoModel``; with LoRA
  (``model.lora``) the weights with the adapters merged in, and the adapter alone in ``adapter/`` (peft's format;
  :func:`pipeline.model.lora.save_merged_with_adapter`); a bidirectional decoder's config says ``is_causal: false``;
* the tokenizer; when it does not append EOS by itself (Qwen3, Llama), a post-processor that does is added, so
  that ``tokenizer(text)`` ends with the EOS that last-token pooling reads, as in training;
* ``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json``, ``2_Normalize`` (if normalised) and
  ``config_sentence_transformers.json`` with one prompt per dataset instruction (``{name}: "Instruct: ...\\nQuery: "``)
  and cosine similarity: ``SentenceTransformer(dir).encode(q, prompt_name=...)`` reproduces training embeddings;
  plus the per-task-type prompts MTEB looks up (:func:`mteb_prompts`), so that ``mteb.evaluate(SentenceTransformer(
  dir), tasks)`` gives the queries of retrieval, reranking, classification and clustering tasks the instruction they
  were trained with, and documents none. It also records the training step of the weights (``training_step``,
  :func:`export_step`; sentence-transformers ignores the key): :mod:`pipeline.merge` checks the order of its
  inputs against it.

The extra exports for checkpoint merging are named by :func:`merge_export_name`, ``merge_step_<N>`` with N
zero-padded to 8 digits (``merge_step_00009500``, as the checkpoint tags ``step_<N>``), so that a shell glob lists
them in step order; :func:`merge_export_step` also reads the unpadded names of earlier versions.

A failed write (disk full, unwritable or vanished output directory) raises :class:`ExportError` on every rank, one
line naming the directory; the temporary directory is removed and an existing export of the same name is kept
(it is only replaced once the new one is complete). Checkpoints are never touched by an export.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.resilience.faults import NO_FAULTS, FaultInjector
from pipeline.training.errors import TrainingAborted
from pipeline.data.registry import format_query
from pipeline.logs import global_rank, log
from pipeline.model.lora import is_lora, save_merged_with_adapter

ST_CONFIG = "config_sentence_transformers.json"
STEP_KEY = "training_step"  # in ST_CONFIG: the optimizer step of the exported weights
MERGE_EXPORT_PREFIX = "merge_step_"
MERGE_EXPORT_DIGITS = 8  # as the checkpoint tags step_<N>: sorts by step up to 99,999,999 steps
_MERGE_EXPORT_NAME = re.compile(rf"{MERGE_EXPORT_PREFIX}(\d+)")
ST_POOLING_KEYS = {
    "last_token": "pooling_mode_lasttoken",
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
}


class ExportError(TrainingAborted):
    """The model directory could not be written; nothing was replaced."""


def _is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def consolidated_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of `module` on rank 0 (empty elsewhere); all ranks must call it."""
    state: dict[str, torch.Tensor] = {}
    rank0 = global_rank() == 0
    params = dict(module.named_parameters())
    for name, tensor in module.state_dict(keep_vars=True).items():
        param = params.get(name)
        if param is not None and _is_zero3_param(param):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank0:
                    state[name] = param.data.detach().to("cpu", copy=True)
        elif rank0:
            state[name] = tensor.detach().to("cpu", copy=True)
    return state


def _eos_appending_tokenizer(tokenizer: Any, eos_id: int) -> Any:
    """Make a fast tokenizer close every sequence with EOS (as the shards do); unchanged if it already does."""
    probe = tokenizer("a b", add_special_tokens=True)["input_ids"]
    if probe and probe[-1] == eos_id:
        return tokenizer
    from tokenizers import processors

    eos = tokenizer.convert_ids_to_tokens(eos_id)
    backend = tokenizer.backend_tokenizer
    bos_id = tokenizer.bos_token_id if probe and probe[0] == tokenizer.bos_token_id else None
    if bos_id is not None:
        bos = tokenizer.convert_ids_to_tokens(bos_id)
        single, pair = f"{bos} $A {eos}", f"{bos} $A {eos} $B:1 {eos}:1"
        special = [(bos, bos_id), (eos, eos_id)]
    else:
        single, pair = f"$A {eos}", f"$A {eos} $B:1 {eos}:1"
        special = [(eos, eos_id)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tokenizer


@dataclass(frozen=True)
class TrainedDataset:
    """What the export records of a training dataset: its type, query instruction and number of queries."""

    type: str
    instruction: str | None
    queries: int


# MTEB task types (mteb.abstasks.task_metadata.TaskType) whose queries are written as a training dataset type wrote
# its queries, and the MTEB prompt type that takes the instruction: "query" for asymmetric tasks (documents get no
# prompt), None for tasks that embed every text alike (MTEB then looks the prompt up by the task type alone).
MTEB_TASK_TYPES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "retrieval": (("Retrieval", "query"), ("Reranking", "query")),
    "classification": (("Classification", None), ("MultilabelClassification", None)),
    "clustering": (("Clustering", None),),
}
RETRIEVAL_PROMPT = "Retrieval-query"  # the MTEB key of retrieval queries' prompt


def query_prompts(instructions: dict[str, str | None], template: str) -> dict[str, str]:
    """sentence-transformers prompts, per dataset: the query as :func:`pipeline.data.registry.format_query` writes
    it, up to the query itself (so that prompt + query is the training query)."""
    if not template.endswith("{query}"):
        log(f"query template {template!r} does not end with {{query}}: no sentence-transformers prompts exported")
        return {}
    return {name: format_query(template, ins, "") for name, ins in sorted(instructions.items()) if ins}


def mteb_prompts(datasets: dict[str, TrainedDataset], template: str) -> dict[str, str]:
    """The prompts MTEB's sentence-transformers wrapper looks up (``{TaskType}-query``, ``{TaskType}``; see
    ``get_prompt_name`` in mteb/models/abs_encoder.py, embeddings-benchmark/mteb): for each training dataset type,
    the query prompt of its datasets with the most queries (ties: the first name), under every MTEB task type of
    :data:`MTEB_TASK_TYPES`. No ``document`` key is written, so MTEB embeds documents without a prompt, as training
    did; a type trained without an instruction gets no key."""
    prompts = query_prompts({n: d.instruction for n, d in datasets.items()}, template)
    out: dict[str, str] = {}
    for dtype, targets in MTEB_TASK_TYPES.items():
        named = sorted((-d.queries, n) for n, d in datasets.items() if d.type == dtype and n in prompts)
        if not named:
            continue
        prompt = prompts[named[0][1]]
        for task_type, prompt_type in targets:
            out[f"{task_type}-{prompt_type}" if prompt_type else task_type] = prompt
    return out


def model_prompts(model_dir: str | Path) -> dict[str, str]:
    """The per-dataset query prompts of an exported (sentence-transformers) model directory; {} when it has none."""
    path = Path(model_dir) / ST_CONFIG
    if not path.is_file():
        return {}
    try:
        prompts = json.loads(path.read_text()).get("prompts") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return {str(k): str(v) for k, v in prompts.items() if v}


def merge_export_name(step: int) -> str:
    """The directory name (under ``RUN/export/``) of the merge export after optimizer step `step`:
    ``merge_step_<step>`` zero-padded to :data:`MERGE_EXPORT_DIGITS` digits, so that names sort as steps."""
    return f"{MERGE_EXPORT_PREFIX}{step:0{MERGE_EXPORT_DIGITS}d}"


def merge_export_step(name: str) -> int | None:
    """The step in a merge export's directory name, padded (:func:`merge_export_name`) or not (earlier versions:
    ``merge_step_9500``); None for any other name."""
    match = _MERGE_EXPORT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def export_step(model_dir: str | Path) -> int | None:
    """The training step an export recorded (``training_step`` in its sentence-transformers config); None when it
    recorded none (no such file or key: another model, or an export of an earlier version). ValueError naming the
    file and key when the value is not a step (an integer >= 0)."""
    path = Path(model_dir) / ST_CONFIG
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    step = cfg.get(STEP_KEY) if isinstance(cfg, dict) else None
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path}: {STEP_KEY} must be an integer >= 0, got {step!r}")
    return step


def write_sentence_transformers_files(
    out: Path, *, dim: int, pooling: str, normalize: bool, max_seq_length: int, prompts: dict[str, str],
    step: int | None = None,
) -> None:
    """The sentence-transformers files of the export (module docstring); `step`: the training step recorded in
    :data:`ST_CONFIG` (omitted when None)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2)
    )
    pool_cfg = {"word_embedding_dimension": dim, "include_prompt": True}
    for mode, key in ST_POOLING_KEYS.items():
        pool_cfg[key] = mode == pooling
    pool_cfg.update({"pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
                     "pooling_mode_weightedmean_tokens": False})
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2))
    st_config: dict[str, Any] = {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    if step is not None:
        st_config[STEP_KEY] = step
    (out / ST_CONFIG).write_text(json.dumps(st_config, indent=2))


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete directory `tmp` to `out`; an existing `out` is removed only once `tmp` has replaced it."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_model(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    eos_id: int,
    max_seq_length: int,
    datasets: dict[str, TrainedDataset],
    query_template: str,
    step: int | None = None,
    faults: FaultInjector = NO_FAULTS,
) -> Path:
    """Write the model directory (see module docstring). `model` is an EmbeddingModel or an engine around one;
    `datasets`: the training datasets (their instructions become the prompts); `step`: the optimizer step of the
    weights, recorded (:func:`export_step`; None: not recorded); `faults` injects write errors in tests."""
    base = getattr(model, "module", model)
    backbone = base.backbone
    state = consolidated_state_dict(backbone)
    out = Path(out_dir)
    error = ""
    if global_rank() == 0:
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            faults.check_write("export", out.name, tmp / "model.safetensors")
            if is_lora(backbone):
                save_merged_with_adapter(backbone, state, tmp)
            else:
                backbone.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            _eos_appending_tokenizer(tokenizer, eos_id).save_pretrained(str(tmp))
            write_sentence_transformers_files(
                tmp,
                dim=base.hidden_size,
                pooling=base.pooling,
                normalize=base.normalize,
                max_seq_length=max_seq_length,
                prompts={**query_prompts({n: d.instruction for n, d in datasets.items()}, query_template),
                         **mteb_prompts(datasets, query_template)},
                step=step,
            )
            move_into_place(tmp, out)
        except Exception as exc:  # noqa: BLE001 - OSError, or a serializer error wrapping one
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            where = f": {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
            error = " ".join(f"export to {out} failed ({reason}{where}); nothing was replaced".split())
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ExportError(error)
    log(f"exported model: {out}")
    return out
