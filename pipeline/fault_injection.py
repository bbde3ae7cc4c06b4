"""Fault injection for resilience tests: environment variables that make a run fail on purpose.

A testing aid only. Every hook here is a no-op unless its variable is set, and the variables are read once per
process (the launchers pass the environment on to every rank):

``PIPELINE_INJECT_NONFINITE_STEPS=3,4``
    The loss of these attempted optimizer steps is made NaN before the backward, so that the loss and every
    gradient are non-finite. Steps are numbered 1, 2, ... over the whole run, counting skipped steps: attempt
    number = ``global_step + skipped_steps + 1`` (both are saved in checkpoints, so the numbering survives resume).
``PIPELINE_INJECT_NONFINITE_GRADS=2``
    The same for the gradients only: the loss keeps its (finite) value, its backward yields NaN.
``PIPELINE_INJECT_ENOSPC=checkpoint@6,export@final:1``
    Raise ``OSError(ENOSPC)`` while writing the checkpoint of step 6 (after DeepSpeed wrote its files, before the
    RNG states and the COMPLETE marker: a partial checkpoint directory is left behind) or while writing the export
    named ``final`` (``export@epoch_0`` for an epoch export). ``:R`` limits the failure to global rank R.
``PIPELINE_INJECT_STEP_DELAY=0.5``
    Sleep this many seconds after every training step (widens the window in which tests send signals).
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from pipeline.logs import global_rank, log

NONFINITE_VAR = "PIPELINE_INJECT_NONFINITE_STEPS"
NONFINITE_GRADS_VAR = "PIPELINE_INJECT_NONFINITE_GRADS"
ENOSPC_VAR = "PIPELINE_INJECT_ENOSPC"
DELAY_VAR = "PIPELINE_INJECT_STEP_DELAY"


@dataclass(frozen=True)
class _Failure:
    kind: str  # "checkpoint" or "export"
    at: str  # step number (checkpoint) or export name
    rank: int | None  # None: every rank


def _parse_steps(raw: str, var: str) -> frozenset[int]:
    try:
        return frozenset(int(s) for s in raw.replace(" ", "").split(",") if s)
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected comma-separated step numbers, e.g. 3,4") from None


def _parse_failures(raw: str) -> tuple[_Failure, ...]:
    out = []
    for item in raw.replace(" ", "").split(","):
        if not item:
            continue
        what, sep, rest = item.partition("@")
        at, _, rank = rest.partition(":")
        if not sep or what not in ("checkpoint", "export") or not at or (rank and not rank.isdigit()):
            raise ValueError(f"{ENOSPC_VAR}={raw!r}: expected KIND@WHERE[:RANK] items, e.g. checkpoint@6 or export@final:1")
        out.append(_Failure(what, at, int(rank) if rank else None))
    return tuple(out)


@lru_cache(maxsize=None)
def _nonfinite_steps() -> frozenset[int]:
    raw = os.environ.get(NONFINITE_VAR, "")
    steps = _parse_steps(raw, NONFINITE_VAR) if raw else frozenset()
    if steps:
        log(f"fault injection: non-finite loss at attempted steps {sorted(steps)} ({NONFINITE_VAR})")
    return steps


@lru_cache(maxsize=None)
def _nonfinite_grad_steps() -> frozenset[int]:
    raw = os.environ.get(NONFINITE_GRADS_VAR, "")
    steps = _parse_steps(raw, NONFINITE_GRADS_VAR) if raw else frozenset()
    if steps:
        log(f"fault injection: non-finite gradients at attempted steps {sorted(steps)} ({NONFINITE_GRADS_VAR})")
    return steps


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN backward."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


@lru_cache(maxsize=None)
def _failures() -> tuple[_Failure, ...]:
    raw = os.environ.get(ENOSPC_VAR, "")
    failures = _parse_failures(raw) if raw else ()
    if failures:
        log(f"fault injection: disk full at {raw} ({ENOSPC_VAR})")
    return failures


@lru_cache(maxsize=None)
def _delay() -> float:
    raw = os.environ.get(DELAY_VAR, "")
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{DELAY_VAR}={raw!r}: expected seconds, e.g. 0.5") from None


_attempt = 0


def set_attempt(attempt: int) -> None:
    """Tell the hooks which optimizer step (1-based, skipped ones included) is being attempted."""
    global _attempt
    _attempt = attempt


def poison_loss(loss: torch.Tensor) -> torch.Tensor:
    """`loss`, or NaN (keeping the graph, so every gradient becomes NaN) when the current attempt is listed in
    ``PIPELINE_INJECT_NONFINITE_STEPS``; `loss` with a NaN backward when it is listed in ``..._GRADS``."""
    if _nonfinite_steps() and _attempt in _nonfinite_steps():
        return loss * float("nan")
    if _nonfinite_grad_steps() and _attempt in _nonfinite_grad_steps():
        return _NanGradient.apply(loss)
    return loss


def maybe_fail_write(kind: str, at: str | int, path: str | os.PathLike) -> None:
    """Raise ENOSPC for `path` when ``kind@at`` (on this rank, or on every rank) is listed in the variable."""
    for failure in _failures():
        if failure.kind == kind and failure.at == str(at) and failure.rank in (None, global_rank()):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENOSPC_VAR})", str(path))


def step_delay() -> None:
    """Sleep for ``PIPELINE_INJECT_STEP_DELAY`` seconds (no-op when unset)."""
    if _delay() > 0:
        time.sleep(_delay())
