"""`bench/bench_vs_st.py --quick` runs ours (2 CPU ranks, launch/train.sh) and sentence-transformers' trainer end to
end on the tiny Qwen3 case, and its JSON has every field with sane values. A benchmark is not a timed test: nothing
here asserts a speed; what must hold is that both sides ran the same thing (steps, batches, tokens, lr schedule) and
that both trained models evaluate the same way through both evaluation paths."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_vs_st.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_bench_json(tmp_path):
    out = tmp_path / "vs_st.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| samples/s (median step) |" in proc.stdout and "| held-out MRR@10" in proc.stdout, proc.stdout
    assert "[bench_vs_st" in proc.stderr  # progress lines
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["command"].startswith("PYTHONPATH=. python bench/bench_vs_st.py")
    assert report["repeats"] == 1 and report["warmup"] == 1
    assert set(report["versions"]) >= {"torch", "transformers", "sentence_transformers"}
    assert _positive(report["load_average"]["median"]) and report["load_average"]["samples"] >= 1
    cases = [c for c in report["cases"] if "skipped" not in c]
    assert [c["case"] for c in cases] == ["qwen3"]
    for case in cases:
        s = case["summary"]
        for side in ("ours", "st"):
            for key in ("samples_per_s", "step_s", "wall_s", "real_tokens_per_s", "computed_tokens_per_s"):
                assert _positive(s[key][side]), (key, s[key])
            for metric in ("mrr@10", "ndcg@10", "mrr@10_st_encode"):
                assert 0.0 <= s[metric][side] <= 1.0, (metric, s[metric])
            assert 0.0 < s["padding_efficiency"][side] <= 1.0, s["padding_efficiency"]
        assert _positive(s["samples_per_s_ratio"]) and len(s["samples_per_s_ratio_per_repeat"]) == 1
        assert 0.0 <= s["mrr@10"]["base"] <= 1.0
        # the same run on both sides: steps, batch, negatives, lr schedule, batches, tokens
        assert s["steps"]["ours"] == s["steps"]["st"] == case["steps_total"] == case["spec"]["steps"] == 3
        assert case["batch"]["ours"] == case["batch"]["st"] == case["global_batch"] == 8
        assert case["hard_negatives"]["ours"] == case["hard_negatives"]["st"] == 3
        assert s["batches_match"] is True
        assert s["real_tokens_match"] is True  # every step's real tokens: their collator's == the shards'
        assert s["lr_max_abs_diff"] < 1e-12
        assert case["texts_tokenize_identically"] == 1.0
        # ours packs (no padding), theirs pads each mini-batch: the same real tokens, more computed on their side
        assert s["padding_efficiency"]["ours"] == 1.0
        assert s["real_tokens_per_s"]["ours"] == s["computed_tokens_per_s"]["ours"]
        assert s["ratio_factors"]["padding"] >= 1.0 and _positive(s["ratio_factors"]["compute"])
        # the two evaluation paths agree on each trained model (same weights, same pooling)
        for side in ("ours", "st"):
            assert abs(s["mrr@10"][side] - s["mrr@10_st_encode"][side]) < 0.02, s
        # the paired bootstrap is over the per-query terms of the st-encode MRR@10: its means are those MRRs' differences
        bs = s["mrr@10_paired_bootstrap"]
        enc = s["mrr@10_st_encode"]
        for name, (a, b) in {"ours-st": ("ours", "st"), "ours-base": ("ours", "base"), "st-base": ("st", "base")}.items():
            assert abs(bs[name]["diff"] - (enc[a] - enc[b])) < 1e-9, (name, bs[name], enc)
            assert bs[name]["ci95_low"] <= bs[name]["diff"] <= bs[name]["ci95_high"], bs[name]
        rep = case["repeats"][0]
        assert len(rep["ours"]["step_times_s"]) == len(rep["st"]["step_times_s"]) == 2  # intervals from step 2 on
        assert all(_positive(t) for t in rep["ours"]["step_times_s"] + rep["st"]["step_times_s"])
        assert len(rep["ours"]["lr"]) == len(rep["st"]["lr"]) == 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)


def test_help():
    proc = _cli("--help")
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--cases" in proc.stdout, proc.stderr


def test_bad_arguments_one_line_exit_2():
    proc = _cli("--cases", "nope")
    assert proc.returncode == 2 and "--cases" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr
    proc = _cli("--steps", "1")  # no step left to measure after the warmup step
    assert proc.returncode == 2 and "--steps" in proc.stderr, proc.stderr


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_vs_st", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # its dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_reciprocal_ranks_and_paired_bootstrap():
    import numpy as np

    bench = _bench_module()
    top = np.array([[3, 1, 2], [0, 5, 4], [7, 8, 9]])
    assert bench.reciprocal_ranks(top, [[1], [0, 4], [1]]) == [0.5, 1.0, 0.0]  # first relevant hit; none -> 0
    assert bench.reciprocal_ranks(top, [[2]], k=2) == [0.0]  # beyond the cut-off
    rng = np.random.default_rng(1)
    a = rng.random(300).tolist()
    same = bench.paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "queries": 300}
    shifted = bench.paired_bootstrap([x + 0.25 for x in a], a)  # a constant per-query gain: no spread at all
    assert all(abs(shifted[k] - 0.25) < 1e-12 for k in ("diff", "ci95_low", "ci95_high"))
    b = rng.random(300).tolist()
    noisy = bench.paired_bootstrap(a, b)
    assert noisy["ci95_low"] < noisy["diff"] < noisy["ci95_high"]
    assert noisy == bench.paired_bootstrap(a, b)  # seeded: the same interval every time
