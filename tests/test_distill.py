"""Embedding distillation (loss.distill, F2LLM v2): exact under GradCache with a partitioned ZeRO-3 teacher, logged per
dataset, teacher checked at start."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_helpers import make_word_tokenizer, minilm_dir
from helpers_model import TINY_QWEN3, last_line, run_torchrun
from train_helpers import REPO, TINY, run_training


def _teacher(out: Path, *, hidden: int, tokenizer: str) -> Path:
    """A tiny random Qwen3 model directory (hidden `hidden`) with the given tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    kw = {k: v for k, v in TINY_QWEN3.items() if k != "model_type"}
    kw.update(hidden_size=hidden, head_dim=hidden // 4, intermediate_size=2 * hidden)
    torch.manual_seed(5)
    AutoModel.from_config(AutoConfig.for_model("qwen3", **kw)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return _teacher(tmp_path_factory.mktemp("teacher"), hidden=96, tokenizer=minilm_dir())


def test_gradcheck_with_a_partitioned_teacher(teacher_dir):
    """2 ranks, ZeRO-3 (student and teacher partitioned): cached vs plain, and against one process computing the
    global batch with an unsharded teacher; a ragged batch (7 and 2 queries), so the distillation term is weighted
    by each rank's queries too."""
    proc = run_torchrun(["pipeline.gradcheck", "--config", str(TINY), "--rank-batch-sizes", "7,2",
                         f"loss.distill.teacher={teacher_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch: 9 queries over 2 ranks (7 on rank 0)" in proc.stderr
    assert "partitioned over 2 ranks (ZeRO-3, inference only)" in proc.stderr
    assert re.search(r"with a distillation teacher\): relative gradient error .*'distill': [\d.]+", proc.stderr)
    assert float(last_line(proc.stdout).split(": ")[1]) < 1e-5


def test_training_logs_distillation_per_dataset(teacher_dir, example_shards, tmp_path):
    out = tmp_path / "run"
    run_training([f"data.shards={example_shards}", f"train.output_dir={out}", "train.max_steps=3",
                  "train.eval_every=3", "train.save_every=0", f"loss.distill.teacher={teacher_dir}",
                  "loss.distill.weight=0.5"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 3
    for r in train:
        datasets = [k.split("/", 1)[1] for k in r if k.startswith("loss/")]
        assert len(datasets) == 1 and r[f"distill/{datasets[0]}"] == r["distill"] > 0
        assert r["total"] > 0.5 * r["distill"]
    assert json.loads((out / "config.json").read_text())["loss"]["distill"]["weight"] == 0.5


def test_teacher_checks_are_one_line(teacher_dir, example_shards, tmp_path):
    other = _teacher(tmp_path / "other_tokenizer", hidden=96, tokenizer=make_word_tokenizer(tmp_path / "words"))
    base = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY)]
    shards = f"data.shards={example_shards}"
    for extra in ([], ["--check", "--world-size", "2"]):  # at start (before any process group) and at --check
        proc = subprocess.run(base + extra + [shards, f"loss.distill.teacher={other}"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(line) == 1, proc.stderr[-3000:]
        assert f"loss.distill.teacher: {other}: its tokenizer" in line[0]
        assert "differs from the shards'" in line[0] and "the teacher must read the same token ids" in line[0]
    proc = subprocess.run(base + ["--check", "--world-size", "2", shards, f"loss.distill.teacher={teacher_dir}",
                                  "loss.distill.weight=0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: loss.distill.weight: must be > 0, got 0.0" in proc.stderr

    from pipeline.config import DistillConfig
    from pipeline.training.teacher import load_teacher

    narrow = _teacher(tmp_path / "narrow", hidden=32, tokenizer=minilm_dir())
    with pytest.raises(ValueError, match=r"^loss.distill.teacher: .*narrow: hidden size 32 is smaller than the "
                                         r"student's 64"):
        load_teacher(DistillConfig(teacher=str(narrow)), torch.device("cpu"), student_hidden=64, zero_stage=0,
                     world_size=1)
