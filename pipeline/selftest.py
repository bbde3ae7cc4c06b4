"""Self-test of a recipe on the machine that will run it: every fast path the run will take, checked in minutes.

    python -m pipeline.selftest --config configs/f2llm-v2-0.6b.yaml [KEY=VALUE ...] [--world-size N]
    launch/train.sh --selftest --config RECIPE [KEY=VALUE ...]             # the world size of this machine's launch

Run it on a node of the run before a long job (one process, one GPU; a 0.6B model takes at most ~3 minutes, the tiny
CPU recipe well under one). It builds the model as the run will (``model.*`` resolved for this machine) and checks,
each check isolated (an exception is that check's FAIL line, the others still run) and timed:

1. ``kernels``: a liger-patched decoder layer against the unpatched one on the same input (forward and gradient
   relative error, :func:`layer_error`) and which modules the patch changed; only where ``model.kernels`` resolves
   to liger (:func:`pipeline.model.kernels.resolve_kernels`), else skipped with its reason.
2. ``compile``: the compiled model against an eager copy of the same weights on one chunk (embeddings and parameter
   gradient, eval mode), the graphs compiled in the first steps and those compiled after the first step
   (:class:`pipeline.model.compiled.CompileWatch`); where ``model.compile`` resolves on (``model.compile=true`` runs
   it on CPU too: inductor's C++ backend).
3. ``gradcache``: GradCache's exactness in the run's dtype - in bf16/fp16 what ``python -m pipeline.gradcheck
   --dtype bf16`` computes (:func:`pipeline.gradcheck.bf16_gradient_errors`: cached and plain 16-bit gradients
   against the fp32 full-batch one, cached <= 1.5 x plain); in fp32 gradcheck's default comparison (cached vs plain,
   dropout on, one repeat, replay exact), relative error <= 1e-5.
4. ``chunk_tokens``: the value ``gradcache.chunk_tokens`` resolves to (the trainer's
   :func:`pipeline.training.chunk_budget.resolve_chunk_tokens`: probed on CUDA, for the run's world size) and the
   peak memory of one real GradCache step at that size (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the
   process's peak RSS, since there is no GPU memory to measure).
5. ``optimizer``: one optimizer step of the trainer itself (:class:`pipeline.training.trainer.Trainer` on the recipe,
   its output in a temporary directory: the recipe's DeepSpeed config, ZeRO stage and offload), its time and peak
   memory; the process group is destroyed afterwards (:func:`pipeline.training.distributed.teardown`).
6. ``attention``: the attention path the model runs and whether sequences stay isolated: a packed row's (encoders: a
   padded chunk's) embeddings against the same sequences embedded one at a time (:func:`isolation_difference`).
7. the verdict, last: ``selftest: safe to launch (N checks passed, M skipped: names)`` (exit 0) or ``selftest: FAIL -
   <check>: <what failed>; <the setting to change>`` (exit 1). A bad config is one ``error:`` line, exit 2.

Each check prints one line to stdout, ``selftest <check>: ok|FAIL|skipped - <numbers> (<seconds> s)``; an ``auto``
setting that fell back (:mod:`pipeline.fallbacks`) is a WARNING in its check's line, not a failure. Every decision is
the run's own function (resolve functions, CompileWatch, the chunk budget, the GradCache step, the DeepSpeed config,
the trainer's step); the self-test only measures what they do here.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator

from pipeline.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # heavy imports stay inside the checks, so that --help and config errors answer at once
    import numpy as np
    import torch
    from torch import nn

    from pipeline.data.batch import ContrastiveBatch
    from pipeline.data.loader import TrainData
    from pipeline.model.embedding import EmbeddingModel, ModelSettings

OK, FAIL, SKIPPED = "ok", "FAIL", "skipped"
CHECKS = ("kernels", "compile", "gradcache", "chunk_tokens", "optimizer", "attention")

FP32_TOLERANCE = 1e-5  # relative error (gradients, layer outputs) and max |difference| (isolation) in fp32
SIXTEEN_BIT_FACTOR = 2.0  # a 16-bit fast path may be at most this many times farther from fp32 than the eager path
SIXTEEN_BIT_ISOLATION = 1e-2  # max |difference| of unit-norm embeddings, packed vs alone, in bf16/fp16 (see below)
COMPARE_TOKENS = 4096  # at most this many tokens in the one chunk the kernels and compile checks compare on
GIB = 2**30


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One check's outcome: its status, the numbers (`detail`), and for a FAIL the setting to change (`advice`)."""

    name: str
    status: str  # OK, FAIL or SKIPPED
    detail: str
    advice: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        text = f"selftest {self.name}: {self.status} - {self.detail}"
        for warning in self.warnings:
            text += f"; WARNING {warning}"
        if self.status == FAIL and self.advice:
            text += f"; set {self.advice}"
        return f"{text} ({self.seconds:.1f} s)"


def passed(name: str, detail: str, warnings: list[str] | None = None) -> Result:
    return Result(name, OK, detail, warnings=list(warnings or []))


def failed(name: str, detail: str, advice: str, warnings: list[str] | None = None) -> Result:
    return Result(name, FAIL, detail, advice, warnings=list(warnings or []))


def skipped(name: str, why: str) -> Result:
    return Result(name, SKIPPED, why)


def verdict(results: list[Result]) -> tuple[str, int]:
    """The last line and the exit code: FAIL naming every failed check and its setting (1), else safe (0)."""
    bad = [r for r in results if r.status == FAIL]
    if bad:
        return "selftest: FAIL - " + " | ".join(f"{r.name}: {r.detail}; {r.advice}" for r in bad), 1
    skips = [r.name for r in results if r.status == SKIPPED]
    warned = [r.name for r in results if r.warnings]
    text = f"selftest: safe to launch ({sum(r.status == OK for r in results)} checks passed, {len(skips)} skipped"
    text += f": {', '.join(skips)}" if skips else ""
    text += f"; fallbacks: {', '.join(warned)}" if warned else ""
    return text + ")", 0


