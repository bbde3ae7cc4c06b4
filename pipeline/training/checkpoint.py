"""DeepSpeed checkpoints that are complete or absent, with the data position and RNG states for exact resume.

Layout under ``<output_dir>/checkpoints``::

    step_00000200/            engine.save_checkpoint(tag=...): ZeRO partitions, optimizer, lr scheduler,
                              client state {"trainer": TrainerState} (written by every rank)
    step_00000200/rng_rank{r}.pt   rank r's python / numpy / torch (CPU and CUDA) RNG states, plain data: loaded
                              with torch.load(weights_only=True), no pickled code runs
    step_00000200/COMPLETE    written by rank 0 only after a barrier that every rank reaches after writing: JSON
                              {global_step, time, world_size, identity} (the run identity,
                              pipeline.training.run_identity, compared at resume)
    step_00000200/universal/  DeepSpeed's universal copy, made when a run resumes on another world size
                              (pipeline.training.resume)
    latest_complete           name of the newest COMPLETE tag, replaced atomically after COMPLETE

A crash while saving leaves a tag without COMPLETE, which resume ignores (and the next save removes); the pointer
still names the previous complete checkpoint. Only the last ``keep_last`` complete checkpoints are kept.

A write error (disk full, a read-only or vanished directory, a file where the tag directory should be) on any rank
fails the save on every rank alike, with one :class:`CheckpointError` naming the tag directory, the rank and the
error: the ranks agree on the outcome after each phase (prepare the directory / DeepSpeed's files and the RNG
states / COMPLETE and the pointer). DeepSpeed's own file writes are wrapped so that an error is recorded instead of
raised in the middle of ``engine.save_checkpoint`` - a rank leaving it early would strand the others in its
barriers. The partial directory is then removed (it may be what filled the disk); the previous checkpoint stays the
latest, untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pipeline.resilience.faults import NO_FAULTS, FaultInjector
from pipeline.training.errors import TrainingAborted
from pipeline.logs import global_rank, log

COMPLETE = "COMPLETE"
POINTER = "latest_complete"


class CheckpointError(TrainingAborted):
    """A checkpoint could not be written (on some rank); the previous checkpoint stays the latest."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a complete checkpoint's COMPLETE file says: its step, the world size that wrote it, and the run
    identity (None when written before identities were recorded)."""

    step: int | None
    world_size: int | None
    identity: dict[str, Any] | None


@dataclass
class TrainerState:
    """Where training stands: the next batch to train on is `step_in_epoch` of `epoch`; `global_step` optimizer
    updates are done. A skipped (non-finite) step consumes its batch but makes no update, so `step_in_epoch` may run
    ahead of `global_step`; `skipped_steps` counts them all, `consecutive_skips` those since the last update.
    `best_value` / `best_step`: the metric ``train.keep_best`` keeps the export of, at its best so far."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None  # train.keep_best: the best value so far, and the step that reached it
    best_step: int | None = None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# What a checkpoint's RNG file may hold besides plain data: numpy arrays, which files written before the numpy state was
