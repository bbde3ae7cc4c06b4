"""Property tests of the batching edge cases that break peers (tests/batching_cases.py): random batches with 1-token
and max_len sequences, the same text twice, empty ranks and ragged rank sizes.

* packed (varlen attention, and sdpa with transformers' mask from the restarting position ids) == padded == one
  sequence at a time, through the chunked no-grad pass training runs, whatever the chunk size;
* every InfoNCE label points at its own positive (perfect embeddings give ~0 loss, swapped positives do not);
* the same on two ranks (gloo), with an empty rank and ragged sizes.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batching_cases import MAX_LEN, embedding_gap, label_losses, random_sequences
from helpers_model import REPO, env_for_subprocess, free_port, last_line, one_torch_thread, tiny_model
from pipeline.config import GradCacheConfig
from pipeline.model.packing import pack
from pipeline.training.gradcache import embed_no_grad

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def models():
    """The same tiny Qwen3 weights as packed-varlen, packed-sdpa (transformers' block mask from position ids) and
    padded-sdpa models, eval mode (no dropout)."""
    built = {
        "varlen": tiny_model(0, attn_implementation="varlen"),
        "sdpa": tiny_model(0, attn_implementation="sdpa", packing="packed"),
        "padded": tiny_model(0, packing="padded"),
    }
    reference = built["varlen"].state_dict()
    for model in built.values():
        model.eval()
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    return built


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), chunk_tokens=st.integers(1, 4 * MAX_LEN))
def test_packed_padded_and_one_at_a_time_agree(models, seed, n, chunk_tokens):
    seqs = random_sequences(np.random.default_rng(seed), n)
    gc = GradCacheConfig(chunk_tokens=chunk_tokens)
    with torch.no_grad():
        for name in ("varlen", "sdpa"):
            chunked = embed_no_grad(models[name], seqs, gc)
            assert chunked.shape == (n, 64)
            assert embedding_gap(chunked, models[name], models["padded"], seqs) <= 1e-5, name


def test_single_token_sequences_stay_apart(models):
    """Consecutive 1-token sequences in one packed row (restarting position ids 0, 0, 0) are three sequences, not
    one: each embedding equals the sequence alone, and the row's bounds say so."""
    seqs = [np.array([102]), np.array([102]), np.array([7, 102]), np.array([102])]
    assert pack(seqs).cu_seqlens.tolist() == [0, 1, 2, 4, 5]
    with torch.no_grad():
        for name in ("varlen", "sdpa"):
            row = models[name](models[name].make_inputs(seqs))
            alone = torch.cat([models[name](models[name].make_inputs([s])) for s in seqs])
            assert float((row - alone).abs().max()) <= 1e-6, name
            assert torch.equal(row[0], row[1])  # the same text gives the same embedding in one row


@SETTINGS
@given(size=st.integers(1, 9), seed=st.integers(0, 1000))
def test_every_label_points_at_its_own_positive(size, seed):
    """One rank: perfect embeddings give ~0 in-batch and hard-negative loss (the duplicate document masked), swapped
    positives ~100 (ranks without queries: the two-rank test)."""
    in_batch, hard, swapped = label_losses([size], 0, seed)
    assert in_batch <= 1e-6 and hard <= 1e-6
    if size >= 2:
        assert swapped > 1.0


def test_two_ranks_with_empty_and_ragged_batches():
    """tests/batching_worker.py on 2 gloo ranks: both properties for 12 random global batches."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(REPO / "tests" / "batching_worker.py")],
        cwd=REPO, env=env_for_subprocess(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert last_line(proc.stdout) == "ok 12"