# --------------------------------------------------------------------------------------------------------------
# What every check shares: the recipe resolved for this machine, the data, the models
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """The recipe as this machine runs it. Checks never change `cfg` (they copy it); models are built fresh per
    check, with the same seed (the same initial weights)."""

    cfg: Config
    device: torch.device
    settings: ModelSettings
    world_size: int  # ranks of the run: the chunk probe's optimizer reserve and the work per rank
    seed: int = 0

    @cached_property
    def data(self) -> TrainData:
        """The run's training data as rank 0 of `world_size` ranks sees it (shards checked at start, no hashing)."""
        from pipeline.data.loader import TrainData

        cfg = self.cfg
        return TrainData(cfg.data, cfg.loss, seed=cfg.train.seed, per_device_batch=cfg.train.per_device_batch_size,
                         world_size=self.world_size, rank=0, verify=False)

    @property
    def max_len(self) -> int:
        return int(self.data.reader.max_len)

    def batch(self, step: int, rank: int = 0) -> ContrastiveBatch:
        """Rank `rank`'s batch of step `step` of epoch 0, built as the training loop receives it."""
        from pipeline.data.loader import rank_batch

        data = self.data
        return rank_batch(data.plan, data.schedule, data.reader, 0, step % data.steps_per_epoch, rank)[1]

    def model(self, **overrides: Any) -> EmbeddingModel:
        """A fresh model of the recipe (``model.*`` fields replaced by `overrides`), seeded: every call gives the
        same initial weights. Not compiled (:meth:`CompileWatch.start` does that, as in the trainer)."""
        import torch

        from pipeline.model.embedding import EmbeddingModel

        torch.manual_seed(self.seed)
        return EmbeddingModel.from_config(dataclasses.replace(self.cfg.model, **overrides), self.device)

    @property
    def loss(self) -> Any:
        """The recipe's loss without the distillation terms: their teacher states and scores are constants of the
        loss (``pipeline.gradcheck`` checks them), and no teacher is loaded for the model checks."""
        return dataclasses.replace(self.cfg.loss, distill=None, score_distill=None)

    @property
    def sixteen_bit(self) -> bool:
        import torch

        return self.settings.dtype in (torch.bfloat16, torch.float16)

    @property
    def dtype_name(self) -> str:
        return str(self.settings.dtype).removeprefix("torch.")


def prepare(args: argparse.Namespace) -> Context:
    """The recipe loaded and resolved for this machine, as the trainer would at start; ConfigError / ValueError
    (one line naming the key) when it cannot run here: config keys and values, model settings, DeepSpeed JSON, the
    shard directory (its manifest, datasets and file sizes; checksums are ``--check``'s job)."""
    cfg = load_config(args.config, args.overrides)
    import torch

    from pipeline.data.loader import check_data
    from pipeline.model.embedding import load_hf_config, resolve_model_settings
    from pipeline.training.ds_config import training_ds_config

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    world = args.world_size if args.world_size is not None else max(torch.cuda.device_count(), 1)
    if world < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world}")
    if cfg.train.per_device_batch_size < 1:
        raise ConfigError(f"train.per_device_batch_size: must be >= 1, got {cfg.train.per_device_batch_size}")
    settings = resolve_model_settings(cfg.model, load_hf_config(cfg.model), device)
    training_ds_config(cfg, world_size=world, device_type=device.type)
    check_data(cfg.data, verify=False)
    return Context(cfg, device, settings, world, seed=args.seed)


def head(batch: ContrastiveBatch, tokens: int) -> ContrastiveBatch:
    """The first queries of `batch` (with their positives and negatives) that hold at most `tokens` tokens, at least
    two queries (the in-batch loss needs a second) when the batch has them. Teacher scores are dropped (see
    :attr:`Context.loss`)."""
    from pipeline.data.batch import ContrastiveBatch

    k, used = 0, 0
    for i in range(batch.size):
        own = [batch.queries[i], batch.positives[i], *batch.negatives[i * batch.n_neg:(i + 1) * batch.n_neg]]
        cost = sum(len(s) for s in own)
        if k >= 2 and used + cost > tokens:
            break
        k, used = k + 1, used + cost
    return ContrastiveBatch(
        queries=batch.queries[:k], positives=batch.positives[:k], negatives=batch.negatives[:k * batch.n_neg],
        n_neg=batch.n_neg, dataset_type=batch.dataset_type,
        positive_ids=None if batch.positive_ids is None else batch.positive_ids[:k],
    )


def one_chunk(ctx: Context, batch: ContrastiveBatch) -> Any:
    """The recipe's GradCache settings with every sequence of `batch` in one chunk."""
    return dataclasses.replace(ctx.cfg.gradcache, chunk_tokens=max(batch.real_tokens(), 1), chunk_size=None)


def fallbacks_of(*owners: Any) -> list[str]:
    """The :class:`pipeline.fallbacks.Fallback` lines of models, watches and choices that record one (attributes
    ``fallbacks`` or ``fallback``; absent or None: nothing fell back)."""
    out = []
    for owner in owners:
        found = list(getattr(owner, "fallbacks", None) or []) + [getattr(owner, "fallback", None)]
        out += [f.describe() if hasattr(f, "describe") else str(f) for f in found if f is not None]
    return out


