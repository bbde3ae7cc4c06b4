"""Regional compilation of the backbone's layers (``model.compile``) and the count of graphs compiled.

Each repeated layer of the backbone (the decoder layers) is compiled with ``torch.compile`` - the layer, not the
whole model (PyTorch's "regional compilation" recipe: the layers share one compiled graph, so compile time is one
layer's, and the model's Python around them - embeddings, pooling, GradCache - stays eager). Inductor fuses the
elementwise work between the matrix products (RMSNorm, RoPE, SwiGLU, residuals), which dominates a small model's
step on GPU. It runs on CPU too (inductor's C++ backend), which is how the tests check it.

Static shapes: with ``model.compile`` on, packed chunks are padded to exactly ``gradcache.chunk_tokens`` tokens
(:func:`pipeline.model.packing.pack`, a dummy segment whose output is dropped), so one graph per mode (GradCache's
no-grad pass, its replayed pass with a graph, validation in eval mode) serves every chunk. What still varies from
chunk to chunk - the number of sequences in the row - only reaches the attention kernel: its sequence bounds are
marked dynamic, and the per-sequence CPU kernel runs outside the graph (:mod:`pipeline.model.attention`).

:func:`graphs_compiled` counts the graphs dynamo has compiled in this process; the trainer logs how many were added
after the first step (0 in steady state: no recompilation).
"""
from __future__ import annotations

from torch import nn


def resolve_compile(requested: bool | str, device_type: str, *, packed: bool) -> bool:
    """``model.compile``: True / False as given; auto = on CUDA for packed (decoder) chunks, whose shapes are static."""
    if requested == "auto":
        return device_type == "cuda" and packed
    return bool(requested)


def static_chunk_length(*, packed: bool, chunk_tokens: object, max_len: int) -> int | None:
    """The token count every chunk of compiled layers is padded to: ``gradcache.chunk_tokens`` for packed chunks
    with a token budget (None otherwise: shapes stay dynamic). It must hold the longest sequence (`max_len`), or a
    longer chunk would need a second graph: ValueError naming the key."""
    if not packed or not isinstance(chunk_tokens, int):
        return None
    if chunk_tokens < max_len:
        raise ValueError(
            f"gradcache.chunk_tokens: {chunk_tokens} is below the shards' max_len {max_len}; with model.compile every "
            f"packed chunk is padded to chunk_tokens, which must hold the longest sequence (raise it to >= {max_len} "
            "or set model.compile false)"
        )
    return chunk_tokens


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


def compile_layers(backbone: nn.Module, *, dynamic: bool | None) -> int:
    """Compile the ``forward`` of every layer of the backbone's stack in place; returns how many.
    `dynamic`: False for static chunk shapes, None to let dynamo generalise shapes that change.

    The layer's ``forward`` is compiled, not its ``__call__``: module hooks stay outside the graph. Under ZeRO-3
    each layer is also made a DeepSpeed "leaf module" (``deepspeed.utils.set_z3_leaf_module``): its parameters are
    gathered once by the layer's own hooks, before the compiled forward, instead of by hooks on every submodule
    inside it (which would break the graph at each one). Call it before ``deepspeed.initialize``."""
    import torch
    from deepspeed.utils import set_z3_leaf_module

    layers = repeated_layers(backbone)
    for layer in layers:
        set_z3_leaf_module(layer, True)
        layer.forward = torch.compile(layer.forward, dynamic=dynamic)
    return len(layers)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Compiles a model's layers at start when its settings say so, and counts the graphs compiled after the first
    optimizer step (recompilations; 0 in steady state) for the step metrics and the end-of-run log line."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.after_first_step: int | None = None

    @classmethod
    def start(cls, model: nn.Module, gradcache: object, *, max_len: int) -> "CompileWatch":
        """Compile `model`'s layers if ``model.compile`` resolved to on; packed chunks get the static length
        ``gradcache.chunk_tokens``, which must hold the longest sequence (`max_len`)."""
        settings = getattr(model, "settings", None)
        if settings is None or not settings.compile:
            return cls(False)
        model.compile_layers(static_chunk_length(packed=model.packed, chunk_tokens=getattr(gradcache, "chunk_tokens",
                                                                                            None), max_len=max_len))
        return cls(True)

    def after_step(self) -> None:
        if self.enabled and self.after_first_step is None:
            self.after_first_step = graphs_compiled()

    def values(self) -> dict[str, int]:
        """``graphs_compiled`` and ``recompiles`` (graphs compiled after the first step), once it is done."""
        if not self.enabled or self.after_first_step is None:
            return {}
        total = graphs_compiled()
        return {"graphs_compiled": total, "recompiles": total - self.after_first_step}

    def report(self) -> None:
        values = self.values()
        if values:
            from pipeline.logs import log

            log(f"compile: {values['graphs_compiled']} graphs compiled, {values['recompiles']} of them after the first "
                "step (recompilations)")
