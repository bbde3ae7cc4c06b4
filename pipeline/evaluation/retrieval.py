"""Retrieval evaluation math: embed in bounded memory, exact top-k search, MRR@10 / nDCG@10 / Recall@k.

Search is exact (cosine = dot product of normalised embeddings), by chunked matrix products with a running top-k:
memory is bounded by ``query_block x doc_block`` scores plus the embeddings (1M docs x 1024 dims = 4 GiB fp32).

Metrics (binary relevance, several relevant documents per query allowed; the standard trec_eval definitions):
MRR@10 = mean 1 / rank of the first relevant document in the top 10 (0 if none); nDCG@10 = DCG@10 / ideal DCG@10
with gain 1 / log2(rank + 1); Recall@k = relevant documents in the top k / relevant documents of the query.

Used by ``python -m pipeline.evaluate`` and by ``preprocess mine-negatives`` (embedding and search).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.model.embedding import encode

DEFAULT_KS = (1, 10, 100)
CUTOFF = 10  # MRR@10, nDCG@10


class EvaluationError(ValueError):
    """Bad model, data or options; the message names the path or option."""


# --------------------------------------------------------------------------------------------------------------
# Embedding and search
# --------------------------------------------------------------------------------------------------------------
def embed(
    model: torch.nn.Module,
    seqs: Sequence[np.ndarray],
    *,
    chunk_tokens: int | None = None,
    chunk_size: int | None = None,
    lengths: np.ndarray | None = None,
    desc: str = "embed",
    progress: bool = True,
    group: int = 2048,
) -> torch.Tensor:
    """[n, d] float32 CPU embeddings of `seqs` (any indexable of 1-D token arrays, e.g. a shard TokenTable).

    Sequences are sorted by length (longest first) and handed to :func:`pipeline.model.embedding.encode` `group` at a time,
    so that padded chunks stay length-bucketed across the whole input while the bar advances.
    """

    n = len(seqs)
    if n == 0:
        raise EvaluationError(f"{desc}: nothing to embed")
    if lengths is None:
        lengths = np.fromiter((len(seqs[i]) for i in range(n)), dtype=np.int64, count=n)
    order = np.argsort(-np.asarray(lengths), kind="stable")
    out: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, unit="seq", dynamic_ncols=True,
                                          disable=not progress) as bar:
            for start in range(0, n, group):
                idx = order[start : start + group]
                emb, _ = encode(model, [np.asarray(seqs[int(i)]) for i in idx],
                                chunk_tokens=chunk_tokens, chunk_size=chunk_size)
                emb = emb.float().cpu()
                if out is None:
                    out = torch.empty((n, emb.shape[1]), dtype=torch.float32)
                out[torch.from_numpy(idx)] = emb
                bar.update(len(idx))
    finally:
        model.train(was_training)
    assert out is not None
    return out


def exact_topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    query_block: int = 1024,
    doc_block: int = 65536,
    desc: str = "search",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) [n_queries, min(k, n_docs)] of the highest dot products, best first.

    Chunked: peak extra memory is one [query_block, doc_block] score block plus the running top-k.
    """
    n_docs = corpus.shape[0]
    k = min(k, n_docs)
    if k <= 0:
        raise EvaluationError("exact_topk: empty corpus")
    scores_out = torch.empty((queries.shape[0], k), dtype=torch.float32)
    index_out = torch.empty((queries.shape[0], k), dtype=torch.int64)
    with torch.inference_mode(), tqdm(total=queries.shape[0], desc=desc, unit="query", dynamic_ncols=True,
                                      disable=not progress) as bar:
        for q0 in range(0, queries.shape[0], query_block):
            q = queries[q0 : q0 + query_block]
            best_s = best_i = None
            for d0 in range(0, n_docs, doc_block):
                s = q @ corpus[d0 : d0 + doc_block].T
                kk = min(k, s.shape[1])
                s, i = torch.topk(s, kk, dim=1)
                i = i + d0
                if best_s is not None:
                    merged = torch.cat([best_s, s], dim=1)
                    s, pick = torch.topk(merged, min(k, merged.shape[1]), dim=1)
                    i = torch.gather(torch.cat([best_i, i], dim=1), 1, pick)
                best_s, best_i = s, i
            scores_out[q0 : q0 + len(q)] = best_s
            index_out[q0 : q0 + len(q)] = best_i
            bar.update(len(q))
    return scores_out, index_out


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------
def _hit_matrix(topk: np.ndarray, relevant: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """hits[i, r] = topk[i, r] is relevant to query i; and the number of relevant documents per query."""
    n_rel = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=len(relevant))
    if (n_rel == 0).any():
        raise EvaluationError(f"query {int(np.argmin(n_rel))} has no relevant document")
    width = int(max(topk.max(initial=0), max(max(r) for r in relevant))) + 1
    rel_q = np.repeat(np.arange(len(relevant), dtype=np.int64), n_rel)
    rel_d = np.fromiter((d for r in relevant for d in r), dtype=np.int64, count=int(n_rel.sum()))
    rel_keys = np.unique(rel_q * width + rel_d)
    keys = np.arange(topk.shape[0], dtype=np.int64)[:, None] * width + topk.astype(np.int64)
    return np.isin(keys, rel_keys), n_rel