@dataclass(frozen=True)
class Comparison:
    """A fast path (fused kernels, compiled layers) against the eager one on the same input: relative errors of the
    forward output and of the gradient, and for 16-bit runs both paths' errors against an fp32 eager reference."""

    forward: float
    gradient: float
    fast32: tuple[float, float] | None = None  # (forward, gradient) of the fast path vs the fp32 reference
    eager32: tuple[float, float] | None = None  # the same for the eager 16-bit path

    @property
    def ok(self) -> bool:
        """fp32: fast vs eager <= :data:`FP32_TOLERANCE` relative - both compute the same thing in the same
        precision, only the order of rounding differs (1e-7..1e-6 measured). 16-bit: the fast path no farther from
        the fp32 reference than :data:`SIXTEEN_BIT_FACTOR` x the eager 16-bit path - both round to 16 bits, a
        fusion may even round less, while a wrong kernel or graph is off by O(1), hundreds of times the 16-bit
        rounding error."""
        if self.fast32 is None or self.eager32 is None:
            return max(self.forward, self.gradient) <= FP32_TOLERANCE
        return all(fast <= SIXTEEN_BIT_FACTOR * eager + FP32_TOLERANCE
                   for fast, eager in zip(self.fast32, self.eager32))

    def describe(self, what: str) -> str:
        def one(k: int, value: float) -> str:
            if self.fast32 is None or self.eager32 is None:
                return f"{value:.1e}"
            return f"{value:.1e} (vs fp32: {self.fast32[k]:.1e}, eager {self.eager32[k]:.1e})"

        return f"{what} gradient relative error {one(1, self.gradient)}, forward {one(0, self.forward)}"


def seconds_since(started: float) -> float:
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------------------------
# 1. kernels
# --------------------------------------------------------------------------------------------------------------
class _Captured(Exception):
    """Raised by the input-capturing hook to stop a forward at the first layer."""


def layer_inputs(model: nn.Module, seqs: list[np.ndarray]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments the backbone passes to its first repeated layer for a chunk of `seqs`
    (captured by a forward pre-hook; the forward stops there)."""
    import torch

    from pipeline.model.compiled import repeated_layers

    layer = repeated_layers(model.backbone)[0]
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(model.make_inputs(seqs))
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in seen:
        raise RuntimeError(f"{type(layer).__name__} was not called by the backbone's forward")
    return seen["args"], seen["kwargs"]


def _to(obj: Any, dtype: torch.dtype) -> Any:
    """`obj` with every floating-point tensor inside (tuples, lists, dicts) cast to `dtype`."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, dtype) for k, v in obj.items()}
    return obj


@dataclass
class LayerRun:
    """One layer's output and the gradient of a fixed random projection of it (input and parameters)."""

    output: torch.Tensor
    grads: list[torch.Tensor]


def run_layer(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype) -> LayerRun:
    """`layer` on the captured inputs (floating ones cast to `dtype`), eval mode; the gradient of
    sum(output * R), R ~ N(0, 1) from a fixed seed, w.r.t. its input hidden states and its parameters."""
    import torch

    args, kwargs = _to(args, dtype), _to(kwargs, dtype)
    if args:
        hidden = args[0].detach().clone().requires_grad_(True)
        args = (hidden, *args[1:])
    else:
        hidden = kwargs["hidden_states"].detach().clone().requires_grad_(True)
        kwargs = {**kwargs, "hidden_states": hidden}
    layer.eval()
    out = layer(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    generator = torch.Generator(device=out.device).manual_seed(1234)
    probe = torch.randn(out.shape, generator=generator, device=out.device, dtype=torch.float32)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out.float() * probe).sum(), [hidden, *params], allow_unused=True)
    return LayerRun(out.detach().float(), [torch.zeros_like(t, dtype=torch.float32) if g is None else g.float()
                                           for t, g in zip([hidden, *params], grads)])


def layer_error(a: LayerRun, ref: LayerRun) -> tuple[float, float]:
    """(forward, gradient) relative L2 errors of `a` against `ref`: ||a - ref|| / ||ref||, the gradient over the
    input and every parameter as one vector."""
    def rel(num: float, den: float) -> float:
        return math.sqrt(num) / max(math.sqrt(den), 1e-30)

    forward = rel(float((a.output - ref.output).pow(2).sum()), float(ref.output.pow(2).sum()))
    num = sum(float((g - r).pow(2).sum()) for g, r in zip(a.grads, ref.grads))
    den = sum(float(r.pow(2).sum()) for r in ref.grads)
    return forward, rel(num, den)


