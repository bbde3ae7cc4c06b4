"""Fused GPU kernels for the decoder layers: liger-kernel's RMSNorm, SwiGLU and RoPE (``model.kernels``).

At hidden size 1024 (Qwen3-0.6B) the unfused elementwise kernels of the transformers layers - RMSNorm's fp32
upcasts, rotary embeddings, the SwiGLU product - cost more GPU time than the matrix products. Liger-Kernel
(Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training", https://github.com/linkedin/Liger-Kernel)
replaces them with fused Triton kernels. Its cross-entropy kernels are for language-model heads and stay off (an
embedding model has none).

``model.kernels``:
* ``auto`` - liger when the ranks run on CUDA, liger-kernel imports and supports the model family; else none. The
  choice and its reason are logged once at start. Fail-soft: when liger's patch then fails for the model (liger has
  no patch for its type, a module the patch expects is missing, an API the installed release lacks), the model keeps
  the transformers layers and the failure is recorded as a :class:`pipeline.fallbacks.Fallback` (one WARNING,
  ``EmbeddingModel.fallbacks``).
* ``liger`` - required: a one-line error at start (and at ``--check``) when any of the three conditions fails, and
  when the patch fails (:func:`pipeline.fallbacks.explicit_failure`).
* ``none`` - the transformers layers as they are.

What liger's patch does, and what :func:`patch_liger` keeps of it. ``apply_liger_kernel_to_<family>(model=...)``
(liger-kernel 0.8.5, ``src/liger_kernel/transformers/monkey_patch.py``,
https://github.com/linkedin/Liger-Kernel/blob/main/src/liger_kernel/transformers/monkey_patch.py) changes two things:

* the instance: every RMSNorm and MLP module of the model gets liger's ``forward`` bound into its own ``__dict__``
  (``_patch_rms_norm_module``, ``_patch_swiglu_module``, via ``_bind_method_to_module``: ``module.__dict__["forward"]
  = LigerRMSNorm.forward.__get__(module)``, plus the attributes that forward reads). The modules keep their
  transformers classes and parameters; only their forward changes.
* the family's modeling module, for the whole process: ``modeling_<family>.<Family>RMSNorm`` and ``<Family>MLP``
  become liger's classes (for models built later) and ``modeling_<family>.apply_rotary_pos_emb`` becomes liger's
  RoPE, which the attention's forward looks up in that module at every call.

Norms and MLPs: the instance patch stays, the module-level classes are restored at once, so a model of the same family
built later in the process (``model.kernels: none``, a teacher, a benchmark's reference model) gets the transformers
layers. RoPE: in liger-kernel 0.8.5 its RoPE is called through liger's kernel dispatcher
(``liger_kernel.backends.dispatch``; 0.8.2 and earlier call the autograd function directly), which is
``@torch.compiler.disable``: in a compiled layer (``model.compile``) it splits the layer into 4 graphs with 3 graph
breaks (measured with torch._dynamo.explain on a Qwen3 layer, the Triton calls replaced by torch code: 1 graph
without liger's RoPE), while inductor fuses the rotary arithmetic by itself. So with compiled layers RoPE is left
to the compiler. With eager layers liger's RoPE is patched, and that patch cannot be confined to one model: liger
offers no instance patch for it, and transformers reads the function from the module at call time.
``modeling_<family>.apply_rotary_pos_emb`` then stays liger's for the rest of the process - every later model of the
family in the process runs liger's RoPE (the same rotation up to rounding, on CUDA) - and the start-up log line says
so.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pipeline.fallbacks import Fallback, explicit_failure, fall_back
from pipeline.logs import log

# Decoder families whose liger patch covers RMSNorm, RoPE and SwiGLU (liger-kernel's apply_liger_kernel_to_<type>).
LIGER_FAMILIES = ("qwen3", "qwen2", "llama", "mistral")
ROPE_FUNCTION = "apply_rotary_pos_emb"  # the module-level RoPE function of the transformers decoder families
SWIGLU_ACTIVATIONS = ("silu", "swish")  # liger's SwiGLU computes silu(gate) * up whatever the module's act_fn
LIGER_FALLBACK = "the transformers layers (no fused kernels)"


@dataclass(frozen=True)
class KernelChoice:
    """What ``model.kernels`` resolved to, and why (for the start-up log line)."""

    kernels: str  # "liger" or "none"
    reason: str
    auto: bool = False  # from model.kernels: auto - a patch that fails falls back to the transformers layers


@dataclass(frozen=True)
class LigerPatch:
    """What :func:`patch_liger` changed in a model (and in the process)."""

    model_type: str
    version: str  # liger-kernel's
    norms: int  # RMSNorm modules running liger's forward
    mlps: int  # MLP modules running liger's SwiGLU forward
    rope: bool  # liger's RoPE in the modeling module (process-wide)
    rope_before: bool  # liger's RoPE was already there, patched by an earlier model of the process
    module: str  # the family's modeling module

    def describe(self) -> str:
        text = (f"liger-kernel {self.version} on this {self.model_type} model: {self.norms} RMSNorm and {self.mlps} "
                "MLP (SwiGLU) modules")
        if self.rope:
            return (f"{text}, RoPE process-wide: {self.module}.{ROPE_FUNCTION} stays liger's for the rest of this "
                    f"process (transformers looks it up at call time), so later {self.model_type} models here run "
                    "liger's RoPE too")
        if self.rope_before:
            return (f"{text}; RoPE left to torch.compile, but {self.module}.{ROPE_FUNCTION} is already liger's "
                    "(patched by an earlier model of this process): a graph break in every compiled layer")
        return f"{text}; RoPE left to torch.compile (liger's RoPE would be a graph break in every compiled layer)"


def liger_importable() -> bool:
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        importlib.import_module("liger_kernel.transformers")
    except Exception:  # noqa: BLE001 - a broken install (no Triton, wrong torch) is as good as none
        return False
    return True


def liger_version() -> str:
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def resolve_kernels(requested: str, device: torch.device, model_type: str, *, importable: bool | None = None
                    ) -> KernelChoice:
    """``model.kernels`` for a model of `model_type` on `device` (ValueError naming the key when ``liger`` is asked
    for and cannot run). `importable`: whether liger-kernel imports (default: try it here)."""
    if requested == "none":
        return KernelChoice("none", "model.kernels: none")
    auto = requested == "auto"
    blockers = []
    if device.type != "cuda":
        blockers.append(f"the ranks run on {device.type}, liger-kernel's Triton kernels need CUDA")
    if model_type not in LIGER_FAMILIES:
        blockers.append(f"model type {model_type!r} is not one of liger's supported families "
                        f"{', '.join(LIGER_FAMILIES)}")
    if not blockers and not (liger_importable() if importable is None else importable):
        blockers.append("liger-kernel does not import (pip install -e '.[gpu]')")
    if not blockers:
        return KernelChoice("liger", f"liger-kernel RMSNorm, RoPE and SwiGLU for {model_type} on CUDA", auto=auto)
    if requested == "liger":
        raise ValueError(f"model.kernels: liger cannot be used: {'; '.join(blockers)}")
    return KernelChoice("none", f"auto: {'; '.join(blockers)}", auto=auto)


def _restore_module(module: ModuleType, state: dict[str, Any], keep: frozenset[str] = frozenset()) -> None:
    """Put `module`'s namespace back to `state` (a copy of it), except the names in `keep`."""
    current = vars(module)
    for name in [n for n in current if n not in state and n not in keep]:
        delattr(module, name)
    for name, value in state.items():
        if name not in keep and current.get(name) is not value:
            setattr(module, name, value)


