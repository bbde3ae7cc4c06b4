"""`bench/bench_preprocess.py --quick` runs end to end and prints its report table with every row (no timing checks)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_preprocess.py"


def _rows() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("bench_preprocess_rows", BENCH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return (*module.ROWS, module.TOKENIZER_ROW)


def test_quick_bench_prints_full_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--work", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| metric | seed (median) | ours (median) | ours vs seed | target | met |" in out
    for label in _rows():
        line = next((ln for ln in out.splitlines() if ln.startswith(f"| {label} |")), None)
        assert line is not None, f"row missing: {label}\n{out}"
        assert line.count("|") == 7 and "(n=" in line, line
    assert "token sequences: identical" in out
    assert "of the tokenizer |" in out and "tokenizer alone: " in out
    assert "command: `" in out


def test_help_of_both_scripts():
    for script in (BENCH, REPO / "bench" / "seed_baseline.py"):
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
