"""bench/gpu_bench.py's CPU dry run: the GPU benchmark's whole code path (varlen check, seed step, ours, fit) on a
tiny Qwen3, so the script is known to run before a GPU is at hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "dry.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py", "--dry-run", *args, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_bench_dry_run_compiled(tmp_path):
    """Every section with ours compiled, except the global-batch-4096 step (fit), whose compiled CPU run alone takes
    minutes; fit runs eagerly in the next test."""
    result = dry_run(tmp_path, "--compile", "true", "--skip-fit")
    check = result["varlen_check"]
    assert check["ok"] and check["attn_implementation"] == "varlen" and check["weight_matrices_compared"] >= 10
    seed, ours = result["seed"], result["ours"]
    nogc, zero3, big = result["ours_without_gradcache"], result["ours_zero3"], result["big_model"]
    assert "fit" not in result
    assert seed["sequences_per_step"] == 4 * 9 and ours["sequences_per_step"] == 16 * 9
    assert seed["computed_tokens_per_step"] > seed["real_tokens_per_step"]  # one right-padded tensor
    for r in (ours, nogc, zero3):
        # packed, compiled with a dynamic token dimension: nothing is padded
        assert r["status"] == "ok" and r["computed_tokens_per_step"] == r["real_tokens_per_step"]
        assert r["chunks_per_step"] > 1 and r["recompiles"] == 0
    assert ours["extra_forward"] and not nogc["extra_forward"]
    for r in (seed, ours, nogc, zero3, big["result"]):
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and len(r["step_seconds"]) >= 1
    assert big["largest_global_batch"] == 32 and big["tried"] == {"32": "ok"}
    assert result["bf16_gradcheck"]["exit_code"] == 0
    assert result["bf16_gradcheck"]["result"].startswith("bf16 relative gradient error: cached ")
    for key in ("ratio_samples_per_s", "gradcache_time_per_sample_ratio", "zero3_vs_zero2_samples_per_s"):
        assert result[key] > 0


def test_gpu_bench_dry_run_eager_with_fit(tmp_path):
    """The eager path of every section, the global-batch-4096 step included: packed chunks, no padding."""
    result = dry_run(tmp_path, "--compile", "false")
    for name in ("ours", "fit", "ours_without_gradcache", "ours_zero3"):
        r = result[name]
        assert r["status"] == "ok" and r["computed_tokens_per_step"] == r["real_tokens_per_step"], name
        assert r["chunks_per_step"] > 1 and r["recompiles"] is None and r["samples_per_s"] > 0
    assert result["fit"]["chunks_per_step"] > result["ours"]["chunks_per_step"]
    assert result["bf16_gradcheck"]["exit_code"] == 0


def test_gpu_bench_refuses_to_run_without_a_gpu_unless_dry():
    import torch

    if torch.cuda.is_available():  # this check is about CPU machines; on a GPU the full run is the test
        return
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "use --dry-run" in proc.stderr
