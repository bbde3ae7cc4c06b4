"""Dry run of a training launch (``launch/train.py --check``): validate every input, then describe the run.

Nothing here initialises torch.distributed or allocates model weights. Every decision the run depends on is made
by the same function the trainer calls, so that the dry run cannot drift from the run. Checked, cheapest first:

* the YAML recipe (:func:`pipeline.config.load_config`: keys and types) and the values a type cannot catch
  (positive batch size and learning rate, fractions in range, dataset types of the loss keys
  (:func:`pipeline.training.losses.loss_type_problems`, as the trainer at start), ...);
* the world size: ``--hostfile`` (parsed like DeepSpeed does, :func:`pipeline.preflight.parse_hostfile`) with
  ``--num_nodes`` / ``--num_gpus`` limits, ``--world-size N``, or this machine's GPUs (1 process without any);
* the DeepSpeed JSON (DeepSpeed's own ZeRO section model; completed by
  :func:`pipeline.training.ds_config.training_ds_config` as the trainer does) and its consistency with the recipe:
  batch fields that are not ``"auto"`` must equal what the recipe implies, gradient_accumulation_steps must be 1
  (GradCache), fp16 and bf16 (:func:`pipeline.training.ds_config.deepspeed_bf16`) are not both on;
* the tokenizer loads (:func:`pipeline.model.embedding.load_tokenizer_for`); the model's transformers config loads
  (:func:`pipeline.model.embedding.load_hf_config`; parameters counted on the meta device, no memory), pooling /
  packing / attention / dtype resolve for the ranks' device (:func:`pipeline.model.embedding.resolve_model_settings`),
  the vocabulary covers the tokenizer;
* the data exactly as the trainer checks it at start (:func:`pipeline.data.loader.check_data`: directory, manifest,
  datasets, file sizes, tokenizer, sha256 when ``data.verify_checksums``), then the split and schedule for the
  resolved world size (training queries per dataset - a full global batch each with ``data.drop_last`` -,
  hard-negative counts per type).

The plan: world size, batch per rank and global, steps per epoch and in total (``TrainConfig.total_steps``),
datasets with their share of the steps (``HomogeneousSchedule.probabilities``), chunks per rank and real tokens per
step - measured by building the first steps' batches of every rank with the trainer's own code
(:func:`pipeline.data.loader.rank_batch`) and chunking them with GradCache's
:func:`pipeline.training.gradcache.step_chunks` - ZeRO stage, precision, attention, output directory and the
checkpoint the run starts from (``--resume``), and the steps of the merge exports (``train.merge_every`` /
``merge_window``, :class:`pipeline.training.trainer.EveryInLast`, the trainer's own rule).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, ConfigError, load_config
from pipeline.fallbacks import Fallback, load_fallbacks


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One problem: where (a config key or a file, with line when known) and what is wrong."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"

    @classmethod
    def from_message(cls, message: str) -> "Problem":
        """Split a one-line ``"<where>: <what>"`` message (ConfigError, ShardError, ...) into a Problem."""
        where, sep, what = " ".join(str(message).split()).partition(": ")
        return cls(where, what) if sep else cls("config", where)


class _Stop(Exception):
    """Internal: a check that other checks depend on failed."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


@dataclass
class WorldPlan:
    """How many ranks the run will have, and from what."""

    size: int
    source: str
    hosts: dict[str, int] | None = None


@dataclass
class DatasetPlan:
    """One trained (or skipped) dataset."""

    name: str
    type: str
    train_queries: int
    validation_queries: int
    batches_per_epoch: int  # global batches available per epoch
    steps_epoch0: int  # steps the schedule gives it in epoch 0
    weight: float  # sampling probability per step (n_batches ** (1 / T), normalised)
    hard_negatives: int
    validation_batches: int


@dataclass
class StepSample:
    """Per-step work measured on the first `steps` global batches of epoch 0, every rank's slice."""

    steps: int
    chunks_run_mean: float  # chunks every rank runs (max over ranks, as GradCache pads to it)
    chunks_run_max: int
    chunks_run_min: int
    real_tokens_mean: float  # summed over ranks
    real_tokens_min: int
    real_tokens_max: int
    computed_tokens_mean: float  # real + padding, summed over ranks
    sequences_per_step: float  # summed over ranks
    chunks_run: list[int] = field(default_factory=list)  # per measured step
    real_tokens: list[int] = field(default_factory=list)  # per measured step
    chunk_tokens: int | str | None = None  # the budget the steps were chunked with (auto: as the trainer resolves it)
    work_tokens: int | None = None  # chunk_tokens auto: the most real tokens a rank has in one of the first steps


