"""Retrieval evaluation math: embed in bounded memory, exact top-k search, MRR@10 / nDCG@10 / Recall@k.

Similarity: cosine, s(q, d) = <q, d> / (||q|| ||d||) (:func:`cosine_scores`), whatever the model's ``normalize``
setting - the similarity training's contrastive losses use. Every ranking here
(:func:`evaluate_retrieval`, :func:`exact_topk`) scores through :meth:`RunningTopK.add`, which calls
:func:`cosine_scores`, so ``python -m pipeline.evaluate`` and the training-time retrieval metrics
(``train.retrieval_eval_every``, which ``train.keep_best`` follows) rank alike.

Search is exact, by chunked matrix products with a running top-k (:class:`RunningTopK`): the corpus may arrive
block by block (embedded, searched, dropped), so memory is bounded by one corpus block, one
``query_block x doc_block`` score block, the query embeddings and the running top-k - never the whole corpus.

Metrics (the trec_eval definitions, which BEIR computes with pytrec_eval; several relevant documents per query):

* MRR@10 = mean 1 / rank of the first relevant document in the top 10 (0 if none);
* nDCG@10 = DCG@10 / ideal DCG@10, DCG@10 = sum over ranks r <= 10 of gain(doc at r) / log2(r + 1), the ideal
  DCG from the query's judged grades sorted in descending order (Jarvelin and Kekalainen 2002). The gain is the
  relevance grade: 1 for binary relevance, the qrels grade for graded relevance, as pytrec_eval's ``ndcg_cut``
  (trec_eval's linear gain, not 2^grade - 1) - what BEIR reports (Thakur et al. 2021, ``EvaluateRetrieval``);
* Recall@k = relevant documents in the top k / relevant documents of the query.

A document is relevant when its grade is > 0. Matryoshka dims (Kusupati et al. 2022): the embeddings' first `dim`
coordinates (:func:`pipeline.model.matryoshka.leading`), compared by cosine (= re-normalised, as training's
MRL losses see them: :func:`pipeline.model.matryoshka.truncate`).

Used by ``python -m pipeline.evaluate``, the training-time retrieval evaluation and ``preprocess mine-negatives``
(embedding and search).
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.model.embedding import encode
from pipeline.model.matryoshka import leading

DEFAULT_KS = (1, 10, 100)
CUTOFF = 10  # MRR@10, nDCG@10
EMBED_GROUP = 2048  # sequences handed to encode() at a time by embed()


class EvaluationError(ValueError):
    """Bad model, data or options; the message names the path or option."""


# --------------------------------------------------------------------------------------------------------------
# Embedding and search
# --------------------------------------------------------------------------------------------------------------
def length_order(lengths: np.ndarray) -> np.ndarray:
    """Sequence indices longest first (stable): the order :func:`embed` hands sequences to the model in."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


def embedding_chunks(lengths: np.ndarray, chunk_size: int, packed: bool, group: int = EMBED_GROUP
                     ) -> list[np.ndarray]:
    """The sequence index chunks, in order, that :func:`embed` forms for sequences of these `lengths` with
    `chunk_size` sequences per forward: groups of `group` in :func:`length_order`, each planned by
    :func:`pipeline.model.packing.plan_chunks` as :func:`pipeline.model.embedding.encode` plans it. Embedding each
    chunk on its own gives every sequence the batch, hence the embedding, it gets from one :func:`embed` call."""
    from pipeline.model.packing import plan_chunks

    order = length_order(lengths)
    chunks: list[np.ndarray] = []
    for g0 in range(0, len(order), group):
        idx = order[g0 : g0 + group]
        within = plan_chunks(np.asarray(lengths)[idx], packed=packed, chunk_size=chunk_size)
        chunks.extend(idx[c] for c in within)
    return chunks


def embed(
    model: torch.nn.Module,
    seqs: Sequence[np.ndarray],
    *,
    chunk_tokens: int | None = None,
    chunk_size: int | None = None,
    lengths: np.ndarray | None = None,
    desc: str = "embed",
    progress: bool = True,
    group: int = EMBED_GROUP,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """[n, d] float32 CPU embeddings of `seqs` (any indexable of 1-D token arrays, e.g. a shard TokenTable).

    Sequences are sorted by length (longest first) and handed to :func:`pipeline.model.embedding.encode` `group` at a time,
    so that padded chunks stay length-bucketed across the whole input while the bar advances. `bar`: advance this
    (outer) progress bar instead of showing one.
    """

    n = len(seqs)
    if n == 0:
        raise EvaluationError(f"{desc}: nothing to embed")
    if lengths is None:
        lengths = np.fromiter((len(seqs[i]) for i in range(n)), dtype=np.int64, count=n)
    order = length_order(lengths)
    out: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    own = bar is None
    if own:
        bar = tqdm(total=n, desc=desc, unit="seq", dynamic_ncols=True, disable=not progress)
    try:
        with torch.inference_mode():
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
        if own:
            bar.close()
    assert out is not None
    return out


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """[...] L2 norms ||x_i||_2 of the rows of `x` [..., d], clamped at 1e-12 (the eps of torch's F.normalize)."""
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12)


