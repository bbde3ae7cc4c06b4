"""Two-rank worker of tests/test_batching_properties.py (``torchrun --nproc_per_node 2 tests/batching_worker.py``).

For many random global batches - ragged rank sizes, an empty rank, 1-token and max_len sequences, the same text
on both ranks - every rank checks, with gloo collectives:

* embeddings: the chunked, packed no-grad pass training runs (:func:`pipeline.training.gradcache.embed_no_grad`,
  every rank joining every chunk, dummy chunks on short and empty ranks) equals a padded model and one sequence at
  a time;
* labels: with perfect embeddings (each positive id its own direction, every query equal to its positive) the
  in-batch and hard-negative losses are ~0 on every rank (a label pointing anywhere but the query's own gathered
  positive costs ~ G / tau), and with the positives of two queries swapped they are not.

Prints ``ok <cases>`` on rank 0 and exits 0, or raises (non-zero exit) with the failing case.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from batching_cases import MAX_LEN, embedding_gap, label_losses, random_sequences  # noqa: E402
from helpers_model import tiny_model  # noqa: E402
from pipeline.config import GradCacheConfig  # noqa: E402
from pipeline.training.gradcache import embed_no_grad  # noqa: E402

CASES = 12


def main() -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    packed, padded = tiny_model(0, attn_implementation="varlen"), tiny_model(0, packing="padded")
    packed.eval(), padded.eval()
    for case in range(CASES):
        rng = np.random.default_rng([case, 77])  # the same on every rank: rank sizes and the shared texts
        sizes = [int(rng.integers(0, 5)) for _ in range(world)]
        if case % 3 == 0:
            sizes[int(rng.integers(0, world))] = 0  # an empty rank
        if sum(sizes) == 0:
            sizes[0] = 3
        shared = random_sequences(rng, 2)  # texts both ranks embed (duplicates across ranks)
        own = random_sequences(np.random.default_rng([case, rank]), sizes[rank] * 2)
        seqs = own + (shared if sizes[rank] else [])
        gc = GradCacheConfig(chunk_tokens=int(rng.integers(MAX_LEN, 4 * MAX_LEN)))
        with torch.no_grad():
            chunked = embed_no_grad(packed, seqs, gc)
            if seqs:
                gap = embedding_gap(chunked, packed, padded, seqs)
                assert gap <= 1e-5, f"case {case} rank {rank}: packed/padded/one-at-a-time differ by {gap:.3e}"
        in_batch, hard, swapped = label_losses(sizes, rank, seed=case)
        assert in_batch <= 1e-6 and hard <= 1e-6, f"case {case} rank {rank} sizes {sizes}: {in_batch}, {hard}"
        if sum(sizes) >= 2:
            assert swapped > 1.0, f"case {case} sizes {sizes}: swapped positives not detected ({swapped})"
    dist.barrier()
    if rank == 0:
        print(f"ok {CASES}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
