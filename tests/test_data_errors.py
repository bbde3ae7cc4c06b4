"""Corrupt or mismatched data stops `launch/train.py` before any training step with one line on stderr.

Each case copies the session's example shards, damages the copy, and runs the real entry point as a plain single
process (tiny CPU recipe): exit status 2, exactly one ``error: <file or key>: <what>`` line, no traceback, and no
trace of a step (no run directory, metrics or checkpoints).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from data_helpers import make_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-cpu.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY),
           f"data.shards={shards}", f"train.output_dir={out}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def flip_byte(shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    path = shards / "web_search" / "corpus-00000.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum can tell
    path.write_bytes(bytes(data))
    return [], f"{path}: sha256 checksum mismatch"


def truncate(shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    path = shards / "paper_topics" / "queries-00000.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    return ["data.verify_checksums=false"], f"{path}: size "  # caught by the size check, without hashing


def other_tokenizer(shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    tok = make_word_tokenizer(tmp_path / "word_tokenizer")
    return [f"model.tokenizer={tok}"], f"{shards / 'manifest.json'}: shards were tokenized with"


def foreign_manifest(shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    """A manifest copied from shards built with another tokenizer (its vocabulary hash differs)."""
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tokenizer"].update(name_or_path="Qwen/Qwen3-0.6B", vocab_size=151669, vocab_sha256="0" * 64)
    path.write_text(json.dumps(manifest))
    return [], f"{path}: shards were tokenized with 'Qwen/Qwen3-0.6B'"


def missing_dataset(shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    return ["data.datasets=[web_search, not_a_dataset]"], "data.datasets: not_a_dataset not in the shards"


def missing_directory(shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    shutil.rmtree(shards)
    return [], f"{shards}: shard directory does not exist"


def missing_manifest(shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    (shards / "manifest.json").unlink()
    return [], f"{shards / 'manifest.json'}: missing"


def broken_manifest(shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    path = shards / "manifest.json"
    path.write_text(path.read_text()[:200])  # cut mid-write
    return [], f"{path}: not valid JSON"


def missing_file(shards: Path, tmp_path: Path) -> tuple[list[str], str]:
    path = shards / "product_reviews" / "corpus-00000.arrow"
    path.unlink()
    return [], f"{path}: file is missing"


CASES: dict[str, Callable[[Path, Path], tuple[list[str], str]]] = {
    "checksum": flip_byte,
    "truncated": truncate,
    "tokenizer": other_tokenizer,
    "foreign_manifest": foreign_manifest,
    "dataset": missing_dataset,
    "no_directory": missing_directory,
    "no_manifest": missing_manifest,
    "bad_manifest": broken_manifest,
    "no_file": missing_file,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_one_line_before_any_step(case, example_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(example_shards, shards)
    extra, expected = CASES[case](shards, tmp_path)
    out = tmp_path / "run"
    proc = train(shards, out, *extra)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: {expected}"), errors[0]
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))  # no run dir: no metrics, no checkpoint


def test_intact_copy_passes_the_checks(example_shards, tmp_path):
    """The same checks accept an intact copy (so the cases above fail for their damage, not for the copy)."""
    sys.path.insert(0, str(REPO))
    from pipeline.config import load_config
    from pipeline.data.loader import check_data
    from pipeline.model.embedding import load_tokenizer_for

    shards = tmp_path / "shards"
    shutil.copytree(example_shards, shards)
    cfg = load_config(TINY, [f"data.shards={shards}"])
    assert cfg.data.verify_checksums  # hashing is on by default
    reader = check_data(cfg.data, load_tokenizer_for(cfg.model))
    assert sorted(reader.datasets) == ["paper_topics", "product_reviews", "web_search"]
