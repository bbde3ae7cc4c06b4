"""GradCache gradient equivalence: cached vs full batch, tiny Qwen3 with dropout > 0, hard negatives and MRL on.

Single process in-process; 2 processes (gloo) through torchrun: DeepSpeed ZeRO-2, ZeRO-3 and plain
torch.distributed, via the gradcheck CLI (which also checks the gradient scale against a one-process global batch).
ZeRO-3 and torch.distributed run ragged global batches (a dataset's last batch): 5 queries on rank 0 and none on
rank 1, and 6 / 3; the scale check then verifies the rank weighting of the loss (B_r x W / G).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from helpers_model import REPO, last_line, one_torch_thread, run_torchrun, tiny_model
from pipeline.data.batch import random_batch
from pipeline.config import GradCacheConfig, LossConfig
from pipeline.training.gradcache import cached_step, plain_step

TOL = 1e-5
CONFIG = str(REPO / "configs" / "tiny-cpu.yaml")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def grad_vector(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().clone() for p in model.parameters()])


def gradient(model, step, batch, loss_cfg, gc_cfg, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    stats = step(model, batch, loss_cfg, gc_cfg)
    return grad_vector(model), stats, torch.get_rng_state()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "dataset_type,n_neg,overrides",
    [
        ("retrieval", 3, {}),
        ("clustering", 3, {"packing": "padded"}),
        ("classification", 1, {"gradient_checkpointing": True}),
        ("retrieval", 2, {"attn_implementation": "varlen"}),
    ],
)
def test_cached_equals_full_batch_single_process(dataset_type, n_neg, overrides):
    model = tiny_model(0, **overrides)
    model.train()
    assert model.backbone.config.attention_dropout > 0
    batch = random_batch(np.random.default_rng(5), batch_size=8, n_neg=n_neg, vocab_size=30522, eos_id=102,
                         dataset_type=dataset_type)
    loss_cfg = LossConfig(matryoshka=True)
    gc_cfg = GradCacheConfig(chunk_tokens=192)
    g_full, s_full, rng_full = gradient(model, plain_step, batch, loss_cfg, gc_cfg, seed=11)
    g_cached, s_cached, rng_cached = gradient(model, cached_step, batch, loss_cfg, gc_cfg, seed=11)
    assert s_cached.chunks >= 3, "the batch must really be split"
    assert s_cached.loss == pytest.approx(s_full.loss, rel=1e-6)
    assert rel(g_cached, g_full) <= TOL
    # RNG replay matters: another dropout seed moves the gradient far beyond the tolerance ...
    g_other, _, _ = gradient(model, plain_step, batch, loss_cfg, gc_cfg, seed=12)
    assert rel(g_other, g_full) > 100 * TOL
    # ... and the cached step leaves the RNG where the plain step leaves it.
    assert torch.equal(rng_full, rng_cached)
    if overrides.get("packing") == "padded":
        assert s_cached.padding_efficiency < 1.0
    else:
        assert s_cached.padding_efficiency == 1.0


def test_gradcheck_cli_single_process(capsys):
    from pipeline.gradcheck import main

    assert main(["--config", CONFIG, "gradcache.chunk_tokens=256"]) == 0  # several chunks: a real check
    line = last_line(capsys.readouterr().out)
    m = re.fullmatch(r"max relative gradient error: (\S+)", line)
    assert m and float(m.group(1)) <= TOL


def test_gradcheck_cli_fails_above_tolerance(capsys):
    from pipeline.gradcheck import main

    assert main(["--config", CONFIG, "--tolerance", "1e-12", "gradcache.chunk_tokens=256"]) == 1
    assert last_line(capsys.readouterr().out).startswith("max relative gradient error: ")


def _two_process_gradcheck(extra: list[str]) -> tuple[float, str]:
    out = run_torchrun(["pipeline.gradcheck", "--config", CONFIG, *extra], timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    m = re.fullmatch(r"max relative gradient error: (\S+)", last_line(out.stdout))
    assert m, out.stdout[-2000:]
    return float(m.group(1)), out.stderr


@pytest.mark.parametrize("ds_json,sizes", [("zero2.json", None), ("zero3.json", "5,0")])
def test_cached_equals_full_batch_deepspeed_two_processes(ds_json, sizes):
    ragged = ["--rank-batch-sizes", sizes] if sizes else []
    err, log = _two_process_gradcheck(
        ["--engine", "deepspeed", "--ds-config", str(REPO / "ds_configs" / ds_json), *ragged,
         "gradcache.chunk_tokens=256"]
    )
    assert err <= TOL
    stage = ds_json[4]
    assert f"ZeRO stage {stage}, world size 2" in log
    assert "scale check (dropout off)" in log  # the one-process global-batch reference ran
    chunks, run = map(int, re.search(r"chunks on rank 0 (\d+), run (\d+)", log).groups())
    if sizes:  # rank 1 holds no query: it runs dummy chunks only and still joins the loss's gathers
        assert "batch: 5 queries over 2 ranks (5 on rank 0)" in log and run == chunks
    else:
        assert run > chunks, "rank 0 must pad with dummy chunks (ranks have different chunk counts)"


def test_cached_equals_full_batch_torch_distributed_two_processes():
    err, log = _two_process_gradcheck(["--engine", "torch", "--rank-batch-sizes", "6,3", "gradcache.chunk_tokens=128"])
    assert err <= TOL
    assert "world size 2, backend gloo" in log and "ZeRO" not in log
    assert "batch: 9 queries over 2 ranks (6 on rank 0)" in log and "scale check (dropout off)" in log