def _restore_instances(states: dict[nn.Module, dict[str, Any]]) -> None:
    """Put every module's ``__dict__`` back to its copy in `states` (undoes forwards bound on the instance)."""
    for module, before in states.items():
        current = vars(module)
        for name in [n for n in current if n not in before]:
            del current[name]
        for name, value in before.items():
            if current.get(name) is not value:
                current[name] = value


def patch_liger(backbone: nn.Module, *, rope: bool) -> LigerPatch:
    """Patch `backbone` (a transformers base model) with liger's RMSNorm and SwiGLU, and its family's RoPE when
    `rope` (see the module docstring: RoPE is process-wide). The family's module-level classes are restored. On any
    failure, everything the patch changed is undone before the exception propagates."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    version = liger_version()
    model_type = backbone.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise LookupError(f"liger-kernel {version} has no patch for model type {model_type!r}")
    activation = getattr(backbone.config, "hidden_act", "silu")
    if activation not in SWIGLU_ACTIVATIONS:
        raise ValueError(f"liger's SwiGLU computes silu(gate) * up; this model's hidden_act is {activation!r}")
    modeling = sys.modules[type(backbone).__module__]
    module_state = dict(vars(modeling))
    instance_state = {module: dict(vars(module)) for module in backbone.modules()}
    try:
        apply(rope=rope, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
              model=backbone)
        patched = [m for m, before in instance_state.items() if vars(m).get("forward") is not before.get("forward")]
        if not patched:
            raise RuntimeError(f"liger-kernel {version} patched no module of the {type(backbone).__name__}")
    except BaseException:
        _restore_module(modeling, module_state)
        _restore_instances(instance_state)
        raise
    _restore_module(modeling, module_state, keep=frozenset({ROPE_FUNCTION}) if rope else frozenset())
    names = [m._get_name() for m in patched]
    return LigerPatch(
        model_type=model_type, version=version,
        norms=sum("RMSNorm" in name for name in names), mlps=sum("MLP" in name for name in names),
        rope=rope and _is_liger(getattr(modeling, ROPE_FUNCTION, None)),
        rope_before=_is_liger(module_state.get(ROPE_FUNCTION)),
        module=modeling.__name__,
    )


def _is_liger(function: object) -> bool:
    return str(getattr(function, "__module__", "")).startswith("liger_kernel")


def apply_kernels(backbone: nn.Module, choice: KernelChoice, *, compiled: bool) -> Fallback | None:
    """Patch `backbone` (a transformers base model) in place with the chosen kernels. `compiled`: its layers will be
    compiled (``model.compile`` resolved on), so RoPE is left to the compiler (module docstring).

    Returns the :class:`Fallback` of an ``auto`` choice whose patch failed (the backbone is then as it was built),
    else None. A failing explicit ``liger`` raises ValueError naming ``model.kernels``."""
    if choice.kernels != "liger":
        return None
    try:
        patch = patch_liger(backbone, rope=not compiled)
    except Exception as exc:  # noqa: BLE001 - an import, a missing model type or module, an older API: "cannot"
        if choice.auto:
            return fall_back("model.kernels", exc, LIGER_FALLBACK)
        raise explicit_failure("model.kernels", "liger", exc,
                               "set model.kernels: none, or auto to fall back to the transformers layers") from None
    log(f"kernels: {patch.describe()}", level=logging.WARNING if patch.rope_before and compiled else logging.INFO)
    return None