def retrieval_metrics(
    topk: np.ndarray | torch.Tensor, relevant: Sequence[Sequence[int]], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """MRR@10, nDCG@10 and Recall@k from ranked doc ids `topk` [n_queries, K] (best first) and relevant ids."""
    topk = np.asarray(topk)
    if topk.ndim != 2 or topk.shape[0] != len(relevant):
        raise EvaluationError(f"topk: expected [{len(relevant)}, K], got {list(topk.shape)}")
    hits, n_rel = _hit_matrix(topk, relevant)
    ranks = np.arange(1, topk.shape[1] + 1)
    top = hits[:, :CUTOFF]
    first = np.where(top.any(1), top.argmax(1) + 1, 0)
    mrr = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    discounts = 1.0 / np.log2(ranks[:CUTOFF] + 1)
    dcg = (top * discounts[: top.shape[1]]).sum(1)
    ideal = np.cumsum(1.0 / np.log2(np.arange(1, CUTOFF + 1) + 1))[np.minimum(n_rel, CUTOFF) - 1]
    out = {"mrr@10": float(mrr.mean()), "ndcg@10": float((dcg / ideal).mean())}
    for k in ks:
        out[f"recall@{k}"] = float((hits[:, :k].sum(1) / n_rel).mean())
    return out


def evaluate_retrieval(
    model: torch.nn.Module,
    queries_tokens: Sequence[np.ndarray],
    corpus_tokens: Sequence[np.ndarray],
    relevant: Sequence[Sequence[int]],
    *,
    batch_tokens: int = 16384,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = True,
    corpus_lengths: np.ndarray | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Embed queries and corpus with `model` (an EmbeddingModel), exact search, metrics.

    `relevant[i]` lists the corpus indices relevant to query i. Returns the metrics plus counts and timings.
    """
    if len(queries_tokens) != len(relevant):
        raise EvaluationError(f"{len(queries_tokens)} queries but {len(relevant)} relevance lists")
    prefix = f"{name}: " if name else ""
    t0 = time.perf_counter()
    q_emb = embed(model, queries_tokens, chunk_tokens=batch_tokens, desc=f"{prefix}embed queries", progress=progress)
    t1 = time.perf_counter()
    d_emb = embed(model, corpus_tokens, chunk_tokens=batch_tokens, lengths=corpus_lengths,
                  desc=f"{prefix}embed corpus", progress=progress)
    t2 = time.perf_counter()
    _, topk = exact_topk(q_emb, d_emb, max(max(ks), CUTOFF), desc=f"{prefix}search", progress=progress)
    t3 = time.perf_counter()
    metrics = retrieval_metrics(topk.numpy(), relevant, ks)
    return {
        **metrics,
        "queries": len(queries_tokens),
        "docs": len(corpus_tokens),
        "relevant_per_query": float(np.mean([len(r) for r in relevant])),
        "seconds": {"embed_queries": round(t1 - t0, 2), "embed_corpus": round(t2 - t1, 2),
                    "search": round(t3 - t2, 2)},
    }

