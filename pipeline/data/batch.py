"""The per-rank contrastive batch handed from the data loader to the model step.

A batch holds B queries, B positives (positive i belongs to query i) and B * n_neg hard negatives, query i's
negatives at ``negatives[i * n_neg:(i + 1) * n_neg]``. Every sequence is a 1-D array of token ids that already
ends in the tokenizer's EOS (the pooled token for last-token pooling). ``dataset_type`` decides which losses apply
(see :mod:`pipeline.training.losses`). ``positive_ids`` are the positives' corpus ids (the in-batch loss masks a
candidate that is the query's own positive document under another row); None when unknown (all distinct). B may
be 0: a rank's share of a global batch smaller than the world size, which still takes part in every collective.
With score distillation, ``teacher_scores[i]`` holds the teacher's scores of query i's positive (column 0) and of
its negatives in batch order (column 1 + j), NaN where the teacher has none.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATASET_TYPES = ("retrieval", "classification", "clustering")


@dataclass
class ContrastiveBatch:
    """B >= 0 queries, B positives, B * n_neg negatives (token-id arrays), the dataset type and the positives'
    corpus ids."""

    queries: list[np.ndarray]
    positives: list[np.ndarray]
    negatives: list[np.ndarray]
    n_neg: int
    dataset_type: str
    positive_ids: np.ndarray | None = None  # [B] int64 corpus ids of the positives
    teacher_scores: np.ndarray | None = None  # [B, 1 + n_neg] float32, for loss.score_distill

    def __post_init__(self) -> None:
        if self.dataset_type not in DATASET_TYPES:
            raise ValueError(f"ContrastiveBatch: dataset_type {self.dataset_type!r} is not one of {DATASET_TYPES}")
        if self.n_neg < 0:
            raise ValueError(f"ContrastiveBatch: n_neg must be >= 0, got {self.n_neg}")
        if self.positive_ids is not None and len(self.positive_ids) != len(self.queries):
            raise ValueError(
                f"ContrastiveBatch: {len(self.queries)} queries but {len(self.positive_ids)} positive ids"
            )
        if len(self.positives) != len(self.queries):
            raise ValueError(
                f"ContrastiveBatch: {len(self.queries)} queries but {len(self.positives)} positives"
            )
        if len(self.negatives) != len(self.queries) * self.n_neg:
            raise ValueError(
                f"ContrastiveBatch: expected {len(self.queries)} * {self.n_neg} negatives, got {len(self.negatives)}"
            )
        if self.teacher_scores is not None and self.teacher_scores.shape != (len(self.queries), 1 + self.n_neg):
            raise ValueError(f"ContrastiveBatch: teacher_scores of shape {self.teacher_scores.shape}, expected "
                             f"({len(self.queries)}, {1 + self.n_neg})")
        for i, seq in enumerate(self.sequences()):
            if not isinstance(seq, np.ndarray) or seq.ndim != 1 or seq.size == 0:
                raise ValueError(f"ContrastiveBatch: sequence {i} is not a non-empty 1-D numpy array")

    @property
    def size(self) -> int:
        """B, the number of queries."""
        return len(self.queries)

    def sequences(self) -> list[np.ndarray]:
        """All sequences in the order queries, positives, negatives (the order of the embedding matrix)."""
        return [*self.queries, *self.positives, *self.negatives]

    def real_tokens(self) -> int:
        return int(sum(len(s) for s in self.sequences()))


def random_batch(
    rng: np.random.Generator,
    *,
    batch_size: int,
    n_neg: int,
    vocab_size: int,
    eos_id: int,
    query_len: tuple[int, int] = (8, 32),
    passage_len: tuple[int, int] = (16, 64),
    dataset_type: str = "retrieval",
) -> ContrastiveBatch:
    """A batch of random token ids with uniform random lengths in the given [low, high] ranges, each ending in EOS.

    For tests, the gradient check and benchmarks (lengths are sampled per sequence, so chunks differ in size).
    """

    def seq(lo: int, hi: int) -> np.ndarray:
        n = int(rng.integers(lo, hi + 1))
        ids = rng.integers(0, vocab_size, size=n, dtype=np.int64)
        ids[-1] = eos_id
        return ids

    queries = [seq(*query_len) for _ in range(batch_size)]
    positives = [seq(*passage_len) for _ in range(batch_size)]
    negatives = [seq(*passage_len) for _ in range(batch_size * n_neg)]
    return ContrastiveBatch(queries, positives, negatives, n_neg, dataset_type)
