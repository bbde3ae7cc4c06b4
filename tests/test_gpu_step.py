"""The GPU step's CPU-testable parts: regional compilation with a dynamic token dimension (no padding, no recompiles
on widely varying lengths, same gradients), under ZeRO-2 and ZeRO-3, fp32 accumulation of chunk gradients, the bf16
gradient check, kernel gating, and chunk_tokens auto."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_model import TINY_QWEN3, last_line, one_torch_thread, run_torchrun, tiny_model
from train_helpers import REPO, TINY, run_training

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _deterministic_model():
    """The tiny Qwen3 without attention dropout: compiled, padded and eager runs draw the same (no) masks."""
    return tiny_model(from_config={**TINY_QWEN3, "attention_dropout": 0.0})


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _varied_batches():
    """Batches of widely varying shapes: sequences of 1 to 900 tokens, 1 to 12 queries, 1 to 8 chunks of 1024 tokens
    (chunks from ~20 to 1024 tokens, 1 to ~40 sequences each)."""
    from pipeline.data.batch import random_batch

    rng = np.random.default_rng(0)
    shapes = [(8, (4, 60), (12, 400)), (2, (200, 600), (300, 900)), (12, (1, 8), (1, 40)), (1, (1, 3), (1, 8)),
              (5, (20, 200), (100, 700))]
    return [random_batch(rng, batch_size=b, n_neg=3, vocab_size=30522, eos_id=102, query_len=q, passage_len=p)
            for b, q, p in shapes]


def test_compiled_layers_match_eager_without_recompiling():
    """Regional compilation with a dynamic token dimension on CPU (inductor), batches of widely varying lengths:
    nothing padded (computed tokens = real), the same gradients as the eager model within 1e-5 step after step, and
    no graph compiled after the warm-up (a validation pass and the first step) - other chunk counts and lengths,
    other sequence counts per chunk, validation in eval mode included."""
    import copy

    from pipeline.config import GradCacheConfig, LossConfig
    from pipeline.model.compiled import CompileWatch, graphs_compiled
    from pipeline.training.gradcache import batch_loss, cached_step

    eager = _deterministic_model()
    compiled = copy.deepcopy(eager)
    assert compiled.compile_layers(max_length=1024, chunk_tokens=1024) == 2
    watch = CompileWatch(True)
    gc, loss = GradCacheConfig(chunk_tokens=1024), LossConfig(matryoshka=True)
    batches = _varied_batches()
    compiled.eval()
    eager.eval()
    assert abs(float(batch_loss(compiled, batches[0], loss, gc).total)
               - float(batch_loss(eager, batches[0], loss, gc).total)) < 1e-5
    compiled.train()
    eager.train()
    chunks = []
    for i, batch in enumerate(batches):
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
        ref = cached_step(eager, batch, loss, gc)
        out = cached_step(compiled, batch, loss, gc)
        assert abs(out.loss - ref.loss) <= 1e-5 * abs(ref.loss)
        assert _rel(_grads(compiled), _grads(eager)) < 1e-5, f"step {i}"
        assert out.computed_tokens == out.real_tokens == ref.real_tokens and out.chunks == ref.chunks
        chunks.append(out.chunks)
        watch.after_step(i + 1)
    compiled.eval()
    batch_loss(compiled, batches[2], loss, gc)
    assert len(set(chunks)) >= 3, chunks  # the steps differed in chunk counts too
    assert watch.after_first_step > 0 and graphs_compiled() == watch.after_first_step  # no recompilation
    assert watch.values()["recompiles"] == 0


def _losses(run: Path) -> list[tuple[str, int, float]]:
    return [(r["split"], r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] in ("train", "validation")]


def test_compiled_training_under_zero3_and_zero2_matches_eager(example_shards, tmp_path):
    """2 ranks, the real trainer: compiled layers under ZeRO-3 and ZeRO-2 give the eager ZeRO-3 run's losses (within
    1e-5 relative over 4 steps and 2 validations) and log 0 recompilations after the first step."""
    common = [f"data.shards={example_shards}", "train.max_steps=4", "train.eval_every=2", "train.save_every=0",
              "model.from_config.attention_dropout=0.0", "gradcache.chunk_tokens=512"]
    runs = {}
    for name, extra in (("eager", ["model.compile=false"]), ("zero3", ["model.compile=true"]),
                        ("zero2", ["model.compile=true", f"deepspeed={REPO / 'ds_configs' / 'zero2.json'}"])):
        out = tmp_path / name
        proc = run_training([*common, f"train.output_dir={out}", *extra])
        runs[name] = _losses(out)
        if name != "eager":
            assert re.search(r"compile: 2 Qwen3DecoderLayer layers compiled .* dynamic token dimension \(packed "
                             r"chunks of up to 512 tokens unpadded", proc.stdout + proc.stderr)
            assert re.search(r"compile: \d+ graphs compiled, 0 of them after the first step", proc.stdout + proc.stderr)
            last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-2])
            assert last["recompiles"] == 0, last
    for name in ("zero3", "zero2"):
        assert [r[:2] for r in runs[name]] == [r[:2] for r in runs["eager"]]
        for (_, step, loss), (_, _, ref) in zip(runs[name], runs["eager"]):
            assert abs(loss - ref) <= 1e-5 * abs(ref), (name, step, loss, ref)


def test_check_plans_compiled_chunks_unpadded(example_shards):
    """--check with model.compile: the same chunks as eager and nothing padded (computed = real tokens), also with
    chunk_tokens below the shards' max_len (64): a longer sequence gets a chunk of its own, as in eager runs."""
    from pipeline.training.plan import check_run, format_plan

    plans = {}
    for compiled in ("true", "false"):
        report = check_run(TINY, [f"data.shards={example_shards}", f"model.compile={compiled}",
                                  "gradcache.chunk_tokens=32"], world_size=2, sample_steps=2)
        assert report.ok, report.problems
        plans[compiled] = report.plan
    on, off = plans["true"].sample, plans["false"].sample
    assert on.chunks_run == off.chunks_run and on.real_tokens == off.real_tokens
    assert on.computed_tokens_mean == on.real_tokens_mean == off.computed_tokens_mean
    text = format_plan(plans["true"])
    assert "layers compiled (torch.compile per layer, dynamic token dimension, chunks unpadded)" in text
    assert "(padding efficiency 100.0%)" in text


