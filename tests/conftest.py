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


@pytest.fixture(autouse=True)
def _release_deepspeed_shm_buffers():
    """DeepSpeed's CPU communication leaves a 66 MB /dev/shm/deepspeed_allreduce_buffer_* file per rank and launch
    (it never unlinks them); dozens of 2-rank launches would fill /dev/shm, which is RAM. After each test, remove the
    buffers its launches created once no live process uses their port."""
    import glob
    import os
    import re

    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    yield
    live = set()
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            live.update(re.findall(rb"master_port[= \x00](\d+)", open(cmdline, "rb").read()))
        except OSError:
            continue
    for path in set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before:
        port = re.search(r"_(\d+)_\d+$", path)
        if port and port.group(1).encode() not in live:
            try:
                os.unlink(path)
            except OSError:
                pass


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
