"""`bench/bench_trainer.py --quick` runs end to end (2 ranks, deepspeed launcher) and prints both tables with every
method's row (no timing assertions); the seed step's loss semantics (non-differentiable gather) by hand."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_trainer.py"
sys.path.insert(0, str(REPO))

LABELS = (
    "seed step (F2LLM: padded batch, no GradCache, non-differentiable gather)",
    "ours: Trainer step (packed + GradCache + differentiable gather)",
    "ours without GradCache (packed, plain_step)",
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def test_quick_bench_prints_tables(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "Command: `PYTHONPATH=. python bench/bench_trainer.py --quick`" in out
    assert "| method | step time (s) | samples/s | real tokens/s |" in out
    assert "| method | peak RSS per rank by per-rank batch (GiB) |" in out
    lines = out.splitlines()
    for label in LABELS:  # throughput rows: all three methods
        row = [ln for ln in lines if ln.startswith(f"| {label} |")]
        assert row, f"row missing: {label}\n{out}"
    for label in LABELS[:2]:  # memory rows: seed and ours (default --mem-methods), each a second row
        rows = [ln for ln in lines if ln.startswith(f"| {label} |")]
        assert len(rows) == 2, f"memory row missing: {label}\n{out}"
        assert rows[1].count("|") == 5, rows[1]


def test_help():
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--quick" in proc.stdout, proc.stderr


def test_seed_collate_and_loss_semantics():
    from bench.seed_step import seed_collate, seed_loss
    from pipeline.data.batch import ContrastiveBatch
    from pipeline.config import LossConfig

    seqs = lambda lens: [np.arange(1, n + 1, dtype=np.int64) for n in lens]  # noqa: E731
    batch = ContrastiveBatch(seqs([3, 5]), seqs([7, 4]), seqs([2, 9, 6, 1]), 2, "retrieval")
    one = seed_collate(batch, pad_id=0, padding="batch")
    assert len(one.groups) == 1 and one.groups[0].input_ids.shape == (8, 9)  # everything padded to the longest
    assert one.real_tokens == 37 and one.computed_tokens == 72
    assert one.groups[0].attention_mask.sum() == 37 and one.groups[0].input_ids[0, 3:].eq(0).all()
    three = seed_collate(batch, pad_id=0, padding="group")
    assert [g.input_ids.shape for g in three.groups] == [(2, 5), (2, 7), (4, 9)]

    torch.manual_seed(0)
    q = torch.randn(2, 8, requires_grad=True)
    p = torch.randn(2, 8, requires_grad=True)
    n = torch.randn(4, 8, requires_grad=True)
    cfg = LossConfig(temperature=0.05)
    loss, parts = seed_loss(q, p, n, 2, "retrieval", cfg)
    assert set(parts) == {"in_batch", "hard_negative", "total"}
    # Only the hard-negative term reaches the positives: their gradient equals that of the hard loss alone.
    loss.backward()
    p_grad_total = p.grad.clone()
    p.grad = None
    hard_only = LossConfig(temperature=0.05, in_batch_types=[])
    loss2, parts2 = seed_loss(q, p, n, 2, "retrieval", hard_only)
    assert set(parts2) == {"hard_negative", "total"}
    loss2.backward()
    assert torch.allclose(p.grad, p_grad_total)