def test_fp32_accumulator_rounds_once():
    from pipeline.training.backward import FP32Accumulator

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    parts = [torch.randn(4096) * (1.0 if i == 0 else 1e-2) for i in range(64)]  # one large, many small
    exact = torch.stack(parts).sum(0)
    accumulator = FP32Accumulator([p])
    for part in parts:
        p.grad = part.to(torch.bfloat16) if p.grad is None else p.grad + part.to(torch.bfloat16)
        accumulator.collect()
        assert float(p.grad.abs().max()) == 0.0
    accumulator.release()
    bf16_sum = torch.zeros(4096, dtype=torch.bfloat16)
    for part in parts:
        bf16_sum += part.to(torch.bfloat16)
    err_fp32, err_bf16 = _rel(p.grad.float(), exact), _rel(bf16_sum.float(), exact)
    assert p.grad.dtype == torch.bfloat16 and err_fp32 < 0.01 and err_fp32 < err_bf16 / 2, (err_fp32, err_bf16)


def test_gradcheck_bf16_on_cpu():
    from pipeline.gradcheck import main

    assert main(["--config", str(TINY), "--dtype", "bf16", "--batch-size", "8", "--chunks", "32"]) == 0


def test_gradcheck_bf16_zero3_two_ranks():
    proc = run_torchrun(["pipeline.gradcheck", "--config", str(TINY), "--dtype", "bf16", "--batch-size", "8",
                         "--ds-config", str(REPO / "ds_configs" / "zero3.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = last_line(proc.stdout)
    found = re.search(r"bf16 relative gradient error: cached ([\d.e+-]+), plain ([\d.e+-]+) \(ok", line)
    assert found, line
    cached, plain = map(float, found.groups())
    assert 0 < cached <= 1.5 * plain
    assert re.search(r"\(a\) GradCache bf16, \d+ chunks, chunk gradients summed in fp32, coalesced", proc.stderr)


def test_gradcheck_compiled_is_exact():
    proc = run_torchrun(["pipeline.gradcheck", "--config", str(TINY), "model.compile=true"], nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = float(last_line(proc.stdout).split(": ")[1])
    assert error < 1e-5


def test_kernel_choice():
    from pipeline.model.kernels import resolve_kernels

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = resolve_kernels("auto", cpu, "qwen3")
    assert auto.kernels == "none" and "the ranks run on cpu" in auto.reason
    with pytest.raises(ValueError, match=r"^model.kernels: liger cannot be used: the ranks run on cpu"):
        resolve_kernels("liger", cpu, "qwen3")
    assert resolve_kernels("auto", cuda, "bert", importable=True).kernels == "none"
    assert "not one of liger's supported families" in resolve_kernels("auto", cuda, "bert", importable=True).reason
    assert resolve_kernels("auto", cuda, "qwen3", importable=False).reason.endswith("liger-kernel does not import "
                                                                                    "(pip install -e '.[gpu]')")
    for family in ("qwen3", "qwen2", "llama", "mistral"):
        assert resolve_kernels("auto", cuda, family, importable=True).kernels == "liger"
    assert resolve_kernels("none", cuda, "qwen3", importable=True).kernels == "none"


def test_kernels_and_chunk_auto_in_check_and_at_start(example_shards):
    """--check names the kernel choice and its reason; liger on CPU is a one-line error; chunk_tokens auto on CPU is
    8192 or less: the power of two above the most tokens a rank has in the first steps."""
    base = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY), "--check", "--world-size", "2",
            f"data.shards={example_shards}"]
    ok = subprocess.run(base + ["gradcache.chunk_tokens=auto"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "kernels            none (auto: the ranks run on cpu, liger-kernel's Triton kernels need CUDA)" in ok.stdout
    found = re.search(r"chunk_tokens auto = (\d+) \(no GPU to probe; at most \1 = the power of two >= ([\d,]+), the "
                      r"most real tokens a rank has in one of the first 8 steps\)", ok.stdout)
    assert found, ok.stdout
    auto, work = int(found.group(1)), int(found.group(2).replace(",", ""))
    assert auto // 2 < work <= auto <= 8192
    bad = subprocess.run(base + ["model.kernels=liger"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "error: model.kernels: liger cannot be used: the ranks run on cpu" in bad.stderr


def test_chunk_tokens_auto():
    from pipeline.config import GradCacheConfig
    from pipeline.training.chunk_budget import auto_ceiling, candidates, largest_fitting, resolve_chunk_tokens
    from pipeline.training.gradcache import step_chunks

    assert candidates(1024)[0] == 1 << 17 and candidates(1024)[-1] == 1024 and candidates(3000)[-1] == 4096
    assert candidates(100)[-1] == 1024
    assert auto_ceiling(None) == 1 << 17 and auto_ceiling(36_000) == 65536 and auto_ceiling(65536) == 65536
    assert auto_ceiling(10) == 1024 and auto_ceiling(10**9) == 1 << 17
    assert candidates(1024, auto_ceiling(36_000)) == [65536, 32768, 16384, 8192, 4096, 2048, 1024]
    assert candidates(3000, 1024) == [4096]  # a chunk holds the longest sequence
    assert largest_fitting(candidates(512), lambda t: t <= 20000) == 16384
    assert largest_fitting([4096, 2048], lambda t: False) is None
    auto = GradCacheConfig(chunk_tokens="auto")
    with pytest.raises(ValueError, match="resolved at start"):
        step_chunks([5, 6], packed=True, gc=auto)
    resolved = resolve_chunk_tokens(auto, tiny_model(), torch.device("cpu"), max_len=64, world_size=1).gradcache
    assert resolved.chunk_tokens == 8192
    assert resolve_chunk_tokens(auto, None, torch.device("cpu"), max_len=64, world_size=1,
                                work_tokens=3000).gradcache.chunk_tokens == 4096
    assert resolve_chunk_tokens(GradCacheConfig(chunk_tokens=300), None, torch.device("cpu"), max_len=64,
                                world_size=1).gradcache.chunk_tokens == 300
