"""DeepSpeed checkpoints that are complete or absent, with the data position and RNG states for exact resume.

Layout under ``<output_dir>/checkpoints``::

    step_00000200/            engine.save_checkpoint(tag=...): ZeRO partitions, optimizer, lr scheduler,
                              client state {"trainer": TrainerState} (written by every rank)
    step_00000200/rng_rank{r}.pt   rank r's python / numpy / torch (CPU and CUDA) RNG states
    step_00000200/COMPLETE    written by rank 0 only after a barrier that every rank reaches after writing
    latest_complete           name of the newest COMPLETE tag, replaced atomically after COMPLETE

A crash while saving leaves a tag without COMPLETE, which resume ignores (and the next save removes); the pointer
still names the previous complete checkpoint. Only the last ``keep_last`` complete checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.logs import global_rank, log

COMPLETE = "COMPLETE"
POINTER = "latest_complete"


@dataclass
class TrainerState:
    """Where training stands: the next step to run is `step_in_epoch` of `epoch`; `global_step` steps are done."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:08d}"

    def latest(self) -> str | None:
        """Newest complete tag, or None. Falls back to scanning when the pointer is missing or stale."""
        pointer = self.root / POINTER
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if (self.root / tag / COMPLETE).is_file():
                return tag
        complete = sorted(p.parent.name for p in self.root.glob(f"step_*/{COMPLETE}"))
        return complete[-1] if complete else None

    def save(self, engine: Any, state: TrainerState) -> Path:
        """Save on every rank; returns the tag directory. Raises (on every rank) if any rank failed to write."""
        tag = self.tag_for(state.global_step)
        path = self.root / tag
        ok = 1
        error = ""
        try:
            if global_rank() == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if path.exists():  # a stale, incomplete save of the same step
                    shutil.rmtree(path)
            _barrier()
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"trainer": asdict(state)}, save_latest=False)
            torch.save(rng_state(), path / f"rng_rank{global_rank()}.pt")
        except Exception as exc:  # disk full, permissions: reported below on every rank
            ok = 0
            error = f"{type(exc).__name__}: {exc}"
        ok = _all_ok(ok)
        if not ok:
            if error:
                log(f"checkpoint {path}: save failed ({error})", all_ranks=True)
            raise RuntimeError(f"checkpoint {path}: save failed on at least one rank; {self.latest()} stays the latest")
        if global_rank() == 0:
            (path / COMPLETE).write_text(json.dumps({"global_step": state.global_step, "time": time.time()}))
            tmp = self.root / f".{POINTER}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / POINTER)
            self._prune(keep=tag)
        _barrier()
        log(f"checkpoint saved: {path}")
        return path

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step_*") if p.is_dir())
        complete = [t for t in tags if (self.root / t / COMPLETE).is_file()]
        doomed = set(complete[: -self.keep_last]) | {t for t in tags if t not in complete and t < keep}
        for tag in sorted(doomed):
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, engine: Any, tag: str) -> TrainerState:
        """Load weights, optimizer, scheduler, trainer state and this rank's RNG states from `tag`."""
        path, client = engine.load_checkpoint(str(self.root), tag=tag)
        if path is None or client is None or "trainer" not in client:
            raise RuntimeError(f"checkpoint {self.root / tag}: could not be loaded")
        rng_file = self.root / tag / f"rng_rank{global_rank()}.pt"
        if not rng_file.is_file():
            raise RuntimeError(f"{rng_file}: missing (checkpoint written with another world size?)")
        set_rng_state(torch.load(rng_file, weights_only=False))
        return TrainerState(**client["trainer"])


def _all_ok(ok: int) -> int:
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([ok], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return int(flag.item())
    return ok