@dataclass
class ModelPlan:
    """The model as the ranks will build it, resolved from its config only."""

    model_type: str
    decoder: bool
    parameters: int | None
    non_embedding_parameters: int | None
    hidden_size: int | None
    layers: int | None
    attention: str
    dtype: str
    pooling: str
    packed: bool
    gradient_checkpointing: bool
    kernels: str  # "liger" / "none", with the reason
    compile: bool
    attention_mask: str = "causal"  # or "bidirectional"
    training: str = "full fine-tuning"  # or the LoRA adapters and their trainable parameters
    compile_auto: bool = False  # model.compile auto: eager layers if compiling fails at start


@dataclass
class DeepSpeedPlan:
    path: str
    zero_stage: int
    offload: str
    bf16: bool
    fp16: bool


@dataclass
class RunPlan:
    """Everything ``--check`` resolved."""

    config: str
    world: WorldPlan
    device: str
    per_device_batch: int
    global_batch: int
    steps_per_epoch: int
    epochs: float
    max_steps: int | None
    total_steps: int
    sampling_temperature: float
    datasets: list[DatasetPlan]
    skipped: list[str]
    sample: StepSample
    model: ModelPlan
    deepspeed: DeepSpeedPlan
    gradcache: str
    shards: str
    verify_checksums: bool
    output_dir: str
    resume: str  # what the run starts from
    merge_steps: list[int] = field(default_factory=list)  # steps exported to export/merge_step_<N, 8 digits>
    score_distill: str = "off"  # loss.score_distill: the teachers whose scores the trained datasets hold
    fallbacks: list[Fallback] = field(default_factory=list)  # what the last run in output_dir fell back from


@dataclass
class CheckReport:
    plan: RunPlan | None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------------------------------------------
# World size
# --------------------------------------------------------------------------------------------------------------
def resolve_world(
    *,
    hostfile: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
    world_size: int | None = None,
    device: str = "cpu",
) -> WorldPlan:
    """World size as the DeepSpeed launcher would make it (raises _Stop on a bad hostfile or option).

    ``--hostfile``: the first ``num_nodes`` hosts (default all), ``num_gpus`` ranks on each (default its slots,
    at most its slots). Without a hostfile: ``num_nodes`` x ``num_gpus``, ``num_gpus`` defaulting to this
    machine's GPUs when the ranks use CUDA, else 1. ``world_size`` sets it directly.
    """
    from pipeline.preflight import PreflightError, parse_hostfile

    for name, value in (("--num_nodes", num_nodes), ("--num_gpus", num_gpus), ("--world-size", world_size)):
        if value is not None and value < 1:
            raise _Stop(Problem(name, f"must be >= 1, got {value}"))
    if world_size is not None:
        if hostfile is not None or num_nodes is not None or num_gpus is not None:
            raise _Stop(Problem("--world-size", "give either --world-size or --hostfile/--num_nodes/--num_gpus"))
        return WorldPlan(world_size, "--world-size")
    if hostfile is not None:
        try:
            hosts = parse_hostfile(hostfile)
        except PreflightError as exc:
            raise _Stop(Problem.from_message(str(exc))) from None
        if num_nodes is not None:
            if num_nodes > len(hosts):
                raise _Stop(Problem("--num_nodes", f"{num_nodes} but {hostfile} lists {len(hosts)} host(s)"))
            hosts = dict(list(hosts.items())[:num_nodes])
        if num_gpus is not None:
            short = [h for h, slots in hosts.items() if slots < num_gpus]
            if short:
                raise _Stop(Problem("--num_gpus", f"{num_gpus} but host {short[0]} has {hosts[short[0]]} slot(s)"))
            hosts = {h: num_gpus for h in hosts}
        listing = ", ".join(f"{h} {s}" for h, s in hosts.items())
        return WorldPlan(sum(hosts.values()), f"hostfile {hostfile}: {len(hosts)} host(s) ({listing})", hosts)
    nodes = num_nodes or 1
    if num_gpus is not None:
        per_node, what = num_gpus, "--num_gpus"
    elif device == "cuda":
        import torch

        per_node, what = max(torch.cuda.device_count(), 1), "this machine's GPUs"
    else:
        per_node, what = 1, "one CPU process (set --world-size, --num_gpus or --hostfile)"
    return WorldPlan(nodes * per_node, f"{nodes} node(s) x {per_node} ({what})")


