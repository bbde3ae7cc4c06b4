"""`bench/bench_chunk_padding.py` at a small size: builds F2LLM-shaped shards, reuses them on a rerun, and prints the
issue-22 table from --check's plan (compiled and eager chunks unpadded: 100%)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def test_small_run_builds_reuses_and_prints_the_table(tmp_path, capsys):
    from bench.bench_chunk_padding import main

    args = ["--out", str(tmp_path), "--queries", "300", "--world-sizes", "1", "--chunk-tokens", "16384",
            "--steps", "2", "--json", str(tmp_path / "rows.json")]
    assert main(args) == 0
    stamp = (tmp_path / "spec.json").stat().st_mtime_ns
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["max_len"] == 1024
    assert main(args) == 0  # rerun: the shards are reused
    assert (tmp_path / "spec.json").stat().st_mtime_ns == stamp
    out = capsys.readouterr().out
    assert "| world | chunk_tokens | model.compile | chunks per rank (mean / max) |" in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["compile"], r["efficiency"]) for r in rows] == [(True, 1.0), (False, 1.0)]
    assert rows[0]["real_tokens"] > 16384 and rows[0]["chunks_max"] >= 2  # ~35k tokens per rank and step
    assert rows[0]["before_efficiency"] < 0.9 < rows[0]["buckets_efficiency"] < 1.0