def patched_modules(before: dict[str, tuple[type, Any]], model: nn.Module) -> dict[str, int]:
    """Class name -> how many modules of `model` a patch changed (another class, or another ``forward`` bound on the
    instance), from the `before` snapshot of :func:`module_snapshot`."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        cls, forward = before.get(name, (None, None))
        if cls is not type(module) or vars(module).get("forward") is not forward:
            key = cls.__name__ if cls is not None else type(module).__name__
            counts[key] = counts.get(key, 0) + 1
    return counts


def module_snapshot(model: nn.Module) -> dict[str, tuple[type, Any]]:
    return {name: (type(m), vars(m).get("forward")) for name, m in model.named_modules()}


def check_kernels(ctx: Context) -> Result:
    """Liger's patch on a copy of the model against the unpatched model, one decoder layer on a real chunk's inputs:
    forward and gradient relative errors (:func:`layer_error`, judged by :attr:`Comparison.ok`) and the modules
    changed. The unpatched layer (and its fp32 reference, for 16-bit runs) is run BEFORE the patch: liger's RoPE is
    a process-wide replacement of the family's module function, which the unpatched copy would call too (so this
    check runs first, before any model of the process is patched)."""
    import torch

    from pipeline.model.compiled import repeated_layers
    from pipeline.model.kernels import apply_kernels

    choice = ctx.settings.kernels
    if choice.kernels != "liger":
        return skipped("kernels", f"{choice.reason} (device {ctx.device.type})")
    unpatched = ctx.model(kernels="none", compile=False)  # first: nothing of liger's in this model
    patched = copy.deepcopy(unpatched)  # the same weights
    seqs = head(ctx.batch(0), COMPARE_TOKENS).sequences()
    args, kwargs = layer_inputs(unpatched, seqs)
    dtype = ctx.settings.dtype
    layer = repeated_layers(unpatched.backbone)[0]
    eager = run_layer(layer, args, kwargs, dtype)
    eager32 = None
    if ctx.sixteen_bit:
        reference = run_layer(copy.deepcopy(layer).float(), args, kwargs, torch.float32)
        eager32 = layer_error(eager, reference)
    del unpatched, layer
    modeling = sys.modules[type(patched.backbone).__module__]
    functions = dict(vars(modeling))
    before = module_snapshot(patched.backbone)
    fallback = apply_kernels(patched.backbone, ctx.settings.kernels, compiled=ctx.settings.compile)
    if fallback is not None:
        return passed("kernels", "nothing to compare: the patch fell back to the transformers layers",
                      [fallback.describe()])
    instances = patched_modules(before, patched.backbone)
    globals_ = sorted(n for n, v in vars(modeling).items() if functions.get(n) is not v and not n.startswith("__"))
    what = ", ".join(f"{name} x{n}" for name, n in sorted(instances.items())) or "no module"
    if globals_:
        what += f"; {modeling.__name__.rsplit('.', 1)[-1]}.{', '.join(globals_)}"
    if not instances and not globals_:
        return failed("kernels", "liger's patch changed nothing in the model", "model.kernels: none")
    fast = run_layer(repeated_layers(patched.backbone)[0], args, kwargs, dtype)
    comparison = Comparison(*layer_error(fast, eager), fast32=layer_error(fast, reference) if ctx.sixteen_bit else
                            None, eager32=eager32)
    detail = (comparison.describe(f"liger-patched vs unpatched {type(repeated_layers(patched.backbone)[0]).__name__} "
                                  f"({ctx.dtype_name}, {sum(len(s) for s in seqs)} tokens):")
              + f"; patched: {what}")
    return passed("kernels", detail) if comparison.ok else failed("kernels", detail, "model.kernels: none")


# --------------------------------------------------------------------------------------------------------------
# 2. compile
# --------------------------------------------------------------------------------------------------------------
def cached_gradient(model: nn.Module, batch: ContrastiveBatch, loss: Any, gc_cfg: Any, seed: int) -> torch.Tensor:
    """The GradCache step's parameter gradient of `batch` (:func:`pipeline.training.gradcache.cached_step`, from the
    RNG state of `seed`), as one fp32 vector (:func:`pipeline.gradcheck.full_grad`); the model's grads are cleared."""
    import torch

    from pipeline.gradcheck import full_grad
    from pipeline.training.gradcache import cached_step

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    cached_step(model, batch, loss, gc_cfg)
    grad = full_grad(model)
    model.zero_grad(set_to_none=True)
    return grad


def embeddings(model: nn.Module, batch: ContrastiveBatch, gc_cfg: Any) -> torch.Tensor:
    from pipeline.training.gradcache import embed_no_grad

    return embed_no_grad(model, batch.sequences(), gc_cfg).float().cpu()


def check_compile(ctx: Context) -> Result:
    """Compiled layers (:meth:`CompileWatch.start`, as the trainer compiles them) against an eager copy of the same
    weights, made BEFORE compiling: one chunk of a real batch (within the run's chunk size, so in a size class of the
    token dimension training compiles anyway), embeddings and the GradCache parameter gradient, judged by
    :attr:`Comparison.ok`; in training mode (the graphs the run uses, compiled at start), unless the model has
    dropout (:func:`has_dropout`), which inside a compiled graph draws from another RNG stream than eager - not an
    error - so then in eval mode (the validation graphs). Then two training steps of real batches (the trainer's
    mode and shapes): the graphs compiled by the end of the first step and those compiled after it (CompileWatch's
    count: a new size class of the token dimension; 0 in steady state)."""
    from pipeline.gradcheck import rel_error
    from pipeline.model.compiled import CompileWatch, graphs_compiled
    from pipeline.training.gradcache import cached_step

    settings, cfg = ctx.settings, ctx.cfg
    if not settings.compile:
        return skipped("compile", f"model.compile {cfg.model.compile} resolves off on {ctx.device.type} "
                       f"({'packed' if settings.packed else 'padded'} chunks; auto compiles on CUDA for packed "
                       "chunks; model.compile=true compiles anyway)")
    eager = ctx.model()
    eager32 = copy.deepcopy(eager).float() if ctx.sixteen_bit else None
    compiled = copy.deepcopy(eager)  # before compiling: a copy made after would share the compiled layers
    gc_run = dataclasses.replace(cfg.gradcache, chunk_tokens=run_chunk_tokens(cfg))
    batch = head(ctx.batch(0), min(COMPARE_TOKENS, gc_run.chunk_tokens or COMPARE_TOKENS))
    gc_one = one_chunk(ctx, batch)
    before = graphs_compiled()
    watch = CompileWatch.start(compiled, gc_one, max_len=ctx.max_len)
    warnings = fallbacks_of(compiled, watch)
    if not watch.enabled:
        if warnings:
            return passed("compile", "nothing compiled to compare: the layers run eagerly", warnings)
        return failed("compile", "CompileWatch compiled nothing although model.compile resolved on",
                      "model.compile: false")
    models = [m for m in (eager, compiled, eager32) if m is not None]
    dropout = has_dropout(eager)
    for m in models:
        m.train(not dropout)
    emb = [embeddings(m, batch, gc_one) for m in models]
    grads = [cached_gradient(m, batch, ctx.loss, gc_one, ctx.seed) for m in models]
    comparison = Comparison(
        rel_error(emb[1], emb[0]), rel_error(grads[1], grads[0]),
        fast32=(rel_error(emb[1], emb[2]), rel_error(grads[1], grads[2])) if eager32 is not None else None,
        eager32=(rel_error(emb[0], emb[2]), rel_error(grads[0], grads[2])) if eager32 is not None else None)
    del eager, eager32, models, emb, grads
    compiled.train()
    for step in (1, 2):
        compiled.zero_grad(set_to_none=True)
        cached_step(compiled, ctx.batch(step - 1), ctx.loss, gc_run)
        watch.after_step(step)
    compiled.zero_grad(set_to_none=True)
    graphs = (watch.after_first_step or 0) - before
    recompiles = watch.values().get("recompiles", 0)
    mode = "eval mode: the model has dropout" if dropout else "training mode"
    detail = (comparison.describe(f"compiled vs eager ({ctx.dtype_name}, one chunk of {batch.real_tokens()} tokens, "
                                  f"{mode}):")
              + f"; {graphs} graphs compiled, {recompiles} recompiles after the first step")
    ok = comparison.ok
    return passed("compile", detail, warnings) if ok else failed("compile", detail, "model.compile: false", warnings)


