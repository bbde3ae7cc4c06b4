"""Dry run of a training launch (``launch/train.py --check``): validate every input, then describe the run.

Nothing here initialises torch.distributed or allocates model weights. Every decision the run depends on is made
by the same function the trainer calls, so that the dry run cannot drift from the run. Checked, cheapest first:

* the YAML recipe (:func:`pipeline.config.load_config`: keys and types) and the values a type cannot catch
  (positive batch size and learning rate, fractions in range, dataset types of the loss keys
  (:func:`pipeline.training.losses.loss_type_problems`, as the trainer at start), ...);
* the world size: ``--hostfile`` (parsed like DeepSpeed does, :func:`pipeline.preflight.parse_hostfile`) with
  ``--num_nodes`` / ``--num_gpus`` limits, ``--world-size N``, or this machine's GPUs (1 process without any);
* the DeepSpeed JSON (read by :func:`pipeline.training.ds_config.read_ds_json` and completed by
  :func:`pipeline.training.ds_config.training_ds_config`, as the trainer does; its ZeRO section read with DeepSpeed's
  own model, the stage taken by the trainer's :func:`pipeline.training.chunk_budget.optimizer_residency`) and its
  consistency with the recipe: batch fields that are not ``"auto"`` must equal what the recipe implies,
  gradient_accumulation_steps must be 1 (GradCache), fp16 (:func:`pipeline.training.ds_config.deepspeed_fp16`) is
  not left on beside bf16 (:func:`pipeline.training.ds_config.deepspeed_bf16`), grad_accum_dtype is one DeepSpeed
  knows;
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
``merge_window``, :class:`pipeline.training.trainer.EveryInLast`, the trainer's own rule). This module decides;
:mod:`pipeline.training.plan_format` writes the plan as text.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from pipeline.config import Config, ConfigError, GradCacheConfig, load_config
from pipeline.fallbacks import Fallback, load_fallbacks
from pipeline.training.plan_format import format_plan

if TYPE_CHECKING:
    from pipeline.data.loader import TrainData
    from pipeline.training.resume import ResumePoint


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


@contextmanager
def _stop_on(*errors: type[Exception]) -> Iterator[None]:
    """Turn the one-line errors of the trainer's own functions (ValueError and its kin) into a _Stop."""
    try:
        yield
    except errors as exc:
        raise _Stop(Problem.from_message(str(exc))) from None


@dataclass
class WorldPlan:
    """How many ranks the run will have, and from what: ``--world-size`` (`per_node` None), a hostfile's `hosts`,
    or `nodes` x `per_node` ranks (`per_node_from`: ``--num_gpus``, ``cuda`` (this machine's GPUs) or ``cpu``)."""

    size: int
    hostfile: str | None = None
    hosts: dict[str, int] | None = None
    nodes: int = 1
    per_node: int | None = None
    per_node_from: str = ""


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
    kernels: str  # "liger" / "none"
    kernels_reason: str
    compile: bool
    attention_mask: str = "causal"  # or "bidirectional"
    lora: str | None = None  # the LoRA adapters and their trainable parameters; None: full fine-tuning
    compile_auto: bool = False  # model.compile auto: eager layers if compiling fails at start
    attention_assumed: bool = False  # attention resolved for CUDA on a machine without it (flash-attn unchecked)


@dataclass
class DeepSpeedPlan:
    path: str
    zero_stage: int
    offload: list[tuple[str, str]]  # (what, device) offloaded: "optimizer" / "parameters" -> cpu / nvme
    bf16: bool


@dataclass
class ScoreDistillPlan:
    """``loss.score_distill``: its temperatures and weight, the teachers whose scores the trained datasets hold."""

    weight: float
    teacher_temperature: float
    student_temperature: float
    teachers: list[str]


@dataclass
class StartPlan:
    """What the run starts from: the trainer's :class:`pipeline.training.resume.ResumePoint` for ``--resume``
    (`point` None: a fresh start); without ``--resume``, the checkpoint ``--resume auto`` would load (`latest`)."""

    resume: str | None
    root: Path
    point: ResumePoint | None = None
    latest: Path | None = None
    latest_step: int | None = None


