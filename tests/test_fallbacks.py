"""Fail-soft ``auto`` settings (pipeline.fallbacks): an ``auto`` setting whose first use fails falls back to the plain
path with one WARNING naming the setting, the exception and the fallback, and the run records it (metrics.jsonl,
RUN/fallbacks.json, shown by --check); an explicit value fails at once with a one-line error. The failure is
injected on CPU: torch.compile with a backend that raises, as a missing C++/Triton toolchain does."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers_model import REPO, env_for_subprocess, one_torch_thread, tiny_model

_single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
INJECTED = "no C++ compiler found (injected)"


def _failing_compile(fn):
    def boom(gm, example_inputs):
        raise RuntimeError(INJECTED)

    return torch.compile(fn, backend=boom)


def _compiled_model(*, auto: bool):
    """The tiny Qwen3 with model.compile resolved on (as on CUDA), `auto` or an explicit true."""
    model = tiny_model(attn_implementation="varlen", compile=True)
    model.settings = dataclasses.replace(model.settings, compile=True, compile_auto=auto)
    return model


def _embeddings(model) -> torch.Tensor:
    seqs = [np.arange(1, n + 1, dtype=np.int64) for n in (9, 4, 13)]
    model.eval()
    with torch.no_grad():
        return model(model.make_inputs(seqs))


def test_compile_auto_falls_back_to_eager_layers(monkeypatch, pipeline_log):
    from pipeline.model import compiled

    monkeypatch.setattr(compiled, "_compile", _failing_compile)
    model = _compiled_model(auto=True)
    eager = copy.deepcopy(model)
    watch = compiled.CompileWatch.start(model, None, max_len=64)
    assert not watch.enabled and watch.fallback is not None
    assert watch.fallback.setting == "model.compile" and INJECTED in watch.fallback.error
    assert watch.fallback.fallback.startswith("eager layers")
    assert all("forward" not in vars(layer) for layer in compiled.repeated_layers(model.backbone))
    assert torch.equal(_embeddings(model), _embeddings(eager))  # the plain path, the same numbers
    warnings = [r.getMessage() for r in pipeline_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("model.compile: auto failed (BackendCompilerFailed") and INJECTED in warnings[0]
    assert warnings[0].endswith("falling back to eager layers (not compiled)") and "\n" not in warnings[0]


def test_compile_true_fails_at_once_with_one_line(monkeypatch):
    from pipeline.model import compiled

    monkeypatch.setattr(compiled, "_compile", _failing_compile)
    model = _compiled_model(auto=False)
    with pytest.raises(ValueError) as err:
        compiled.CompileWatch.start(model, None, max_len=64)
    message = str(err.value)
    assert message.startswith("model.compile: true failed (BackendCompilerFailed") and INJECTED in message
    assert "set model.compile: false" in message and "\n" not in message


def test_the_trial_draws_no_random_numbers_and_a_copy_runs_its_own_layers():
    """The first use at start (both GradCache passes) leaves the RNG stream where it was and writes no gradient;
    the compiled forward is bound per layer, so a deepcopy's layers compute with the copy's weights (an instance
    attribute holding torch.compile(layer.forward) would run the original's layers from the copy)."""
    from pipeline.model import compiled

    model = _compiled_model(auto=True)
    before = torch.get_rng_state()
    watch = compiled.CompileWatch.start(model, None, max_len=64)
    assert watch.enabled and watch.fallback is None
    assert torch.equal(torch.get_rng_state(), before)
    assert compiled.graphs_compiled() > 0
    assert all(p.grad is None for p in model.parameters())
    copy_ = copy.deepcopy(model)
    seqs = [np.arange(1, n + 1, dtype=np.int64) for n in (6, 11)]
    copy_.train()
    copy_(copy_.make_inputs(seqs)).sum().backward()
    assert all(p.grad is not None for p in compiled.repeated_layers(copy_.backbone).parameters())
    assert all(p.grad is None for p in model.parameters())


_RUN_WITH_FAILING_COMPILE = """
import sys, torch
sys.path.insert(0, {repo!r})
import pipeline.model.embedding as embedding, pipeline.model.compiled as compiled
embedding.resolve_compile = lambda requested, device_type, packed: True   # auto resolves on, as on CUDA
def failing(fn):
    def boom(gm, example_inputs):
        raise RuntimeError({injected!r})
    return torch.compile(fn, backend=boom)
compiled._compile = failing
sys.argv = ["train.py"] + sys.argv[1:]
sys.path.insert(0, {launch!r})
import train
sys.exit(train.main())
"""


def test_a_run_records_its_fallback_and_check_shows_it(example_shards, tmp_path, capsys):
    """One process (no launcher), two steps of tiny-cpu with model.compile auto resolved on and a compiler that
    raises: the run trains eagerly, metrics.jsonl and RUN/fallbacks.json hold the fallback, --check shows it."""
    out = tmp_path / "run"
    script = _RUN_WITH_FAILING_COMPILE.format(repo=str(REPO), launch=str(REPO / "launch"), injected=INJECTED)
    args = ["--config", str(REPO / "configs" / "tiny-cpu.yaml"), f"data.shards={example_shards}",
            f"train.output_dir={out}", "train.max_steps=2", "train.save_every=0", "train.eval_every=0",
            "data.num_workers=0", "model.compile=auto"]
    env = env_for_subprocess()
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(__import__("tests.helpers_model", fromlist=["free_port"]).free_port())})
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "WARNING model.compile: auto failed (BackendCompilerFailed" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fallback = [r for r in records if r["split"] == "fallback"]
    assert len(fallback) == 1 and fallback[0]["setting"] == "model.compile" and INJECTED in fallback[0]["error"]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]  # it trained, eagerly
    saved = json.loads((out / "fallbacks.json").read_text())
    assert [entry["setting"] for entry in saved] == ["model.compile"]

    from pipeline.training.plan import check_run, format_plan

    report = check_run(REPO / "configs" / "tiny-cpu.yaml", [f"data.shards={example_shards}",
                                                           f"train.output_dir={out}"])
    assert report.ok, report.problems
    line = next(x for x in format_plan(report.plan).splitlines() if x.lstrip().startswith("last fallbacks"))
    assert "model.compile: auto failed (BackendCompilerFailed" in line and "eager layers" in line


def test_check_reports_no_fallback_for_a_fresh_output_dir(example_shards, tmp_path):
    from pipeline.training.plan import check_run, format_plan

    report = check_run(REPO / "configs" / "tiny-cpu.yaml", [f"data.shards={example_shards}",
                                                           f"train.output_dir={tmp_path / 'fresh'}"])
    assert report.ok, report.problems
    assert "last fallbacks     none recorded" in format_plan(report.plan)


def test_an_unreadable_fallbacks_file_is_named(example_shards, tmp_path):
    from pipeline.training.plan import check_run

    out = tmp_path / "run"
    out.mkdir()
    (out / "fallbacks.json").write_text("[{\"setting\": 1}]")
    report = check_run(REPO / "configs" / "tiny-cpu.yaml", [f"data.shards={example_shards}",
                                                           f"train.output_dir={out}"])
    assert [str(p) for p in report.problems] == [f"{out / 'fallbacks.json'}: not a fallbacks file (TypeError: "
                                                 "Fallback.__init__() missing 2 required positional arguments: "
                                                 "'error' and 'fallback')"]