def has_dropout(model: nn.Module) -> bool:
    """Whether any module of `model` drops out in training mode: an ``nn.Dropout`` with p > 0 (LoRA's included) or
    a float ``attention_dropout`` / ``dropout`` attribute > 0 (transformers' attention modules keep their rate so)."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        for name in ("attention_dropout", "dropout"):
            value = vars(module).get(name)
            if isinstance(value, float) and value > 0:
                return True
    return False


def run_chunk_tokens(cfg: Config) -> int | None:
    """The recipe's chunk_tokens where it is a number; ``auto`` (resolved in the chunk_tokens check) as the CPU
    default of :mod:`pipeline.training.chunk_budget`, for shapes only."""
    from pipeline.training.chunk_budget import DEFAULT_CHUNK_TOKENS

    value = cfg.gradcache.chunk_tokens
    return DEFAULT_CHUNK_TOKENS if value == "auto" else value


# --------------------------------------------------------------------------------------------------------------
# 3. gradcache
# --------------------------------------------------------------------------------------------------------------
def exactness_advice(ctx: Context) -> str:
    """The fast paths to switch off when a gradient is not exact (a nondeterministic or wrong kernel)."""
    parts = []
    if ctx.settings.compile:
        parts.append("model.compile: false")
    if ctx.settings.kernels.kernels == "liger":
        parts.append("model.kernels: none")
    return " or ".join(parts) or "model.attn_implementation: sdpa (then run python -m pipeline.gradcheck --repeat 30)"


def check_gradcache(ctx: Context) -> Result:
    """GradCache against the full-batch gradient on gradcheck's batch (:func:`pipeline.gradcheck.make_batches`,
    ``train.per_device_batch_size`` queries of random lengths). 16-bit runs: :func:`pipeline.gradcheck.
    bf16_gradient_errors` (32 chunks, cached <= 1.5 x plain, as ``--dtype bf16``); fp32: gradcheck's default
    comparison, one repeat (relative error <= 1e-5 and an exact replay, :func:`pipeline.gradcheck.repeat_problems`)."""
    import torch

    from pipeline.gradcheck import (
        Repeat, bf16_gradient_errors, make_batches, max_sequence, repeat_problems, run_gradient,
    )
    from pipeline.model.compiled import CompileWatch
    from pipeline.training.chunk_budget import OptimizerResidency, resolve_chunk_tokens
    from pipeline.training.gradcache import cached_step, plain_step

    cfg = copy.deepcopy(ctx.cfg)
    cfg.loss = ctx.loss
    b = cfg.train.per_device_batch_size
    if ctx.sixteen_bit:
        cfg.model.dtype, cfg.model.compile = "float32", False  # gradcheck's fp32 reference; its 16-bit copy inside
        model32 = ctx.model(dtype="float32", compile=False)
        batches = make_batches(cfg, *vocab_eos(model32), [b], "retrieval", ctx.seed)
        errors = bf16_gradient_errors(model32, batches, 0, cfg, chunks=32, seed=ctx.seed, dtype=ctx.settings.dtype)
        detail = (f"{ctx.dtype_name} vs the fp32 full-batch gradient: GradCache ({errors.stats.chunks_run} chunks, "
                  f"chunk sums in {'fp32' if errors.chunked.fp32_accumulation else ctx.dtype_name}) relative error "
                  f"{errors.cached:.2e}, plain {ctx.dtype_name} {errors.plain:.2e} (cached "
                  f"{'<=' if errors.ok else '>'} 1.5 x plain)")
        advice = ("gradcache.fp32_accumulation: true" if not cfg.gradcache.fp32_accumulation else exactness_advice(ctx))
        return passed("gradcache", detail) if errors.ok else failed("gradcache", detail, advice)
    model = ctx.model()
    batches = make_batches(cfg, *vocab_eos(model), [b], "retrieval", ctx.seed)
    choice = resolve_chunk_tokens(cfg.gradcache, model, ctx.device, max_len=max_sequence(batches), world_size=1,
                                  residency=OptimizerResidency.plain())
    cfg.gradcache = choice.gradcache
    watch = CompileWatch.start(model, cfg.gradcache, max_len=max_sequence(batches))
    model.train()
    step_seed = ctx.seed + 7
    g_plain, s_plain = run_gradient(model, plain_step, batches[0], cfg, step_seed)
    g_cached, s_cached = run_gradient(model, cached_step, batches[0], cfg, step_seed)
    run = Repeat(g_plain, g_cached, s_plain, s_cached)
    problems = repeat_problems([run], torch.get_num_threads())
    ok = run.error <= FP32_TOLERANCE and not problems
    detail = (f"fp32 (the run's dtype on {ctx.device.type}, so gradcheck's fp32 comparison): GradCache vs plain "
              f"full-batch relative gradient error {run.error:.2e} ({'<=' if run.error <= FP32_TOLERANCE else '>'} "
              f"1e-5, {'dropout on' if has_dropout(model) else 'no dropout in the model'}, {s_cached.chunks} chunks), "
              f"replay difference {s_cached.replay_max_diff:.1e}")
    if problems:
        detail += f"; {problems[0]}"
    warnings = fallbacks_of(model, watch)
    return passed("gradcache", detail, warnings) if ok else failed("gradcache", detail, exactness_advice(ctx), warnings)


def vocab_eos(model: EmbeddingModel) -> tuple[int, int]:
    """(vocabulary size, EOS id) of the model's config, as ``pipeline.gradcheck`` reads them."""
    config = model.backbone.config
    eos = config.eos_token_id
    return int(config.vocab_size), int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 1))


