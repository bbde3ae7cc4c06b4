"""Graceful stop: SIGTERM / SIGINT, or the launcher going away, end the run at the next step boundary.

The signal handler only records the signal (signal-safe; nothing else happens inside it). At every step boundary
the trainer calls :meth:`StopRequest.local_code` and all-reduces it with MAX (:func:`agree`, one small collective
that every rank runs every step), so a signal delivered to a single rank stops all ranks after the same step. The
trainer then saves a checkpoint, skips the export, tears the process group down and exits 0.

Signals: SIGTERM (what Slurm, Kubernetes and the DeepSpeed launcher send) and SIGINT (Ctrl-C) are both graceful;
repeating them changes nothing (send SIGKILL to stop at once). DataLoader workers ignore both
(:func:`ignore_stop_signals`, in their ``worker_init_fn``): a worker that receives the signal (a process-group kill, or
the DeepSpeed launcher terminating each rank's process tree) keeps serving batches instead of dying, which would
make the rank raise in the middle of its step.

Launcher death: ``python -m deepspeed.launcher.runner`` installs no signal handler for local runs, so SIGTERM to it
kills it at once without telling its child ``deepspeed.launcher.launch`` or the ranks. Each rank therefore watches
its launcher chain at every step boundary (Linux ``/proc``): when its parent (``launch``, torchrun) or the DeepSpeed
runner above it is gone, the rank stops as if it had received SIGTERM. ``deepspeed.launcher.launch`` forwards
SIGTERM/SIGINT to every rank's process tree and SIGKILLs what is still alive 30 s later (hard-coded in DeepSpeed),
so a step plus a checkpoint must fit in 30 s; otherwise resume falls back to the last periodic checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from pipeline.logs import log
from pipeline.resilience.rank_health import process_start_time, process_state

NONE, LAUNCHER_GONE, SIGINT, SIGTERM = 0, 1, 2, 3
REASONS = {LAUNCHER_GONE: "the launcher exited", SIGINT: "SIGINT", SIGTERM: "SIGTERM"}
_CODES = {signal.SIGINT: SIGINT, signal.SIGTERM: SIGTERM}


def _stat_ppid(pid: int) -> int | None:
    """Parent pid of `pid` from /proc, or None when the process is gone (or /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid ...
    return int(fields[1]) if len(fields) > 1 else None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class StopRequest:
    """Records SIGTERM/SIGINT and watches the launcher; :meth:`local_code` says whether this rank wants to stop."""

    def __init__(self) -> None:
        self._signal = NONE
        self._parent: int | None = None
        self._runner: int | None = None
        self._announced = NONE

    def install(self) -> None:
        """Install the handlers (main thread only) and remember the launcher chain to watch."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _CODES:
            signal.signal(signum, self._handle)
        if "LOCAL_RANK" in os.environ and os.path.isdir("/proc"):  # started by a launcher
            self._parent = os.getppid()
            if "deepspeed.launcher.launch" in _cmdline(self._parent):
                runner = _stat_ppid(self._parent)
                if runner is not None and "deepspeed.launcher.runner" in _cmdline(runner):
                    self._runner = runner

    def _handle(self, signum: int, frame: Any) -> None:
        self._signal = max(self._signal, _CODES.get(signum, SIGTERM))

    def _launcher_gone(self) -> bool:
        if self._parent is None:
            return False
        if os.getppid() != self._parent:
            return True
        return self._runner is not None and _stat_ppid(self._parent) != self._runner

    def local_code(self) -> int:
        """This rank's stop code (NONE, LAUNCHER_GONE, SIGINT, SIGTERM); logs the first time it is non-zero."""
        code = self._signal if self._signal else (LAUNCHER_GONE if self._launcher_gone() else NONE)
        if code and code != self._announced:
            self._announced = code
            log(f"{REASONS[code]}: stopping after this step with a checkpoint", all_ranks=True)
        return code


def ignore_stop_signals(worker_id: int = 0) -> None:
    """Workers ignore SIGTERM/SIGINT, which are their rank's to handle.

    PyTorch's worker handler exits quietly on SIGTERM from its own rank but dies of any other SIGTERM (a process-group
    kill, the DeepSpeed launcher terminating the rank's process tree), and the rank then raises "DataLoader worker
    is killed" in the middle of its step. Ignoring it lets the rank finish the step and checkpoint; the workers
    still exit when the rank closes the loader or when the rank is gone (:class:`DataWorkerInit`)."""
    for signum in _CODES:
        signal.signal(signum, signal.SIG_IGN)


class DataWorkerInit:
    """DataLoader ``worker_init_fn`` of a rank's workers: ignore the stop signals (:func:`ignore_stop_signals`) and
    exit as soon as the rank is gone.

    The workers start from a fork server (:func:`pipeline.data.loader.worker_context`), so PyTorch's own watchdog,
    which watches a worker's parent, watches the fork server instead of the rank; and the fork server lives while
    any worker does. Without this check, a rank that is SIGKILLed (or dies of its own) would leave its workers and
    fork server behind for ever. Created in the rank (its pid and /proc start time: a reused pid is not the rank);
    polled every `interval_s` seconds in a daemon thread of each worker."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.rank_pid = os.getpid()
        self.rank_start = process_start_time(self.rank_pid)
        self.interval_s = interval_s

    def __call__(self, worker_id: int = 0) -> None:
        ignore_stop_signals(worker_id)
        threading.Thread(target=self._exit_when_rank_is_gone, name="rank-watch", daemon=True).start()

    def _exit_when_rank_is_gone(self) -> None:
        while process_state(self.rank_pid, self.rank_start) != "gone":
            time.sleep(self.interval_s)
        os._exit(0)


def agree(values: list[int], device: torch.device | str = "cpu") -> list[int]:
    """Element-wise MAX of `values` over all ranks (identity in one process). One collective; every rank calls it."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]