# --------------------------------------------------------------------------------------------------------------
# Individual checks
# --------------------------------------------------------------------------------------------------------------
def value_problems(cfg: Config) -> list[Problem]:
    """Values that have the right type but cannot work."""
    t, d, g, lo = cfg.train, cfg.data, cfg.gradcache, cfg.loss
    rules: list[tuple[str, bool, str]] = [
        ("train.per_device_batch_size", t.per_device_batch_size >= 1, f"must be >= 1, got {t.per_device_batch_size}"),
        ("train.epochs", t.epochs > 0 or t.max_steps is not None, f"must be > 0, got {t.epochs}"),
        ("train.max_steps", t.max_steps is None or t.max_steps >= 1, f"must be >= 1 or null, got {t.max_steps}"),
        ("train.lr", t.lr > 0, f"must be > 0, got {t.lr}"),
        ("train.min_lr", 0 <= t.min_lr and (t.lr <= 0 or t.min_lr <= t.lr),
         f"must be in [0, train.lr], got {t.min_lr}"),
        ("train.warmup_steps", t.warmup_steps >= 0, f"must be >= 0, got {t.warmup_steps}"),
        ("train.betas", len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
         f"expected [b1, b2] in [0, 1), got {t.betas}"),
        ("train.grad_clip", t.grad_clip >= 0, f"must be >= 0, got {t.grad_clip}"),
        ("train.keep_last", t.keep_last >= 1, f"must be >= 1, got {t.keep_last}"),
        ("train.log_every", t.log_every >= 0, f"must be >= 0, got {t.log_every}"),
        ("train.eval_every", t.eval_every >= 0, f"must be >= 0, got {t.eval_every}"),
        ("train.save_every", t.save_every >= 0, f"must be >= 0, got {t.save_every}"),
        ("train.merge_window", t.merge_window >= 0, f"must be >= 0, got {t.merge_window}"),
        ("train.merge_every", t.merge_every >= 0, f"must be >= 0, got {t.merge_every}"),
        ("train.collective_timeout_s", t.collective_timeout_s > 0, f"must be > 0, got {t.collective_timeout_s}"),
        ("train.max_consecutive_skips", t.max_consecutive_skips >= 1, f"must be >= 1, got {t.max_consecutive_skips}"),
        ("data.validation_fraction", 0 <= d.validation_fraction < 1, f"must be in [0, 1), got {d.validation_fraction}"),
        ("data.sampling_temperature", d.sampling_temperature > 0, f"must be > 0, got {d.sampling_temperature}"),
        ("data.num_workers", d.num_workers >= 0, f"must be >= 0, got {d.num_workers}"),
        ("loss.temperature", lo.temperature > 0, f"must be > 0, got {lo.temperature}"),
        ("loss.distill.weight", lo.distill is None or lo.distill.weight > 0,
         f"must be > 0, got {lo.distill.weight if lo.distill else None}"),
        ("loss.score_distill.weight", lo.score_distill is None or lo.score_distill.weight > 0,
         f"must be > 0, got {lo.score_distill.weight if lo.score_distill else None}"),
        ("loss.score_distill.teacher_temperature", lo.score_distill is None or lo.score_distill.teacher_temperature > 0,
         f"must be > 0, got {lo.score_distill.teacher_temperature if lo.score_distill else None}"),
        ("gradcache.chunk_tokens", g.chunk_tokens in (None, "auto") or g.chunk_tokens >= 1,
         f"must be >= 1, auto or null, got {g.chunk_tokens}"),
        ("gradcache.chunk_size", g.chunk_size is None or g.chunk_size >= 1,
         f"must be >= 1 or null, got {g.chunk_size}"),
        ("model", (cfg.model.name_or_path is None) != (cfg.model.from_config is None),
         "set exactly one of name_or_path and from_config"),
        ("train.retrieval_eval_every", t.retrieval_eval_every is None or t.retrieval_eval_every >= 1,
         f"must be >= 1 or null, got {t.retrieval_eval_every}"),
        ("train.retrieval_eval_max_docs", t.retrieval_eval_max_docs is None or t.retrieval_eval_max_docs >= 1,
         f"must be >= 1 or null, got {t.retrieval_eval_max_docs}"),
    ]
    problems = [Problem(key, what) for key, ok, what in rules if not ok]
    from pipeline.training.keep_best import keep_best_problem
    from pipeline.training.losses import loss_type_problems
    from pipeline.training.metrics import report_to_problem

    problems += [Problem.from_message(line) for line in loss_type_problems(lo)]
    for key, what in (("train.keep_best", keep_best_problem(t)), ("train.report_to", report_to_problem(t.report_to))):
        if what:
            problems.append(Problem(key, what))
    for key, count in lo.hard_negatives.items():
        if count < 0:
            problems.append(Problem(f"loss.hard_negatives.{key}", f"must be >= 0, got {count}"))
    out = Path(t.output_dir)
    existing = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK)):
        problems.append(Problem("train.output_dir", f"{existing} is not a writable directory"))
    return problems


def load_tokenizer(cfg: Config) -> Any:
    """The tokenizer the trainer will load (:func:`pipeline.model.embedding.load_tokenizer_for`); raises _Stop."""
    from pipeline.model.embedding import load_tokenizer_for

    try:
        return load_tokenizer_for(cfg.model)
    except ValueError as exc:
        raise _Stop(Problem.from_message(str(exc))) from None