# --------------------------------------------------------------------------------------------------------------
# 4. chunk_tokens
# --------------------------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """The process's peak resident set so far (``getrusage`` ru_maxrss, KiB on Linux), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chunk_advice(chunk_tokens: object) -> str:
    """The settings that lower a step's peak memory: half the chunk (a number), or checkpointing the layers."""
    smaller = (f"gradcache.chunk_tokens: {max(chunk_tokens // 2, 1)}" if isinstance(chunk_tokens, int) else
               "gradcache.chunk_tokens: a number below the probed one")
    return f"{smaller} (or model.gradient_checkpointing: true)"


def check_chunk_tokens(ctx: Context) -> Result:
    """``gradcache.chunk_tokens`` as the trainer resolves it (:func:`resolve_chunk_tokens`, with the optimizer
    reserve of the run's DeepSpeed config and world size and, for ``auto``, the most real tokens a rank has in the
    first steps - the maximum over the run's ranks, as the trainer agrees on it), then one real GradCache step
    (:func:`pipeline.training.gradcache.train_step`, model compiled as the trainer would) on the batch of rank 0 with
    the most tokens among those steps, at that chunk size: its peak memory."""
    import torch

    from pipeline.model.compiled import CompileWatch
    from pipeline.training.chunk_budget import WORK_SAMPLE_STEPS, optimizer_residency, resolve_chunk_tokens
    from pipeline.training.ds_config import training_ds_config
    from pipeline.training.gradcache import step_chunks, train_step

    cfg = ctx.cfg
    model = ctx.model()
    work = None
    if cfg.gradcache.chunk_tokens == "auto":
        work = max(ctx.data.most_step_tokens(WORK_SAMPLE_STEPS, rank=r) for r in range(ctx.world_size))
    ds = training_ds_config(cfg, world_size=ctx.world_size, device_type=ctx.device.type)
    choice = resolve_chunk_tokens(cfg.gradcache, model, ctx.device, max_len=ctx.max_len, world_size=ctx.world_size,
                                  work_tokens=work, residency=optimizer_residency(
                                      ds, coalesce=cfg.gradcache.coalesce_grad_reduction))
    gc_cfg = choice.gradcache
    warnings = fallbacks_of(model, choice)
    watch = CompileWatch.start(model, gc_cfg, max_len=ctx.max_len)
    warnings += fallbacks_of(watch)
    steps = min(WORK_SAMPLE_STEPS, ctx.data.steps_per_epoch)
    batch = max((ctx.batch(s) for s in range(steps)), key=lambda bt: bt.real_tokens())
    lengths = [len(s) for s in batch.sequences()]
    chunks = step_chunks(lengths, packed=model.packed, gc=gc_cfg)
    largest = max(sum(lengths[i] for i in idx) for idx in chunks)
    value = gc_cfg.chunk_tokens
    how = "auto" if cfg.gradcache.chunk_tokens == "auto" else "as set"
    advice = chunk_advice(value)
    model.train()
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device)
    started = time.perf_counter()
    try:
        stats = train_step(model, batch, ctx.loss, gc_cfg)
    except torch.cuda.OutOfMemoryError as exc:
        return failed("chunk_tokens", f"gradcache.chunk_tokens {value} ({how}): one step ran out of GPU memory "
                      f"({' '.join(str(exc).split())[:160]})", advice, warnings)
    took = seconds_since(started)
    step = (f"one GradCache step of the largest of the first {steps} batches: {batch.real_tokens():,} tokens in "
            f"{stats.chunks} chunks (largest {largest:,} tokens), {took:.2f} s")
    if cuda:
        torch.cuda.synchronize(ctx.device)
        peak = torch.cuda.max_memory_allocated(ctx.device)
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        memory = (f"peak GPU memory {peak / GIB:.2f} GiB of {total / GIB:.1f} GiB ({(peak - base) / GIB:.2f} GiB "
                  f"above the model; no optimizer state here: see the optimizer check)")
    else:
        memory = (f"no GPU memory to measure on {ctx.device.type}: process peak RSS {peak_rss_mib():,.0f} MiB "
                  "(getrusage, the whole process so far)")
    return passed("chunk_tokens", f"gradcache.chunk_tokens {value} ({how}, world size {ctx.world_size}); {step}; "
                  f"{memory}", warnings)


