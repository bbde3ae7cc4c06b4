"""Resuming a run: which checkpoint, whether the run may continue from it, and loading it on any world size.

:func:`resume_point` is the one decision, made by the trainer at start and by ``launch/train.py --check``: the
checkpoint ``--resume auto|TAG`` names, its run identity (:mod:`pipeline.training.run_identity`) compared with this
run's - any change is refused with one line naming every changed key and both values, or accepted with a warning
under ``--resume-force``; a checkpoint without an identity (written before identities were recorded) is accepted
with a warning, and so are the keys an older identity does not record - and whether the world size changed.

Another world size (32 GPUs preempted, 16 come back; the global batch kept by doubling the per-device batch) is
resumed through DeepSpeed's universal checkpoint (Lian et al. 2024, "Universal Checkpointing: Efficient and
Flexible Checkpointing for Large Scale Distributed Training", arXiv 2406.18820; ``deepspeed.checkpoint.
ds_to_universal``): ZeRO's optimizer files are partitioned by rank, so rank 0 converts the checkpoint once into
``<tag>/universal/`` - one file per parameter for the fp32 master weights and each Adam moment - and the engine,
built with ``"checkpoint": {"load_universal": true}``, cuts its own partitions out of them. The lr schedule, the
step counters and the trainer state come from rank 0's model-states file. What cannot carry over are the per-rank
RNG states (``rng_rank{r}.pt``): the new ranks are seeded from (train.seed, step, rank) instead, so dropout masks
differ from both the old run and an uninterrupted run on the new world size (without dropout the run continues
exactly: the batches are a pure function of seed, epoch, step and the global batch, :mod:`pipeline.data.sampler`).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from pipeline.logs import global_rank, log
from pipeline.training.checkpoint import COMPLETE, CheckpointManager, TrainerState
from pipeline.training.errors import TrainingAborted
from pipeline.training.run_identity import identity_changes, unrecorded_keys

UNIVERSAL = "universal"
# Rank 0 converts while the others wait in a collective of their own with this timeout (the run's collectives use
# train.collective_timeout_s, which a large model's conversion may exceed); a rank that dies still ends the wait.
CONVERSION_TIMEOUT_S = 6 * 3600
# Below this much optimizer state the conversion runs in one process, above it in a pool of spawned workers.
POOL_BYTES = 1 << 30


class ResumeRefused(ValueError):
    """``--resume`` names a checkpoint the run must not continue from; the message is one line."""


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, and what differs from the run that wrote it."""

    path: Path
    step: int | None
    saved_world_size: int | None  # None: not recorded (taken as unchanged)
    world_size: int
    changes: tuple[str, ...]  # changed identity keys, accepted with --resume-force
    warnings: tuple[str, ...]  # what the run logs (WARNING) before it resumes

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def world_size_changed(self) -> bool:
        return self.saved_world_size is not None and self.saved_world_size != self.world_size

    def describe(self) -> str:
        """``PATH (step N)``, plus the world-size change when there is one."""
        text = f"{self.path} (step {self.step})" if self.step is not None else str(self.path)
        if self.world_size_changed:
            text += (f", written by {_ranks(self.saved_world_size)}: resumed on {self.world_size} through DeepSpeed's "
                     "universal checkpoint (per-rank RNG states not kept)")
        return text


def _ranks(n: int | None) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def resume_point(manager: CheckpointManager, resume: str | None, identity: dict[str, Any] | None, world_size: int,
                 *, force: bool = False) -> ResumePoint | None:
    """The checkpoint ``--resume`` names (``auto``: the newest complete one; None when there is none, or when
    `resume` is None), checked against this run's `identity` (None: not compared).

    Raises :class:`ResumeRefused` when a named tag is not a complete checkpoint, or when the identity changed and
    not `force`: ``--resume PATH: the run changed: KEY OLD -> NEW; ... (pass --resume-force to continue anyway)``.
    """
    if resume is None:
        return None
    tag = manager.latest() if resume == "auto" else resume
    if tag is None:
        return None
    path = manager.root / tag
    if not (path / COMPLETE).is_file():
        raise ResumeRefused(f"--resume: {path} is not a complete checkpoint")
    info = manager.info(tag)
    warnings: list[str] = []
    changes: list[str] = []
    if identity is not None and info.identity is None:
        warnings.append(f"--resume {path}: the checkpoint records no run identity (written by an older version): "
                        "cannot check that the recipe is unchanged")
    elif identity is not None:
        changes = identity_changes(info.identity, identity)
        unrecorded = unrecorded_keys(info.identity, identity)
        if unrecorded:
            warnings.append(f"--resume {path}: the checkpoint's run identity does not record {', '.join(unrecorded)} "
                            "(written by an older version): not compared")
    if changes:
        what = f"--resume {path}: the run changed: {'; '.join(changes)}"
        if not force:
            raise ResumeRefused(f"{what} (pass --resume-force to continue anyway)")
        warnings.append(f"{what}; continuing anyway (--resume-force)")
    return ResumePoint(path, info.step, info.world_size, world_size, tuple(changes), tuple(warnings))