@dataclass
class RunPlan:
    """Everything ``--check`` resolved (printed by :func:`pipeline.training.plan_format.format_plan`)."""

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
    gradcache: GradCacheConfig  # as configured (chunk_tokens may be auto: the sample holds what was assumed)
    shards: str
    verify_checksums: bool
    output_dir: str
    start: StartPlan
    merge_steps: list[int] = field(default_factory=list)  # steps exported to export/merge_step_<N, 8 digits>
    score_distill: ScoreDistillPlan | None = None
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
        return WorldPlan(world_size)
    if hostfile is not None:
        with _stop_on(PreflightError):
            hosts = parse_hostfile(hostfile)
        if num_nodes is not None:
            if num_nodes > len(hosts):
                raise _Stop(Problem("--num_nodes", f"{num_nodes} but {hostfile} lists {len(hosts)} host(s)"))
            hosts = dict(list(hosts.items())[:num_nodes])
        if num_gpus is not None:
            short = [h for h, slots in hosts.items() if slots < num_gpus]
            if short:
                raise _Stop(Problem("--num_gpus", f"{num_gpus} but host {short[0]} has {hosts[short[0]]} slot(s)"))
            hosts = {h: num_gpus for h in hosts}
        return WorldPlan(sum(hosts.values()), hostfile=hostfile, hosts=hosts, nodes=len(hosts))
    nodes = num_nodes or 1
    if num_gpus is not None:
        per_node, source = num_gpus, "--num_gpus"
    elif device == "cuda":
        import torch

        per_node, source = max(torch.cuda.device_count(), 1), "cuda"
    else:
        per_node, source = 1, "cpu"
    return WorldPlan(nodes * per_node, nodes=nodes, per_node=per_node, per_node_from=source)


# --------------------------------------------------------------------------------------------------------------
# Values a type cannot catch
# --------------------------------------------------------------------------------------------------------------
Rule = tuple[str, Callable[[Any, Config], bool], str]  # (key, whether its value is fine, what it must be)


def _at_least(low: int) -> tuple[Callable[[Any, Config], bool], str]:
    return (lambda v, cfg: v >= low), f"must be >= {low}"


def _at_least_or_null(low: int) -> tuple[Callable[[Any, Config], bool], str]:
    return (lambda v, cfg: v is None or v >= low), f"must be >= {low} or null"


_POSITIVE: tuple[Callable[[Any, Config], bool], str] = ((lambda v, cfg: v > 0), "must be > 0")

# In the order they are reported; a key inside an unset section (loss.distill.weight without loss.distill) is skipped.
VALUE_RULES: tuple[Rule, ...] = (
    ("train.per_device_batch_size", *_at_least(1)),
    ("train.epochs", lambda v, cfg: v > 0 or cfg.train.max_steps is not None, "must be > 0"),
    ("train.max_steps", *_at_least_or_null(1)),
    ("train.lr", *_POSITIVE),
    ("train.min_lr", lambda v, cfg: 0 <= v and (cfg.train.lr <= 0 or v <= cfg.train.lr), "must be in [0, train.lr]"),
    ("train.warmup_steps", *_at_least(0)),
    ("train.betas", lambda v, cfg: len(v) == 2 and all(0 <= b < 1 for b in v), "expected [b1, b2] in [0, 1)"),
    ("train.grad_clip", *_at_least(0)),
    ("train.keep_last", *_at_least(1)),
    ("train.log_every", *_at_least(0)),
    ("train.eval_every", *_at_least(0)),
    ("train.save_every", *_at_least(0)),
    ("train.merge_window", *_at_least(0)),
    ("train.merge_every", *_at_least(0)),
    ("train.collective_timeout_s", *_POSITIVE),
    ("train.max_consecutive_skips", *_at_least(1)),
    ("data.validation_fraction", lambda v, cfg: 0 <= v < 1, "must be in [0, 1)"),
    ("data.sampling_temperature", *_POSITIVE),
    ("data.num_workers", *_at_least(0)),
    ("loss.temperature", *_POSITIVE),
    ("loss.distill.weight", *_POSITIVE),
    ("loss.score_distill.weight", *_POSITIVE),
    ("loss.score_distill.teacher_temperature", *_POSITIVE),
    ("gradcache.chunk_tokens", lambda v, cfg: v in (None, "auto") or v >= 1, "must be >= 1, auto or null"),
    ("gradcache.chunk_size", *_at_least_or_null(1)),
    ("train.retrieval_eval_every", *_at_least_or_null(1)),
    ("train.retrieval_eval_max_docs", *_at_least_or_null(1)),
)


