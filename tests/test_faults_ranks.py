"""A rank that dies or hangs: named (rank, host), the job exits non-zero within the timeout, nothing is left behind.

Real 2-process ZeRO-3 runs on CPU (gloo) through the deepspeed launcher, with ``train.collective_timeout_s`` set to
20 s. A rank is SIGKILLed (it dies) or SIGSTOPped (it hangs) once a checkpoint exists; the test then checks the
job's exit status and time, the one-line ``error:`` naming the rank and host, that no process of the job's session
survives (the stopped rank included: the deepspeed launcher SIGKILLs it 30 s after its SIGTERM), and that
``--resume auto`` continues with exactly the losses and weights of an uninterrupted reference run. The heartbeat
logic itself (pipeline.resilience.rank_health) is also checked in-process against a real TCPStore.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from train_helpers import (
    REPO,
    free_port,
    kill_group,
    resume_matches_reference,
    run_training,
    start_training,
    train_losses,
    wait_for,
    web_search_overrides,
)

STEPS = 6
SAVE_EVERY = 2
TIMEOUT = 20  # train.collective_timeout_s of these runs (also the rendezvous timeout: not lower on busy CI)
INTERVAL = 4  # their heartbeat interval: pipeline.resilience.rank_health.heartbeat_interval(TIMEOUT)
LAUNCHER_GRACE = 30  # deepspeed.launcher.launch: SIGTERM to every rank's tree, SIGKILL 30 s later
HOST = socket.gethostname()


def overrides(shards: Path, out: Path) -> list[str]:
    return web_search_overrides(shards, out, steps=STEPS, save_every=SAVE_EVERY, eval_every=0,
                                **{"train.collective_timeout_s": str(TIMEOUT)})


@pytest.fixture(scope="module")
def reference_run(example_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run_training(overrides(example_shards, out), log=out.parent / "log.txt")
    return out


# --------------------------------------------------------------------------------------------------------------
# The job's processes
# --------------------------------------------------------------------------------------------------------------
def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the training processes (children of deepspeed.launcher.launch; RANK from their environment;
    their DataLoader workers share cmdline and environment but not the parent)."""
    ranks = {}
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        try:
            parent = proc.parent()
            if parent is None or "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
                continue
            if "train.py" in " ".join(proc.cmdline()):
                ranks[int(proc.environ()["RANK"])] = proc.pid
        except (psutil.Error, KeyError, ValueError):
            continue
    return ranks


def session_processes(sid: int) -> list[str]:
    """Live (non-zombie) processes of session `sid`, described for an assertion message."""
    found = []
    for proc in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} [{proc.info['status']}] {' '.join(proc.info['cmdline'] or [])[:150]}")
        except (OSError, psutil.Error):
            continue
    return found


