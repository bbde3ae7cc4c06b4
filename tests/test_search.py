"""Mining search (:mod:`preprocess.search`): faiss candidates rescored exactly against exact search."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import minilm_dir, write_jsonl

from preprocess.mine_negatives import (
    MineOptions,
    MiningParams,
    mine_from_embeddings,
    mine_negatives,
)
from preprocess.search import (
    SearchError,
    SearchParams,
    auto_factory,
    faiss_search_slice,
    recall_at_k,
    search_slice,
)


def _clustered(n_docs: int, n_queries: int, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, dim, generator=g)
    docs = torch.nn.functional.normalize(centres[torch.randint(0, 16, (n_docs,), generator=g)]
                                         + 0.3 * torch.randn(n_docs, dim, generator=g), dim=1)
    queries = torch.nn.functional.normalize(docs[:n_queries] + 0.1 * torch.randn(n_queries, dim, generator=g), dim=1)
    return queries, docs


def test_faiss_flat_and_fully_probed_ivf_equal_exact_search():
    """A flat index, or an IVF index probing every list, proposes every document: the rescored top-k is exactly the
    exact search's (scores and ids, on a corpus share with non-contiguous ids)."""
    q, d = _clustered(3000, 200)
    ids = torch.arange(3000) * 3 + 7
    exact = search_slice(q, d, ids, 40, doc_block=1000)
    for factory, nprobe in (("Flat", 1), ("IVF16,Flat", 16)):
        got = faiss_search_slice(q, d, ids, 40, factory=factory, nprobe=nprobe)
        assert torch.equal(got[1], exact[1]) and torch.equal(got[0], exact[0]), factory
    # probing one list of 16 loses candidates: recall below 1, every returned score is still the exact one
    s, i = faiss_search_slice(q, d, ids, 40, factory="IVF16,Flat", nprobe=1)
    recall = recall_at_k(i.numpy(), exact[1].numpy())
    assert 0.1 < recall < 1.0
    rows = (i - 7) // 3
    ok = i >= 0
    assert torch.allclose(s[ok], (q.double().unsqueeze(1) * d.double()[rows.clamp(min=0)]).sum(-1)[ok])


def test_empty_slots_are_last_and_never_mined():
    """Too few documents in the probed lists: empty slots (-inf, -1) at the end of the row; mining ignores them."""
    q, d = _clustered(100, 20)
    s, i = faiss_search_slice(q, d, torch.arange(100), 50, factory="IVF2,Flat", nprobe=1)
    assert (i < 0).any()
    for row_s, row_i in zip(s, i):
        n = int(torch.isfinite(row_s).sum())
        assert (row_i[:n] >= 0).all() and (row_i[n:] == -1).all() and torch.isinf(row_s[n:]).all()
    params = MiningParams(top_k=50, skip_top=0, max_score=2.0, relative_margin=1.0, keep=60)
    negatives, stats = mine_from_embeddings(q, d, [[k] for k in range(20)], [[] for _ in range(20)], params,
                                            search=SearchParams("faiss", "IVF2,Flat", nprobe=1, recall_queries=20))
    assert all(n >= 0 for negs in negatives for n in negs)
    assert 0 < stats["search"]["recall_at_top_k"] < 1 and stats["search"]["recall_queries"] == 20


def test_recall_at_k_and_auto_factory():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.array([[4, 3, 9, -1], [-1, -1, -1, -1]]), exact) == pytest.approx(0.25)
    assert auto_factory(1_000_000) == "IVF4000,Flat" and auto_factory(1000) == "IVF25,Flat"
    assert auto_factory(50) == "Flat"


def test_errors_name_the_option(monkeypatch: pytest.MonkeyPatch):
    q, d = _clustered(200, 5)
    with pytest.raises(SearchError, match="--faiss-index 'NoSuchIndex'"):
        faiss_search_slice(q, d, torch.arange(200), 10, factory="NoSuchIndex")
    with pytest.raises(SearchError, match="IVF500,Flat: 500 lists need at least as many documents"):
        faiss_search_slice(q, d, torch.arange(200), 10, factory="IVF500,Flat")
    with pytest.raises(SearchError, match="--faiss-nprobe"):
        SearchParams("faiss", nprobe=0).check()
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(SearchError, match=r"faiss is not installed \(pip install"):
        SearchParams("faiss").check()


def test_mine_negatives_with_flat_faiss_writes_the_exact_output(tmp_path: Path):
    """The whole job: a flat faiss index gives the same files as exact search, and the report holds recall 1."""
    records = [{"query": f"how to {v} a {n}", "pos": [f"To {v} the {n}, call {v}({n})."], "neg": []}
               for v in ("sort", "parse", "merge", "split", "copy") for n in ("list", "string", "file", "dict")]
    write_jsonl(tmp_path / "raw" / "howto.jsonl", records)
    common = dict(raw=str(tmp_path / "raw"), model=minilm_dir(), max_len=32, batch_size=8, progress=False,
                  params=MiningParams(top_k=10, skip_top=1, keep=3))
    mine_negatives(MineOptions(out=str(tmp_path / "exact"), **common))
    report = mine_negatives(MineOptions(out=str(tmp_path / "faiss"), search=SearchParams("faiss", "Flat"), **common))
    assert (tmp_path / "exact" / "howto.jsonl").read_bytes() == (tmp_path / "faiss" / "howto.jsonl").read_bytes()
    assert report["datasets"]["howto"]["search"] == {"method": "faiss", "index": "Flat", "nprobe": 64,
                                                     "recall_at_top_k": 1.0, "recall_queries": 20}
    exact = json.loads((tmp_path / "exact" / "mining_report.json").read_text())
    assert exact["datasets"]["howto"]["search"] == {"method": "exact"}