def value_problems(cfg: Config) -> list[Problem]:
    """Values that have the right type but cannot work: :data:`VALUE_RULES`, the model's source, the checks the
    trainer runs at start (dataset types of the loss keys, ``train.keep_best``, ``train.report_to``), negative
    hard-negative counts and an output directory that cannot be written."""
    from pipeline.training.keep_best import keep_best_problem
    from pipeline.training.losses import loss_type_problems
    from pipeline.training.metrics import report_to_problem

    problems = []
    for key, ok, expected in VALUE_RULES:
        section, _, name = key.rpartition(".")
        owner: Any = cfg
        for part in section.split("."):
            owner = getattr(owner, part) if owner is not None else None
        if owner is not None and not ok(getattr(owner, name), cfg):
            problems.append(Problem(key, f"{expected}, got {getattr(owner, name)}"))
    if (cfg.model.name_or_path is None) == (cfg.model.from_config is None):
        problems.append(Problem("model", "set exactly one of name_or_path and from_config"))
    t, lo = cfg.train, cfg.loss
    problems += [Problem.from_message(line) for line in loss_type_problems(lo)]
    for key, what in (("train.keep_best", keep_best_problem(t)), ("train.report_to", report_to_problem(t.report_to))):
        if what:
            problems.append(Problem(key, what))
    problems += [Problem(f"loss.hard_negatives.{key}", f"must be >= 0, got {count}")
                 for key, count in lo.hard_negatives.items() if count < 0]
    out = Path(t.output_dir)
    existing = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK)):
        problems.append(Problem("train.output_dir", f"{existing} is not a writable directory"))
    return problems


# --------------------------------------------------------------------------------------------------------------
# Individual checks, each through the function the trainer calls (raise _Stop)
# --------------------------------------------------------------------------------------------------------------
def load_tokenizer(cfg: Config) -> Any:
    """The tokenizer the trainer will load (:func:`pipeline.model.embedding.load_tokenizer_for`)."""
    from pipeline.model.embedding import load_tokenizer_for

    with _stop_on(ValueError):
        return load_tokenizer_for(cfg.model)


def check_deepspeed(cfg: Config, world: int, device: str) -> DeepSpeedPlan:
    """The DeepSpeed JSON: read as the trainer reads it (:func:`pipeline.training.ds_config.read_ds_json`), its batch
    fields consistent with the recipe (``"auto"`` or what the trainer writes there), then the config the trainer
    builds the engine with (:func:`pipeline.training.ds_config.training_ds_config`): its ZeRO section as DeepSpeed
    reads it, the stage the trainer's :func:`pipeline.training.chunk_budget.optimizer_residency` takes from it, its
    offload and bf16 (fp16 left on beside bf16 is refused, as DeepSpeed refuses it)."""
    from deepspeed.runtime.zero.config import get_zero_config

    from pipeline.training.chunk_budget import optimizer_residency
    from pipeline.training.ds_config import deepspeed_fp16, read_ds_json, training_ds_config

    path = cfg.deepspeed
    micro = cfg.train.per_device_batch_size
    with _stop_on(ValueError):
        raw = read_ds_json(path, key="deepspeed")
    expected = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                "train_batch_size": micro * world}
    for key, want in expected.items():
        value = raw.get(key, "auto")
        if value != "auto" and value != want:
            why = "GradCache needs 1" if key == "gradient_accumulation_steps" else "from train.per_device_batch_size"
            raise _Stop(Problem(f"{path}: {key}", f"is {value!r}, expected \"auto\" or {want} ({why})"))
    with _stop_on(ValueError):
        ds = training_ds_config(cfg, world_size=world, device_type=device)
    zero = _zero_config(get_zero_config, ds, path)
    try:
        residency = optimizer_residency(ds, coalesce=cfg.gradcache.coalesce_grad_reduction)
    except ValueError as exc:  # data_types.grad_accum_dtype: the trainer stops at start on the same error
        raise _Stop(Problem.from_message(f"{path}: {exc}")) from None
    if deepspeed_fp16(ds) and ds["bf16"]["enabled"]:
        raise _Stop(Problem(f"{path}: fp16.enabled", "fp16 is on but the run uses bf16 (model.dtype); set it false"))
    offload = [(what, str(part.device)) for what, part in
               (("optimizer", zero.offload_optimizer), ("parameters", zero.offload_param))
               if part is not None and str(part.device) != "none"]
    return DeepSpeedPlan(path, residency.stage, offload, bool(ds["bf16"]["enabled"]))


