"""Random batches with the edge cases that break padding-free packing and InfoNCE labels elsewhere, and the two
properties checked on them (tests/test_batching_properties.py on one rank, tests/batching_worker.py on two).

The failure modes come from a peer's report (ms-swift issue #9903: single-token sequences merged with their
neighbours under padding-free packing, InfoNCE labels shifted): sequences of 1 token and of max_len, the same text
twice (in one rank's batch and on two ranks), ranks with no queries and ragged rank sizes.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.config import LossConfig
from pipeline.training.distributed import is_distributed
from pipeline.training.losses import contrastive_loss

MAX_LEN = 48  # the shards' max_len of these cases
EOS = 102
VOCAB = 30522


def random_sequences(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """`n` token sequences ending in EOS, lengths drawn from {1, 2, MAX_LEN, anything between}; about one in four
    repeats an earlier sequence of the list (the same text twice)."""
    seqs: list[np.ndarray] = []
    for _ in range(n):
        if seqs and rng.random() < 0.25:
            seqs.append(seqs[int(rng.integers(0, len(seqs)))].copy())
            continue
        length = int(rng.choice([1, 2, MAX_LEN, int(rng.integers(3, MAX_LEN))]))
        ids = rng.integers(1, VOCAB, size=length, dtype=np.int64)
        ids[-1] = EOS
        seqs.append(ids)
    return seqs


@torch.no_grad()
def embedding_gap(chunked: torch.Tensor, packed_model, padded_model, seqs: list[np.ndarray]) -> float:
    """max |difference| between the `chunked` embeddings of `seqs` (as training computes them), the padded model's
    embeddings of all of them at once, and the packed model's embeddings of each sequence alone."""
    padded = padded_model(padded_model.make_inputs(seqs))
    alone = torch.cat([packed_model(packed_model.make_inputs([s])) for s in seqs])
    return max(float((chunked - padded).abs().max()), float((chunked - alone).abs().max()))


def _one_hot(ids: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids, dim).float()


def label_losses(sizes: list[int], rank: int, seed: int, n_neg: int = 2) -> tuple[float, float, float]:
    """(in-batch loss sum, hard-negative loss sum) of `rank`'s queries with perfect embeddings, and the in-batch
    loss summed over all ranks when the positives of global queries 0 and 1 are swapped (when there are two).
    `sizes`: every rank's queries, some rank's > 0.

    Perfect embeddings: positive id k points along axis k; query i equals its positive; the last query of a global
    batch of >= 3 has the first query's document as its positive (the same document twice, masked as a candidate of
    the other); negatives point along axes no positive uses. Correct labels give ~0 loss (cosine 1 against 0 at
    temperature 0.01); a label that points anywhere else costs ~100."""
    cfg = LossConfig(temperature=0.01, matryoshka=False, hard_negatives={"retrieval": n_neg},
                     in_batch_types=["retrieval"])
    total = sum(sizes)
    ids = torch.arange(total)
    if total >= 3:
        ids[-1] = ids[0]
    start = sum(sizes[:rank])
    mine = ids[start:start + sizes[rank]]
    dim = 2 * total + 2 * n_neg * total + 8
    p = _one_hot(mine, dim)
    rng = np.random.default_rng([seed, rank])
    neg_axes = torch.as_tensor(total + rng.permutation(2 * n_neg * total)[: sizes[rank] * n_neg], dtype=torch.long)
    n = _one_hot(neg_axes, dim)
    out = contrastive_loss(p.clone(), p, n, n_neg, "retrieval", cfg, positive_ids=mine)
    swapped_ids = ids.clone()
    if total >= 2:
        swapped_ids[[0, 1]] = ids[[1, 0]]
    swapped_p = _one_hot(swapped_ids[start:start + sizes[rank]], dim)
    swapped = contrastive_loss(p.clone(), swapped_p, n, n_neg, "retrieval", cfg,
                               positive_ids=swapped_ids[start:start + sizes[rank]])
    swapped_sum = torch.tensor([swapped.sums.get("in_batch", 0.0)], dtype=torch.float64)
    if is_distributed():
        torch.distributed.all_reduce(swapped_sum)
    return out.sums.get("in_batch", 0.0), out.sums.get("hard_negative", 0.0), float(swapped_sum[0])
