"""`pipeline.evaluate --beir`: graded nDCG@10 by hand, BEIR's conventions end to end against pytrec_eval (the library
BEIR computes its metrics with), several directories in one table/JSON, Matryoshka dims and their plot, one-line
errors for bad BEIR files."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_helpers import minilm_dir
from pipeline.evaluate import build_parser, main, run
from pipeline.evaluation.eval_sets import beir_document, load_beir
from pipeline.evaluation.retrieval import EvaluationError, retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A small corpus with titles (one document without a title, one with a null title) on four topics.
DOCS = {
    "d0": ("Python lists", "A list is a mutable sequence; append adds an item at the end."),
    "d1": ("Python tuples", "A tuple is an immutable sequence of values."),
    "d2": ("Sorting", "sorted() returns a new sorted list from the items of any iterable."),
    "d3": ("Dictionaries", "A dict maps hashable keys to values; get returns a default for a missing key."),
    "d4": ("Sets", "A set is an unordered collection of distinct hashable objects."),
    "d5": (None, "Files are opened with open(), which returns a file object to read or write."),
    "d6": ("", "The with statement closes the file when the block ends, even after an exception."),
    "d7": ("Strings", "str.split breaks a string into a list of words at whitespace."),
    "d8": ("Strings", "str.join concatenates the strings of an iterable with a separator."),
    "d9": ("Exceptions", "try and except catch an exception raised in the block."),
    "d10": ("Generators", "A generator function uses yield to produce values lazily."),
    "q3": ("Loops", "A for loop iterates over the items of any iterable, such as a list."),  # id shared with a query
}
QUERIES = {
    "q0": "how do I add an element to the end of a list",
    "q1": "read a file and make sure it is closed",
    "q2": "split a sentence into words",
    "q3": "iterate over the items of a list",
    "q4": "catch errors",
    "q9": "a query that no qrels line judges",
}
# graded judgements (BEIR: query-id, corpus-id, score); q4's are all 0 (pytrec_eval scores such a query 0)
QRELS = [("q0", "d0", 2), ("q0", "d2", 1), ("q0", "d1", 0),
         ("q1", "d5", 2), ("q1", "d6", 3),
         ("q2", "d7", 1), ("q2", "d8", 1), ("q2", "d3", 0),
         ("q3", "q3", 1), ("q3", "d0", 2), ("q3", "d10", 1),
         ("q4", "d9", 0)]


def write_beir(root: Path, docs=DOCS, queries=QUERIES, qrels=QRELS, split: str = "test") -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w") as f:
        for did, (title, text) in docs.items():
            rec = {"_id": did, "text": text}
            if title is not None or did == "d5":
                rec["title"] = title
            f.write(json.dumps(rec) + "\n")
        f.write("\n")  # a trailing blank line is allowed
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text, "metadata": {}}) + "\n")
    with open(root / "qrels" / f"{split}.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["query-id", "corpus-id", "score"])
        w.writerows(qrels)
    return root


def test_graded_ndcg_by_hand_for_a_fixed_ranking(tmp_path):
    beir = load_beir(write_beir(tmp_path / "toy"), "test")
    assert beir.query_ids == ["q0", "q1", "q2", "q3", "q4"]  # judged queries only, in qrels order
    assert beir.n_docs == len(DOCS)
    index = {did: i for i, did in enumerate(DOCS)}
    assert beir.relevant[0] == [index["d0"], index["d2"]] and beir.grades[0] == [2.0, 1.0]
    assert beir.relevant[4] == [] and beir.queries_without_relevant == 1
    assert list(beir.exclude) == [-1, -1, -1, index["q3"], -1]  # the document sharing q3's id
    assert next(beir.documents(100))[5] == DOCS["d5"][1] and next(beir.documents(100))[0] == \
        "Python lists A list is a mutable sequence; append adds an item at the end."
    assert beir_document("", " text ") == "text" and beir_document(None, "x") == "x"

    # fixed rankings (corpus indices, best first)
    i = index
    ranking = np.array([
        [i["d2"], i["d1"], i["d0"], i["d3"]],       # q0: grade 1 at rank 1, grade 2 at rank 3
        [i["d6"], i["d0"], i["d1"], i["d5"]],       # q1: grade 3 at rank 1, grade 2 at rank 4
        [i["d3"], i["d4"], i["d9"], i["d10"]],      # q2: nothing relevant in the top 4
        [i["d10"], i["q3"], i["d1"], i["d0"]],      # q3: grade 1, 1, -, 2
        [i["d9"], i["d0"], i["d1"], i["d2"]],       # q4: no relevant document at all
    ])
    log2 = math.log2
    ndcg = [
        (1 / log2(2) + 2 / log2(4)) / (2 / log2(2) + 1 / log2(3)),
        (3 / log2(2) + 2 / log2(5)) / (3 / log2(2) + 2 / log2(3)),
        0.0,
        (1 / log2(2) + 1 / log2(3) + 2 / log2(5)) / (2 / log2(2) + 1 / log2(3) + 1 / log2(4)),
        0.0,
    ]
    mrr = [1.0, 1.0, 0.0, 1.0, 0.0]
    recall_1 = [1 / 2, 1 / 2, 0.0, 1 / 3, 0.0]
    m = retrieval_metrics(ranking, beir.relevant, ks=(1, 10), grades=beir.grades, no_relevant="zero")
    assert m["ndcg@10"] == pytest.approx(np.mean(ndcg), abs=1e-12)
    assert m["mrr@10"] == pytest.approx(np.mean(mrr))
    assert m["recall@1"] == pytest.approx(np.mean(recall_1))
    assert m["recall@10"] == pytest.approx(np.mean([1.0, 1.0, 0.0, 1.0, 0.0]))
    # binary relevance (every grade 1) gives a different nDCG for the same ranking: the grades are used
    binary = retrieval_metrics(ranking, beir.relevant, ks=(1,), no_relevant="zero")
    assert binary["ndcg@10"] != pytest.approx(m["ndcg@10"], abs=1e-3)


def test_metrics_equal_pytrec_eval_on_random_graded_runs():
    import pytrec_eval

    rng = np.random.default_rng(0)
    n_q, n_d = 60, 40
    qrels, relevant, grades = {}, [], []
    for q in range(n_q):
        docs = rng.choice(n_d, size=int(rng.integers(1, 7)), replace=False)
        g = rng.integers(0, 4, size=len(docs))
        qrels[f"q{q}"] = {f"d{d}": int(x) for d, x in zip(docs, g)}
        relevant.append([int(d) for d, x in zip(docs, g) if x > 0])
        grades.append([float(x) for x in g if x > 0])
    assert any(not r for r in relevant)  # some queries judged all-0
    scores = rng.random((n_q, n_d))
    run_ = {f"q{q}": {f"d{d}": float(scores[q, d]) for d in range(n_d)} for q in range(n_q)}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1,10"}).evaluate(run_)
    ours = retrieval_metrics(np.argsort(-scores, axis=1), relevant, ks=(1, 10), grades=grades, no_relevant="zero")
    assert ours["ndcg@10"] == pytest.approx(np.mean([r["ndcg_cut_10"] for r in ref.values()]), abs=1e-12)
    assert ours["recall@10"] == pytest.approx(np.mean([r["recall_10"] for r in ref.values()]), abs=1e-12)
    assert ours["recall@1"] == pytest.approx(np.mean([r["recall_1"] for r in ref.values()]), abs=1e-12)


def _beir_reference(root: Path, model, dim: int | None = None) -> dict[str, float]:
    """BEIR's own recipe, written independently: sentence-transformers embeddings of the queries and of
    (title + " " + text).strip(), cosine scores, the query's own id removed from its run (ignore_identical_ids),
    pytrec_eval's ndcg_cut.10 over the judged queries."""
    import pytrec_eval

    corpus = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines() if line.strip()]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (root / "queries.jsonl").read_text().splitlines())}
    qrels: dict[str, dict[str, int]] = {}
    with open(root / "qrels" / "test.tsv") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        for qid, did, score in reader:
            qrels.setdefault(qid, {})[did] = int(score)
    doc_texts = [((d.get("title") or "") + " " + d["text"]).strip() for d in corpus]
    qids = list(qrels)
    q = model.encode([queries[x] for x in qids], normalize_embeddings=True)
    d = model.encode(doc_texts, normalize_embeddings=True)
    if dim is not None:
        q = q[:, :dim] / np.linalg.norm(q[:, :dim], axis=1, keepdims=True)
        d = d[:, :dim] / np.linalg.norm(d[:, :dim], axis=1, keepdims=True)
    scores = q @ d.T
    run_ = {}
    for i, qid in enumerate(qids):
        top = np.argsort(-scores[i])[:100]
        run_[qid] = {corpus[j]["_id"]: float(scores[i, j]) for j in top if corpus[j]["_id"] != qid}
    res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10"}).evaluate(run_)
    return {"ndcg@10": float(np.mean([r["ndcg_cut_10"] for r in res.values()])),
            "recall@10": float(np.mean([r["recall_10"] for r in res.values()]))}


