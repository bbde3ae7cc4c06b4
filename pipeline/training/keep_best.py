"""``train.keep_best``: which logged metric decides the best export, and whether a new value beats the best so far.

A metric is named as it is logged (its TensorBoard tag): ``<split>/<key>`` with split ``retrieval`` (the
training-time retrieval evaluation, :mod:`pipeline.training.retrieval_eval`: ``mrr@10``, ``ndcg@10``, and per
dataset ``mrr@10/<dataset>``, ``ndcg@10/<dataset>``) or ``validation`` (``loss``). Losses are better lower, every
other metric higher. Ties keep the earlier export.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import TrainConfig

RETRIEVAL_KEYS = ("mrr@10", "ndcg@10")


@dataclass(frozen=True)
class KeepBest:
    metric: str
    split: str
    key: str

    @classmethod
    def parse(cls, metric: str) -> "KeepBest":
        split, _, key = metric.partition("/")
        return cls(metric, split, key)

    @property
    def lower_is_better(self) -> bool:
        return self.key == "loss"

    def better(self, value: float, best: float | None) -> bool:
        """Whether `value` beats `best` (None: nothing yet)."""
        if value != value:  # NaN never wins
            return False
        if best is None:
            return True
        return value < best if self.lower_is_better else value > best


def keep_best_problem(train: TrainConfig, retrieval_datasets: list[str] | None = None) -> str | None:
    """Why ``train.keep_best`` cannot work with this config (one line, without the key), or None.
    `retrieval_datasets`: the retrieval datasets the run evaluates, when known (a per-dataset metric must name one)."""
    if train.keep_best is None:
        return None
    best = KeepBest.parse(train.keep_best)
    if best.split == "validation":
        if best.key != "loss":
            return f"{train.keep_best}: the validation metric is validation/loss"
        if not train.eval_every:
            return f"{train.keep_best} is never computed: train.eval_every is 0"
        return None
    if best.split != "retrieval":
        return (f"{train.keep_best}: expected retrieval/mrr@10, retrieval/ndcg@10, retrieval/<metric>/<dataset> or "
                "validation/loss")
    metric, _, dataset = best.key.partition("/")
    if metric not in RETRIEVAL_KEYS:
        return f"{train.keep_best}: unknown retrieval metric {metric!r} (have: {', '.join(RETRIEVAL_KEYS)})"
    if not train.retrieval_eval_every:
        return f"{train.keep_best} is never computed: set train.retrieval_eval_every"
    if retrieval_datasets is not None and not retrieval_datasets:
        return f"{train.keep_best} is never computed: no retrieval dataset with held-out queries"
    if dataset and retrieval_datasets is not None and dataset not in retrieval_datasets:
        return (f"{train.keep_best}: {dataset!r} is not a retrieval dataset of this run (have: "
                f"{', '.join(retrieval_datasets) or 'none'})")
    return None