def _zero_config(read: Callable[[dict[str, Any]], Any], ds: dict[str, Any], path: str) -> Any:
    """The ZeRO section of `ds` as DeepSpeed reads it (`read`: its ``get_zero_config``); a _Stop naming the first
    invalid field."""
    try:
        return read(ds)
    except TypeError:
        raise _Stop(Problem(f"{path}: zero_optimization", "expected a JSON object")) from None
    except Exception as exc:  # noqa: BLE001 - pydantic.ValidationError
        errors = getattr(exc, "errors", None)
        if callable(errors) and errors():
            first = errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise _Stop(Problem(f"{path}: zero_optimization.{loc}".rstrip("."), first.get("msg", str(exc)))) from None
        raise _Stop(Problem(f"{path}: zero_optimization", " ".join(str(exc).split()))) from None


def check_model(cfg: Config, device: str, tokenizer: Any | None, warnings: list[Problem]) -> ModelPlan:
    """Resolve the model settings from its config only, as the trainer does (:func:`pipeline.model.embedding.
    resolve_model_settings`), parameters counted on the meta device, LoRA applied there as the trainer applies it
    (:func:`pipeline.model.lora.apply_lora`), the vocabulary checked (:func:`pipeline.model.embedding.
    check_vocabulary`)."""
    import torch
    from transformers import AutoModel

    from pipeline.model.embedding import check_vocabulary, load_hf_config, resolve_model_settings

    requested = cfg.model.attn_implementation
    here = device == "cpu" or torch.cuda.is_available()
    # flash-attn and liger-kernel can only be checked on a machine with the ranks' device; elsewhere they are assumed
    # to import (a warning says so when they are required).
    if not here and cfg.model.kernels == "liger":
        warnings.append(Problem("model.kernels", "liger: liger-kernel cannot be checked without CUDA on this machine; "
                                "make sure it imports on the GPU nodes (pip install -e '.[gpu]')"))
    with _stop_on(ValueError):
        hf = load_hf_config(cfg.model)
        settings = resolve_model_settings(cfg.model, hf, torch.device(device),
                                          flash=None if here else requested == "flash_attention_2",
                                          liger=None if here else True)
    if not here and requested == "flash_attention_2":
        warnings.append(Problem("model.attn_implementation", f"{requested}: flash-attn cannot be checked "
                                "without CUDA on this machine; make sure it imports on the GPU nodes"))
    params = non_embedding = lora = None
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

        with _stop_on(ValueError), torch.device("meta"):
            lora = describe_lora(apply_lora(backbone, cfg.model.lora))
    if tokenizer is not None and vocab is not None:
        with _stop_on(ValueError):
            check_vocabulary(vocab, tokenizer)
    return ModelPlan(
        model_type=hf.model_type, decoder=settings.decoder, parameters=params, non_embedding_parameters=non_embedding,
        hidden_size=getattr(hf, "hidden_size", None), layers=getattr(hf, "num_hidden_layers", None),
        attention=settings.attn_implementation, dtype=str(settings.dtype).removeprefix("torch."),
        pooling=settings.pooling, packed=settings.packed, gradient_checkpointing=cfg.model.gradient_checkpointing,
        kernels=settings.kernels.kernels, kernels_reason=settings.kernels.reason, compile=settings.compile,
        compile_auto=settings.compile_auto, attention_mask=settings.attention_mask, lora=lora,
        attention_assumed=not here and requested == "auto",
    )