def test_beir_directories_end_to_end_match_beir_recipe(tmp_path):
    from sentence_transformers import SentenceTransformer

    toy = write_beir(tmp_path / "toy")
    other = write_beir(tmp_path / "other", qrels=[r for r in QRELS if r[0] != "q4"] + [("q2", "q3", 2)])
    out = tmp_path / "beir.json"
    argv = ["--model", minilm_dir(), "--beir", str(toy), str(other), "--split", "test", "--corpus-block", "5",
            "--dims", "32,128", "--plot", str(tmp_path / "dims.png"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert list(report["datasets"]) == ["toy", "other"]  # one JSON for both directories
    res = report["datasets"]["toy"]
    assert res["queries"] == 5 and res["docs"] == len(DOCS) and res["queries_without_relevant"] == 1
    assert res["self_matches_excluded"] == 1 and res["query_instruction"] == "none"
    assert sorted(res["dims"], key=int) == ["32", "128", "384"] and res["dims"]["384"]["ndcg@10"] == res["ndcg@10"]
    st = SentenceTransformer(minilm_dir(), device="cpu")
    for name, root in (("toy", toy), ("other", other)):
        ref = _beir_reference(root, st)
        assert report["datasets"][name]["ndcg@10"] == pytest.approx(ref["ndcg@10"], abs=1e-4), name
        assert report["datasets"][name]["recall@10"] == pytest.approx(ref["recall@10"], abs=1e-4), name
    ref32 = _beir_reference(toy, st, dim=32)
    assert res["dims"]["32"]["ndcg@10"] == pytest.approx(ref32["ndcg@10"], abs=1e-4)
    assert res["dims"]["32"]["ndcg@10"] != pytest.approx(res["ndcg@10"], abs=1e-3)  # truncation changes rankings
    png = (tmp_path / "dims.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_bad_beir_files_are_one_line_errors(tmp_path):
    def error_of(root: Path, split: str = "test") -> str:
        with pytest.raises(EvaluationError) as info:
            load_beir(root, split)
        message = str(info.value)
        assert "\n" not in message
        return message

    good = write_beir(tmp_path / "good")
    assert error_of(good, "dev") == f"{good}/qrels/dev.tsv: missing (no qrels for split 'dev'; have: test)"

    bad = write_beir(tmp_path / "unknown_doc", qrels=QRELS + [("q1", "d99", 1)])
    assert error_of(bad) == (f"{bad}/qrels/test.tsv:{len(QRELS) + 2}: document id 'd99' is not in "
                             f"{bad}/corpus.jsonl (1 unknown document judgement(s))")
    bad = write_beir(tmp_path / "unknown_query", qrels=QRELS + [("q7", "d1", 1)])
    assert error_of(bad) == (f"{bad}/qrels/test.tsv:{len(QRELS) + 2}: query id 'q7' is not in "
                             f"{bad}/queries.jsonl (1 unknown query id(s))")
    bad = write_beir(tmp_path / "bad_json")
    lines = (bad / "corpus.jsonl").read_text().splitlines()
    lines[3] = lines[3][:-1]  # cut the closing brace
    (bad / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    assert error_of(bad).startswith(f"{bad}/corpus.jsonl:4: not valid JSON")
    bad = write_beir(tmp_path / "no_text")
    with open(bad / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q8"}) + "\n")
    assert error_of(bad) == f"{bad}/queries.jsonl:{len(QUERIES) + 1}: field 'text' missing"
    bad = write_beir(tmp_path / "bad_score", qrels=QRELS[:2] + [("q0", "d3", "high")])
    assert error_of(bad) == f"{bad}/qrels/test.tsv:4: score 'high' is not an integer relevance grade"
    with pytest.raises(EvaluationError, match="no such|not a directory"):
        load_beir(tmp_path / "nowhere")

    # through the command line: exit 2, one line naming the file and line, before any model is loaded
    bad = write_beir(tmp_path / "cli", qrels=QRELS + [("q1", "d99", 1)])
    proc = _cli("--model", minilm_dir(), "--beir", str(good), str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}/qrels/test.tsv:{len(QRELS) + 2}: document id 'd99' is not in {bad}/corpus.jsonl "
        "(1 unknown document judgement(s))"]
    proc = _cli("--model", minilm_dir(), "--beir", str(good), "--dims", "32,4096", "--no-progress")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "error: --dims: 4096 outside 1..384 (the model's embedding size)"
    proc = _cli("--model", minilm_dir(), "--beir", str(good), "--registry", "x.yaml")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --beir: --registry and --dataset apply to --data only"


def test_instruction_sources_for_beir(tmp_path):
    """--query-instruction, --prompt-name, and an unknown prompt name; documents never get an instruction."""
    toy = write_beir(tmp_path / "toy")
    base = ["--model", minilm_dir(), "--beir", str(toy), "--no-progress", "--max-len", "64"]
    res = run(build_parser().parse_args(base + ["--query-instruction", "Find the Python documentation"]))
    assert res["datasets"]["toy"]["query_instruction"] == "--query-instruction 'Find the Python documentation'"
    with pytest.raises(Exception, match="--prompt-name nope: the model has no prompt of that name"):
        run(build_parser().parse_args(base + ["--prompt-name", "nope"]))