def wait_until_gone(sid: int, timeout: float) -> list[str]:
    deadline = time.time() + timeout
    while (left := session_processes(sid)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def start_and_wait_for_checkpoint(shards: Path, out: Path, log: Path) -> tuple[subprocess.Popen, dict[int, int]]:
    """Start a run; return once step SAVE_EVERY's checkpoint is complete and step SAVE_EVERY + 1 is logged."""
    proc = start_training(overrides(shards, out), log=log)
    pointer = out / "checkpoints" / "latest_complete"
    wait_for(lambda: pointer.is_file() and max(train_losses(out), default=0) > SAVE_EVERY, 300,
             f"checkpoint {SAVE_EVERY} and step {SAVE_EVERY + 1}", proc)
    ranks = rank_pids(proc)
    assert sorted(ranks) == [0, 1], ranks
    return proc, ranks


def watch(proc: subprocess.Popen, log: Path, limit: float) -> tuple[float | None, float]:
    """Wait for the job to end: (seconds until an ``error:`` line appeared in the log, seconds until exit)."""
    started = time.time()
    error_at = None
    while proc.poll() is None and time.time() - started < limit:
        if error_at is None and "error:" in log.read_text(errors="replace"):
            error_at = time.time() - started
        time.sleep(0.2)
    if proc.poll() is None:
        raise AssertionError(f"the job is still running {limit:.0f} s after the fault:\n{log.read_text()[-4000:]}")
    if error_at is None and "error:" in log.read_text(errors="replace"):
        error_at = time.time() - started
    return error_at, time.time() - started


def error_lines(log: Path) -> list[str]:
    return [line[line.index("error: "):] for line in log.read_text(errors="replace").splitlines() if "error: " in line]


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------
def test_killed_rank_is_named_and_resume_is_exact(reference_run, example_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc, ranks = start_and_wait_for_checkpoint(example_shards, out, log)
    try:
        os.kill(ranks[1], signal.SIGKILL)
        error_at, exited_at = watch(proc, log, TIMEOUT + LAUNCHER_GRACE + 30)
        left = wait_until_gone(proc.pid, 15)
    finally:
        kill_group(proc)
    assert proc.returncode != 0
    assert exited_at < TIMEOUT, f"job exit {exited_at:.1f} s after the kill"
    # A peer process gone on the same machine is seen at the next check of the watch thread (every second).
    assert error_at is not None and error_at < 5, (error_at, log.read_text()[-4000:])
    named = [line for line in error_lines(log)
             if re.match(rf"error: rank 1 on host {re.escape(HOST)} \(pid {ranks[1]}\) exited unexpectedly after step "
                         rf"\d+; seen from rank 0 on host {re.escape(HOST)}$", line)]
    assert named, error_lines(log) or log.read_text()[-4000:]
    assert not left, f"processes left behind: {left}"

    resumed_from = int((out / "checkpoints" / "latest_complete").read_text().removeprefix("step_"))
    assert resumed_from >= SAVE_EVERY
    resume_matches_reference(overrides(example_shards, out), out, reference_run, resumed_from=resumed_from,
                             steps=STEPS, log=tmp_path / "resume_log.txt")


def test_stopped_rank_is_named_and_killed(example_shards, tmp_path):
    """SIGSTOP: the process is alive but silent; its heartbeats stop. (Rank 0 stopped, the store host: see
    test_heartbeat_judge_names_a_stopped_store_host.)"""
    from pipeline.resilience.rank_health import heartbeat_interval

    assert heartbeat_interval(TIMEOUT) == INTERVAL
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc, ranks = start_and_wait_for_checkpoint(example_shards, out, log)
    rank, other = 1, 0
    try:
        os.kill(ranks[rank], signal.SIGSTOP)
        error_at, exited_at = watch(proc, log, TIMEOUT + LAUNCHER_GRACE + 40)
        left = wait_until_gone(proc.pid, 10)
    finally:
        kill_group(proc)
    assert proc.returncode != 0
    assert error_at is not None, log.read_text()[-4000:]
    # Silent for the timeout: the last heartbeat may precede the stop, and the last read follow it, by an interval.
    assert TIMEOUT - 2 * INTERVAL - 1 <= error_at <= TIMEOUT + 2 * INTERVAL + 2, f"error {error_at:.1f} s after SIGSTOP"
    assert exited_at <= TIMEOUT + LAUNCHER_GRACE + 20, f"job exit {exited_at:.1f} s after SIGSTOP"
    pattern = (rf"error: rank {rank} on host {re.escape(HOST)} stopped answering after step \d+ \(pid {ranks[rank]} "
               rf"is stopped; no heartbeat for \d+ s; train\.collective_timeout_s = {TIMEOUT} s\); seen from rank "
               rf"{other} on host {re.escape(HOST)}$")
    assert any(re.match(pattern, line) for line in error_lines(log)), error_lines(log) or log.read_text()[-4000:]
    assert not left, f"processes left behind: {left}"
    assert not psutil.pid_exists(ranks[rank]) or psutil.Process(ranks[rank]).status() == psutil.STATUS_ZOMBIE


# --------------------------------------------------------------------------------------------------------------
# In process: the heartbeat judge against a real TCPStore
# --------------------------------------------------------------------------------------------------------------
def test_comm_errors_are_recognised():
    from pipeline.training.errors import TrainingAborted
    from pipeline.resilience.rank_health import comm_error, first_line

    def is_comm_error(exc: BaseException) -> bool:
        return comm_error(exc) is not None

    reset = RuntimeError("[/w/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9391: "
                         "Connection reset by peer. This is typically caused by a remote worker hanging")
    timed_out = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv")
    assert is_comm_error(reset) and is_comm_error(timed_out)
    try:
        try:
            raise timed_out
        except RuntimeError as exc:
            raise ValueError("wrapped") from exc
    except ValueError as wrapped:
        assert is_comm_error(wrapped)
    assert not is_comm_error(ValueError("bad value"))
    assert not is_comm_error(TrainingAborted("checkpoint write timed out"))
    assert first_line(timed_out) == "Timed out waiting 5000ms for recv"


def test_heartbeat_judge_names_silent_and_exited_peers():
    """Rank 0's judge with a fake rank 1 (a real child process, its heartbeats written by the test)."""
    import torch.distributed as dist

    from pipeline.resilience.rank_health import RankHealth, machine_id, process_start_time

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=10), wait_for_workers=False)
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        health = RankHealth(timeout_s=1.5, rank=0, world_size=2, progress=lambda: 7,
                            store_address=("127.0.0.1", port), interval_s=0.2)
        health._record_info(1, json.dumps(  # what RankHealth.start's all_gather_object brings
            {"host": "node-b", "pid": peer.pid, "start": process_start_time(peer.pid), "machine": machine_id()}))
        beat = threading.Thread(target=health._beat_loop, daemon=True)  # no watch thread: it would os._exit
        beat.start()
        for seq in range(10):  # a live peer: never judged
            server.set("rank_health/beat/1", f"{seq} 7")
            time.sleep(0.2)
            assert health.diagnose() is None
        assert health._peers[1].host == "node-b" and health._peers[1].step == 7
        time.sleep(2.0)  # the peer falls silent
        message = health.diagnose()
        assert message is not None and re.fullmatch(
            r"rank 1 on host node-b stopped answering after step 7 \(no heartbeat for \d s; "
            rf"train\.collective_timeout_s = 1\.5 s\); seen from rank 0 on host {re.escape(HOST)}", message), message
        server.set("rank_health/beat/1", "99 5")
        time.sleep(0.5)
        assert health.diagnose() is None  # heard from again
        # Alive but stuck behind: what a rank reports when its collective times out and nobody is silent.
        timeout = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1500ms for recv "
                               "operation to complete")
        assert health.collective_message(timeout) == (
            f"a collective timed out after 1.5 s on rank 0 on host {HOST} after step 7 (Timed out waiting 1500ms for "
            "recv operation to complete); rank 1 on host node-b is alive but still after step 5")
        peer.kill()
        peer.wait()
        message = health.diagnose()
        expected = f"rank 1 on host node-b (pid {peer.pid}) exited unexpectedly after step 7; seen from rank 0"
        assert message is not None and message.startswith(expected), message
        health.stop()
        assert health.diagnose() is None  # past stop(), a peer's exit is normal
        beat.join(timeout=5)
    finally:
        peer.kill()
        peer.wait()


