"""Fused GPU kernels for the decoder layers: liger-kernel's RMSNorm, RoPE and SwiGLU (``model.kernels``).

At hidden size 1024 (Qwen3-0.6B) the unfused elementwise kernels of the transformers layers - RMSNorm's fp32
upcasts, rotary embeddings, the SwiGLU product - cost more GPU time than the matrix products. Liger-Kernel
(Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training", https://github.com/linkedin/Liger-Kernel)
replaces them with fused Triton kernels: ``apply_liger_kernel_to_<family>(model=...)`` patches the instance's
norms and MLPs and the family's ``apply_rotary_pos_emb``. Its cross-entropy kernels are for language-model heads
and stay off (an embedding model has none).

``model.kernels``:
* ``auto`` - liger when the ranks run on CUDA, liger-kernel imports and supports the model family; else none. The
  choice and its reason are logged once at start.
* ``liger`` - required: a one-line error at start (and at ``--check``) when any of the three conditions fails.
* ``none`` - the transformers layers as they are.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

# Decoder families whose liger patch covers RMSNorm, RoPE and SwiGLU (liger-kernel's apply_liger_kernel_to_<type>).
LIGER_FAMILIES = ("qwen3", "qwen2", "llama", "mistral")


@dataclass(frozen=True)
class KernelChoice:
    """What ``model.kernels`` resolved to, and why (for the start-up log line)."""

    kernels: str  # "liger" or "none"
    reason: str


def liger_importable() -> bool:
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        importlib.import_module("liger_kernel.transformers")
    except Exception:  # noqa: BLE001 - a broken install (no Triton, wrong torch) is as good as none
        return False
    return True


def resolve_kernels(requested: str, device: torch.device, model_type: str, *, importable: bool | None = None
                    ) -> KernelChoice:
    """``model.kernels`` for a model of `model_type` on `device` (ValueError naming the key when ``liger`` is asked
    for and cannot run). `importable`: whether liger-kernel imports (default: try it here)."""
    if requested == "none":
        return KernelChoice("none", "model.kernels: none")
    blockers = []
    if device.type != "cuda":
        blockers.append(f"the ranks run on {device.type}, liger-kernel's Triton kernels need CUDA")
    if model_type not in LIGER_FAMILIES:
        blockers.append(f"model type {model_type!r} is not one of liger's supported families {', '.join(LIGER_FAMILIES)}")
    if not blockers and not (liger_importable() if importable is None else importable):
        blockers.append("liger-kernel does not import (pip install -e '.[gpu]')")
    if not blockers:
        return KernelChoice("liger", f"liger-kernel RMSNorm, RoPE and SwiGLU for {model_type} on CUDA")
    if requested == "liger":
        raise ValueError(f"model.kernels: liger cannot be used: {'; '.join(blockers)}")
    return KernelChoice("none", f"auto: {'; '.join(blockers)}")


def apply_kernels(backbone: Any, choice: KernelChoice) -> None:
    """Patch `backbone` (a transformers base model) in place with the chosen kernels."""
    if choice.kernels != "liger":
        return
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[backbone.config.model_type]
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
          model=backbone)
