"""`preprocess mine-negatives`: selection rules on known rankings, fake embeddings, and one real MiniLM run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_helpers import minilm_dir, write_jsonl, write_parquet, write_registry
from preprocess.mine_negatives import (
    MineOptions,
    MiningError,
    MiningParams,
    mine_from_embeddings,
    mine_negatives,
    select_negatives,
)
from pipeline.data.raw import RawStats, read_rows

REPO = Path(__file__).resolve().parents[1]


def test_select_negatives_rules():
    # ranked candidates (best first): doc 7 is the positive; the positive scores 0.70
    ids = [3, 7, 4, 8, 5, 6, 9, 10, 11, 12]
    scores = [0.90, 0.70, 0.69, 0.67, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10]
    params = MiningParams(top_k=10, skip_top=2, max_score=0.8, relative_margin=0.95, keep=3)
    reasons: Counter = Counter()
    kept = select_negatives(ids, scores, positives={7}, positive_score=0.70, params=params, reasons=reasons)
    # rank 0 (doc 3) skipped by skip_top, rank 1 is the positive, doc 4 (0.69 >= 0.95 * 0.70) and doc 8 (0.67)
    # are likely false negatives (margin); then 5, 6, 9 are kept and selection stops at keep=3
    assert kept == [5, 6, 9]
    assert reasons == Counter({"skip_top": 1, "positive": 1, "margin": 2})

    # no skip: the top candidate now fails max_score; an existing negative is not mined twice
    params = MiningParams(top_k=10, skip_top=0, max_score=0.8, relative_margin=0.95, keep=10)
    reasons = Counter()
    kept = select_negatives(ids, scores, positives={7}, positive_score=0.70, params=params, exclude={6},
                            reasons=reasons)
    assert kept == [5, 9, 10, 11, 12]
    assert reasons == Counter({"max_score": 1, "positive": 1, "margin": 2, "existing": 1})
    # the loosest filter (margin 1) keeps every candidate scoring below the positive
    loose = MiningParams(top_k=10, skip_top=0, max_score=2.0, relative_margin=1.0, keep=4)
    assert select_negatives(ids, scores, positives={7}, positive_score=0.7, params=loose) == [4, 8, 5, 6]
    assert select_negatives(ids, scores, positives={7}, positive_score=0.7, params=loose, limit=0) == []


def test_margin_with_a_negative_positive_score():
    """A positive scoring -0.5: margin 0.95 x -0.5 = -0.475 would lie ABOVE it and keep candidates that outscore
    the positive; the threshold is s - (1 - m)|s| = -0.525 (TopK-PercPos, Moreira et al. 2024, arXiv:2407.15831)."""
    ids = [1, 2, 3, 9, 4, 5, 6]
    scores = [-0.40, -0.47, -0.48, -0.50, -0.52, -0.53, -0.60]
    params = MiningParams(top_k=10, skip_top=0, max_score=0.8, relative_margin=0.95, keep=10)
    reasons: Counter = Counter()
    kept = select_negatives(ids, scores, positives={9}, positive_score=-0.5, params=params, reasons=reasons)
    # -0.40, -0.47, -0.48 score above the positive and -0.52 above -0.525: all margin; -0.53, -0.60 kept
    assert kept == [5, 6]
    assert reasons == Counter({"margin": 4, "positive": 1})
    # at a positive score of 0 a candidate must score strictly below 0; for s > 0 the rule is still m x s
    kept = select_negatives([1, 2, 3], [0.0, -1e-9, -0.3], positives=set(), positive_score=0.0, params=params)
    assert kept == [2, 3]
    kept = select_negatives([1, 2, 3], [0.48, 0.475, 0.47], positives=set(), positive_score=0.5, params=params)
    assert kept == [3]


@pytest.mark.parametrize("margin", [0.5, 0.95, 1.0])
def test_no_kept_candidate_scores_at_or_above_its_positive(margin: float):
    """Property check over random scores of both signs: every kept candidate scores below its positive, and below
    margin x positive when the positive scores above 0 (what the rule was for positive scores)."""
    rng = np.random.default_rng(0)
    params = MiningParams(top_k=30, skip_top=0, max_score=2.0, relative_margin=margin, keep=30)
    for _ in range(500):
        scores = np.sort(rng.uniform(-1.0, 1.0, size=30))[::-1]
        positive_score = float(rng.choice([rng.uniform(-1.0, 1.0), rng.choice(scores), 0.0]))
        kept = select_negatives(list(range(30)), scores.tolist(), positives=set(), positive_score=positive_score,
                                params=params)
        assert all(scores[d] < positive_score for d in kept), (positive_score, scores[kept].max())
        if positive_score > 0:
            assert kept == [d for d in range(30) if scores[d] < margin * positive_score]


def test_relative_margin_must_be_at_most_one():
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(MiningError, match=r"^--relative-margin: must be in \(0, 1\], got "):
            MiningParams(relative_margin=bad).check()
    MiningParams(relative_margin=1.0).check()


def test_mine_from_fake_embeddings():
    """Unit vectors at known angles: the scores, and so the mined negatives, are known exactly."""
    def unit(deg: float) -> list[float]:
        return [float(np.cos(np.radians(deg))), float(np.sin(np.radians(deg)))]

    q = torch.tensor([unit(0), unit(180)])
    # doc angles from query 0: 10 (its positive, cos .985), 12 (near duplicate, cos .978 >= .95 * .985),
    # 40 (.766), 60 (.5), 90 (0), 170 (-.985: query 1's positive), 120 (-.5)
    d = torch.tensor([unit(a) for a in (10, 12, 40, 60, 90, 170, 120)])
    positives = [[0], [5]]
    existing = [[6, 0], []]  # doc 0 listed as a negative of its own query: never kept
    params = MiningParams(top_k=5, skip_top=0, max_score=0.99, relative_margin=0.95, keep=3)
    negs, stats = mine_from_embeddings(q, d, positives, existing, params)
    assert negs[0] == [6, 2, 3]  # existing first, then 40 and 60 degrees; 12 degrees dropped by the margin
    assert stats["dropped"]["margin"] >= 1 and stats["dropped"]["positive"] == 2
    negs, _ = mine_from_embeddings(q, d, positives, existing, params, keep_existing=False)
    assert negs[0] == [2, 3, 4]
    # query 1 (180 degrees): positive 170 (.985), then 120 (.5), 90 (0), 60, 40
    assert negs[1] == [6, 4, 3]
    assert stats["positive_at_rank_1"] == 1.0 and stats["queries_full"] == 2


@pytest.fixture()
def raw_dir(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "raw"
    topics = [
        ("how do I sort a list in python", "Use sorted(items) to get a new sorted list of the items.",
         "Use sorted(items) to get a new, sorted list of the items!"),  # near duplicate of the positive
        ("read a text file line by line", "Open the file and iterate over it to read each line.",
         "Open the file, then iterate over it to read every line."),
        ("convert a string to an integer", "Call int(text) to parse the string as an integer.",
         "Call int(text) to parse that string as an integer."),
        ("merge two dictionaries", "Use {**a, **b} or a | b to merge two dicts.",
         "Use a | b or {**a, **b} to merge the two dicts."),
        ("reverse a string", "Slice the string with text[::-1] to reverse it.",
         "Slice it with text[::-1] to reverse the string."),
    ]
    records = [{"query": q, "pos": [p], "neg": []} for q, p, _ in topics]
    records[0]["neg"] = ["The weather is sunny and warm today."]  # an existing negative: kept first
    # the near duplicates are positives of other (paraphrased) queries, so they are in the corpus
    records += [{"query": f"{q}?", "pos": [dup], "neg": []} for q, _, dup in topics]
    write_jsonl(raw / "howto.jsonl", records)
    write_parquet(raw / "howto_pq.parquet", [{"query": r["query"], "passage": r["pos"][0]} for r in records])
    registry = write_registry(tmp_path / "datasets.yaml", {"howto": {"type": "retrieval"},
                                                           "howto_pq": {"type": "retrieval"}})
    return raw, registry


def test_minilm_mining_end_to_end(raw_dir: tuple[Path, Path], tmp_path: Path):
    from pipeline.data.tokenization import encode_spec, tokenize_texts
    from pipeline.evaluation.retrieval import embed
    from pipeline.model.embedding import load_model_dir
    from preprocess.mine_negatives import margin_threshold

    raw, registry = raw_dir
    out = tmp_path / "mined"
    params = MiningParams(top_k=10, skip_top=0, max_score=0.8, relative_margin=0.95, keep=3)
    report = mine_negatives(MineOptions(raw=str(raw), model=minilm_dir(), out=str(out), registry=str(registry),
                                        params=params, max_len=64, batch_size=8, progress=False))
    assert (out / "datasets.yaml").is_file() and (out / "mining_report.json").is_file()
    assert set(report["datasets"]) == {"howto", "howto_pq"}
    assert report["datasets"]["howto"]["query_instruction"] == "none (registry entry has no instruction)"

    records = [json.loads(line) for line in (out / "howto.jsonl").read_text().splitlines()]
    assert len(records) == 10
    assert records[0]["neg"][0] == "The weather is sunny and warm today."  # existing first
    # check every kept negative against the rules with the same model's scores
    model, _ = load_model_dir(minilm_dir(), "cpu")
    spec = encode_spec(minilm_dir(), 64)
    texts = sorted({t for r in records for t in [r["query"], *r["pos"], *r["neg"]]})
    emb = embed(model, tokenize_texts(texts, spec, progress=False), chunk_size=8, progress=False)
    vec = dict(zip(texts, emb))
    near_dup_dropped = 0
    for i, r in enumerate(records):
        pos_score = float(vec[r["query"]] @ vec[r["pos"][0]])
        mined = r["neg"][1:] if i == 0 else r["neg"]
        assert 0 < len(r["neg"]) <= 3 and not set(r["neg"]) & set(r["pos"])
        for neg in mined:
            score = float(vec[r["query"]] @ vec[neg])
            assert score < 0.8 and score < margin_threshold(pos_score, 0.95), (r["query"], neg, score, pos_score)
        partner = records[(i + 5) % 10]["pos"][0]  # the near duplicate of this query's positive
        near_dup_dropped += partner not in r["neg"]
    assert near_dup_dropped >= 8  # near duplicates are (almost always) filtered as false negatives

    # parquet: one row per input row, negative_1..K without nulls, readable by the raw reader
    table = pq.read_table(out / "howto_pq.parquet")
    assert table.num_rows == 10 and table.column_names == ["query", "passage", "negative_1", "negative_2",
                                                           "negative_3"]
    stats = RawStats()
    rows = list(read_rows(out / "howto_pq.parquet", stats))
    assert len(rows) == 10 and not stats.skipped
    assert all(r.positive not in r.negatives for r in rows)
    assert report["datasets"]["howto_pq"]["queries"] == 10


def test_errors(raw_dir: tuple[Path, Path], tmp_path: Path):
    raw, _ = raw_dir
    with pytest.raises(MiningError, match="--skip-top"):
        mine_negatives(MineOptions(raw=str(raw), model=minilm_dir(), out=str(tmp_path / "o"),
                                   params=MiningParams(top_k=5, skip_top=5)))
    with pytest.raises(MiningError, match="would overwrite the input"):
        mine_negatives(MineOptions(raw=str(raw), model=minilm_dir(), out=str(raw)))
    proc = subprocess.run(
        [sys.executable, "-m", "preprocess", "mine-negatives", "--raw", str(tmp_path / "none.jsonl"),
         "--model", minilm_dir(), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'none.jsonl'}: no such file or directory"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _generated_records(n: int = 22) -> list[dict]:
    """`n` how-to queries over combinations of a few words, some with an existing negative, one query text twice."""
    verbs = ["sort", "parse", "merge", "split", "reverse", "filter", "count", "hash"]
    nouns = ["list", "string", "file", "dictionary", "tuple", "number"]
    records = []
    for i in range(n):
        verb, noun = verbs[i % len(verbs)], nouns[(i * 5) % len(nouns)]
        rec = {"query": f"how to {verb} a {noun} in python (case {i % 4})",
               "pos": [f"To {verb} the {noun}, call the {verb} helper on it; example number {i}."], "neg": []}
        if i % 6 == 0:
            rec["neg"] = [f"The {noun} museum opens at {i} o'clock."]
        records.append(rec)
    records.append({"query": records[3]["query"], "pos": ["A second positive for the same query text."], "neg": []})
    return records


def test_two_ranks_match_one_process(tmp_path: Path):
    """torchrun with 2 CPU ranks (gloo) writes byte-identical outputs and the same report counts as one process,
    on corpora whose sizes do not divide by 2."""
    raw = tmp_path / "raw"
    records = _generated_records()
    write_jsonl(raw / "gen.jsonl", records)
    write_parquet(raw / "gen_pq.parquet", [{"query": r["query"], "passage": r["pos"][0]} for r in records[:17]])
    registry = write_registry(tmp_path / "datasets.yaml", {"gen": {"type": "retrieval"},
                                                           "gen_pq": {"type": "retrieval"}})
    common = ["mine-negatives", "--raw", str(raw), "--model", minilm_dir(), "--registry", str(registry),
              "--top-k", "12", "--skip-top", "1", "--keep", "5", "--max-len", "32", "--batch-size", "3",
              "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "preprocess", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    # exact search, and a flat faiss index per rank (exact too, so the same files; its recall check adds a merge)
    for out, extra in (("two", []), ("two_faiss", ["--search", "faiss", "--faiss-index", "Flat"])):
        two = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(_free_port()), "-m", "preprocess", *common, *extra, "--out", str(tmp_path / out)],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=180,
        )
        assert two.returncode == 0, two.stderr[-2000:]
        assert "world size 2" in two.stderr and "queries/s" in two.stderr
        for name in ("gen.jsonl", "gen_pq.parquet", "datasets.yaml"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / out / name).read_bytes(), (out, name)
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "faiss search (Flat, nprobe 64): recall@12 1.0000" in two.stderr
    rep1, rep2 = (json.loads((tmp_path / d / "mining_report.json").read_text())["datasets"] for d in ("one", "two"))
    assert rep1["gen"]["docs"] % 2 == 1 and rep1["gen_pq"]["docs"] % 2 == 1  # uneven splits
    for name in rep1:
        for key in ("queries", "docs", "negatives_mean", "mined_total", "queries_full", "queries_short",
                    "queries_without_negatives", "dropped", "positive_score_mean", "positive_at_rank_1", "rows"):
            assert rep1[name][key] == rep2[name][key], (name, key)
    assert rep1["gen"]["mined_total"] > 0