def check_deepspeed(cfg: Config, world: int, device: str) -> DeepSpeedPlan:
    """The DeepSpeed JSON: readable, a valid ZeRO section, consistent with the recipe; raises _Stop."""
    import json

    from pipeline.training.ds_config import deepspeed_bf16, training_ds_config

    path = cfg.deepspeed
    micro = cfg.train.per_device_batch_size
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise _Stop(Problem(path, f"cannot read DeepSpeed config ({exc.strerror}; key deepspeed)")) from None
    except json.JSONDecodeError as exc:
        raise _Stop(Problem(path, f"invalid JSON ({exc.msg} at line {exc.lineno})")) from None
    if not isinstance(raw, dict):
        raise _Stop(Problem(path, "expected a JSON object at the top level"))
    expected = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                "train_batch_size": micro * world}
    for key, want in expected.items():
        value = raw.get(key, "auto")
        if value != "auto" and value != want:
            why = "GradCache needs 1" if key == "gradient_accumulation_steps" else "from train.per_device_batch_size"
            raise _Stop(Problem(f"{path}: {key}", f"is {value!r}, expected \"auto\" or {want} ({why})"))
    zero = raw.get("zero_optimization", {})
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        zcfg = DeepSpeedZeroConfig(**zero)
    except TypeError:
        raise _Stop(Problem(f"{path}: zero_optimization", "expected a JSON object")) from None
    except Exception as exc:  # noqa: BLE001 - pydantic.ValidationError
        errors = getattr(exc, "errors", None)
        if callable(errors) and errors():
            first = errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise _Stop(Problem(f"{path}: zero_optimization.{loc}".rstrip("."), first.get("msg", str(exc)))) from None
        raise _Stop(Problem(f"{path}: zero_optimization", " ".join(str(exc).split()))) from None
    use_bf16 = deepspeed_bf16(cfg.model.dtype, device)
    try:
        ds = training_ds_config(cfg, world_size=world, device_type=device)
    except ValueError as exc:
        raise _Stop(Problem.from_message(str(exc))) from None
    fp16 = isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") in (True, "auto") and device == "cuda"
    if fp16 and use_bf16:
        raise _Stop(Problem(f"{path}: fp16.enabled", "fp16 is on but the run uses bf16 (model.dtype); set it false"))
    offload = [f"{what} -> {getattr(getattr(zcfg, attr), 'device', 'none')}"
               for what, attr in (("optimizer", "offload_optimizer"), ("parameters", "offload_param"))
               if getattr(zcfg, attr) is not None and str(getattr(getattr(zcfg, attr), "device", "none")) != "none"]
    stage = int(zcfg.stage)
    return DeepSpeedPlan(path, stage, ", ".join(str(o) for o in offload) or "no offload", use_bf16, fp16)


def check_model(cfg: Config, device: str, tokenizer: Any | None, warnings: list[Problem]) -> ModelPlan:
    """Resolve the model settings from its config only, as the trainer does (:func:`pipeline.model.embedding.
    resolve_model_settings`), parameters counted on the meta device; raises _Stop."""
    import torch
    from transformers import AutoModel

    from pipeline.model.embedding import check_vocabulary, load_hf_config, resolve_model_settings

    requested = cfg.model.attn_implementation
    here = device == "cpu" or torch.cuda.is_available()
    # flash-attn and liger-kernel can only be checked on a machine with the ranks' device; elsewhere they are assumed
    # to import (a warning says so when they are required).
    flash = None if here else requested == "flash_attention_2"
    liger = None if here else True
    if not here and cfg.model.kernels == "liger":
        warnings.append(Problem("model.kernels", "liger: liger-kernel cannot be checked without CUDA on this machine; "
                                "make sure it imports on the GPU nodes (pip install -e '.[gpu]')"))
    try:
        hf = load_hf_config(cfg.model)
        settings = resolve_model_settings(cfg.model, hf, torch.device(device), flash=flash, liger=liger)
    except ValueError as exc:
        raise _Stop(Problem.from_message(str(exc))) from None
    attention = settings.attn_implementation
    if not here:
        if requested == "flash_attention_2":
            warnings.append(Problem("model.attn_implementation", f"{requested}: flash-attn cannot be checked "
                                    "without CUDA on this machine; make sure it imports on the GPU nodes"))
        elif requested == "auto":
            attention += " (resolved for CUDA without flash-attn here; flash_attention_2 where it imports)"
    params = non_embedding = None
    training = "full fine-tuning"
    try:
        with torch.device("meta"):
            backbone = AutoModel.from_config(hf, trust_remote_code=cfg.model.trust_remote_code)
        params = sum(p.numel() for p in backbone.parameters())
        non_embedding = params - backbone.get_input_embeddings().weight.numel()
        vocab = backbone.get_input_embeddings().num_embeddings
    except Exception as exc:  # noqa: BLE001 - the count is information; the build itself is the trainer's
        backbone, vocab = None, getattr(hf, "vocab_size", None)
        warnings.append(Problem("model", f"parameters not counted ({type(exc).__name__})"))
    if cfg.model.lora is not None and backbone is not None:  # the trainer's adapters, on the meta model
        from pipeline.model.lora import apply_lora, describe_lora

        try:
            with torch.device("meta"):
                training = f"LoRA {describe_lora(apply_lora(backbone, cfg.model.lora))}"
        except ValueError as exc:
            raise _Stop(Problem.from_message(str(exc))) from None
    if tokenizer is not None and vocab is not None:
        try:
            check_vocabulary(vocab, tokenizer)
        except ValueError as exc:
            raise _Stop(Problem.from_message(str(exc))) from None
    return ModelPlan(
        model_type=hf.model_type, decoder=settings.decoder, parameters=params, non_embedding_parameters=non_embedding,
        hidden_size=getattr(hf, "hidden_size", None), layers=getattr(hf, "num_hidden_layers", None),
        attention=attention, dtype=str(settings.dtype).removeprefix("torch."), pooling=settings.pooling,
        packed=settings.packed, gradient_checkpointing=cfg.model.gradient_checkpointing,
        kernels=f"{settings.kernels.kernels} ({settings.kernels.reason})", compile=settings.compile,
        compile_auto=settings.compile_auto,
        attention_mask=settings.attention_mask, training=training,
    )


