"""`pipeline.evaluate`: metrics by hand, chunked exact search, MiniLM on stdlib pairs (raw == shards)."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import make_word_tokenizer, minilm_dir, write_registry
from pipeline.data.registry import query_formatter
from pipeline.evaluate import build_parser, run
from pipeline.evaluation.retrieval import CUTOFF, EvaluationError, exact_topk, retrieval_metrics

REPO = Path(__file__).resolve().parents[1]


def metrics_from_scores(scores: np.ndarray, relevant: list[list[int]], ks: tuple[int, ...]) -> dict[str, float]:
    """retrieval_metrics of a full score matrix [n_queries, n_docs] (ties: lower doc id first)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")[:, : max(max(ks), CUTOFF)]
    return retrieval_metrics(order, relevant, ks)


def test_metrics_by_hand():
    # 3 queries x 12 docs; each row's scores give a known ranking
    scores = np.zeros((3, 12))
    scores[0] = -np.arange(12)  # ranking 0, 1, 2, ...: relevant {0} at rank 1
    scores[1] = -np.arange(12)  # relevant {2} at rank 3
    scores[2] = -np.arange(12)  # relevant {1, 11}: ranks 2 and 12 (outside the top 10)
    relevant = [[0], [2], [1, 11]]
    m = metrics_from_scores(scores, relevant, ks=(1, 10, 100))
    mrr = (1 + 1 / 3 + 1 / 2) / 3
    ndcg = (1 + 1 / math.log2(4) + (1 / math.log2(3)) / (1 + 1 / math.log2(3))) / 3
    assert m["mrr@10"] == pytest.approx(mrr)
    assert m["ndcg@10"] == pytest.approx(ndcg)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@10"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["recall@100"] == pytest.approx(1.0)  # the corpus has 12 docs: everything is retrieved

    # a query with no relevant document in the top 10 scores 0 for MRR and nDCG
    m = retrieval_metrics(np.array([[3, 4, 5]]), [[9]], ks=(1,))
    assert m == {"mrr@10": 0.0, "ndcg@10": 0.0, "recall@1": 0.0}
    with pytest.raises(EvaluationError, match="no relevant"):
        retrieval_metrics(np.array([[0]]), [[]])


def test_exact_topk_chunked_matches_full_sort():
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(7, 16, generator=gen), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(23, 16, generator=gen), dim=-1)
    scores, idx = exact_topk(q, d, 5, query_block=3, doc_block=4, progress=False)
    full = q @ d.T
    ref_s, ref_i = torch.topk(full, 5, dim=1)
    assert torch.equal(idx, ref_i) and torch.allclose(scores, ref_s)
    _, idx_all = exact_topk(q, d, 100, doc_block=6, progress=False)  # k larger than the corpus
    assert idx_all.shape == (7, 23) and torch.equal(idx_all, torch.argsort(full, dim=1, descending=True))


