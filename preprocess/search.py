"""Top-k search of queries over a corpus (share): exact, or approximate with faiss (`mine-negatives --search`).

Both return the same thing: (float64 scores, doc ids) [n_q, min(k, n_d)] on the CPU, best first, equal scores by
ascending id, so that lists from several ranks merge with :func:`canonical_order` into what one process finds.

* **exact** (:func:`search_slice`): blocked matrix products on the device (float32), the ``k + TIE_SLACK`` best of
  each block rescored in float64 (:func:`exact_scores`) and merged into the running top-k; the result does not
  depend on how the corpus is split into blocks or ranks. Cost: n_q x n_d x d multiply-adds.
* **faiss** (:func:`faiss_search_slice`), for corpora beyond exact search: only the *candidates* are approximate.
  A faiss inner-product index (any ``index_factory`` string, e.g. ``IVF4096,Flat`` or ``IVF4096,PQ64``; ``auto``:
  :func:`auto_factory`) proposes the ``k + TIE_SLACK`` best documents of each query, which are rescored in float64
  as above, so the mining filters (``max_score``, ``relative_margin``) see true scores. A query whose probed lists
  hold fewer than ``k`` documents gets empty slots (score ``-inf``, id ``-1``) at the end of its row. Under several
  ranks each rank indexes its own share, so the candidates (unlike exact search) depend on the number of ranks.
  Its recall against exact search, :func:`recall_at_k`, is measured on a sample of queries in every faiss run.

References: Johnson, Douze, Jégou, "Billion-scale similarity search with GPUs" (IEEE Trans. Big Data 2019) and the
faiss wiki (https://github.com/facebookresearch/faiss/wiki: IVF indexes, ``nprobe``, the index factory, choosing
``nlist``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import torch

TIE_SLACK = 8  # extra float32 candidates per block, rescored in float64 before the top-k is cut
SEARCH_DOC_BLOCK = 65536
SEARCH_QUERY_BLOCK = 1024
AUTO = "auto"
MIN_POINTS_PER_LIST = 39  # faiss k-means wants >= 39 training points per centroid
METHODS = ("exact", "faiss")


class SearchError(ValueError):
    """A search option that cannot work (faiss missing, an index faiss cannot build); names the option."""


@dataclass(frozen=True)
class SearchParams:
    """How candidates are found: ``method`` exact or faiss; for faiss the index factory string, the lists probed
    per query, the k-means seed, and how many queries are also searched exactly to measure the recall."""

    method: str = "exact"
    faiss_index: str = AUTO
    nprobe: int = 64
    seed: int = 0
    recall_queries: int = 1000

    def check(self) -> None:
        if self.method not in METHODS:
            raise SearchError(f"--search: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.nprobe < 1:
            raise SearchError(f"--faiss-nprobe: must be positive, got {self.nprobe}")
        if self.recall_queries < 0:
            raise SearchError(f"--faiss-recall-queries: must be >= 0, got {self.recall_queries}")
        if self.method == "faiss":
            _faiss()


def search_share(q_emb: torch.Tensor, d_emb: torch.Tensor, doc_ids: torch.Tensor, k: int, search: SearchParams,
                 *, device: torch.device | str = "cpu", progress: bool = False,
                 desc: str = "search") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every query over this corpus share by `search.method` (the one place that decides)."""
    if search.method == "faiss":
        return faiss_search_slice(q_emb, d_emb, doc_ids, k, factory=search.faiss_index, nprobe=search.nprobe,
                                  seed=search.seed, progress=progress, desc=desc)
    return search_slice(q_emb, d_emb, doc_ids, k, device=device, progress=progress, desc=desc)


