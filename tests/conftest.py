"""Session fixtures shared by the training tests: a small example shard directory built once."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_helpers import minilm_dir  # noqa: E402


@pytest.fixture(scope="session")
def example_raw(tmp_path_factory) -> Path:
    """Synthetic raw datasets (retrieval parquet, classification JSONL, clustering parquet) + registry."""
    from preprocess.synth import SynthOptions, generate

    raw = tmp_path_factory.mktemp("example_raw")
    generate(SynthOptions(out=str(raw), passages=1200, negatives=7, seed=0))
    return raw


@pytest.fixture(scope="session")
def example_shards(example_raw, tmp_path_factory) -> Path:
    """The example raw data tokenized with all-MiniLM-L6-v2's tokenizer, max_len 64."""
    from preprocess.build import BuildOptions, ShardBuilder

    out = tmp_path_factory.mktemp("example_shards")
    ShardBuilder(
        BuildOptions(raw=str(example_raw), tokenizer=minilm_dir(), out=str(out),
                     registry=str(example_raw / "datasets.yaml"), max_len=64, workers=1)
    ).run()
    return out


def _mapped_files() -> set[str]:
    """Paths of the files some live process has mapped into memory (from /proc/*/maps)."""
    import glob

    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps, errors="replace") as handle:
                mapped.update(line.split(None, 5)[5].strip() for line in handle if "/dev/shm/" in line)
        except (OSError, IndexError):
            continue
    return mapped


def release_deepspeed_shm_buffers(min_age_s: float = 10.0) -> None:
    """DeepSpeed's CPU communication leaves a 66 MB /dev/shm/deepspeed_allreduce_buffer_* file per rank and launch
    (it never unlinks them); dozens of 2-rank launches would fill /dev/shm, which is RAM. Remove every such buffer
    that no live process maps and that is older than `min_age_s` (a rank maps its buffer right after creating it and
    keeps it mapped until it exits; the age covers the moment between the two). Safe while other test processes
    (pytest-xdist workers) launch ranks of their own."""
    import glob
    import os
    import time

    now = time.time()
    old = []
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            if now - os.stat(path).st_mtime > min_age_s:
                old.append(path)
        except OSError:
            pass
    if not old:
        return
    mapped = _mapped_files()
    for path in old:
        if path not in mapped:
            try:
                os.unlink(path)
            except OSError:
                pass


@pytest.fixture(autouse=True)
def _release_deepspeed_shm_buffers():
    """After each test, the buffers of launches that have ended (this test's and any earlier ones)."""
    yield
    release_deepspeed_shm_buffers()


@pytest.fixture
def pipeline_log(caplog):
    """The records of pipeline.logs.log (its logger does not propagate to the root logger caplog watches)."""
    from pipeline.logs import get_logger

    logger = get_logger()
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
