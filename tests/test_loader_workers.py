"""DataLoader workers start from a fork server, not by forking the (threaded) rank, and build the same batches.

Forking a process in which another thread holds an interpreter lock can leave the child blocked for ever in
``PyOS_AfterFork_Child`` (CPython < 3.12); a rank always has threads (gloo/NCCL, the heartbeat, tqdm's monitor).
"""
from __future__ import annotations

import threading

import numpy as np
import psutil

from pipeline.config import DataConfig, LossConfig


def _data(shards, workers: int, world_size: int = 2):
    from pipeline.data.loader import TrainData

    cfg = DataConfig(shards=str(shards), validation_fraction=0.1, num_workers=workers)
    return TrainData(cfg, LossConfig(), seed=7, per_device_batch=4, world_size=world_size, rank=world_size - 1)


def _fork_servers(process: psutil.Process) -> list[psutil.Process]:
    """The multiprocessing fork servers `process` started."""
    return [p for p in process.children() if "multiprocessing.forkserver" in " ".join(p.cmdline())]


def _arrays(batch) -> list[np.ndarray]:
    return [*batch.queries, *batch.positives, *batch.negatives, batch.positive_ids]


def _churn_threads(stop: threading.Event) -> None:
    """Start and end short-lived threads (each creates and deletes an interpreter thread state) until `stop`."""
    while not stop.is_set():
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()


def test_workers_come_from_a_fork_server_and_batches_equal_in_process_ones(example_shards):
    inline, pooled = _data(example_shards, 0), _data(example_shards, 2)
    stop = threading.Event()
    churn = threading.Thread(target=_churn_threads, args=(stop,), daemon=True)
    churn.start()  # thread states come and go while the loaders start their workers
    try:
        for epoch, start in ((0, 0), (1, 3), (2, 0)):
            expected = list(inline.loader(epoch, start))
            got = []
            for step, item in enumerate(pooled.loader(epoch, start)):
                got.append(item)
                if step == 0:
                    me = psutil.Process()
                    # nothing forked from this process (a fork would run this process's command line) ...
                    assert not [p for p in me.children() if p.cmdline() == me.cmdline()]
                    # ... the two workers are children of the fork server
                    (server,) = _fork_servers(me)
                    assert len(server.children()) == 2, [p.cmdline() for p in server.children()]
            assert len(got) == len(expected) == inline.steps_per_epoch - start
            for (name_a, a), (name_b, b) in zip(got, expected):
                assert name_a == name_b and (a.n_neg, a.dataset_type) == (b.n_neg, b.dataset_type)
                assert all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b), strict=True))
    finally:
        stop.set()
        churn.join()


RANK_SCRIPT = """
import sys, time
sys.path.insert(0, "tests")
from test_loader_workers import _data
batches = iter(_data(sys.argv[1], 2, world_size=1).loader(0))
next(batches)
print("first batch", flush=True)
time.sleep(600)
"""


def test_workers_and_fork_server_exit_when_their_rank_is_killed(example_shards):
    """A rank SIGKILLed in the middle of an epoch leaves nothing behind: its workers notice within a second and
    exit, and with them the fork server (PyTorch's watchdog alone would watch the fork server, not the rank)."""
    import signal
    import subprocess
    import sys
    import time

    from train_helpers import REPO, env

    rank = subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(example_shards)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert rank.stdout.readline().strip() == "first batch"
        descendants = psutil.Process(rank.pid).children(recursive=True)
        server = _fork_servers(psutil.Process(rank.pid))
        assert len(server) == 1 and len(server[0].children()) == 2, [p.cmdline() for p in descendants]
        rank.send_signal(signal.SIGKILL)
        rank.wait(timeout=30)
        started = time.time()
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
        assert time.time() - started < 5
    finally:
        rank.kill()
        rank.wait()