def check_data_plan(
    cfg: Config, tokenizer: Any | None, world: int, *, packed: bool, device: str, sample_steps: int,
    warnings: list[Problem],
) -> tuple[list[DatasetPlan], list[str], int, StepSample]:
    """The trainer's data checks (:func:`pipeline.data.loader.check_data`), split and schedule for `world` ranks
    (:class:`pipeline.data.loader.TrainData`), and the first steps measured (:func:`measure_steps`)."""
    from pipeline.data.loader import TrainData, check_data
    from pipeline.data.shard_format import ShardError

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
    weights = dict(zip(schedule.datasets, schedule.probabilities().tolist()))
    datasets = [DatasetPlan(
        name=name, type=data.reader[name].type, train_queries=len(data.train_ids[name]),
        validation_queries=len(data.val_ids[name]), batches_per_epoch=schedule.n_batches[name],
        steps_epoch0=names.count(name), weight=weights.get(name, 0.0), hard_negatives=data.plan.n_neg[name],
        validation_batches=data.validation_steps(name),
    ) for name in sorted(data.reader.datasets)]
    for name in schedule.skipped:
        warnings.append(Problem(f"data: dataset {name}", schedule.skip_reason(name)))
    if cfg.train.eval_every and not any(d.validation_batches for d in datasets):
        warnings.append(Problem("data.validation_fraction", "no dataset holds out a query: no validation loss"))
    sample = measure_steps(data, cfg.gradcache, world, min(sample_steps, schedule.steps_per_epoch), packed=packed,
                           device=device, warnings=warnings)
    return datasets, list(schedule.skipped), schedule.steps_per_epoch, sample


def measure_steps(data: TrainData, gc: GradCacheConfig, world: int, steps: int, *, packed: bool, device: str,
                  warnings: list[Problem]) -> StepSample:
    """Chunks and tokens of the first `steps` steps: every rank's batch built by the trainer's
    :func:`pipeline.data.loader.rank_batch`, chunked by GradCache's :func:`pipeline.training.gradcache.step_chunks`
    under the budget the run will use (``chunk_tokens: auto`` as :func:`pipeline.training.chunk_budget.
    planned_chunk_tokens` assumes it, from the work the trainer bounds it by), padding costed by
    :func:`pipeline.model.packing.chunk_cost`."""
    import dataclasses

    from pipeline.data.loader import rank_batch
    from pipeline.model.packing import chunk_cost
    from pipeline.training.chunk_budget import WORK_SAMPLE_STEPS, describe_work, planned_chunk_tokens
    from pipeline.training.gradcache import step_chunks

    work = None
    if gc.chunk_tokens == "auto":  # the trainer's bound: the most tokens a rank has in the first steps, all ranks
        work = max(data.most_step_tokens(WORK_SAMPLE_STEPS, rank) for rank in range(world))
        gc = dataclasses.replace(gc, chunk_tokens=planned_chunk_tokens(work, device))
        if device == "cuda":
            warnings.append(Problem("gradcache.chunk_tokens", f"auto is probed on the GPUs at start, "
                                    f"{describe_work(work)}; the per-step numbers below assume {gc.chunk_tokens}"))
    chunks_run, real, computed, seqs = [], [], [], []
    for step in range(steps):
        lengths = [[len(s) for s in rank_batch(data.plan, data.schedule, data.reader, 0, step, rank)[1].sequences()]
                   for rank in range(world)]
        chunks = [step_chunks(n, packed=packed, gc=gc) for n in lengths]
        chunks_run.append(max(len(c) for c in chunks))
        real.append(sum(sum(n) for n in lengths))
        computed.append(sum(chunk_cost([n[i] for i in idx], packed=packed) for n, c in zip(lengths, chunks)
                            for idx in c))
        seqs.append(sum(len(n) for n in lengths))
    return StepSample(
        steps=steps, chunks_run_mean=float(np.mean(chunks_run)), chunks_run_max=max(chunks_run),
        chunks_run_min=min(chunks_run), real_tokens_mean=float(np.mean(real)), real_tokens_min=min(real),
        real_tokens_max=max(real), computed_tokens_mean=float(np.mean(computed)),
        sequences_per_step=float(np.mean(seqs)), chunks_run=chunks_run, real_tokens=real,
        chunk_tokens=gc.chunk_tokens, work_tokens=work,
    )


