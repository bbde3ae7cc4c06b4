"""The GPU step's CPU-testable parts: static chunk padding, regional compilation (no recompiles, same gradients),
under ZeRO-2 and ZeRO-3, fp32 accumulation of chunk gradients, the bf16 gradient check, kernel gating, and
chunk_tokens auto."""
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


def _batches(n: int, seed: int = 0):
    from pipeline.data.batch import random_batch

    rng = np.random.default_rng(seed)
    # Different lengths per batch: different numbers of sequences per chunk and of chunks per step.
    return [random_batch(rng, batch_size=6 + 2 * i, n_neg=3, vocab_size=30522, eos_id=102, passage_len=(12, 120 + 40 * i))
            for i in range(n)]


def _deterministic_model():
    """The tiny Qwen3 without attention dropout: compiled, padded and eager runs draw the same (no) masks."""
    return tiny_model(from_config={**TINY_QWEN3, "attention_dropout": 0.0})


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_static_padding_leaves_embeddings_and_gradients_unchanged():
    from pipeline.config import GradCacheConfig, LossConfig
    from pipeline.model.embedding import encode
    from pipeline.model.packing import pack
    from pipeline.training.gradcache import cached_step

    model = _deterministic_model()
    padded = pack([np.arange(5) + 1, np.arange(9) + 3], pad_to=32, pad_id=0)
    assert padded.input_ids.shape == (1, 32) and padded.n == 2 and padded.cu_seqlens.tolist() == [0, 5, 14, 32]
    assert padded.max_length == 32 and padded.position_ids[0, 14:].tolist() == list(range(18))

    batch = _batches(1)[0]
    gc = GradCacheConfig(chunk_tokens=512)
    with torch.no_grad():
        plain_emb, _ = encode(model, batch.sequences(), chunk_tokens=512)
    model.zero_grad(set_to_none=True)
    cached_step(model, batch, LossConfig(), gc)
    plain_grad = _grads(model)
    model.static_tokens = 512
    with torch.no_grad():
        static_emb, stats = encode(model, batch.sequences(), chunk_tokens=512)
    model.zero_grad(set_to_none=True)
    step = cached_step(model, batch, LossConfig(), gc)
    assert stats.computed_tokens == 512 * stats.chunks and step.computed_tokens == 512 * step.chunks
    assert torch.allclose(static_emb, plain_emb, atol=1e-6)
    assert _rel(_grads(model), plain_grad) < 1e-6


def test_compiled_layers_match_eager_without_recompiling():
    """Regional compilation with static chunks on CPU (inductor): the same gradients as the eager model within 1e-5
    step after step, and no graph compiled after the first step (other chunk counts, other sequence counts per
    chunk, validation in eval mode included)."""
    import copy

    from pipeline.config import GradCacheConfig, LossConfig
    from pipeline.model.compiled import graphs_compiled
    from pipeline.training.gradcache import batch_loss, cached_step

    eager = _deterministic_model()
    compiled = copy.deepcopy(eager)
    assert compiled.compile_layers(static_tokens=1024) == 2
    gc, loss = GradCacheConfig(chunk_tokens=1024), LossConfig(matryoshka=True)
    batches = _batches(4)
    compiled.eval()
    eager.eval()
    assert abs(float(batch_loss(compiled, batches[0], loss, gc).total)
               - float(batch_loss(eager, batches[0], loss, gc).total)) < 1e-5
    compiled.train()
    eager.train()
    after_first = None
    for i, batch in enumerate(batches):
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
        ref = cached_step(eager, batch, loss, gc)
        out = cached_step(compiled, batch, loss, gc)
        assert abs(out.loss - ref.loss) <= 1e-5 * abs(ref.loss)
        assert _rel(_grads(compiled), _grads(eager)) < 1e-5, f"step {i}"
        if after_first is None:
            after_first = graphs_compiled()
    compiled.eval()
    batch_loss(compiled, batches[3], loss, gc)
    assert after_first > 0
    assert graphs_compiled() == after_first  # no recompilation in steady state


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
            assert re.search(r"compile: 2 Qwen3DecoderLayer layers compiled .* static chunks of 512 tokens",
                             proc.stdout + proc.stderr)
            assert re.search(r"compile: \d+ graphs compiled, 0 of them after the first step", proc.stdout + proc.stderr)
            last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-2])
            assert last["recompiles"] == 0, last
    for name in ("zero3", "zero2"):
        assert [r[:2] for r in runs[name]] == [r[:2] for r in runs["eager"]]
        for (_, step, loss), (_, _, ref) in zip(runs[name], runs["eager"]):
            assert abs(loss - ref) <= 1e-5 * abs(ref), (name, step, loss, ref)


def test_compile_needs_chunks_that_hold_the_longest_sequence(example_shards):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY), "--check", "--world-size", "2",
         f"data.shards={example_shards}", "model.compile=true", "gradcache.chunk_tokens=32"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: gradcache.chunk_tokens: 32 is below the shards' max_len 64; with model.compile" in proc.stderr


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
    """--check names the kernel choice and its reason; liger on CPU is a one-line error; chunk_tokens auto is 8192
    on CPU."""
    base = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY), "--check", "--world-size", "2",
            f"data.shards={example_shards}"]
    ok = subprocess.run(base + ["gradcache.chunk_tokens=auto"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "kernels            none (auto: the ranks run on cpu, liger-kernel's Triton kernels need CUDA)" in ok.stdout
    assert "chunk_tokens auto = 8192 (no GPU to probe)" in ok.stdout
    bad = subprocess.run(base + ["model.kernels=liger"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "error: model.kernels: liger cannot be used: the ranks run on cpu" in bad.stderr


def test_chunk_tokens_auto():
    from pipeline.config import GradCacheConfig
    from pipeline.training.chunk_budget import candidates, largest_fitting, resolve_chunk_tokens
    from pipeline.training.gradcache import step_chunks

    assert candidates(1024)[0] == 1 << 17 and candidates(1024)[-1] == 1024 and candidates(3000)[-1] == 4096
    assert candidates(100)[-1] == 1024
    assert largest_fitting(candidates(512), lambda t: t <= 20000) == 16384
    assert largest_fitting([4096, 2048], lambda t: False) is None
    auto = GradCacheConfig(chunk_tokens="auto")
    with pytest.raises(ValueError, match="resolved at start"):
        step_chunks([5, 6], packed=True, gc=auto)
    resolved = resolve_chunk_tokens(auto, tiny_model(), torch.device("cpu"), max_len=64, world_size=1)
    assert resolved.chunk_tokens == 8192
    assert resolve_chunk_tokens(GradCacheConfig(chunk_tokens=300), None, torch.device("cpu"), max_len=64,
                                world_size=1).chunk_tokens == 300