def test_exact_topk_ranks_by_cosine_whatever_the_norms():
    """Unnormalised embeddings (a model with normalize: false): documents whose norms span 1e-2..1e2 rank by cosine,
    not by dot product (which would put the longest vectors first); Matryoshka dims too."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(9, 16, generator=gen) * torch.logspace(-1, 1, 9).unsqueeze(1)
    d = torch.randn(40, 16, generator=gen) * torch.logspace(-2, 2, 40)[torch.randperm(40, generator=gen)].unsqueeze(1)
    unit_q, unit_d = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    cos = unit_q @ unit_d.T
    scores, idx = exact_topk(q, d, 10, query_block=4, doc_block=7, progress=False)
    assert not torch.equal(idx, torch.topk(q @ d.T, 10, dim=1).indices)  # the two rankings differ here
    assert torch.equal(idx, torch.topk(cos, 10, dim=1).indices)
    assert torch.allclose(scores, torch.topk(cos, 10, dim=1).values, atol=1e-6)
    relevant = [[int(i)] for i in torch.argsort(cos, dim=1, descending=True)[:, 3]]  # each query's 4th by cosine
    assert retrieval_metrics(idx.numpy(), relevant, ks=(10,))["mrr@10"] == pytest.approx(0.25)
    # the same embeddings scaled per row rank identically
    _, idx_scaled = exact_topk(q * 1e3, unit_d, 10, progress=False)
    assert torch.equal(idx_scaled, idx)
    # at a Matryoshka dim: the first 8 coordinates, re-normalised
    from pipeline.evaluation.retrieval import RunningTopK
    from pipeline.model.matryoshka import leading

    top = RunningTopK(leading(q, 8), 10)
    top.add(leading(d, 8))
    cos8 = torch.nn.functional.normalize(q[:, :8], dim=-1) @ torch.nn.functional.normalize(d[:, :8], dim=-1).T
    assert torch.equal(top.result()[1], torch.topk(cos8, 10, dim=1).indices)


def test_query_formatter_sources():
    from pipeline.data.registry import DatasetSpec, Registry

    reg = Registry({"ds": DatasetSpec("ds", "retrieval", "Find code")}, query_template="{instruction} | {query}")
    fmt, src = query_formatter("ds", instruction=None, registry=reg, prompts={"ds": "P: "})
    assert fmt("q") == "Find code | q" and src.startswith("registry")
    fmt, src = query_formatter("ds", instruction=None, registry=None, prompts={"ds": "P: "})
    assert fmt("q") == "P: q" and src.startswith("model prompt")
    fmt, _ = query_formatter("ds", instruction="Other", registry=None, prompts={"ds": "P: "})
    assert fmt("q") == "Instruct: Other\nQuery: q"
    fmt, _ = query_formatter("ds", instruction="", registry=reg, prompts={})
    assert fmt("q") == "q"
    assert query_formatter("zz", instruction=None, registry=reg, prompts={})[0]("q") == "q"


@pytest.fixture(scope="module")
def stdlib_pairs(tmp_path_factory) -> Path:
    """30 docstring -> code pairs from four standard-library modules (code-pairs builder)."""
    from preprocess.code_pairs import CodePairsOptions, build_code_pairs

    root = tmp_path_factory.mktemp("stdlib_pairs")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = root / "src"
    src.mkdir()
    for name in ("textwrap.py", "shlex.py", "heapq.py", "base64.py"):
        shutil.copy(stdlib / name, src / name)
    build_code_pairs(CodePairsOptions(src=str(src), out=str(root / "pairs"), heldout_fraction=0.0, max_pairs=30),
                     progress=False)
    raw = root / "pairs" / "train" / "code_search.jsonl"
    assert sum(1 for _ in raw.open()) == 30
    return raw


def _args(**kw) -> argparse.Namespace:
    argv = ["--model", kw.pop("model"), "--data", kw.pop("data"), "--no-progress"]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return build_parser().parse_args(argv)


def test_minilm_on_stdlib_pairs_raw_equals_shards(stdlib_pairs: Path, tmp_path: Path):
    from preprocess.build import BuildOptions, ShardBuilder

    raw = run(_args(model=minilm_dir(), data=str(stdlib_pairs), max_len=128))
    res = raw["datasets"]["code_search"]
    assert res["queries"] == 30 and res["docs"] == 30 and raw["pooling"] == "mean"
    # random ranking of 30 docs: MRR@10 ~ 0.098; MiniLM is far above
    assert res["mrr@10"] > 0.4 and res["recall@10"] > 0.6, res
    assert res["recall@100"] == 1.0

    shards = tmp_path / "shards"
    ShardBuilder(BuildOptions(raw=str(stdlib_pairs), tokenizer=minilm_dir(), out=str(shards), max_len=128,
                              workers=1, default_type="retrieval")).run()
    sharded = run(_args(model=minilm_dir(), data=str(shards)))["datasets"]["code_search"]
    for key in ("mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100", "queries", "docs"):
        assert sharded[key] == pytest.approx(res[key], abs=1e-9), key


def test_cli_errors(stdlib_pairs: Path, tmp_path: Path):
    from preprocess.build import BuildOptions, ShardBuilder

    word_tok = make_word_tokenizer(tmp_path / "tok")
    raw = tmp_path / "words.jsonl"
    raw.write_text(json.dumps({"query": "w1 w2", "pos": ["w3 w4"], "neg": ["w5"]}) + "\n")
    shards = tmp_path / "word_shards"
    ShardBuilder(BuildOptions(raw=str(raw), tokenizer=word_tok, out=str(shards), max_len=16, workers=1,
                              default_type="retrieval")).run()
    with pytest.raises(Exception, match="rebuild the shards with the model's tokenizer"):
        run(_args(model=minilm_dir(), data=str(shards)))

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *argv], capture_output=True, text=True,
                              cwd=REPO)

    proc = cli("--model", minilm_dir(), "--data", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        f"error: --data {tmp_path / 'missing.jsonl'}: no such file or directory"
    proc = cli("--model", str(tmp_path), "--data", str(stdlib_pairs))
    assert proc.returncode == 2 and "not a model directory (no config.json)" in proc.stderr.strip().splitlines()[-1]
    proc = cli("--model", minilm_dir(), "--data", str(shards), "--query-instruction", "x")
    assert proc.returncode == 2 and "raw data only" in proc.stderr
    reg = write_registry(tmp_path / "bad.yaml", {"code_search": {"type": "nope"}})
    proc = cli("--model", minilm_dir(), "--data", str(stdlib_pairs), "--registry", str(reg))
    assert proc.returncode == 2 and "datasets.code_search.type" in proc.stderr