def check_data_plan(
    cfg: Config, tokenizer: Any | None, world: int, *, packed: bool, device: str, sample_steps: int,
    warnings: list[Problem],
) -> tuple[list[DatasetPlan], list[str], int, StepSample]:
    """The trainer's data checks, split and schedule for `world` ranks, and the first steps measured (with the
    chunk budget the run will use: ``chunk_tokens: auto`` bounded by the work per step as the trainer bounds it,
    :func:`pipeline.training.chunk_budget.resolve_chunk_tokens`)."""
    import dataclasses

    from pipeline.data.loader import TrainData, check_data, rank_batch
    from pipeline.data.shard_format import ShardError
    from pipeline.model.packing import chunk_cost
    from pipeline.training.chunk_budget import (WORK_SAMPLE_STEPS, auto_ceiling, describe_work,
                                                unprobed_chunk_tokens)
    from pipeline.training.gradcache import step_chunks

    try:
        check_data(cfg.data, tokenizer, scores=cfg.loss.score_distill is not None)
        data = TrainData(cfg.data, cfg.loss, seed=cfg.train.seed, per_device_batch=cfg.train.per_device_batch_size,
                         world_size=world, rank=0, verify=False)
    except ShardError as exc:
        raise _Stop(Problem.from_message(str(exc))) from None
    except ValueError as exc:  # schedule: no dataset with training queries; hard negatives per type
        raise _Stop(Problem("data", " ".join(str(exc).split()))) from None
    schedule = data.schedule
    names, _ = schedule.epoch_plan(0)
    steps_epoch0 = {n: names.count(n) for n in schedule.datasets}
    weights = dict(zip(schedule.datasets, schedule.probabilities().tolist()))
    datasets = []
    for name in sorted(data.reader.datasets):
        ds = data.reader[name]
        n_val = len(data.val_ids[name])
        datasets.append(DatasetPlan(
            name=name, type=ds.type, train_queries=len(data.train_ids[name]), validation_queries=n_val,
            batches_per_epoch=schedule.n_batches[name], steps_epoch0=steps_epoch0.get(name, 0),
            weight=weights.get(name, 0.0), hard_negatives=data.plan.n_neg[name],
            validation_batches=data.validation_steps(name),
        ))
    for name in schedule.skipped:
        warnings.append(Problem(f"data: dataset {name}", schedule.skip_reason(name)))
    if cfg.train.eval_every and not any(d.validation_batches for d in datasets):
        warnings.append(Problem("data.validation_fraction", "no dataset holds out a query: no validation loss"))
    steps = min(sample_steps, schedule.steps_per_epoch)
    chunks_run, real, computed, seqs = [], [], [], []
    gc, work = cfg.gradcache, None
    if gc.chunk_tokens == "auto":  # the trainer's bound: the most tokens a rank has in the first steps, all ranks
        work = max(data.most_step_tokens(WORK_SAMPLE_STEPS, rank) for rank in range(world))
        assumed = auto_ceiling(work) if device == "cuda" else unprobed_chunk_tokens(work)
        gc = dataclasses.replace(gc, chunk_tokens=assumed)
        if device == "cuda":
            warnings.append(Problem("gradcache.chunk_tokens", f"auto is probed on the GPUs at start, "
                                    f"{describe_work(work)}; the per-step numbers below assume {gc.chunk_tokens}"))
    for step in range(steps):
        per_rank_chunks, step_real, step_computed, step_seqs = [], 0, 0, 0
        for rank in range(world):
            _, batch = rank_batch(data.plan, schedule, data.reader, 0, step, rank)
            lengths = [len(s) for s in batch.sequences()]
            chunks = step_chunks(lengths, packed=packed, gc=gc)
            per_rank_chunks.append(len(chunks))
            step_real += sum(lengths)
            step_computed += sum(chunk_cost([lengths[i] for i in idx], packed=packed) for idx in chunks)
            step_seqs += len(lengths)
        chunks_run.append(max(per_rank_chunks))
        real.append(step_real)
        computed.append(step_computed)
        seqs.append(step_seqs)
    sample = StepSample(
        steps=steps, chunks_run_mean=float(np.mean(chunks_run)), chunks_run_max=max(chunks_run),
        chunks_run_min=min(chunks_run), real_tokens_mean=float(np.mean(real)), real_tokens_min=min(real),
        real_tokens_max=max(real), computed_tokens_mean=float(np.mean(computed)),
        sequences_per_step=float(np.mean(seqs)), chunks_run=chunks_run, real_tokens=real,
        chunk_tokens=gc.chunk_tokens, work_tokens=work,
    )
    return datasets, list(schedule.skipped), schedule.steps_per_epoch, sample


