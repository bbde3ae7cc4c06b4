"""Rank health: notice a rank that died or hangs, name it (rank, host, step), and end this rank at once.

Every rank of a multi-process run starts a :class:`RankHealth` (:meth:`RankHealth.start`, called by every rank at
the same point once the model and state are set up). Start exchanges each rank's host name, pid, process start time
and machine identity (host name, boot id, pid namespace) with one ``all_gather_object``, so that every rank can
name every other one whatever fails later. Then two daemon threads per rank, independent of what the main thread is
blocked in:

* the heartbeat thread writes ``rank_health/beat/<rank> = "<seq> <completed steps>"`` into the rendezvous store
  (the c10d TCPStore at MASTER_ADDR:MASTER_PORT, through a client connection of its own) every ``interval`` seconds
  and reads every rank's heartbeat back (one ``multi_get``).
* the watch thread judges what the heartbeat thread saw, on this rank's own monotonic clock (no clock skew):

  1. a peer on this machine whose process is gone (or a zombie) -> "rank R on host H (pid P) exited ...";
  2. the store itself silent for longer than the timeout -> the rank hosting it (rank 0 under the deepspeed
     launcher; the launcher's agent under torchrun) "stopped answering": a store read from a stopped server never
     returns, which is why every store call happens in the heartbeat thread and nothing else waits on it;
  3. a peer whose heartbeat has not changed for longer than the timeout while the store kept answering ->
     "rank R on host H stopped answering after step S (no heartbeat for N s)": it was killed on another machine,
     stopped (SIGSTOP), or its machine or network is gone.

  It then prints ``error: <one line>`` on stderr, runs the registered flush hooks, SIGKILLs this rank's own child
  processes (DataLoader workers) and leaves with ``os._exit(EXIT_CODE)``: a rank blocked in a collective with a
  dead peer may never return from it, and neither may ``destroy_process_group``.

The main thread reports too: :meth:`RankHealth.on_error` is called with an exception raised out of the training
loop. A communication error (gloo "Connection reset by peer", "Timed out waiting ...", NCCL, c10d errors) waits for
the watch thread to name the culprit (up to the timeout plus two heartbeats), then reports the step every rank was
last seen at (a rank alive but stuck behind the others is named); any other exception is left to the caller.

Every surviving rank prints its own line (each names itself as the reporter). The launcher sees the non-zero exit
and terminates the remaining ranks: ``deepspeed.launcher.launch`` sends SIGTERM to each rank's process tree and
SIGKILL 30 s later (a stopped process ignores SIGTERM until then). :meth:`stop` must be called before the final
barrier of a run: past it, ranks leave one by one and a peer's exit is normal.

Cost: one ``set`` and one ``multi_get`` of ``world_size`` short values per rank and interval (interval = timeout/5,
between 0.5 and 10 s), served by the store's host.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

from pipeline.logs import log
from pipeline.resilience import heartbeat_interval

EXIT_CODE = 3  # a rank died or hung (documented in README "Fault tolerance")
_PREFIX = "rank_health"
_FAIL_LOCK = threading.Lock()
_COMM_ERROR = re.compile(
    r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed out|timeout|DistBackendError|DistNetworkError|"
    r"DistStoreError",
    re.IGNORECASE,
)


# ------------------------------------------------------------------------------------------------------------
# Processes on this machine
# ------------------------------------------------------------------------------------------------------------
def machine_id() -> str:
    """Host name + kernel boot id + pid namespace: equal exactly when two processes can see each other's pids."""
    parts = [socket.gethostname()]
    for path, read in (("/proc/sys/kernel/random/boot_id", lambda p: open(p).read().strip()),
                       ("/proc/self/ns/pid", os.readlink)):
        try:
            parts.append(read(path))
        except OSError:
            parts.append("?")
    return "|".join(parts)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of `pid` from /proc, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid ... starttime is the 20th
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def process_state(pid: int, start_time: int | None) -> str:
    """'gone' (no such process, a zombie, or the pid reused by another process), 'stopped', 'disk-wait' or
    'running'. Without /proc (not Linux) only existence is checked."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            pass
        return "running"
    stat = _proc_stat(pid)
    if stat is None or stat[0] in "ZXx" or (start_time is not None and stat[1] != start_time):
        return "gone"
    return {"T": "stopped", "t": "stopped", "D": "disk-wait"}.get(stat[0], "running")


def kill_children() -> None:
    """SIGKILL every descendant of this process (DataLoader workers): they would outlive an ``os._exit``."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # psutil missing or /proc unreadable: the workers notice their parent's exit by themselves
        return
    for child in children:
        try:
            child.kill()
        except Exception:
            pass


