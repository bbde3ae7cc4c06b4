"""Retrieval metrics while training (``train.retrieval_eval_every``): MRR@10 and nDCG@10 of the current model on each
retrieval dataset's held-out queries against that dataset's corpus, logged next to the validation loss.

Queries: the validation split of :class:`pipeline.data.loader.TrainData` (never trained on); held-out rows with
identical tokens are merged and their positives are their relevant documents
(:func:`pipeline.evaluation.eval_sets.shard_relevance`). Documents: the dataset's whole corpus, or with
``train.retrieval_eval_max_docs`` = M a fixed sample of M - the held-out queries' positives, then their hard
negatives, then documents drawn uniformly from the rest (seeded by ``train.seed`` and the dataset name) - the same
at every evaluation, so the curve compares like with like. A sampled corpus is easier than the whole one: expect
higher values than ``pipeline.evaluate`` reports on the full corpus; their change over training is the signal.

Under ZeRO-3 there is no consolidated copy of the model, so the ranks embed together: every sequence (queries and
documents) is dealt to one rank (sorted by length, round-robin, so ranks get similar token counts); each rank embeds
its share through the engine in training's chunks, with the chunk count padded to the maximum over ranks
(:func:`pipeline.training.gradcache.embed_no_grad`), so every rank takes part in every forward. Rank 0 gathers the
embeddings, searches exactly (:mod:`pipeline.evaluation.retrieval`) and broadcasts the metrics, so all ranks hold the
same values (``train.keep_best`` decides on them).

Ranking is by cosine similarity (:func:`pipeline.evaluation.retrieval.cosine_scores`), also under
``model.normalize: false``: the similarity the contrastive losses train and ``pipeline.evaluate`` ranks by.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import GradCacheConfig
from pipeline.data.loader import TrainData
from pipeline.data.shards import ShardDataset
from pipeline.evaluation.eval_sets import shard_relevance
from pipeline.evaluation.retrieval import CUTOFF, exact_topk, retrieval_metrics
from pipeline.training.distributed import broadcast_from_rank0, gather_rows_to_rank0
from pipeline.training.gradcache import embed_no_grad

METRICS = ("mrr@10", "ndcg@10")


@dataclass(frozen=True)
class HeldOutSet:
    """One retrieval dataset's evaluation: distinct held-out query rows, the corpus ids searched and, per query,
    the positions in `doc_ids` of its relevant documents."""

    name: str
    query_rows: np.ndarray
    doc_ids: np.ndarray
    relevant: list[list[int]]


def sample_corpus(ds: ShardDataset, rows: np.ndarray, max_docs: int | None, seed: int) -> np.ndarray:
    """The corpus ids searched for the held-out `rows` of `ds` (ascending): all of them when `max_docs` is None;
    else the rows' positives (always), then their hard negatives, then uniform draws from the rest, up to
    `max_docs`."""
    if max_docs is None or max_docs >= ds.num_docs:
        return np.arange(ds.num_docs, dtype=np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(ds.name.encode())])
    chosen = np.unique(ds.positives[rows].astype(np.int64))
    negatives = ds.negatives[rows]
    negatives = np.setdiff1d(np.unique(negatives[negatives >= 0]), chosen)
    room = max(0, max_docs - len(chosen))
    chosen = np.union1d(chosen, rng.permutation(negatives)[:room])
    room = max(0, max_docs - len(chosen))
    if room:
        rest = np.setdiff1d(np.arange(ds.num_docs, dtype=np.int64), chosen)
        chosen = np.union1d(chosen, rng.choice(rest, size=min(room, len(rest)), replace=False))
    return chosen


def held_out_sets(data: TrainData, max_docs: int | None, seed: int) -> list[HeldOutSet]:
    """The evaluation of every retrieval dataset with held-out queries, in dataset order."""
    out = []
    for name in data.plan.datasets:
        ds = data.reader[name]
        rows = np.asarray(data.val_ids[name], dtype=np.int64)
        if ds.type != "retrieval" or len(rows) == 0:
            continue
        first, positives = shard_relevance(_Rows(ds, rows), ds.positives[rows])
        doc_ids = sample_corpus(ds, rows, max_docs, seed)
        position = {int(d): i for i, d in enumerate(doc_ids)}
        out.append(HeldOutSet(name, rows[first], doc_ids, [[position[p] for p in ps] for ps in positives]))
    return out


class _Rows:
    """The query token arrays of some rows of a dataset, indexable from 0."""

    def __init__(self, ds: ShardDataset, rows: np.ndarray) -> None:
        self.ds, self.rows = ds, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ds.queries[int(self.rows[i])]


class RetrievalEvaluator:
    """Held-out retrieval metrics of a model being trained, computed by all ranks together (see module docstring)."""

    def __init__(self, data: TrainData, *, max_docs: int | None, seed: int) -> None:
        self.reader = data.reader
        self.rank = data.rank
        self.world = data.plan.world_size
        self.sets = held_out_sets(data, max_docs, seed)

    @property
    def datasets(self) -> list[str]:
        return [s.name for s in self.sets]

    def describe(self) -> str:
        return ", ".join(f"{s.name} ({len(s.query_rows):,} queries x {len(s.doc_ids):,} docs)" for s in self.sets)

    def __call__(self, model: torch.nn.Module, gc_cfg: GradCacheConfig) -> dict[str, float]:
        """The metrics of `model` (an engine or EmbeddingModel in eval mode); a collective: every rank calls it and
        receives rank 0's values: ``mrr@10`` and ``ndcg@10`` (means over datasets), ``<metric>/<dataset>``,
        ``queries``, ``docs``, ``seconds``."""
        started = time.perf_counter()
        values: dict[str, float] = {}
        for s in self.sets:
            metrics = self._evaluate(model, gc_cfg, s)
            if metrics is not None:
                values.update({f"{m}/{s.name}": metrics[m] for m in METRICS})
        if self.rank == 0 and self.sets:
            for m in METRICS:
                values[m] = float(np.mean([values[f"{m}/{s.name}"] for s in self.sets]))
            values["queries"] = sum(len(s.query_rows) for s in self.sets)
            values["docs"] = sum(len(s.doc_ids) for s in self.sets)
            values["seconds"] = round(time.perf_counter() - started, 3)
        return broadcast_from_rank0(values)  # type: ignore[return-value]

    def _evaluate(self, model: torch.nn.Module, gc_cfg: GradCacheConfig, s: HeldOutSet) -> dict[str, float] | None:
        ds = self.reader[s.name]
        n_q = len(s.query_rows)
        lengths = np.concatenate([ds.queries.lengths[s.query_rows], ds.corpus.lengths[s.doc_ids]])
        order = np.argsort(-lengths, kind="stable")

        def tokens(i: int) -> np.ndarray:
            return np.array(ds.queries[int(s.query_rows[i])] if i < n_q else ds.corpus[int(s.doc_ids[i - n_q])])

        mine = order[self.rank :: self.world]
        emb = embed_no_grad(model, [tokens(int(i)) for i in mine], gc_cfg)
        parts = gather_rows_to_rank0(emb)
        if parts is None:
            return None
        full = torch.empty((len(order), emb.shape[1]), dtype=torch.float32)
        for r, part in enumerate(parts):
            full[torch.from_numpy(order[r :: self.world])] = part.float().cpu()
        _, top = exact_topk(full[:n_q], full[n_q:], CUTOFF, progress=False)
        return retrieval_metrics(top.numpy(), s.relevant, ks=(CUTOFF,))