def check_teacher(cfg: Config) -> None:
    """``loss.distill``: the teacher's tokenizer is the shards' (the trainer's own check); raises _Stop."""
    from pipeline.data.shards import read_manifest
    from pipeline.training.teacher import check_teacher_tokenizer

    try:
        check_teacher_tokenizer(cfg.loss.distill, read_manifest(cfg.data.shards)["tokenizer"],
                                trust_remote_code=cfg.model.trust_remote_code)
    except ValueError as exc:
        raise _Stop(Problem.from_message(str(exc))) from None


def describe_score_distill(cfg: Config, datasets: list[DatasetPlan]) -> str:
    """``loss.score_distill`` in the plan: its settings and the teacher(s) whose scores the trained datasets hold (as
    recorded by `preprocess score`; :func:`pipeline.data.loader.check_teacher_scores` has checked they exist)."""
    from pipeline.data.shards import read_manifest

    sd = cfg.loss.score_distill
    if sd is None:
        return "off"
    entries = read_manifest(cfg.data.shards)["datasets"]
    owners = [entries[d.name]["scores"]["teacher"] for d in datasets]
    teachers = sorted({f"{t['name_or_path']} ({t['kind']})" for t in owners})
    return (f"weight {sd.weight:g}, teacher temperature {sd.teacher_temperature:g}, student temperature "
            f"{cfg.loss.temperature:g}; scores of {', '.join(teachers)}")


def resume_checkpoint(cfg: Config, resume: str | None = None, *, world_size: int = 1, force: bool = False,
                      warnings: list[Problem] | None = None) -> str:
    """What the run will start from: with ``--resume auto`` the newest complete checkpoint (or a fresh start when
    there is none), with ``--resume TAG`` that checkpoint, else a fresh start (naming the checkpoint ``--resume auto``
    would load, if any). The trainer's own decision (:func:`pipeline.training.resume.resume_point`): raises _Stop
    when the tag is not a complete checkpoint or the run identity changed (unless `force`; its warnings are added to
    `warnings`)."""
    from pipeline.data.shards import read_manifest
    from pipeline.training.checkpoint import CheckpointManager
    from pipeline.training.resume import ResumeRefused, resume_point
    from pipeline.training.run_identity import run_identity

    manager = CheckpointManager(Path(cfg.train.output_dir) / "checkpoints", cfg.train.keep_last)

    def describe(tag: str) -> str:
        step = manager.info(tag).step
        return f"{manager.root / tag} (step {step})" if step is not None else str(manager.root / tag)

    if resume is None:
        tag = manager.latest()
        return f"fresh start (--resume auto would load {describe(tag)})" if tag else "fresh start (no complete checkpoint)"
    try:
        identity = run_identity(cfg, read_manifest(cfg.data.shards), world_size)
    except ValueError:  # ShardError, a model config or teacher that cannot load: reported by the data, model and
        identity = None  # teacher checks; the checkpoint is then not compared
    try:
        point = resume_point(manager, resume, identity, world_size, force=force)
    except ResumeRefused as exc:
        raise _Stop(Problem.from_message(str(exc))) from None
    if point is None:
        return f"fresh start (no complete checkpoint in {manager.root})"
    if warnings is not None:
        warnings.extend(Problem.from_message(line) for line in point.warnings)
    return f"resumes from {point.describe()}"


