"""Regional compilation of the backbone's layers (``model.compile``), a dynamic token dimension, and the count of
graphs compiled.

Each repeated layer of the backbone (the decoder layers) is compiled with ``torch.compile`` - the layer, not the
whole model (PyTorch's "regional compilation" recipe: the layers share one compiled graph, so compile time is one
layer's, and the model's Python around them - embeddings, pooling, GradCache - stays eager). Inductor fuses the
elementwise work between the matrix products (RMSNorm, RoPE, SwiGLU, residuals), which dominates a small model's
step on GPU. It runs on CPU too (inductor's C++ backend), which is how the tests check it.

Shapes: a packed chunk is one row of T tokens (T = the sum of its sequences' lengths, :mod:`pipeline.model.packing`)
holding n sequences. Both vary from chunk to chunk, and nothing is padded: before each compiled layer call, the
token dimension of the layer's inputs (hidden states [1, T, d], RoPE's cos/sin, position ids) and the sequence
bounds [n + 1] are marked dynamic (:func:`mark_token_dimension`), so the first compilation already produces a graph
for every T and n, and the attention kernels get a constant ``max_length`` (the shards' max_len, an upper bound:
:func:`pipeline.model.packing.pack`), so no graph specialises on a chunk's longest sequence. One graph per mode
(GradCache's no-grad pass, its replayed pass with a graph, evaluation) serves every chunk; the compiler may still
split the token range into a few size classes (inductor's CPU backend compiles one graph each for T <= 1024,
<= 2048, <= 4096 and larger: measured), each compiled the first time a chunk of that class runs - a number bounded
by the range of T (2 to ``gradcache.chunk_tokens``), not by the batches. On CPU the per-sequence attention kernel
runs outside the graph (:mod:`pipeline.model.attention`), so there the layer is several graphs around it; those
after the break dynamo first compiles for the first chunk's shape and generalises at the next (a first step of
several chunks does both).

Why not static shapes (every chunk padded to one length, or rounded up to a few buckets): padding every chunk to
chunk_tokens computed 27-74% padding on F2LLM-shaped data (GitHub issue 22); rounding each balanced chunk up to a
multiple of max_len still computes 1.4-3.8% padding (``bench/bench_chunk_padding.py`` prints both), and every
bucket is another set of graphs per mode (up to chunk_tokens / max_len buckets): on CPU the third static shape
already hit dynamo's ``recompile_limit`` (8 per function), after which the layers silently ran eagerly.

:func:`graphs_compiled` counts the graphs dynamo has compiled in this process; :class:`CompileWatch` logs the count
after the first step and every graph compiled after it (``recompiles`` in the step metrics: 0 in steady state).
"""
from __future__ import annotations

import types
from typing import Any, Callable

from torch import nn

from pipeline.fallbacks import Fallback, explicit_failure, fall_back
from pipeline.logs import log


def resolve_compile(requested: bool | str, device_type: str, *, packed: bool) -> bool:
    """``model.compile``: True / False as given; auto = on CUDA for packed (decoder) chunks, whose token dimension is
    compiled dynamic (no padding, :func:`mark_token_dimension`)."""
    if requested == "auto":
        return device_type == "cuda" and packed
    return bool(requested)