def cosine_scores(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """[n_q, n_d] cosine similarities s_ij = <q_i, d_j> / (||q_i|| ||d_j||) of `queries` [n_q, d] and `docs`
    [n_d, d] (norms by :func:`row_norms`; a zero row scores 0): the similarity of every ranking in this module, and
    the one training's losses use. Divides the score block in place: no normalised copy of `docs` is made."""
    scores = queries @ docs.T
    return scores.div_(row_norms(queries).unsqueeze(1)).div_(row_norms(docs).unsqueeze(0))


class RunningTopK:
    """Exact top-k by cosine similarity (:func:`cosine_scores`) of `queries` [n_q, d] against a corpus that arrives
    in blocks (:meth:`add`), best first; the embeddings need not be normalised.

    `exclude[i]` (optional, -1 = none): a corpus index query i must never retrieve (BEIR leaves a document with the
    query's own id out of its ranking); its score is -inf and it is reported as -1 when fewer than k others exist.
    Peak extra memory: one [query_block, block size] score block plus the running [n_q, k] top-k.
    """

    def __init__(self, queries: torch.Tensor, k: int, *, query_block: int = 1024,
                 exclude: np.ndarray | None = None) -> None:
        if k <= 0:
            raise EvaluationError(f"top-k: k must be positive, got {k}")
        self.queries = queries
        self.k = k
        self.query_block = query_block
        self.exclude = None if exclude is None else torch.as_tensor(np.asarray(exclude, dtype=np.int64))
        self.seen = 0
        self.scores: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

    def add(self, docs: torch.Tensor) -> None:
        """Search the next `docs` [n_b, d] (corpus indices seen .. seen + n_b - 1) by cosine similarity."""
        offset, n_b = self.seen, docs.shape[0]
        if n_b == 0:
            return
        width = min(self.k, offset + n_b)
        n_q = self.queries.shape[0]
        scores = torch.empty((n_q, width), dtype=torch.float32)
        indices = torch.empty((n_q, width), dtype=torch.int64)
        with torch.inference_mode():
            for q0 in range(0, n_q, self.query_block):
                q1 = min(q0 + self.query_block, n_q)
                s = cosine_scores(self.queries[q0:q1], docs)
                if self.exclude is not None:
                    local = self.exclude[q0:q1] - offset
                    rows = torch.nonzero((local >= 0) & (local < n_b)).squeeze(1)
                    s[rows, local[rows]] = float("-inf")
                s, i = torch.topk(s, min(self.k, n_b), dim=1)
                i = i + offset
                if self.scores is not None:
                    merged = torch.cat([self.scores[q0:q1], s], dim=1)
                    s, pick = torch.topk(merged, width, dim=1)
                    i = torch.gather(torch.cat([self.indices[q0:q1], i], dim=1), 1, pick)
                scores[q0:q1] = s
                indices[q0:q1] = i
        self.scores, self.indices = scores, indices
        self.seen += n_b

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices) [n_q, min(k, docs seen)], best first; excluded documents as index -1."""
        if self.scores is None or self.indices is None:
            raise EvaluationError("exact_topk: empty corpus")
        indices = self.indices.masked_fill(torch.isneginf(self.scores), -1)
        return self.scores, indices


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
    """(scores, indices) [n_queries, min(k, n_docs)] of the highest cosine similarities (:class:`RunningTopK`),
    best first.

    Chunked: peak extra memory is one [query_block, doc_block] score block plus the running top-k.
    """
    if corpus.shape[0] == 0:
        raise EvaluationError("exact_topk: empty corpus")
    top = RunningTopK(queries, k, query_block=query_block)
    with tqdm(total=corpus.shape[0], desc=desc, unit="doc", dynamic_ncols=True, disable=not progress) as bar:
        for d0 in range(0, corpus.shape[0], doc_block):
            block = corpus[d0 : d0 + doc_block]
            top.add(block)
            bar.update(block.shape[0])
    return top.result()


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------
def retrieval_metrics(
    topk: np.ndarray | torch.Tensor,
    relevant: Sequence[Sequence[int]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    grades: Sequence[Sequence[float]] | None = None,
    no_relevant: Literal["error", "zero"] = "error",
) -> dict[str, float]:
    """MRR@10, nDCG@10 and Recall@k from ranked doc ids `topk` [n_queries, K] (best first; -1 = no document) and
    each query's relevant corpus ids (grade > 0); `grades[i][j]` is the grade of `relevant[i][j]` (default 1).

    A query without a relevant document is an error, or with ``no_relevant="zero"`` scores 0 on every metric and
    counts in the means (pytrec_eval's and so BEIR's treatment of a query whose judgements are all 0).
    """
    topk = np.asarray(topk)
    if topk.ndim != 2 or topk.shape[0] != len(relevant):
        raise EvaluationError(f"topk: expected [{len(relevant)}, K], got {list(topk.shape)}")
    n_q = len(relevant)
    n_rel = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=n_q)
    if no_relevant == "error" and (n_rel == 0).any():
        raise EvaluationError(f"query {int(np.argmin(n_rel))} has no relevant document")
    if grades is None:
        grades = [[1.0] * len(r) for r in relevant]
    elif any(len(g) != len(r) for g, r in zip(grades, relevant)) or len(grades) != n_q:
        raise EvaluationError("grades: expected one grade per relevant document")
    if any(g <= 0 for gs in grades for g in gs):
        raise EvaluationError("grades: relevant documents must have a grade > 0")

    # (query, doc) -> grade, as sorted keys q * width + d (a query's duplicate ids keep the highest grade)
    width = int(max(topk.max(initial=0), max((max(r) for r in relevant if len(r)), default=0))) + 1
    rel_q = np.repeat(np.arange(n_q, dtype=np.int64), n_rel)
    rel_d = np.fromiter((d for r in relevant for d in r), dtype=np.int64, count=int(n_rel.sum()))
    rel_g = np.fromiter((g for gs in grades for g in gs), dtype=np.float64, count=int(n_rel.sum()))
    keys = rel_q * width + rel_d
    order = np.lexsort((rel_g, keys))
    keys, rel_g = keys[order], rel_g[order]
    last = np.r_[keys[1:] != keys[:-1], True][: len(keys)]
    keys, rel_g = np.r_[keys[last], -1], np.r_[rel_g[last], 0.0]  # sentinel: searchsorted stays in range
    n_rel = np.bincount(keys[:-1] // width, minlength=n_q)

    ranked = np.arange(n_q, dtype=np.int64)[:, None] * width + topk.astype(np.int64)
    pos = np.minimum(np.searchsorted(keys[:-1], ranked), len(keys) - 1)
    hits = (topk >= 0) & (keys[pos] == ranked)
    gain = np.where(hits, rel_g[pos], 0.0)

    top = hits[:, :CUTOFF]
    first = np.where(top.any(1), top.argmax(1) + 1, 0)
    mrr = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    discounts = 1.0 / np.log2(np.arange(1, CUTOFF + 1) + 1)
    dcg = (gain[:, :CUTOFF] * discounts[: top.shape[1]]).sum(1)
    best = np.zeros((n_q, CUTOFF))
    starts = np.r_[0, np.cumsum(n_rel)[:-1]]
    for i in np.nonzero(n_rel)[0]:
        g = np.sort(rel_g[starts[i] : starts[i] + n_rel[i]])[::-1][:CUTOFF]
        best[i, : len(g)] = g
    ideal = best @ discounts
    ndcg = np.divide(dcg, ideal, out=np.zeros(n_q), where=ideal > 0)
    out = {"mrr@10": float(mrr.mean()), "ndcg@10": float(ndcg.mean())}
    for k in ks:
        recall = np.divide(hits[:, :k].sum(1), n_rel, out=np.zeros(n_q), where=n_rel > 0)
        out[f"recall@{k}"] = float(recall.mean())
    return out


# --------------------------------------------------------------------------------------------------------------
# Evaluation: embed queries, stream the corpus block by block, search at every Matryoshka dim, score
# --------------------------------------------------------------------------------------------------------------
class _Slice:
    """A read-only view of `seqs[start:stop]` for any indexable of token arrays (a shard TokenTable included)."""

    def __init__(self, seqs: Sequence[np.ndarray], start: int, stop: int) -> None:
        self.seqs, self.start, self.stop = seqs, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> np.ndarray:
        return self.seqs[self.start + i]


def corpus_blocks(
    corpus_tokens: Sequence[np.ndarray], block: int, lengths: np.ndarray | None = None
) -> Iterator[tuple[Sequence[np.ndarray], np.ndarray | None]]:
    """An in-memory corpus as (token arrays, lengths or None) blocks of `block` documents."""
    for start in range(0, len(corpus_tokens), block):
        stop = min(start + block, len(corpus_tokens))
        yield _Slice(corpus_tokens, start, stop), None if lengths is None else np.asarray(lengths[start:stop])


def check_dims(dims: Sequence[int] | None, hidden: int) -> list[int]:
    """The dims to evaluate, ascending, always ending with the full width `hidden`; `--dims` errors name the option."""
    dims = sorted(set(dims or []))
    bad = [d for d in dims if d < 1 or d > hidden]
    if bad:
        raise EvaluationError(f"--dims: {', '.join(map(str, bad))} outside 1..{hidden} (the model's embedding size)")
    return sorted(set(dims) | {hidden})


def evaluate_retrieval(
    model: torch.nn.Module,
    queries_tokens: Sequence[np.ndarray],
    corpus: Sequence[np.ndarray] | Iterable[tuple[Sequence[np.ndarray], np.ndarray | None]],
    relevant: Sequence[Sequence[int]],
    *,
    batch_tokens: int = 16384,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = True,
    corpus_lengths: np.ndarray | None = None,
    n_docs: int | None = None,
    doc_block: int = 65536,
    dims: Sequence[int] | None = None,
    grades: Sequence[Sequence[float]] | None = None,
    exclude: np.ndarray | None = None,
    no_relevant: Literal["error", "zero"] = "error",
    name: str = "",
) -> dict[str, Any]:
    """Embed the queries and the corpus with `model` (an EmbeddingModel), exact search by cosine similarity
    (:class:`RunningTopK`), metrics.

    `corpus`: the documents' token arrays (embedded and searched `doc_block` at a time), or - with `n_docs` - an
    iterable of (token arrays, lengths or None) blocks, e.g. streamed from a file (:func:`corpus_blocks`).
    `relevant[i]` lists the corpus indices relevant to query i (`grades`, `exclude`, `no_relevant`: see
    :func:`retrieval_metrics` and :class:`RunningTopK`). `dims`: Matryoshka dims also evaluated (the full width
    always is); the top-level metrics are those of the full width, ``dims`` holds every dim's.
    Returns the metrics plus counts and timings.
    """
    if len(queries_tokens) != len(relevant):
        raise EvaluationError(f"{len(queries_tokens)} queries but {len(relevant)} relevance lists")
    if n_docs is None:
        n_docs = len(corpus)  # type: ignore[arg-type]
        blocks: Iterable[tuple[Sequence[np.ndarray], np.ndarray | None]] = corpus_blocks(
            corpus, doc_block, corpus_lengths)  # type: ignore[arg-type]
    else:
        blocks = corpus  # type: ignore[assignment]
    if n_docs == 0:
        raise EvaluationError(f"{name or 'corpus'}: no documents")
    prefix = f"{name}: " if name else ""
    t0 = time.perf_counter()
    q_emb = embed(model, queries_tokens, chunk_tokens=batch_tokens, desc=f"{prefix}embed queries", progress=progress)
    t_queries = time.perf_counter() - t0
    hidden = q_emb.shape[1]
    dims = check_dims(dims, hidden)
    k = max(max(ks), CUTOFF)
    tops = {d: RunningTopK(leading(q_emb, d), k, exclude=exclude) for d in dims}
    t_embed = t_search = 0.0
    with tqdm(total=n_docs, desc=f"{prefix}embed + search corpus", unit="doc", dynamic_ncols=True,
              disable=not progress) as bar:
        for seqs, lengths in blocks:
            t1 = time.perf_counter()
            d_emb = embed(model, seqs, chunk_tokens=batch_tokens, lengths=lengths, bar=bar)
            t2 = time.perf_counter()
            for d, top in tops.items():
                top.add(leading(d_emb, d))
            t_embed += t2 - t1
            t_search += time.perf_counter() - t2
    if tops[hidden].seen != n_docs:
        raise EvaluationError(f"{prefix}corpus: {tops[hidden].seen} documents embedded, {n_docs} expected")
    t3 = time.perf_counter()
    per_dim = {d: retrieval_metrics(top.result()[1].numpy(), relevant, ks, grades=grades, no_relevant=no_relevant)
               for d, top in tops.items()}
    out: dict[str, Any] = {
        **per_dim[hidden],
        "queries": len(queries_tokens),
        "docs": n_docs,
        "relevant_per_query": float(np.mean([len(r) for r in relevant])),
        "dim": hidden,
    }
    if len(dims) > 1:
        out["dims"] = {str(d): m for d, m in per_dim.items()}
    out["seconds"] = {"embed_queries": round(t_queries, 2), "embed_corpus": round(t_embed, 2),
                      "search": round(t_search + time.perf_counter() - t3, 2)}
    return out