def check_teacher(cfg: Config) -> None:
    """``loss.distill``: the teacher's tokenizer is the shards' (the trainer's own check)."""
    from pipeline.data.shards import read_manifest
    from pipeline.training.teacher import check_teacher_tokenizer

    with _stop_on(ValueError):
        check_teacher_tokenizer(cfg.loss.distill, read_manifest(cfg.data.shards)["tokenizer"],
                                trust_remote_code=cfg.model.trust_remote_code)


def score_distill_plan(cfg: Config, datasets: list[DatasetPlan]) -> ScoreDistillPlan | None:
    """``loss.score_distill``: its settings and the teacher(s) whose scores the trained datasets hold (as recorded by
    `preprocess score`; :func:`pipeline.data.loader.check_teacher_scores` has checked they exist)."""
    from pipeline.data.shards import read_manifest

    sd = cfg.loss.score_distill
    if sd is None:
        return None
    entries = read_manifest(cfg.data.shards)["datasets"]
    owners = [entries[d.name]["scores"]["teacher"] for d in datasets]
    return ScoreDistillPlan(sd.weight, sd.teacher_temperature, cfg.loss.temperature,
                            sorted({f"{t['name_or_path']} ({t['kind']})" for t in owners}))


def resume_checkpoint(cfg: Config, resume: str | None = None, *, world_size: int = 1, force: bool = False,
                      warnings: list[Problem] | None = None) -> StartPlan:
    """What the run will start from: the trainer's own decision (:func:`pipeline.training.resume.resume_point`:
    ``--resume auto`` the newest complete checkpoint or a fresh start, ``--resume TAG`` that checkpoint); without
    ``--resume`` a fresh start, naming the checkpoint ``--resume auto`` would load. Raises _Stop when the tag is not
    a complete checkpoint or the run identity changed (unless `force`; its warnings are added to `warnings`)."""
    from pipeline.data.shards import read_manifest
    from pipeline.training.checkpoint import CheckpointManager
    from pipeline.training.resume import ResumeRefused, resume_point
    from pipeline.training.run_identity import run_identity

    manager = CheckpointManager(Path(cfg.train.output_dir) / "checkpoints", cfg.train.keep_last)
    if resume is None:
        tag = manager.latest()
        return StartPlan(None, manager.root, latest=None if tag is None else manager.root / tag,
                         latest_step=None if tag is None else manager.info(tag).step)
    try:
        identity = run_identity(cfg, read_manifest(cfg.data.shards), world_size)
    except ValueError:  # ShardError, a model config or teacher that cannot load: reported by the data, model and
        identity = None  # teacher checks; the checkpoint is then not compared
    with _stop_on(ResumeRefused):
        point = resume_point(manager, resume, identity, world_size, force=force)
    if point is not None and warnings is not None:
        warnings.extend(Problem.from_message(line) for line in point.warnings)
    return StartPlan(resume, manager.root, point)


def last_fallbacks(output_dir: str) -> list[Fallback]:
    """The ``auto`` settings the last run in `output_dir` fell back from (:mod:`pipeline.fallbacks`)."""
    with _stop_on(ValueError):
        return load_fallbacks(output_dir)


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
    report.plan = RunPlan(
        config=str(config), world=world, device=device, per_device_batch=t.per_device_batch_size,
        global_batch=t.per_device_batch_size * size, steps_per_epoch=steps_per_epoch, epochs=t.epochs,
        max_steps=t.max_steps, total_steps=total, sampling_temperature=cfg.data.sampling_temperature,
        datasets=datasets, skipped=skipped, sample=sample, model=model, deepspeed=ds_plan, gradcache=cfg.gradcache,
        shards=cfg.data.shards, verify_checksums=cfg.data.verify_checksums, output_dir=t.output_dir, start=start,
        merge_steps=EveryInLast(t.merge_every, t.merge_window, total).planned(),
        score_distill=score_distill_plan(cfg, datasets), fallbacks=attempt(last_fallbacks, t.output_dir) or [],
    )
    return report


def check_command(config: str | Path, overrides: list[str] | None = None, **options: Any) -> int:
    """``--check``: run :func:`check_run` with `options`, print problems (stderr) or the plan (stdout,
    :func:`pipeline.training.plan_format.format_plan`).

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


__all__ = ["CheckReport", "Problem", "RunPlan", "check_command", "check_run", "format_plan", "value_problems"]