def test_heartbeat_judge_names_a_stopped_store_host():
    """Rank 1's judge when rank 0, which serves the rendezvous store, is stopped: store reads never return, so the
    store's silence names rank 0 (a real TCPStore server in a child process, SIGSTOPped)."""
    from pipeline.resilience.rank_health import RankHealth, machine_id, process_start_time

    port = free_port()
    code = (f"import time; from datetime import timedelta; import torch.distributed as d; "
            f"s = d.TCPStore('127.0.0.1', {port}, None, True, timedelta(seconds=30), wait_for_workers=False); "
            f"s.set('rank_health/beat/0', '1 7'); s.set('up', '1'); time.sleep(120)")
    server = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        import torch.distributed as dist

        client = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=60), wait_for_workers=False)
        client.wait(["up"])
        health = RankHealth(timeout_s=1.5, rank=1, world_size=2, progress=lambda: 7,
                            store_address=("127.0.0.1", port), store_host_rank=0, interval_s=0.2)
        health._record_info(0, json.dumps(
            {"host": "node-a", "pid": server.pid, "start": process_start_time(server.pid), "machine": machine_id()}))
        beat = threading.Thread(target=health._beat_loop, daemon=True)
        beat.start()
        for seq in range(2, 8):
            client.set("rank_health/beat/0", f"{seq} 7")
            time.sleep(0.2)
            assert health.diagnose() is None
        os.kill(server.pid, signal.SIGSTOP)
        time.sleep(2.2)
        message = health.diagnose()
        assert message is not None and re.fullmatch(
            rf"rank 0 on host node-a stopped answering after step 7 \(pid {server.pid} is stopped; the rendezvous "
            rf"store it hosts at 127\.0\.0\.1:{port} has not answered for \d s; train\.collective_timeout_s = 1\.5 "
            rf"s\); seen from rank 1 on host {re.escape(HOST)}", message), message
        health.stop()
    finally:
        server.kill()
        server.wait()


def test_timeout_key_is_validated():
    from pipeline.training.distributed import init_distributed

    with pytest.raises(ValueError, match=r"^train\.collective_timeout_s: must be > 0, got 0"):
        init_distributed(use_deepspeed=False, timeout_s=0)
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
           "train.collective_timeout_s=fast"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].endswith("train.collective_timeout_s: expected a number, got 'fast'")