def with_resume(ds_config: dict[str, Any], point: ResumePoint | None) -> dict[str, Any]:
    """The DeepSpeed config to build the engine with: one that loads universal checkpoints when `point` was written
    by another world size."""
    if point is None or not point.world_size_changed:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def load(point: ResumePoint, manager: CheckpointManager, engine: Any, *, seed: int) -> TrainerState:
    """Load `point` into `engine` (built with :func:`with_resume`) on every rank; returns the trainer state.

    Same world size: DeepSpeed's own files and each rank's RNG states. Another world size: the universal copy
    (made once by rank 0, reused by later resumes), and RNG states seeded from (`seed`, step, rank)."""
    for line in point.warnings:
        log(line, level=logging.WARNING)
    if not point.world_size_changed:
        return manager.load(engine, point.tag)
    started = time.perf_counter()
    universal = universal_copy(point.path)
    state = manager.load(engine, point.tag, universal=universal)
    reseed(seed, state.global_step, global_rank())
    log(f"resume on another world size: {point.path} was written by {_ranks(point.saved_world_size)}, this run has "
        f"{point.world_size}; loaded DeepSpeed's universal copy {universal} ({time.perf_counter() - started:.1f} s, "
        f"conversion included); per-rank RNG states not restored (dropout masks are drawn anew, seeded from "
        f"train.seed, step {state.global_step} and the rank)", level=logging.WARNING)
    return state


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from (seed, step, rank): distinct per rank, the same on every
    resume of the same checkpoint."""
    from pipeline.data.loader import seed_everything

    seed_everything(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def universal_copy(tag_dir: Path) -> Path:
    """``tag_dir/universal``: DeepSpeed's universal checkpoint of `tag_dir`, converted by rank 0 unless an earlier
    resume did (written to a temporary directory and renamed, so it is complete or absent). Every rank returns the
    path, or raises the same :class:`TrainingAborted` naming the checkpoint when the conversion failed."""
    target = tag_dir / UNIVERSAL
    error = ""
    if global_rank() == 0 and not target.is_dir():
        log(f"converting {tag_dir} to DeepSpeed's universal checkpoint {target} (once; the other ranks wait)")
        try:
            _convert(tag_dir, target)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = " ".join(f"{type(exc).__name__}: {exc}".split())
            shutil.rmtree(target.with_name(f".{UNIVERSAL}.tmp"), ignore_errors=True)
    errors = _gather_with_timeout(error, CONVERSION_TIMEOUT_S)
    if any(errors):
        raise TrainingAborted(f"checkpoint {tag_dir}: conversion to a universal checkpoint (another world size) failed "
                           f"on rank 0: {next(e for e in errors if e)}")
    return target


# ds_to_universal's worker pools, started with "spawn": forked workers deadlocked in a torch process (measured, ZeRO-2).
_CONVERTER = """
import multiprocessing
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    from deepspeed.checkpoint.ds_to_universal import main, parse_arguments
    main(parse_arguments())
"""


def _convert(tag_dir: Path, target: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of `tag_dir` into `target`, in a process of its own (its memory is returned
    when it ends; its workers are spawned, not forked from a rank); RuntimeError with its last error line on
    failure. ``--inject_missing_state`` adds the ``universal_checkpoint_info`` that ZeRO-1/2 conversion requires and
    only Megatron-DeepSpeed writes."""
    tmp = target.with_name(f".{UNIVERSAL}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    workers = max(1, min(8, (os.cpu_count() or 1) // max(1, local)))
    if sum(f.stat().st_size for f in tag_dir.glob("*optim_states.pt")) < POOL_BYTES:
        workers = 1  # a spawned worker costs seconds of imports: the tiny model converts 2.6x faster without a pool
    proc = subprocess.run(
        [sys.executable, "-c", _CONVERTER, "--input_folder", str(tag_dir), "--output_folder", str(tmp),
         "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2)),
         "--inject_missing_state"],
        capture_output=True, text=True,
    )
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer, written next to its output
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or proc.stdout.splitlines() or ["-"]
        raise RuntimeError(f"ds_to_universal exited with {proc.returncode}: {lines[-1].strip()}")
    os.replace(tmp, target)


def _gather_with_timeout(value: str, timeout_s: float) -> list[str]:
    """Every rank's `value` (one collective in a group of its own, bounded by `timeout_s`; `[value]` alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value, group=group)
    finally:
        dist.destroy_process_group(group)
    return [str(v or "") for v in out]