def comm_error(exc: BaseException) -> BaseException | None:
    """The error of a collective or of the store (peer gone, timeout) in `exc` or its cause chain, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        dist_error = getattr(dist, "DistError", None)
        if dist_error is not None and isinstance(current, dist_error):
            return current
        # Gloo raises plain RuntimeErrors; the project's own RuntimeError subclasses (TrainingAborted) are not it.
        plain = type(current) is RuntimeError or isinstance(current, (ConnectionError, TimeoutError))
        if plain and _COMM_ERROR.search(str(current)):
            return current
        current = current.__cause__ or current.__context__
    return None


def _timed_out(exc: BaseException) -> bool:
    return re.search(r"timed out|timeout", str(exc), re.IGNORECASE) is not None


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|hpp|h):\d+\]\s*", "", text)  # gloo's "[.../pair.cc:537] " source prefix
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------------------
# The monitor
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Peer:
    """What this rank knows of rank `rank`: host and process (from RankHealth.start) and its last heartbeat."""

    rank: int
    host: str = "?"
    pid: int | None = None
    start_time: int | None = None
    machine: str | None = None
    seq: int = -1
    step: int | None = None
    changed_at: float = 0.0  # this rank's monotonic clock when `seq` last changed (or when watching began)


class RankHealth:
    """Heartbeats and failure detection for one rank; see the module docstring. Inactive with one process."""

    def __init__(self, *, timeout_s: float, rank: int, world_size: int, progress: Callable[[], int],
                 store_address: tuple[str, int] | None, store_host_rank: int | None = 0,
                 interval_s: float | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"train.collective_timeout_s: must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or heartbeat_interval(self.timeout_s)
        self.rank = rank
        self.world_size = world_size
        self.progress = progress
        self.store_address = store_address
        self.store_host_rank = store_host_rank  # rank whose process serves the store; None: the launcher does
        self.host = socket.gethostname()
        self.machine = machine_id()
        self.before_exit: list[Callable[[], Any]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        now = time.monotonic()
        self._peers = {r: Peer(rank=r, changed_at=now) for r in range(world_size)}
        me = self._peers[rank]
        me.host, me.pid, me.machine = self.host, os.getpid(), self.machine
        me.start_time = process_start_time(me.pid)
        self._last_answer = now  # last successful read of every heartbeat from the store
        self._seq = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, *, timeout_s: float, progress: Callable[[], int]) -> RankHealth | None:
        """Start monitoring when torch.distributed runs several processes; None (nothing to watch) otherwise."""
        if timeout_s <= 0:
            raise ValueError(f"train.collective_timeout_s: must be > 0, got {timeout_s}")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        address = None
        if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT", "").isdigit():
            address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        health = cls(timeout_s=timeout_s, rank=dist.get_rank(), world_size=dist.get_world_size(),
                     progress=progress, store_address=address, store_host_rank=None if agent_store else 0)
        infos: list[Any] = [None] * health.world_size
        dist.all_gather_object(infos, health._info())  # every rank's host and pid, known before anything fails
        for r, info in enumerate(infos):
            health._record_info(r, info)
        health._start_threads()
        log(f"rank health: heartbeat every {health.interval_s:g} s; a rank silent for {health.timeout_s:g} s "
            f"(train.collective_timeout_s) stops the run")
        return health

    def _start_threads(self) -> None:
        for name, target in (("rank-health-beat", self._beat_loop), ("rank-health-watch", self._watch_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop watching (before the final barrier: past it peers exit normally). Idempotent."""
        self._stopped.set()

    # -- heartbeat thread --------------------------------------------------------------------------------------
    def _connect(self) -> Any:
        timeout = timedelta(seconds=max(5.0, min(self.timeout_s, 30.0)))
        if self.store_address is None:
            return dist.distributed_c10d._get_default_store()
        host, port = self.store_address
        return dist.TCPStore(host, port, None, False, timeout, wait_for_workers=False)

    def _info(self) -> str:
        me = self._peers[self.rank]
        return json.dumps({"host": me.host, "pid": me.pid, "start": me.start_time, "machine": me.machine})

    def _beat_loop(self) -> None:
        store = None
        pending = set(range(self.world_size))  # ranks whose heartbeat key is not in the store yet
        beat_keys = [f"{_PREFIX}/beat/{r}" for r in range(self.world_size)]
        while not self._stopped.is_set():
            try:
                if store is None:
                    store = self._connect()
                self._seq += 1
                store.set(beat_keys[self.rank], f"{self._seq} {self.progress()}")
                for r in sorted(pending):  # startup only: multi_get would wait for a missing key
                    if store.check([beat_keys[r]]):
                        pending.discard(r)
                present = [r for r in range(self.world_size) if r not in pending]
                values = store.multi_get([beat_keys[r] for r in present]) if present else []
                self._record_beats(dict(zip(present, values)))
            except Exception:  # store gone or timed out: the watch thread judges how long it stays silent
                store = None
            self._stopped.wait(self.interval_s)

    def _record_info(self, r: int, raw: str | bytes) -> None:
        try:
            info = json.loads(raw)
        except (TypeError, ValueError):
            return
        with self._lock:
            peer = self._peers[r]
            peer.host, peer.pid, peer.start_time, peer.machine = (
                str(info.get("host", "?")), info.get("pid"), info.get("start"), info.get("machine"))

    def _record_beats(self, values: dict[int, bytes]) -> None:
        now = time.monotonic()
        with self._lock:
            self._last_answer = now
            for r, raw in values.items():
                try:
                    seq, step = (int(x) for x in raw.decode().split())
                except ValueError:
                    continue
                peer = self._peers[r]
                if seq != peer.seq:
                    peer.seq, peer.step, peer.changed_at = seq, step, now

    # -- judging -----------------------------------------------------------------------------------------------
    def _where(self, peer: Peer) -> str:
        return f"rank {peer.rank} on host {peer.host}"

    def _after(self, peer: Peer) -> str:
        """The run's position when `peer` failed: this rank's completed steps (ranks run in lockstep, and a
        heartbeat read may be two intervals old)."""
        return f"after step {self.progress()}"

    def _reporter(self) -> str:
        return f"seen from rank {self.rank} on host {self.host}"

    def diagnose(self) -> str | None:
        """A one-line description of a failed peer (see the module docstring), or None while all look healthy."""
        if self._stopped.is_set():
            return None
        now = time.monotonic()
        with self._lock:
            peers = [Peer(**vars(p)) for r, p in self._peers.items() if r != self.rank]
            last_answer = self._last_answer
        silent_store = now - last_answer
        limit = f"train.collective_timeout_s = {self.timeout_s:g} s"
        for peer in peers:  # 1. a process on this machine that is gone
            if peer.pid is not None and peer.machine == self.machine:
                if process_state(peer.pid, peer.start_time) == "gone":
                    return (f"{self._where(peer)} (pid {peer.pid}) exited unexpectedly {self._after(peer)}; "
                            f"{self._reporter()}")
        if silent_store > self.timeout_s:  # 2. the store does not answer
            addr = f"{self.store_address[0]}:{self.store_address[1]}" if self.store_address else "MASTER_ADDR"
            if self.store_host_rank is not None and self.store_host_rank != self.rank:
                host = next((p for p in peers if p.rank == self.store_host_rank), None)
                if host is not None:
                    return (f"{self._where(host)} stopped answering {self._after(host)} ({self._local_state(host)}"
                            f"the rendezvous store it hosts at {addr} has not answered for {silent_store:.0f} s; "
                            f"{limit}); {self._reporter()}")
            return (f"the rendezvous store at {addr} is unreachable (no answer for {silent_store:.0f} s; {limit}); "
                    f"{self._reporter()}")
        # 3. silent peers, as long as the store answers (a silent store would make every peer look silent)
        stale = [p for p in peers if last_answer - p.changed_at > self.timeout_s]
        if stale:
            first = min(stale, key=lambda p: p.changed_at)
            rest = [str(p.rank) for p in stale if p is not first]
            others = f" (and {len(rest)} more: ranks {', '.join(rest)})" if rest else ""
            return (f"{self._where(first)} stopped answering {self._after(first)} ({self._local_state(first)}"
                    f"no heartbeat for {now - first.changed_at:.0f} s; {limit}){others}; {self._reporter()}")
        return None

    def _local_state(self, peer: Peer) -> str:
        if peer.pid is None or peer.machine != self.machine:
            return ""
        state = process_state(peer.pid, peer.start_time)
        notes = {"stopped": f"pid {peer.pid} is stopped; ", "disk-wait": f"pid {peer.pid} is blocked in I/O; "}
        return notes.get(state, "")

    def _behind(self) -> str:
        """Where every rank was last seen, naming ranks behind this one (alive but stuck elsewhere)."""
        mine = self.progress()
        with self._lock:
            peers = [Peer(**vars(p)) for r, p in self._peers.items() if r != self.rank]
        behind = [p for p in peers if p.step is not None and p.step < mine]
        if behind:
            return "; ".join(f"{self._where(p)} is alive but still after step {p.step}" for p in behind)
        return f"every rank is alive and after step {mine}"

    def _watch_loop(self) -> None:
        tick = min(1.0, self.interval_s / 2)
        while not self._stopped.wait(tick):
            message = self.diagnose()
            if message:
                self.fail(message)

    # -- the main thread's errors ------------------------------------------------------------------------------
    def on_error(self, exc: BaseException) -> None:
        """Called with an exception out of the training loop. A communication error ends the process with a
        message naming the failed rank (never returns); anything else returns, for the caller to re-raise."""
        error = comm_error(exc)
        if self._stopped.is_set() or error is None:
            return
        timed_out = _timed_out(error)
        # A timeout means the culprit has been silent for about the timeout already; a reset connection may be a
        # peer that died a moment ago on another machine, whose heartbeat goes stale only after the timeout.
        wait = 2 * self.interval_s + 1 if timed_out else self.timeout_s + 2 * self.interval_s
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            message = self.diagnose()
            if message:
                self.fail(message)
            time.sleep(0.2)
        self.fail(self.collective_message(error))

    def collective_message(self, error: BaseException) -> str:
        """The report when a collective failed but no rank is dead or silent: where every rank was last seen."""
        what = f"a collective timed out after {self.timeout_s:g} s" if _timed_out(error) else "a collective failed"
        return (f"{what} on rank {self.rank} on host {self.host} after step {self.progress()} ({first_line(error)}); "
                f"{self._behind()}")

    def fail(self, message: str) -> None:
        """Print ``error: message``, flush, kill this rank's children and exit with EXIT_CODE. Never returns; when
        another thread is already failing, waits for it to end the process."""
        if not _FAIL_LOCK.acquire(blocking=False):
            while True:
                time.sleep(60)
        try:
            sys.stdout.flush()
            # Start a line of its own: rank 0's progress bar (on the terminal all ranks share) may hold the current one.
            sys.stderr.write(f"\nerror: {message}\n")
            sys.stderr.flush()
            hooks = threading.Thread(target=self._run_hooks, daemon=True)
            hooks.start()
            hooks.join(timeout=10)  # a flush that hangs must not keep the process alive
            kill_children()
        finally:
            os._exit(EXIT_CODE)

    def _run_hooks(self) -> None:
        for hook in self.before_exit:
            try:
                hook()
            except Exception:
                pass