def recall_sample(n_queries: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of the `size` queries (all when fewer) searched exactly to measure a faiss run's recall."""
    if size >= n_queries:
        return np.arange(n_queries)
    return np.sort(np.random.default_rng([seed, 0x5EA7C4]).choice(n_queries, size=size, replace=False))


def canonical_order(scores: torch.Tensor, ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's entries ordered by score (descending), ties by document id (ascending); the first `width`."""
    import torch

    ids, order = torch.sort(ids, dim=1, stable=True)
    scores = torch.gather(scores, 1, order)
    scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores[:, :width], torch.gather(ids, 1, order)[:, :width]


def exact_scores(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """float64 dot products of `queries` [..., d] with `docs` [..., n, d] -> [..., n]: float32 products are exact in
    float64, so a score does not depend on the shape of the matrix product it came from (or on the rank)."""
    return (docs.double() * queries.double().unsqueeze(-2)).sum(-1)


def rescore(queries: torch.Tensor, docs: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """float64 [n_q, c]: :func:`exact_scores` of each query in `queries` [n_q, d] with its candidates
    ``docs[local[i]]`` (`local` [n_q, c] row indices into `docs` [n, d]), in row chunks whose float64
    temporaries stay near 128 MiB."""
    import torch

    rows = max(1, (1 << 24) // max(local.shape[1] * docs.shape[1], 1))
    return torch.cat([exact_scores(queries[r : r + rows], docs[local[r : r + rows]])
                      for r in range(0, queries.shape[0], rows)])


def search_slice(
    q_emb: torch.Tensor,
    d_emb: torch.Tensor,
    doc_ids: torch.Tensor,
    k: int,
    *,
    device: torch.device | str = "cpu",
    doc_block: int = SEARCH_DOC_BLOCK,
    query_block: int = SEARCH_QUERY_BLOCK,
    progress: bool = False,
    desc: str = "search",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of every query in `q_emb` [n_q, d] over the documents `d_emb` [n_d, d] whose ids are `doc_ids`
    [n_d]: (float64 scores, doc ids) [n_q, min(k, n_d)] on the CPU, best first, equal scores by ascending id.

    Blocks of `doc_block` documents and `query_block` queries are scored on `device` in float32; the best
    ``k + TIE_SLACK`` of each block are rescored in float64 (:func:`rescore`) and merged into the running top-k,
    so the result is the same however the corpus is split into blocks or ranks.
    """
    import torch

    n_q, n_d = q_emb.shape[0], d_emb.shape[0]
    width = min(k, n_d)
    best_s = torch.full((n_q, 0), float("-inf"), dtype=torch.float64, device=device)
    best_i = torch.zeros((n_q, 0), dtype=torch.int64, device=device)
    queries = q_emb.to(device)
    ids_all = doc_ids.to(device)
    with torch.inference_mode(), tqdm(total=n_d, desc=desc, unit="doc", dynamic_ncols=True,
                                      disable=not progress) as bar:
        for d0 in range(0, n_d, doc_block):
            block = d_emb[d0 : d0 + doc_block].to(device)
            ids = ids_all[d0 : d0 + doc_block]
            cand = min(k + TIE_SLACK, block.shape[0])
            parts_s, parts_i = [], []
            for q0 in range(0, n_q, query_block):
                q = queries[q0 : q0 + query_block]
                local = torch.topk(q @ block.T, cand, dim=1).indices
                merged = canonical_order(torch.cat([best_s[q0 : q0 + query_block], rescore(q, block, local)], dim=1),
                                         torch.cat([best_i[q0 : q0 + query_block], ids[local]], dim=1), width)
                parts_s.append(merged[0])
                parts_i.append(merged[1])
            best_s, best_i = torch.cat(parts_s), torch.cat(parts_i)
            bar.update(block.shape[0])
    return best_s.cpu(), best_i.cpu()


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("--search faiss: faiss is not installed (pip install 'embedding-pipeline[faiss]')") \
            from None
    return faiss


def auto_factory(n_docs: int) -> str:
    """The default index for `n_docs` documents: ``IVF<nlist>,Flat`` with nlist ~ 4 sqrt(n) (faiss wiki's
    guideline), at most n / 39 lists; a flat (exact) index when the corpus is too small for one list."""
    nlist = min(int(4 * math.sqrt(n_docs)), n_docs // MIN_POINTS_PER_LIST)
    return f"IVF{nlist},Flat" if nlist >= 2 else "Flat"


def build_index(docs: np.ndarray, factory: str, *, nprobe: int, seed: int = 0, add_block: int = 1 << 18,
                progress: bool = False, desc: str = "index") -> object:
    """A trained inner-product faiss index over `docs` [n, d] float32 (positions are the ids)."""
    faiss = _faiss()
    n, dim = docs.shape
    spec = auto_factory(n) if factory == AUTO else factory
    try:
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise SearchError(f"--faiss-index {factory!r}: faiss cannot build it ({str(exc).strip().splitlines()[-1]})") \
            from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
        ivf.cp.seed = seed
        if n < ivf.nlist:
            raise SearchError(f"--faiss-index {spec}: {ivf.nlist} lists need at least as many documents, this corpus "
                              f"(share) has {n}")
    if not index.is_trained:
        index.train(docs)
    with tqdm(total=n, desc=desc, unit="doc", dynamic_ncols=True, disable=not progress) as bar:
        for s in range(0, n, add_block):
            index.add(docs[s : s + add_block])
            bar.update(min(add_block, n - s))
    return index


def set_nprobe(index: object, nprobe: int) -> None:
    """Inverted lists probed per query by `index` (no effect on an index without lists)."""
    ivf = _faiss().try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def faiss_search_slice(
    q_emb: torch.Tensor,
    d_emb: torch.Tensor,
    doc_ids: torch.Tensor,
    k: int,
    *,
    factory: str = AUTO,
    nprobe: int = 64,
    seed: int = 0,
    progress: bool = False,
    desc: str = "search",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-k of every query in `q_emb` [n_q, d] over `d_emb` [n_d, d] (ids `doc_ids`): a faiss index
    built over `d_emb` (:func:`build_index`) proposes candidates, rescored exactly (:func:`search_index`)."""
    import torch

    n_q, n_d = q_emb.shape[0], d_emb.shape[0]
    if n_d == 0 or n_q == 0:
        width = min(k, n_d)
        return torch.zeros((n_q, width), dtype=torch.float64), torch.zeros((n_q, width), dtype=torch.int64)
    docs = np.ascontiguousarray(d_emb.numpy(), dtype=np.float32)
    index = build_index(docs, factory, nprobe=nprobe, seed=seed, progress=progress, desc=f"{desc} (index)")
    return search_index(index, q_emb, d_emb, doc_ids, k, progress=progress, desc=desc)


def search_index(index: object, q_emb: torch.Tensor, d_emb: torch.Tensor, doc_ids: torch.Tensor, k: int, *,
                 query_block: int = 4096, progress: bool = False,
                 desc: str = "search") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k + TIE_SLACK`` candidates `index` (built over `d_emb`) proposes per query, rescored in float64
    (:func:`rescore`) and cut to the top-k in canonical order; empty slots are (-inf, -1), last."""
    import torch

    n_q, n_d = q_emb.shape[0], d_emb.shape[0]
    width = min(k, n_d)
    cand = min(k + TIE_SLACK, n_d)
    out_s, out_i = [], []
    with torch.inference_mode(), tqdm(total=n_q, desc=desc, unit="query", dynamic_ncols=True,
                                      disable=not progress) as bar:
        for q0 in range(0, n_q, query_block):
            q = q_emb[q0 : q0 + query_block]
            _, found = index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), cand)
            local = torch.from_numpy(found).long()
            empty = local < 0
            local = local.clamp(min=0)
            scores = rescore(q, d_emb, local).masked_fill(empty, float("-inf"))
            ids = torch.where(empty, torch.iinfo(torch.int64).max, doc_ids[local])  # empty slots sort last
            s, i = canonical_order(scores, ids, width)
            out_s.append(s)
            out_i.append(i.masked_fill(torch.isinf(s), -1))
            bar.update(q.shape[0])
    return torch.cat(out_s), torch.cat(out_i)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| for [n_q, k] id lists (-1 = empty slot, ignored; a query
    whose exact list is empty counts as recall 1)."""
    recalls = []
    for a, e in zip(approx_ids.tolist(), exact_ids.tolist()):
        truth = {d for d in e if d >= 0}
        recalls.append(len(truth.intersection(a)) / len(truth) if truth else 1.0)
    return float(np.mean(recalls)) if recalls else 1.0
