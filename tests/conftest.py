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
