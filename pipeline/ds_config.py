"""Load a DeepSpeed JSON config and fill the batch fields from the training config, so they can never disagree.

train_micro_batch_size_per_gpu = micro_batch, gradient_accumulation_steps = grad_accum and
train_batch_size = micro_batch * grad_accum * world_size are always written (values in the file are overwritten).
bf16 is switched on only when asked and the run is on CUDA ("enabled": "auto" resolves the same way); fp16 is off
on CPU as well.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_ds_config(
    path: str | Path,
    *,
    micro_batch: int,
    grad_accum: int = 1,
    world_size: int,
    use_bf16: bool,
) -> dict[str, Any]:
    """Read `path` and return the dict to pass to ``deepspeed.initialize(config=...)``."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read DeepSpeed config ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
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
