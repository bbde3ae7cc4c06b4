"""Learning-rate schedule: linear warmup, then cosine decay to a floor (F2LLM's schedule).

    lr(s) = lr_max * (s + 1) / warmup                                  for s < warmup
    lr(s) = min_lr + (lr_max - min_lr) * (1 + cos(pi * t)) / 2         t = (s - warmup) / (total - warmup)
    lr(s) >= min_lr always (F2LLM clamps the floor after each step).
"""
from __future__ import annotations

import math

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    if warmup > 0 and step < warmup:
        value = lr * (step + 1) / warmup
    else:
        span = max(total - warmup, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        value = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    return max(value, min_lr) if step >= warmup else value


def warmup_cosine(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup: int, total: int):
    """A LambdaLR whose factor reproduces :func:`lr_at` (the optimizer's base lr must be `lr`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, lr=lr, min_lr=min_lr, warmup=warmup, total=total) / lr
    )