# saved as lists contain (numpy's own array reconstruction; the name numpy 1 pickled it under is accepted too).
_reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
_NUMPY_ARRAY_GLOBALS: list[Any] = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray,
                                   np.dtype, type(np.dtype(np.uint32))]


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) RNG states, as plain data (ints, floats, strings,
    tuples, lists, dicts, tensors): loadable with ``torch.load(weights_only=True)``. numpy's state is its
    ``get_state(legacy=False)`` mapping with the MT19937 key as a list of ints."""
    numpy = np.random.get_state(legacy=False)
    numpy = {**numpy, "state": {**numpy["state"], "key": [int(k) for k in numpy["state"]["key"]]}}
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states of :func:`rng_state` (or of an older file, whose numpy state is numpy's legacy tuple)."""
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = {**numpy, "state": {**numpy["state"], "key": np.asarray(numpy["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_file(path: Path) -> dict[str, Any]:
    """An ``rng_rank{r}.pt`` file, unpickled with ``weights_only=True`` (plain data and tensors only; numpy arrays
    too, for files written before :func:`rng_state` stored none). RuntimeError naming the file when it holds
    anything else."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                     type(exc).__name__)
        raise RuntimeError(f"{path}: not an RNG state file of this pipeline (refused by torch.load(weights_only=True): "
                           f"{first})") from None


class CheckpointManager:
    """Saves and finds complete checkpoints under `root` (layout in the module docstring); `identity` (the run
    identity) is recorded in every checkpoint saved; `faults` injects write errors in tests."""

    def __init__(self, root: str | Path, keep_last: int, *, identity: dict[str, Any] | None = None,
                 faults: FaultInjector = NO_FAULTS) -> None:
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.identity = identity
        self.faults = faults

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

    def info(self, tag: str) -> CheckpointInfo:
        """The COMPLETE record of `tag`. Checkpoints written before it recorded the world size count their
        ``rng_rank*.pt`` files (one per rank); unreadable fields are None."""
        try:
            record = json.loads((self.root / tag / COMPLETE).read_text())
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        world = record.get("world_size")
        if not isinstance(world, int):
            world = len(list((self.root / tag).glob("rng_rank*.pt"))) or None
        step = record.get("global_step")
        identity = record.get("identity")
        return CheckpointInfo(step if isinstance(step, int) else None, world,
                              identity if isinstance(identity, dict) else None)

    def save(self, engine: Any, state: TrainerState, tag: str | None = None) -> Path:
        """Save on every rank (default tag: ``step_<global_step>``); returns the tag directory. Raises
        :class:`CheckpointError` on every rank if any rank failed to write; the previous checkpoint stays the latest."""
        tag = tag or self.tag_for(state.global_step)
        path = self.root / tag
        previous = self.latest()
        error = ""
        if global_rank() == 0:  # 1. a fresh, empty tag directory
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if path.is_dir() and not path.is_symlink():  # a stale, incomplete save of the same tag
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
                path.mkdir()
            except OSError as exc:
                error = _describe(exc)
        self._agree(error, path, previous, remove_partial=False)

        error = ""  # 2. DeepSpeed's files, then this rank's RNG states
        with _recording_write_errors(engine) as failures:
            try:
                engine.save_checkpoint(str(self.root), tag=tag, client_state={"trainer": asdict(state)},
                                       save_latest=False)
            except Exception as exc:  # noqa: BLE001 - reported below, on every rank
                error = _describe(exc)
        error = error or (failures[0] if failures else "")
        if not error:
            rng_file = path / f"rng_rank{global_rank()}.pt"
            try:
                self.faults.check_write("checkpoint", state.global_step, rng_file)
                torch.save(rng_state(), rng_file)
            except OSError as exc:
                error = _describe(exc)
        self._agree(error, path, previous)

        error = ""  # 3. COMPLETE, then the pointer (atomically)
        if global_rank() == 0:
            try:
                record = {"global_step": state.global_step, "time": time.time(), "world_size": _world_size()}
                if self.identity is not None:
                    record["identity"] = self.identity
                (path / COMPLETE).write_text(json.dumps(record))
                tmp = self.root / f".{POINTER}.tmp"
                tmp.write_text(tag)
                os.replace(tmp, self.root / POINTER)
            except OSError as exc:
                error = _describe(exc)
                (path / COMPLETE).unlink(missing_ok=True)
        self._agree(error, path, previous)
        if global_rank() == 0:
            self._prune(keep=tag)
        _barrier()
        log(f"checkpoint saved: {path}")
        return path

    def _agree(self, error: str, path: Path, previous: str | None, *, remove_partial: bool = True) -> None:
        """All ranks learn every rank's error; on any, rank 0 removes the partial `path` and all raise alike."""
        errors = _gather_strings(error)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if not failed:
            return
        if remove_partial and global_rank() == 0 and path.is_dir() and not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)
        rank, first = failed[0]
        ranks = ", ".join(str(r) for r, _ in failed)
        kept = str(self.root / previous) if previous else "no checkpoint"
        raise CheckpointError(
            f"checkpoint {path}: save failed on rank {ranks} ({first}); {kept} stays the latest"
            if len(failed) == 1 else
            f"checkpoint {path}: save failed on ranks {ranks} (rank {rank}: {first}); {kept} stays the latest"
        )

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step_*") if p.is_dir())
        complete = [t for t in tags if (self.root / t / COMPLETE).is_file()]
        doomed = set(complete[: -self.keep_last]) | {t for t in tags if t not in complete and t < keep}
        for tag in sorted(doomed):
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, engine: Any, tag: str, *, universal: Path | None = None) -> TrainerState:
        """Load weights, optimizer, scheduler, trainer state and this rank's RNG states from `tag`.

        `universal`: DeepSpeed's universal copy of `tag` (written by another world size), loaded instead by an
        engine built with ``"checkpoint": {"load_universal": true}``; the RNG states are then not restored (they
        belong to the old ranks: :func:`pipeline.training.resume.load` reseeds them)."""
        if universal is not None:
            path, client = engine.load_checkpoint(str(universal.parent), tag=universal.name)
            if path is None or client is None or "trainer" not in client:
                raise RuntimeError(f"checkpoint {universal}: could not be loaded")
            return TrainerState(**client["trainer"])
        path, client = engine.load_checkpoint(str(self.root), tag=tag)
        if path is None or client is None or "trainer" not in client:
            raise RuntimeError(f"checkpoint {self.root / tag}: could not be loaded")
        rng_file = self.root / tag / f"rng_rank{global_rank()}.pt"
        if not rng_file.is_file():
            raise RuntimeError(f"{rng_file}: missing (checkpoint written with another world size?)")
        set_rng_state(load_rng_file(rng_file))
        return TrainerState(**client["trainer"])


def _describe(exc: BaseException) -> str:
    """One line: exception type and message."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _gather_strings(value: str) -> list[str]:
    """Every rank's `value`, indexed by rank (one collective; `[value]` in a single process)."""
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return [str(v or "") for v in out]
    return [value]


@contextlib.contextmanager
def _recording_write_errors(engine: Any) -> Iterator[list[str]]:
    """While active, OSErrors of the engine's checkpoint writes (``checkpoint_engine.save`` / ``makedirs``, and rank
    0's copy of DeepSpeed's ``zero_to_fp32.py`` next to the checkpoints) are appended to the yielded list instead of
    raised, so that the rank keeps taking part in DeepSpeed's barriers."""
    failures: list[str] = []
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    targets = [(ckpt_engine, "save"), (ckpt_engine, "makedirs"), (engine, "_copy_recovery_script")]
    patched = []
    for owner, name in targets:
        original = getattr(owner, name, None) if owner is not None else None
        if original is None:
            continue

        def recording(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            try:
                return _original(*args, **kwargs)
            except OSError as exc:
                failures.append(_describe(exc))
                return None

        patched.append((owner, name, name in vars(owner), original))
        setattr(owner, name, recording)
    try:
        yield failures
    finally:
        for owner, name, own, original in patched:
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