# --------------------------------------------------------------------------------------------------------------
# The whole check
# --------------------------------------------------------------------------------------------------------------
def check_run(
    config: str | Path,
    overrides: list[str] | None = None,
    *,
    hostfile: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
    world_size: int | None = None,
    device: str = "auto",
    sample_steps: int = 8,
    resume: str | None = None,
    resume_force: bool = False,
) -> CheckReport:
    """Run every check; problems are collected (one per failed check), the plan is built when there are none."""
    import torch

    from pipeline.training.trainer import EveryInLast

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    report = CheckReport(plan=None)
    problems, warnings = report.problems, report.warnings

    def attempt(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _Stop as stop:
            problems.append(stop.problem)
            return None

    cfg = None
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        problems.append(Problem.from_message(str(exc)))
    world = attempt(resolve_world, hostfile=hostfile, num_nodes=num_nodes, num_gpus=num_gpus,
                    world_size=world_size, device=device)
    if cfg is None:
        return report
    problems.extend(value_problems(cfg))
    if problems:  # the remaining checks assume sane values
        return report
    size = world.size if world is not None else 1
    tokenizer = attempt(load_tokenizer, cfg)
    ds_plan = attempt(check_deepspeed, cfg, size, device)
    model = attempt(check_model, cfg, device, tokenizer, warnings)
    data = None
    if world is not None:
        packed = model.packed if model is not None else True
        data = attempt(check_data_plan, cfg, tokenizer, size, packed=packed, device=device,
                       sample_steps=sample_steps, warnings=warnings)
    if cfg.loss.distill is not None and data is not None:
        attempt(check_teacher, cfg)
    start = attempt(resume_checkpoint, cfg, resume, world_size=size, force=resume_force, warnings=warnings)
    if problems or world is None or ds_plan is None or model is None or data is None or start is None:
        return report
    datasets, skipped, steps_per_epoch, sample = data
    t = cfg.train
    total = t.total_steps(steps_per_epoch)
    gc = cfg.gradcache
    budget = f"chunk_tokens {gc.chunk_tokens}" if gc.chunk_tokens is not None else (
        f"chunk_size {gc.chunk_size}" if gc.chunk_size is not None else "one chunk")
    if gc.chunk_tokens == "auto":
        from pipeline.training.chunk_budget import describe_work

        budget = (f"chunk_tokens auto (probed on the GPUs at start, {describe_work(sample.work_tokens)}; "
                  f"{sample.chunk_tokens} assumed here)" if device == "cuda" else
                  f"chunk_tokens auto = {sample.chunk_tokens} (no GPU to probe; {describe_work(sample.work_tokens)})")
    report.plan = RunPlan(
        config=str(config), world=world, device=device, per_device_batch=t.per_device_batch_size,
        global_batch=t.per_device_batch_size * size, steps_per_epoch=steps_per_epoch, epochs=t.epochs,
        max_steps=t.max_steps, total_steps=total, sampling_temperature=cfg.data.sampling_temperature,
        datasets=datasets, skipped=skipped, sample=sample, model=model, deepspeed=ds_plan,
        gradcache=f"{'on' if gc.enabled else 'off (plain backward, same chunks)'}, {budget}",
        shards=cfg.data.shards, verify_checksums=cfg.data.verify_checksums, output_dir=t.output_dir,
        resume=start, merge_steps=EveryInLast(t.merge_every, t.merge_window, total).planned(),
        score_distill=describe_score_distill(cfg, datasets), fallbacks=attempt(last_fallbacks, t.output_dir) or [],
    )
    return report


def last_fallbacks(output_dir: str) -> list[Fallback]:
    """The ``auto`` settings the last run in `output_dir` fell back from (:mod:`pipeline.fallbacks`); raises _Stop
    on an unreadable record."""
    try:
        return load_fallbacks(output_dir)
    except ValueError as exc:
        raise _Stop(Problem.from_message(str(exc))) from None


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------
def _millions(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _merge_exports(plan: RunPlan) -> str:
    """The merge exports line: the steps and the directories the trainer names them (first to last)."""
    from pipeline.training.export import merge_export_name

    if not plan.merge_steps:
        return "none"
    names = f"export/{merge_export_name(plan.merge_steps[0])}"
    if len(plan.merge_steps) > 1:
        names += f" to {merge_export_name(plan.merge_steps[-1])}"
    return f"after steps {', '.join(map(str, plan.merge_steps))}: {names} (for python -m pipeline.merge)"


def _compiled(m: ModelPlan) -> str:
    """How the layers run (``model.compile``, :mod:`pipeline.model.compiled`)."""
    if not m.compile:
        return "eager"
    shapes = "dynamic token dimension, chunks unpadded" if m.packed else "dynamic shapes"
    soft = "; auto: eager if compiling fails at start" if m.compile_auto else ""
    return f"compiled (torch.compile per layer, {shapes}{soft})"


def _fallbacks(plan: RunPlan) -> str:
    """What the last run in the output dir fell back from (``RUN/fallbacks.json``)."""
    if not plan.fallbacks:
        return "none recorded"
    return "; ".join(f.describe() for f in plan.fallbacks)


def format_plan(plan: RunPlan) -> str:
    """The plan as aligned text lines (what ``--check`` prints)."""
    m, ds, s = plan.model, plan.deepspeed, plan.sample
    if plan.max_steps is not None:
        steps = f"{plan.steps_per_epoch} per epoch; {plan.total_steps} in total (train.max_steps)"
    else:
        steps = (f"{plan.steps_per_epoch} per epoch; {plan.total_steps} in total ({plan.epochs:g} "
                 f"epoch{'' if plan.epochs == 1 else 's'})")
    precision = f"{m.dtype} weights and compute" + (", DeepSpeed bf16" if ds.bf16 else "") + (
        ", DeepSpeed fp16" if ds.fp16 else "")
    real_per_rank = s.real_tokens_mean / plan.world.size
    lines = [
        f"plan for {plan.config} (checked without starting training)",
        f"  world size         {plan.world.size}   [{plan.world.source}]",
        f"  device             {plan.device}",
        f"  batch              {plan.per_device_batch} queries per rank, {plan.global_batch} global",
        f"  steps              {steps}",
        f"  datasets           {len(plan.datasets) - len(plan.skipped)} trained of {len(plan.datasets)} "
        f"(sampling temperature {plan.sampling_temperature:g}; weight = share of steps)",
        f"    {'name':<20} {'type':<15} {'train q':>8} {'val q':>6} {'batches/ep':>10} {'steps ep0':>9} "
        f"{'weight':>7} {'hard neg':>8} {'val batches':>11}",
    ]
    for d in plan.datasets:
        lines.append(
            f"    {d.name:<20} {d.type:<15} {d.train_queries:>8} {d.validation_queries:>6} {d.batches_per_epoch:>10} "
            f"{d.steps_epoch0:>9} {d.weight:>7.3f} {d.hard_negatives:>8} {d.validation_batches:>11}"
        )
    lines += [
        f"  per step           measured on the first {s.steps} steps' batches of epoch 0, every rank's slice:",
        f"    sequences        {s.sequences_per_step:,.0f} per step (queries, positives, hard negatives; all ranks)",
        f"    chunks per rank  mean {s.chunks_run_mean:.2f}, min {s.chunks_run_min}, max {s.chunks_run_max} "
        f"(the most any rank needs; gradcache {plan.gradcache}, {'packed' if m.packed else 'padded'} chunks)",
        f"    tokens per step  mean {s.real_tokens_mean:,.0f} real tokens (min {s.real_tokens_min:,}, max "
        f"{s.real_tokens_max:,}; {real_per_rank:,.0f} per rank); computed {s.computed_tokens_mean:,.0f} "
        f"(padding efficiency {s.real_tokens_mean / max(s.computed_tokens_mean, 1):.1%})",
        f"  model              {m.model_type} ({'decoder' if m.decoder else 'encoder'}), {_millions(m.parameters)} "
        f"parameters ({_millions(m.non_embedding_parameters)} non-embedding; counted from the config), hidden "
        f"{m.hidden_size}, {m.layers} layers",
        f"  training           {m.training}",
        f"  attention          {m.attention}, {m.attention_mask} mask; pooling {m.pooling}; gradient checkpointing "
        f"{'on' if m.gradient_checkpointing else 'off'}",
        f"  kernels            {m.kernels}; layers {_compiled(m)}",
        f"  precision          {precision}",
        f"  score distillation {plan.score_distill}",
        f"  deepspeed          {ds.path}: ZeRO stage {ds.zero_stage}, {ds.offload}",
        f"  shards             {plan.shards} (sizes checked, "
        f"{'sha256 verified' if plan.verify_checksums else 'sha256 not verified: data.verify_checksums false'})",
        f"  output dir         {plan.output_dir}",
        f"  merge exports      {_merge_exports(plan)}",
        f"  start              {plan.resume}",
        f"  last fallbacks     {_fallbacks(plan)} (auto settings that failed at their first use in {plan.output_dir})",
    ]
    return "\n".join(lines)


def check_command(config: str | Path, overrides: list[str] | None = None, **options: Any) -> int:
    """``--check``: run :func:`check_run` with `options`, print problems (stderr) or the plan (stdout).

    Returns the exit status: 0 when everything is valid, 2 otherwise (every problem on its own line,
    ``error: <key or file>: <what>``). Warnings (``warning: ...``) do not change the status.
    """
    import sys

    report = check_run(config, overrides, **options)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    if not report.ok or report.plan is None:
        if report.ok:  # pragma: no cover - every failed check records a problem
            print("error: check: incomplete (a check failed without a message)", file=sys.stderr)
        return 2
    print(format_plan(report.plan))
    print("check: OK")
    return 0