def repeated_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of identical layers (``layers`` of decoders, ``encoder.layer`` of BERT): the largest
    ModuleList whose members share one class."""
    best: nn.ModuleList | None = None
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"model.compile: {type(backbone).__name__} has no stack of identical layers to compile")
    return best


def mark_token_dimension(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Mark a packed layer call's varying sizes dynamic for the compiler: the token dimension T (dim 1) of the hidden
    states - the first tensor argument, [1, T, d] - and of every other tensor argument with T at dim 1 (also inside
    tuples: RoPE's cos and sin [1, T, head_dim], the position ids [1, T]), and the sequence bounds
    ``cu_seq_lens_q/k`` [n + 1] (dim 0). ``maybe_mark_dynamic``: a size the compiler has to specialise stays legal."""
    import torch

    values = [*args, *kwargs.values()]
    tensors = [t for v in values for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].dim() < 2:
        return
    tokens = tensors[0].shape[1]
    for t in tensors:
        if t.dim() >= 2 and t.shape[1] == tokens:
            torch._dynamo.maybe_mark_dynamic(t, 1)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if isinstance(kwargs.get(key), torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(kwargs[key], 0)


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``: inductor, shapes that change generalised (``dynamic=None``)."""
    import torch

    return torch.compile(fn, dynamic=None)


def compile_layers(backbone: nn.Module, *, dynamic_tokens: bool) -> int:
    """Compile the ``forward`` of every layer of the backbone's stack in place; returns how many.
    `dynamic_tokens` (packed rows): the token dimension is marked dynamic at every call (module docstring); else
    (padded [n, L] chunks) dynamo generalises the shapes that change (``dynamic=None``).

    The layer class's ``forward`` is compiled once, not each layer's ``__call__``: module hooks stay outside the
    graph, and every layer runs the one compiled function (dynamo's cache is per code object, so the layers share
    its graphs). It is bound to each layer as a method (``types.MethodType``): a ``copy.deepcopy`` of the model
    binds it to the copy's layer (an attribute holding ``torch.compile(layer.forward)`` would still call the
    original layer from the copy). Under ZeRO-3 each layer is also made a DeepSpeed "leaf module"
    (``deepspeed.utils.set_z3_leaf_module``): its parameters are gathered once by the layer's own hooks, before the
    compiled forward, instead of by hooks on every submodule inside it (which would break the graph at each one).
    Call it before ``deepspeed.initialize``; :func:`uncompile_layers` undoes it."""
    from deepspeed.utils import set_z3_leaf_module

    layers = repeated_layers(backbone)
    compiled = _compile(type(layers[0]).forward)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if dynamic_tokens:
            mark_token_dimension(args, kwargs)
        return compiled(self, *args, **kwargs)

    for layer in layers:
        set_z3_leaf_module(layer, True)
        layer.forward = types.MethodType(forward, layer)
    return len(layers)


def uncompile_layers(backbone: nn.Module) -> None:
    """Undo :func:`compile_layers`: every layer runs its class's eager ``forward`` again, as a plain (non-leaf)
    module."""
    from deepspeed.utils import set_z3_leaf_module

    for layer in repeated_layers(backbone):
        layer.__dict__.pop("forward", None)
        set_z3_leaf_module(layer, False)


def trial_step(model: nn.Module, max_len: int) -> None:
    """The compiled layers' first use, at start: one small packed (or padded) chunk of two sequences through the
    model without a graph (GradCache's first pass) and with one, and the gradient of its embeddings' sum (its
    second pass), in training mode, so that compiling the forward and the backward graphs happens here, where a
    failure can still fall back (:meth:`CompileWatch.start`), instead of inside the first step. The RNG state is
    forked (dropout draws here do not shift the run's stream) and no ``.grad`` is written."""
    import numpy as np
    import torch

    lengths = [max(2, min(max_len, 12)), max(2, min(max_len, 7))]
    seqs = [np.arange(1, n + 1, dtype=np.int64) for n in lengths]
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with torch.no_grad():
                model(model.make_inputs(seqs))
            emb = model(model.make_inputs(seqs))
            torch.autograd.grad(emb.sum(), params, allow_unused=True)
    finally:
        model.train(was_training)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Compiles a model's layers at start when its settings say so, and watches the number of graphs compiled: logged
    after the first optimizer step, and every graph compiled after it (a recompilation: 0 in steady state) is logged
    as a warning with its step and counted for the step metrics and the end-of-run log line."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.after_first_step: int | None = None
        self.seen = 0
        self.fallback: Fallback | None = None  # model.compile auto that failed at its first use

    @classmethod
    def start(cls, model: nn.Module, gradcache: object, *, max_len: int) -> "CompileWatch":
        """Compile `model`'s layers if ``model.compile`` resolved to on; packed chunks get a dynamic token dimension
        and the attention kernels the constant bound `max_len` (the longest sequence of the data) as max_length.
        `gradcache` (its ``chunk_tokens``, the largest chunk) is named in the log line.

        Then the compiled layers' first use (:func:`trial_step`). When it raises: with ``model.compile: auto`` the
        layers run eagerly and :attr:`fallback` says why (:func:`pipeline.fallbacks.fall_back`, one WARNING); with
        ``true`` a one-line ValueError naming ``model.compile``."""
        settings = getattr(model, "settings", None)
        if settings is None or not settings.compile:
            return cls(False)
        model.compile_layers(max_length=max_len, chunk_tokens=getattr(gradcache, "chunk_tokens", None))
        try:
            trial_step(model, max_len)
        except Exception as exc:  # noqa: BLE001 - whatever the compiler raises (dynamo, inductor, a C++/Triton build)
            uncompile_layers(model.backbone)
            model.max_length_bound = None
            if not settings.compile_auto:
                raise explicit_failure("model.compile", "true", exc, "set model.compile: false, or auto (which "
                                       "falls back to eager layers)") from exc
            watch = cls(False)
            watch.fallback = fall_back("model.compile", exc, "eager layers (not compiled)")
            return watch
        return cls(True)

    def after_step(self, step: int | None = None) -> None:
        """After optimizer step `step`: the first call records (and logs) the graphs compiled so far; later calls
        log a WARNING for every graph compiled since the previous call."""
        if not self.enabled:
            return
        total = graphs_compiled()
        if self.after_first_step is None:
            self.after_first_step = total
            log(f"compile: {total} graphs compiled by the end of the first step (per mode run so far and layer "
                "region; graphs compiled later - a new size class of the token dimension, a mode first run later - "
                "are logged as warnings)")
        elif total > self.seen:
            import logging

            log(f"compile: {total - self.seen} graph(s) compiled at step {step if step is not None else '?'} "
                f"({total - self.after_first_step} after the first step, {total} in all): a shape or mode the "
                "compiled layers had not run yet (a new size class of the token dimension, or a first validation "
                "after a resume)", level=logging.WARNING)
        self.seen = total

    def values(self) -> dict[str, int]:
        """``graphs_compiled`` and ``recompiles`` (graphs compiled after the first step), once it is done."""
        if not self.enabled or self.after_first_step is None:
            return {}
        total = graphs_compiled()
        return {"graphs_compiled": total, "recompiles": total - self.after_first_step}

    def report(self) -> None:
        values = self.values()
        if values:
            log(f"compile: {values['graphs_compiled']} graphs compiled, {values['recompiles']} of them after the first "
                "step (recompilations)")
