"""LoRA adapters (``model.lora``) built by peft: a frozen backbone plus trainable low-rank updates, merged at export.

For every adapted linear layer y = W x + b (W [out, in], frozen), LoRA (Hu et al. 2021, arXiv:2106.09685) trains
A [r, in] and B [out, r]:

    y = W x + b + (alpha / r) B A dropout(x),      B = 0 at the start: the adapted model starts as the base.

The adapters are peft's (``peft.get_peft_model``); the backbone of :class:`pipeline.model.embedding.EmbeddingModel`
is then a ``peft.PeftModel``, whose forward is the base model's. Only A and B require gradients, and the trainer
hands DeepSpeed only the parameters that require gradients (``model_parameters``): under ZeRO-3 the frozen base is
still partitioned over the ranks and gathered layer by layer in every forward, as in full fine-tuning, while Adam's
fp32 master weights and moments exist for the adapters alone; ZeRO-2 keeps the base whole on every rank. The
adapters' dropout (``torch.nn.Dropout``) draws from the global RNG, so GradCache's RNG replay reproduces its masks and
the chunked gradient stays exact (``python -m pipeline.gradcheck``).

Export (:func:`save_merged_with_adapter`): the adapters are merged into the weights, W' = W + (alpha / r) B A
(peft's ``merge_and_unload``), and the merged model is written as an ordinary transformers model - it loads without
peft and embeds as the training model did (up to the rounding of W' to the weights' dtype); the adapter alone goes
to ``adapter/`` in peft's format (``adapter_config.json``, ``adapter_model.safetensors``), for
``PeftModel.from_pretrained(base_model, "adapter")``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import LoraConfig

ALL_LINEAR = "all-linear"


def check_lora(cfg: LoraConfig | None) -> None:
    """ValueError naming the ``model.lora`` key whose value cannot work."""
    if cfg is None:
        return
    if cfg.r < 1:
        raise ValueError(f"model.lora.r: must be >= 1, got {cfg.r}")
    if cfg.alpha <= 0:
        raise ValueError(f"model.lora.alpha: must be > 0, got {cfg.alpha}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.lora.dropout: must be in [0, 1), got {cfg.dropout}")
    if cfg.target_modules != ALL_LINEAR and (not cfg.target_modules or not all(cfg.target_modules)):
        raise ValueError(f"model.lora.target_modules: expected module names or {ALL_LINEAR!r}, got "
                         f"{cfg.target_modules!r}")


def unused_modules(backbone: nn.Module) -> list[str]:
    """Linear layers outside the path to the last hidden states that pooling reads: a BERT-style ``pooler``."""
    return [name for name, module in backbone.named_modules()
            if (name == "pooler" or name.startswith("pooler.")) and isinstance(module, nn.Linear)]


def peft_lora_config(cfg: LoraConfig, backbone: nn.Module) -> Any:
    """peft's LoraConfig for `cfg` on `backbone`."""
    import peft

    targets = cfg.target_modules if cfg.target_modules == ALL_LINEAR else list(cfg.target_modules)
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                           exclude_modules=unused_modules(backbone) or None, bias="none")


def apply_lora(backbone: nn.Module, cfg: LoraConfig) -> nn.Module:
    """`backbone` (a transformers base model) with LoRA adapters: a ``peft.PeftModel``; every other weight frozen.
    ValueError naming ``model.lora.target_modules`` when no module matches."""
    import peft

    check_lora(cfg)
    try:
        return peft.get_peft_model(backbone, peft_lora_config(cfg, backbone))
    except ValueError as exc:  # peft's "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules: {' '.join(str(exc).split())[:300]}") from None


def is_lora(backbone: nn.Module) -> bool:
    """Whether `backbone` carries peft adapters (:func:`apply_lora`)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(backbone, PeftModel)


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of `module`; full sizes also when ZeRO-3 has partitioned them."""
    trainable = total = 0
    for p in module.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def describe_lora(backbone: nn.Module) -> str:
    """The adapters of `backbone` and how many parameters train, for the startup log."""
    trainable, total = parameter_counts(backbone)
    cfg = backbone.peft_config["default"]
    layers = sum(1 for m in backbone.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    return (f"r {cfg.r}, alpha {cfg.lora_alpha:g}, dropout {cfg.lora_dropout:g} on {layers} linear layers: "
            f"{trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters ({100 * trainable / total:.2f}%)")


def save_merged_with_adapter(backbone: nn.Module, state: dict[str, torch.Tensor], out: Path) -> None:
    """Write the merged model to `out` (``config.json``, ``model.safetensors``) and the adapter alone to
    ``out/adapter`` (peft's format), from `state`, the full state dict of the ``PeftModel`` `backbone` (gathered by
    :func:`pipeline.training.export.consolidated_state_dict`: its partitions under ZeRO-3 hold no full weights).

    A peft model of the same structure (of the base model's own class: code a model directory ships, loaded under
    ``model.trust_remote_code``, is not looked up again) is built on the meta device (no memory) and takes the
    tensors of `state` (``load_state_dict(assign=True)``: no copy); peft saves its adapter and merges it into the
    weights in place (``merge_and_unload``); the training backbone's own ``save_pretrained`` then writes the merged
    weights with its config, as for a fully fine-tuned model."""
    from peft import get_peft_model

    base = backbone.get_base_model()
    with torch.device("meta"):
        skeleton = type(base)._from_config(base.config)  # what AutoModel.from_config builds for a built-in class
    clone = get_peft_model(skeleton, copy.deepcopy(backbone.peft_config["default"]))
    clone.load_state_dict(state, strict=True, assign=True)
    clone.save_pretrained(str(out / "adapter"), safe_serialization=True)
    merged = clone.merge_and_unload()
    base.save_pretrained(str(out), state_dict=merged.state_dict(), safe_serialization=True)
