"""Fault injection for resilience tests: environment variables that make a run fail on purpose.

A testing aid only. :meth:`FaultInjector.from_env` reads the variables once (the launchers pass the environment on
to every rank); the trainer is given the injector and hands it to what it composes (the step's loss hook, the
checkpoint manager, the export). An injector built from an environment without the variables does nothing.

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
from typing import Callable, Mapping

import torch

from pipeline.logs import global_rank

NONFINITE_VAR = "PIPELINE_INJECT_NONFINITE_STEPS"
NONFINITE_GRADS_VAR = "PIPELINE_INJECT_NONFINITE_GRADS"
ENOSPC_VAR = "PIPELINE_INJECT_ENOSPC"
DELAY_VAR = "PIPELINE_INJECT_STEP_DELAY"


@dataclass(frozen=True)
class WriteFailure:
    kind: str  # "checkpoint" or "export"
    at: str  # step number (checkpoint) or export name
    rank: int | None  # None: every rank


def _parse_steps(raw: str, var: str) -> frozenset[int]:
    try:
        return frozenset(int(s) for s in raw.replace(" ", "").split(",") if s)
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected comma-separated step numbers, e.g. 3,4") from None


def _parse_failures(raw: str) -> tuple[WriteFailure, ...]:
    out = []
    for item in raw.replace(" ", "").split(","):
        if not item:
            continue
        what, sep, rest = item.partition("@")
        at, _, rank = rest.partition(":")
        if not sep or what not in ("checkpoint", "export") or not at or (rank and not rank.isdigit()):
            raise ValueError(f"{ENOSPC_VAR}={raw!r}: expected KIND@WHERE[:RANK] items, e.g. checkpoint@6 or export@final:1")
        out.append(WriteFailure(what, at, int(rank) if rank else None))
    return tuple(out)


def _parse_delay(raw: str) -> float:
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{DELAY_VAR}={raw!r}: expected seconds, e.g. 0.5") from None


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN backward."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def _nan_loss(loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan")  # keeps the graph: every gradient becomes NaN too


@dataclass(frozen=True)
class FaultInjector:
    """The faults asked for (see the module docstring); the default instance injects nothing."""

    nonfinite_loss_steps: frozenset[int] = frozenset()
    nonfinite_grad_steps: frozenset[int] = frozenset()
    write_failures: tuple[WriteFailure, ...] = ()
    step_delay_s: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "FaultInjector":
        """Parse the ``PIPELINE_INJECT_*`` variables (ValueError, one line naming the variable, when malformed)."""
        env = os.environ if environ is None else environ
        return cls(
            nonfinite_loss_steps=_parse_steps(env.get(NONFINITE_VAR, ""), NONFINITE_VAR),
            nonfinite_grad_steps=_parse_steps(env.get(NONFINITE_GRADS_VAR, ""), NONFINITE_GRADS_VAR),
            write_failures=_parse_failures(env.get(ENOSPC_VAR, "")),
            step_delay_s=_parse_delay(env.get(DELAY_VAR, "")),
        )

    def describe(self) -> list[str]:
        """One log line per active fault (none when nothing is injected)."""
        lines = []
        if self.nonfinite_loss_steps:
            lines.append(f"non-finite loss at attempted steps {sorted(self.nonfinite_loss_steps)} ({NONFINITE_VAR})")
        if self.nonfinite_grad_steps:
            lines.append(f"non-finite gradients at attempted steps {sorted(self.nonfinite_grad_steps)} "
                         f"({NONFINITE_GRADS_VAR})")
        if self.write_failures:
            where = ",".join(f"{f.kind}@{f.at}" + ("" if f.rank is None else f":{f.rank}") for f in self.write_failures)
            lines.append(f"disk full at {where} ({ENOSPC_VAR})")
        if self.step_delay_s:
            lines.append(f"{self.step_delay_s} s sleep after every step ({DELAY_VAR})")
        return [f"fault injection: {line}" for line in lines]

    def loss_hook(self, attempt: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For attempted step `attempt`: a function making the loss NaN (``..._STEPS``) or giving it a NaN backward
        (``..._GRADS``), or None when nothing is injected at that step."""
        if attempt in self.nonfinite_loss_steps:
            return _nan_loss
        if attempt in self.nonfinite_grad_steps:
            return _NanGradient.apply
        return None

    def check_write(self, kind: str, at: str | int, path: str | os.PathLike) -> None:
        """Raise ENOSPC for `path` when ``kind@at`` (on this rank, or on every rank) is listed."""
        for failure in self.write_failures:
            if failure.kind == kind and failure.at == str(at) and failure.rank in (None, global_rank()):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENOSPC_VAR})", str(path))

    def after_step(self) -> None:
        """Sleep for ``PIPELINE_INJECT_STEP_DELAY`` seconds (no-op when unset)."""
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)


NO_FAULTS = FaultInjector()