# --------------------------------------------------------------------------------------------------------------
# 5. optimizer
# --------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def process_state() -> Iterator[None]:
    """Keep the process as it was around the trainer: the SIGTERM/SIGINT handlers it installs and the rendezvous
    variables it sets (a free MASTER_PORT when none is given, so that a self-test next to a running job does not
    take its port)."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: os.environ.get(k) for k in keys}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    if "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_optimizer(ctx: Context) -> Result:
    """One optimizer step of the trainer: :class:`Trainer` built on the recipe (its model, chunk budget, compiled
    layers and DeepSpeed engine from the recipe's JSON), its output directory a temporary one, no W&B run and no
    retrieval evaluation, checksums left to ``--check``; its own ``_step`` on the first batch of rank 0, then its
    ``close`` (process group destroyed). One process: ZeRO shards nothing across ranks here, so the optimizer state
    per GPU is the whole model's (the run divides it over its ranks)."""
    import torch

    from pipeline.data.loader import rank_batch
    from pipeline.training.trainer import Trainer

    cfg = copy.deepcopy(ctx.cfg)
    out = tempfile.mkdtemp(prefix="selftest-")
    cfg.train.output_dir = out
    cfg.data.verify_checksums = False
    cfg.train.report_to = [r for r in cfg.train.report_to if r == "tensorboard"]
    cfg.train.retrieval_eval_every = None
    cfg.train.keep_best = None
    cuda = ctx.device.type == "cuda"
    trainer = None
    try:
        with process_state():
            trainer = Trainer(cfg)
            try:
                dataset, batch = rank_batch(trainer.data.plan, trainer.data.schedule, trainer.data.reader, 0, 0,
                                            trainer.dist.rank)
                if cuda:
                    torch.cuda.synchronize(ctx.device)
                    torch.cuda.reset_peak_memory_stats(ctx.device)
                result = trainer._step(dataset, batch)
                if cuda:
                    torch.cuda.synchronize(ctx.device)
                stage = int(trainer.engine.zero_optimization_stage())
                warnings = fallbacks_of(trainer)
                compiled = trainer.compile_watch.enabled
            finally:
                trainer.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    zero = training_ds_zero(cfg, trainer.dist.world_size if trainer is not None else 1, ctx.device.type)
    offload = ", ".join(f"{what} -> {dev}" for what, dev in zero) or "no offload"
    memory = (f"peak GPU memory {torch.cuda.max_memory_allocated(ctx.device) / GIB:.2f} GiB" if cuda else
              f"process peak RSS {peak_rss_mib():,.0f} MiB (no GPU memory to measure on {ctx.device.type})")
    detail = (f"ZeRO stage {stage} ({offload}; {os.path.basename(cfg.deepspeed)}), one process: step of "
              f"{result.stats.queries} queries in {result.seconds:.2f} s"
              f"{' (first step: compilation included)' if compiled else ''}, loss {result.stats.loss:.4f}, {memory}")
    if not result.updated:
        return failed("optimizer", f"{detail}: non-finite loss or gradient, the step was skipped",
                      "train.lr (or model.dtype: float32)", warnings)
    return passed("optimizer", detail, warnings)


def training_ds_zero(cfg: Config, world: int, device_type: str) -> list[tuple[str, str]]:
    """(what, device) of every offload the run's DeepSpeed config asks for."""
    from pipeline.training.ds_config import training_ds_config

    zero = training_ds_config(cfg, world_size=world, device_type=device_type).get("zero_optimization", {})
    out = []
    for what, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_param")):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            out.append((what, str(device)))
    return out


# --------------------------------------------------------------------------------------------------------------
# 6. attention
# --------------------------------------------------------------------------------------------------------------
def isolation_difference(model: EmbeddingModel, seqs: list[np.ndarray]) -> float:
    """max |e_together - e_alone| over the coordinates of the embeddings (unit-norm when ``model.normalize``) of
    `seqs` embedded as ONE chunk - a packed row (decoders) or a padded matrix (encoders), as the run feeds them -
    and each embedded alone (no neighbour, no padding). Sequence isolation means equal up to rounding: in a packed
    row the position ids restart and attention stays within each sequence; in a padded chunk padding is masked.
    Call in eval mode (no dropout)."""
    import torch

    with torch.no_grad():
        together = model(model.make_inputs(seqs)).float()
        alone = torch.cat([model(model.make_inputs([s])).float() for s in seqs])
    return float((together - alone).abs().max())


def isolation_sequences(batch: ContrastiveBatch, n: int = 6) -> list[np.ndarray]:
    """Up to `n` sequences of a real batch, longest first (distinct lengths where the batch has them), so that the
    later sequences of a packed row follow long ones."""
    seqs = sorted(batch.sequences(), key=len, reverse=True)
    picked, lengths = [], set()
    for s in seqs:
        if len(s) not in lengths:
            picked.append(s)
            lengths.add(len(s))
        if len(picked) == n:
            break
    return picked if len(picked) >= 2 else seqs[:n]


def attention_path(model: EmbeddingModel, ctx: Context) -> str:
    """The attention the model runs (:func:`pipeline.model.embedding.describe_attention`) and its layout."""
    from pipeline.model.embedding import describe_attention

    attn = describe_attention(model.attn_implementation, ctx.device, ctx.settings.dtype)
    if model.attn_implementation == "flash_attention_2":
        attn = "flash-attn varlen (flash_attention_2)" if model.packed else "flash-attn (flash_attention_2)"
    layout = "packed rows" if model.packed else "padded chunks"
    return f"{attn}, {layout}, {ctx.settings.attention_mask} mask"


def isolation_advice(model: EmbeddingModel) -> str:
    """The settings that take another attention path for the layout that leaked."""
    if model.packed:
        other = "sdpa" if model.attn_implementation != "sdpa" else "varlen"
        return f"model.attn_implementation: {other} (or model.packing: padded)"
    return f"model.attn_implementation: {'eager' if model.attn_implementation == 'sdpa' else 'sdpa'}"


def check_attention(ctx: Context) -> Result:
    """The attention path (as the model is built and compiled for the run) and sequence isolation
    (:func:`isolation_difference` on sequences of a real batch). Tolerance on the max |difference| of unit-norm
    embeddings: fp32 :data:`FP32_TOLERANCE` (the two layouts only change the order of rounding: ~1e-7 measured);
    bf16/fp16 :data:`SIXTEEN_BIT_ISOLATION` = 1e-2: 2.5 bf16 rounding units (2^-8) at the unit scale of the
    embedding, ~3x the 0.0029 measured between packed varlen and padded sdpa embeddings of a 28-layer Qwen3-0.6B in
    bf16 (README) and ~20x the 4.8e-4 of packed sdpa vs alone on the tiny test model in bf16, while a leak changes
    an embedding by a fraction of its length: causal attention over the whole packed row instead of per sequence
    moved the tiny test model's embeddings by 0.148 in fp32 and in bf16 (15x the 16-bit tolerance, 10^4 x fp32's)."""
    from pipeline.model.compiled import CompileWatch

    model = ctx.model()
    watch = CompileWatch.start(model, ctx.cfg.gradcache, max_len=ctx.max_len)
    warnings = fallbacks_of(model, watch)
    model.eval()
    seqs = isolation_sequences(ctx.batch(0))
    diff = isolation_difference(model, seqs)
    tolerance = SIXTEEN_BIT_ISOLATION if ctx.sixteen_bit else FP32_TOLERANCE
    together = "one packed row" if model.packed else "one padded chunk"
    detail = (f"{attention_path(model, ctx)}; {len(seqs)} sequences ({', '.join(str(len(s)) for s in seqs)} tokens) "
              f"in {together} vs alone: max |difference| {diff:.1e} ({'<=' if diff <= tolerance else '>'} "
              f"{tolerance:g}, {ctx.dtype_name}{', compiled' if watch.enabled else ''})")
    if diff <= tolerance:
        return passed("attention", detail, warnings)
    return failed("attention", detail + ": sequences are not isolated", isolation_advice(model), warnings)


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------
CHECK_FUNCTIONS: dict[str, str] = {
    "kernels": "check_kernels", "compile": "check_compile", "gradcache": "check_gradcache",
    "chunk_tokens": "check_chunk_tokens", "optimizer": "check_optimizer", "attention": "check_attention",
}
ADVICE = {  # the setting to change when a check raises (see failure_advice)
    "kernels": "model.kernels: none",
    "compile": "model.compile: false",
    "optimizer": "deepspeed (the DeepSpeed JSON: ZeRO stage, offload) or train.per_device_batch_size",
    "attention": "model.attn_implementation (or model.packing: padded)",
}


def failure_advice(name: str, ctx: Context) -> str:
    """The setting to change when check `name` raises."""
    if name == "chunk_tokens":
        return chunk_advice(ctx.cfg.gradcache.chunk_tokens)
    if name == "gradcache":
        return exactness_advice(ctx)
    return ADVICE[name]


def run_check(name: str, ctx: Context) -> Result:
    """Check `name`, isolated: an exception is its FAIL line (one line, the exception's type and message) naming the
    setting to change; memory it held is released, and a process group it left is destroyed. What the libraries
    print to stdout meanwhile (DeepSpeed's op builds) goes to stderr: stdout holds the self-test's lines only."""
    from pipeline.fallbacks import one_line

    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the result lines'; libraries' chatter goes to stderr
            result = globals()[CHECK_FUNCTIONS[name]](ctx)
    except Exception as exc:  # noqa: BLE001 - every failure of a check is that check's FAIL line
        result = failed(name, one_line(exc), failure_advice(name, ctx))
    finally:
        release()
    result.seconds = seconds_since(started)
    return result


def release() -> None:
    """Free what a check held (Python objects, cached CUDA blocks) and any process group it left."""
    import torch

    from pipeline.training.distributed import is_distributed, teardown

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if is_distributed():
        teardown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.selftest", description=__doc__.split("\n\n")[0],
        epilog=f"Checks, in order: {', '.join(CHECKS)}; then the verdict. Exit 0: safe to launch; 1: a check failed "
               "(its setting named); 2: bad config.")
    ap.add_argument("--config", required=True, help="YAML recipe (the one the run will use)")
    ap.add_argument("--world-size", type=int, default=None,
                    help="ranks the run will have: the chunk_tokens probe reserves optimizer memory per rank and "
                         "measures the work per rank for them (default: this machine's GPUs, else 1)")
    ap.add_argument("--checks", default=",".join(CHECKS), metavar="NAME,...",
                    help=f"checks to run (default all: {','.join(CHECKS)}); the others print as skipped")
    ap.add_argument("--seed", type=int, default=0, help="seed of the models' initial weights and the random batches")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.compile=true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in selected if c not in CHECKS]
    if unknown:
        print(f"error: --checks: unknown check {unknown[0]!r} (checks: {', '.join(CHECKS)})", file=sys.stderr)
        return 2
    try:
        ctx = prepare(args)
    except (ConfigError, ValueError) as exc:  # ShardError is a ValueError
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    from pipeline.logs import log

    log(f"selftest: {args.config} on {ctx.device} ({ctx.dtype_name}), run world size {ctx.world_size}")
    results = []
    try:
        for name in CHECKS:
            result = run_check(name, ctx) if name in selected else skipped(name, "not selected (--checks)")
            results.append(result)
            print(result.line(), flush=True)
    finally:
        release()
    line, code = verdict(results)
    print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
