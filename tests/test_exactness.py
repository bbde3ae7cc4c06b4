"""Exact on every run: the gradient check repeated at 1 and 2 threads and several chunk sizes, bit for bit, and the
detectors that name a nondeterministic path.

The claim under test (README, "Exactness"): GradCache's gradient equals the plain full-batch gradient within 1e-5
relative, and the same computation gives the same bits every time, whatever the number of intra-op threads or what
ran before it in the process. A 1-in-10 event needs ~30 tries to be caught with 95% probability, so the check runs
30 times in one process at 2 threads (tiny-cpu at chunk_tokens 256, five chunks), 10 times at 1 and 2 threads for
other chunk sizes, and in fresh processes (the process's first computation compared with later ones).
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers_model import REPO, env_for_subprocess, last_line, tiny_model
from pipeline.config import GradCacheConfig, LossConfig
from pipeline.data.batch import random_batch
from pipeline.gradcheck import Repeat, repeat_problems
from pipeline.training.gradcache import StepStats, cached_step

TOL = 1e-5  # README's exactness statement
CONFIG = str(REPO / "configs" / "tiny-cpu.yaml")
ERROR_LINE = re.compile(r"max relative gradient error: (\S+)")


def _error(out: str) -> float:
    m = ERROR_LINE.fullmatch(last_line(out))
    assert m, out[-2000:]
    return float(m.group(1))


@pytest.mark.parametrize("chunk_tokens,repeats,threads", [
    (256, 30, "2"),      # the case that strayed: five chunks, two threads, 30 times in one process
    (256, 10, "1"),
    (64, 10, "2,1"),     # a chunk per sequence or two
    (1024, 10, "2,1"),   # tiny-cpu's own setting: two chunks
])
def test_gradcheck_is_bit_identical_on_every_repeat(capsys, chunk_tokens, repeats, threads):
    from pipeline.gradcheck import main

    code = main(["--config", CONFIG, "--repeat", str(repeats), "--threads", threads,
                 f"gradcache.chunk_tokens={chunk_tokens}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert _error(captured.out) <= TOL


def test_first_computation_of_a_fresh_process_equals_later_ones():
    """The process's first plain and cached steps against its later ones, at 2 threads, in three fresh processes
    (one per chunk size); the printed error is the same in all of them for the same chunk size."""
    env = env_for_subprocess()
    env["OMP_NUM_THREADS"] = "2"
    errors = {}
    for chunk_tokens in (256, 256, 128):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.gradcheck", "--config", CONFIG, "--repeat", "4",
             f"gradcache.chunk_tokens={chunk_tokens}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        errors.setdefault(chunk_tokens, set()).add(_error(proc.stdout))
    assert all(len(values) == 1 for values in errors.values()), errors
    assert max(max(values) for values in errors.values()) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# The detectors: a nondeterministic path is named, not averaged away.
# ---------------------------------------------------------------------------------------------------------------
def _stats(loss: float, replay: float = 0.0) -> StepStats:
    return StepStats(loss=loss, replay_max_diff=replay)


def test_repeat_problems_names_the_path_that_changed():
    g = torch.arange(6, dtype=torch.float32)
    stray = g.clone()
    stray[2] += 1e-3
    same = Repeat(g, g.clone(), _stats(8.5), _stats(8.5))
    assert repeat_problems([same, same, same], threads=2) == []
    plain_first = Repeat(stray, g.clone(), _stats(8.49), _stats(8.5))  # the first call strays (the reported fault)
    problems = repeat_problems([plain_first, same], threads=2)
    assert len(problems) == 1 and "plain reference step differs from repeat 1" in problems[0]
    cached_later = Repeat(g, stray, _stats(8.5), _stats(8.5))
    problems = repeat_problems([same, same, cached_later], threads=1)
    assert len(problems) == 1 and "1 threads, repeat 3: the GradCache step" in problems[0]
    replayed = Repeat(g, g.clone(), _stats(8.5), _stats(8.5, replay=3e-7))
    assert "replay is not exact" in repeat_problems([replayed], threads=2)[0]


def _batch():
    return random_batch(np.random.default_rng(3), batch_size=6, n_neg=2, vocab_size=30522, eos_id=102)


def test_cached_step_replay_is_exact_and_reports_a_stray_first_pass(monkeypatch):
    model = tiny_model(0)
    model.train()
    loss_cfg, gc_cfg = LossConfig(matryoshka=True), GradCacheConfig(chunk_tokens=128)
    torch.manual_seed(1)
    exact = cached_step(model, _batch(), loss_cfg, gc_cfg)
    assert exact.chunks >= 3 and exact.replay_max_diff == 0.0
    model.zero_grad(set_to_none=True)
    # The no-grad pass's first chunk strays; the backward pass re-computes it without the stray: detected.
    original = type(model).forward
    calls = {"n": 0}

    def forward(self, inputs, raw=False):
        out = original(self, inputs, raw=raw)
        calls["n"] += 1
        return out + 1e-3 if calls["n"] == 1 else out

    monkeypatch.setattr(type(model), "forward", forward)
    torch.manual_seed(1)
    stray = cached_step(model, _batch(), loss_cfg, gc_cfg)
    assert stray.replay_max_diff == pytest.approx(1e-3, rel=1e-2)


def test_gradcheck_fails_and_names_the_path_when_the_first_call_strays(monkeypatch, capsys):
    """A forward that computes differently on its first call (the reported fault: the process's first plain step
    went astray) makes the check fail and name the plain reference, whatever the tolerance."""
    from pipeline import gradcheck
    from pipeline.model.embedding import EmbeddingModel

    original = EmbeddingModel.forward
    calls = {"n": 0}

    def forward(self, inputs, raw=False):
        out = original(self, inputs, raw=raw)
        calls["n"] += 1
        return out * (1 + 1e-4) if calls["n"] == 1 else out

    monkeypatch.setattr(EmbeddingModel, "forward", forward)
    code = gradcheck.main(["--config", CONFIG, "--repeat", "2", "--threads", "2", "--tolerance", "1",
                           "gradcache.chunk_tokens=256"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAIL" in last_line(captured.out)
    assert "FAIL: 2 threads, repeat 2: the plain reference step differs from repeat 1" in captured.out


def test_gradcheck_option_errors_are_one_line(capsys):
    from pipeline.gradcheck import main

    assert main(["--config", CONFIG, "--repeat", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --repeat must be >= 1, got 0"
    assert main(["--config", CONFIG, "--threads", "2,x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --threads: expected comma-separated integers, got '2,x'"


def test_trainer_metrics_carry_the_replay_difference():
    from pipeline.training.metrics import step_values

    model = tiny_model(0)
    values = step_values(_stats(1.0, replay=2.5e-7), 1.0, dataset="d", lr=1e-3, grad_norm=1.0, samples=4,
                         device=torch.device("cpu"), hf_config=model.backbone.config, params_non_embedding=1,
                         world_size=1)
    assert values["gradcache_replay_max_diff"] == 2.5e-7
