"""Load a DeepSpeed JSON config and fill it from the training config, so that the two can never disagree.

:func:`load_ds_config`: train_micro_batch_size_per_gpu = micro_batch, gradient_accumulation_steps = grad_accum and
train_batch_size = micro_batch * grad_accum * world_size are always written (values in the file are overwritten).
bf16 is switched on only when :func:`deepspeed_bf16` says so ("enabled": "auto" resolves the same way); fp16 is off
on CPU as well.

:func:`training_ds_config` is the dict the trainer initialises DeepSpeed with (and ``--check`` validates): the
above, plus the optimizer's lr, betas and weight decay and the gradient clipping from ``train.*``; a scheduler in
the JSON is dropped (the trainer's own :mod:`pipeline.training.lr_schedule` matches the config exactly).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.mapping_file import read_mapping


def deepspeed_bf16(model_dtype: str, device_type: str) -> bool:
    """Whether DeepSpeed runs in bf16: on CUDA, with ``model.dtype`` auto or bfloat16 (the one bf16 decision)."""
    return device_type == "cuda" and model_dtype in ("auto", "bfloat16")


def deepspeed_fp16(ds: dict[str, Any]) -> bool:
    """Whether the DeepSpeed config `ds` (as :func:`load_ds_config` filled it) leaves fp16 on: its ``fp16`` section
    enabled (true or "auto"). load_ds_config turns it off unless bf16 is on, so it is then on beside bf16, which
    DeepSpeed refuses (``--check`` reports it)."""
    section = ds.get("fp16")
    return isinstance(section, dict) and section.get("enabled") in (True, "auto")


def read_ds_json(path: str | Path, *, key: str | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON at `path` as written (a one-line ValueError naming the file, and the config `key` that
    named it, when it cannot be read or is not a JSON object)."""
    return read_mapping(path, "DeepSpeed config", syntax="json", key=key)


def load_ds_config(
    path: str | Path,
    *,
    micro_batch: int,
    grad_accum: int = 1,
    world_size: int,
    use_bf16: bool,
    key: str | None = None,
) -> dict[str, Any]:
    """Read `path` (:func:`read_ds_json`; `key`: the config key naming it) and return the dict to pass to
    ``deepspeed.initialize(config=...)``."""
    cfg = read_ds_json(path, key=key)
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"load_ds_config: {name} must be >= 1, got {value}")
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    bf16 = cfg.setdefault("bf16", {})
    bf16["enabled"] = bool(use_bf16)
    if not use_bf16 and isinstance(cfg.get("fp16"), dict):
        cfg["fp16"]["enabled"] = False
    return cfg


def training_ds_config(cfg: Config, *, world_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config of a training run of `cfg` on `world_size` ranks of `device_type`."""
    t = cfg.train
    ds = load_ds_config(cfg.deepspeed, micro_batch=t.per_device_batch_size, world_size=world_size,
                        use_bf16=deepspeed_bf16(cfg.model.dtype, device_type), key="deepspeed")
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    ds["optimizer"].setdefault("params", {}).update({"lr": t.lr, "betas": list(t.betas), "weight_decay": t.weight_decay})
    ds["gradient_clipping"] = t.grad_clip
    ds.pop("scheduler", None)
    if ds["bf16"]["enabled"] and cfg.gradcache.fp32_accumulation:
        # Reduced gradient partitions summed over a step's chunks in fp32 (when chunks are reduced one by one;
        # coalesced reduction sums on the parameters instead: pipeline.training.backward.FP32Accumulator).
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    return ds
