"""Decontamination: planted copies of every kind are found, near-misses are not, the build drops exactly the found rows
and counts them in the manifest, and `preprocess decontaminate` reports the same.

Planted (training -> evaluation set): a query equal to a BEIR test query after case / punctuation / whitespace
changes; a positive holding a 13-word window of a relevant BEIR document, and one equal to its text without the
title; a long query holding a window of a JSONL eval pair's positive, a query equal to its query; a positive holding a
window of a raw F2LLM eval file's passage; a positive equal (after punctuation changes) to the JSONL pair's positive.
Near-misses that must stay: a 12-word shared window, a short query equal but for one word, a BEIR document judged 0,
an unjudged BEIR document, a BEIR query judged only in another split, an eval file's negative.

Scaling measurement (not a test): ``python tests/test_decontaminate.py --scale [EVAL_DOCS TRAIN_ROWS]`` (default
100000 1000000) writes synthetic data under /tmp and prints the time of each pass and the wall time and peak RSS of
`python -m preprocess decontaminate`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_helpers import minilm_dir, write_jsonl, write_parquet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.shard_format import MANIFEST  # noqa: E402
from pipeline.data.shards import ShardReader  # noqa: E402
from preprocess import decontaminate as dc  # noqa: E402
from preprocess.build import BuildOptions, ShardBuilder  # noqa: E402
from preprocess.validate import validate_shards  # noqa: E402


def words(prefix: str, n: int, start: int = 0) -> list[str]:
    return [f"{prefix}{i}" for i in range(start, start + n)]


def text(*parts: list[str] | str) -> str:
    return " ".join(p if isinstance(p, str) else " ".join(p) for p in parts)


# evaluation texts: words from their own vocabularies, so that only planted copies overlap
D1 = words("sol", 40)  # relevant BEIR document (titled)
D2 = words("lun", 30)  # BEIR document judged 0
D3 = "Tides follow the Moon."  # relevant, short
D4 = words("ast", 30)  # in the corpus, not judged
P1 = words("mag", 35)  # JSONL eval pair's positive
N1 = words("neg", 20)  # JSONL eval pair's negative
F1 = words("fpa", 30)  # F2LLM eval file's passage
F1N = words("fng", 20)  # F2LLM eval file's negative
Q1 = "What causes the seasons on Earth?"
Q3 = "Where do comets come from?"  # judged in dev only
PAIR_Q = "how do magnets attach to steel doors"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("decon")
    beir = root / "beir" / "sci"
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": Q1}, {"_id": "q2", "text": "why is the sky blue"},
                                         {"_id": "q3", "text": Q3}])
    write_jsonl(beir / "corpus.jsonl", [
        {"_id": "d1", "title": "Solar science", "text": text(D1)},
        {"_id": "d2", "title": "", "text": text(D2)},
        {"_id": "d3", "title": None, "text": D3},
        {"_id": "d4", "title": "Stars", "text": text(D4)},
    ])
    (beir / "qrels").mkdir()
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td3\t2\n")
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq3\td4\t1\n")
    pairs = write_jsonl(root / "eval" / "pairs.jsonl", [{"query": PAIR_Q, "pos": [text(P1)], "neg": [text(N1)]}])
    f2llm = write_parquet(root / "eval_f2llm" / "held.parquet",
                          [{"query": "fq0 fq1 fq2", "passage": text(F1), "negative_1": text(F1N)}])

    web = [  # (query, positive, expected reason or None)
        ("tr0 tr1 tr2", text(words("tp", 30)), None),
        ("  what CAUSES the seasons,   on earth!! ", "tr3 tr4", "contaminated_query_exact"),
        ("tr5", text(words("tq", 10), D1[5:18], words("tq", 10, 10)), "contaminated_passage_13gram"),
        ("tr6", text(D2), None),  # a document judged 0 is not relevant
        (text(D1[20:32], words("tz", 8)), "tr7", None),  # 12 shared words only
        ("What causes the tides on Earth?", "tr8", None),  # short, one word differs
        ("tr9", "SOL0 sol1, " + text(D1[2:]) + ".", "contaminated_passage_exact"),  # d1 without its title
        (text(words("tx", 5), P1[10:23], words("tx", 5, 5)), "tr10", "contaminated_query_13gram"),
        ("tr11", text(D4), None),  # unjudged document
        ("tr12", text(F1N), None),  # an eval file's negative is not a relevant document
        ("tr13", text(words("ty", 3), F1[1:14]), "contaminated_passage_13gram"),
        (Q3, "tr14", None),  # judged only in the dev split
        (PAIR_Q.upper() + "?", text(D1[0:13]), "contaminated_query_exact"),  # both match: the query's reason wins
    ]
    write_parquet(root / "train" / "web.parquet",
                  [{"query": q, "passage": p, "negative_1": f"tn{i}"} for i, (q, p, _) in enumerate(web)])
    faq_lines = [
        {"query": "tf0", "pos": ["tf1", text(P1).replace("mag3 ", "Mag3, ")], "neg": ["tf2"]},
        {"query": PAIR_Q.title() + " ?", "pos": ["tf3"]},
        {"query": "tf4", "pos": [text(N1)]},
        {"query": "tf5 tf6", "pos": ["tf7"]},
    ]
    write_jsonl(root / "train" / "faq.jsonl", faq_lines)
    faq = [("tf0", "tf1", None), ("tf0", "x", "contaminated_passage_exact"), ("x", "tf3", "contaminated_query_exact"),
           ("tf4", "x", None), ("tf5 tf6", "tf7", None)]
    return {"root": root, "raw": root / "train", "evals": [str(beir), str(pairs), str(f2llm.parent)],
            "web": web, "faq": faq}


def expected(rows: list) -> dict[int, str]:
    return {i: reason for i, (_, _, reason) in enumerate(rows) if reason}


def found(result: dc.DatasetContamination) -> dict[int, str]:
    return {int(r): dc.REASONS[int(c)] for r, c in zip(result.drop_rows, result.drop_codes)}


def test_normalise_and_hashes():
    assert dc.normalise("  What CAUSES\tthe seasons,\n on ｅａｒｔｈ?! ") == "what causes the seasons on earth"
    assert dc.normalise("Straße — «quoted» don't") == "strasse quoted dont"
    assert dc.normalise("?!...") == ""
    long = text(words("w", 40))
    texts = ["x " + long, "", "!!", "a b", long.upper() + " y"]
    whole = dc.hash_texts(texts)
    assert whole.words.tolist() == [41, 0, 0, 2, 41]
    for i, t in enumerate(texts):  # a text hashes alike alone and in a batch (positions, chunks)
        alone = dc.hash_texts([t])
        assert alone.exact[0] == whole.exact[i] or whole.words[i] == 0
        assert alone.windows.tolist() == whole.windows[whole.owner == i].tolist()
    shared = set(whole.windows[whole.owner == 0].tolist()) & set(whole.windows[whole.owner == 4].tolist())
    assert len(shared) == 40 - 13 + 1
    assert dc.hash_texts(["Some words here"]).exact[0] == dc.hash_texts(["some, WORDS  here."]).exact[0]
    assert dc.hash_texts(["some words here"]).exact[0] != dc.hash_texts(["some here words"]).exact[0]


def test_index_matches_reference(tmp_path, monkeypatch):
    """Spilled buckets, the sorted mapped file and the bitmap filter answer exactly as a set would."""
    monkeypatch.setattr(dc, "_CHUNK_CHARS", 300)  # many chunks per batch
    rng = np.random.default_rng(0)
    docs = [" ".join(f"v{x}" for x in rng.integers(0, 400, size=int(n))) for n in rng.integers(1, 60, size=300)]
    builder = dc._IndexBuilder(tmp_path / "idx", flush_every=500)
    for lo in range(0, len(docs), 37):
        builder.add(dc.hash_texts(docs[lo: lo + 37]))
    index = builder.finish()
    ref = dc.hash_texts(docs)
    probe = dc.hash_texts([" ".join(f"v{x}" for x in rng.integers(0, 400, size=40)) for _ in range(200)] + docs[:50])
    assert index.has_windows(probe.windows).tolist() == np.isin(probe.windows, ref.windows).tolist()
    assert index.has_exact(probe.exact).tolist() == np.isin(probe.exact, ref.exact[ref.words > 0]).tolist()
    assert index.has_windows(probe.windows).sum() > 0 and len(index.windows) == len(np.unique(ref.windows))


def test_every_plant_found_no_false_hit(world, tmp_path):
    checker = dc.Decontaminator(world["evals"])
    raw = world["raw"]
    results = checker.run([("faq", raw / "faq.jsonl"), ("web", raw / "web.parquet")], tmp_path / "work")
    assert found(results["web"]) == expected(world["web"])
    assert found(results["faq"]) == expected(world["faq"])
    assert results["web"].rows == 13 and results["faq"].rows == 5
    labels = {s.label: (s.queries, s.documents) for s in checker.expanded}
    assert labels[world["evals"][0]] == (2, 2)  # q1, q2; d1, d3 (d2 judged 0, d4 unjudged, q3 in dev)
    records = {r["row"]: r for r in map(json.loads, results["web"].report.read_text().splitlines())}
    assert set(records) == set(expected(world["web"]))
    assert records[1]["eval_id"] == "q1" and records[1]["eval_kind"] == "query" and records[1]["eval_text"] == Q1
    assert records[2]["eval_id"] == "d1" and records[2]["window"] == text(D1[5:18])
    assert records[2]["eval_text"].startswith("Solar science sol0")
    assert records[6]["eval_id"] == "d1" and records[6]["reason"] == "contaminated_passage_exact"
    assert records[7]["eval_source"].endswith("pairs.jsonl") and records[7]["eval_id"] == "row 0"
    assert records[10]["eval_source"].endswith("held.parquet") and records[10]["eval_kind"] == "document"
    assert records[12]["reason"] == "contaminated_query_exact" and records[12]["eval_kind"] == "query"
    assert all(r["file"].endswith("web.parquet") and r["dataset"] == "web" for r in records.values())
    faq = [json.loads(x) for x in results["faq"].report.read_text().splitlines()]
    assert [(r["row"], r["raw_row"]) for r in faq] == [(1, 1), (2, 2)]


def test_build_drops_counts_and_matches_cli(world, tmp_path, capsys):
    raw = world["raw"]
    out = tmp_path / "shards"
    opts = BuildOptions(raw=str(raw), tokenizer=minilm_dir(), out=str(out), default_type="retrieval", max_len=64,
                        decontaminate=world["evals"])
    ShardBuilder(opts).run()
    manifest = json.loads((out / MANIFEST).read_text())
    web = manifest["datasets"]["web"]
    assert web["counts"]["skipped"] == {"contaminated_passage_13gram": 2, "contaminated_passage_exact": 1,
                                        "contaminated_query_13gram": 1, "contaminated_query_exact": 2}
    assert web["counts"]["valid_rows"] == 7 and web["counts"]["raw_rows"] == 13
    assert manifest["datasets"]["faq"]["counts"]["skipped"] == {"contaminated_passage_exact": 1,
                                                                "contaminated_query_exact": 1}
    assert web["decontamination"]["dropped"] == 6 and "decontamination.jsonl" in web["files"]
    # the shards hold exactly the clean rows, in order
    from pipeline.data.tokenization import load_tokenizer

    tok = load_tokenizer(minilm_dir())
    reader = ShardReader(out)
    for name, rows in (("web", world["web"]), ("faq", None)):
        ds = reader[name]
        if rows is None:
            clean_q = ["tf0", "tf4", "tf5 tf6"]
        else:
            clean_q = [q for q, _, reason in rows if reason is None]
        assert [ds.queries[i].tolist() for i in range(ds.num_queries)] == [tok(q)["input_ids"] for q in clean_q]
    web_ds = reader["web"]
    positives = [web_ds.corpus[web_ds.positives[i]].tolist() for i in range(web_ds.num_queries)]
    assert positives == [tok(p)["input_ids"][:63] + ([tok.sep_token_id] if len(tok(p)["input_ids"]) > 63 else [])
                         for _, p, reason in world["web"] if reason is None]
    validate_shards(out)
    # `decontaminate` reports the same rows and reasons (the same report) without building (in process: the BEIR
    # reader imports torch, seconds per process)
    from preprocess.__main__ import main

    report = tmp_path / "report.jsonl"
    capsys.readouterr()
    assert main(["decontaminate", "--raw", str(raw), "--default-type", "retrieval", "--against", *world["evals"],
                 "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "web: 6 of 13 rows match" in printed and "faq: 2 of 5 rows match" in printed
    assert report.read_text() == (out / "decontamination.jsonl").read_text()
    assert len(report.read_text().splitlines()) == 8
    # a re-run reuses both datasets; other evaluation sets rebuild them
    assert all(r.reused for r in ShardBuilder(opts).run())
    results = ShardBuilder(BuildOptions(**{**opts.__dict__, "decontaminate": world["evals"][:1]})).run()
    assert not any(r.reused for r in results)
    skipped = json.loads((out / MANIFEST).read_text())["datasets"]["web"]["counts"]["skipped"]
    assert skipped == {"contaminated_passage_13gram": 2, "contaminated_passage_exact": 1,
                       "contaminated_query_exact": 1}  # row 12's positive now counts: its query is clean


def test_parts_merge_to_the_single_build_with_its_report(world, tmp_path):
    """Two parts built with --decontaminate, merged: the manifest's datasets (counts, files, decontamination entry)
    and OUT/decontamination.jsonl equal a single build's; parts against other evaluation sets are refused."""
    from preprocess.build import BuildError
    from preprocess.merge import MergeOptions, PartMerger

    common = dict(raw=str(world["raw"]), tokenizer=minilm_dir(), default_type="retrieval", max_len=64,
                  decontaminate=world["evals"])
    ShardBuilder(BuildOptions(out=str(tmp_path / "single"), **common)).run()
    parts = [str(tmp_path / f"part{i}") for i in range(2)]
    for i, part in enumerate(parts):
        ShardBuilder(BuildOptions(out=part, num_parts=2, part=i, **common)).run()
    PartMerger(MergeOptions(parts=parts, out=str(tmp_path / "merged"))).run()
    single = json.loads((tmp_path / "single" / MANIFEST).read_text())
    merged = json.loads((tmp_path / "merged" / MANIFEST).read_text())
    assert merged["datasets"] == single["datasets"]
    assert merged["datasets"]["web"]["decontamination"]["dropped"] == 6
    report = (tmp_path / "merged" / "decontamination.jsonl").read_text()
    assert report == (tmp_path / "single" / "decontamination.jsonl").read_text() and len(report.splitlines()) == 8
    validate_shards(tmp_path / "merged")
    other = str(tmp_path / "other1")
    ShardBuilder(BuildOptions(out=other, num_parts=2, part=1, **{**common, "decontaminate": world["evals"][:1]})).run()
    with pytest.raises(BuildError, match="parts built from different input or options|decontamination reports differ"):
        PartMerger(MergeOptions(parts=[parts[0], other], out=str(tmp_path / "bad"))).run()


def test_mteb_export_and_offline_error(world, tmp_path, monkeypatch):
    """An MTEB task's loaded data (as mteb 2 holds it) exports to BEIR and is checked like one; an MTEB task whose
    data is not in the local cache is a one-line error (the child runs offline: nothing is downloaded)."""
    data = {"default": {"test": {
        "queries": [{"id": "m1", "text": "tf5 tf6"}, {"id": "m2", "text": "unjudged"}],
        "corpus": [{"id": "c1", "title": "", "text": text(words("tp", 30))}, {"id": "c2", "title": "t", "text": "z"}],
        "relevant_docs": {"m1": {"c1": 1, "c2": 0}},
    }}}
    assert dc.export_mteb_split(data, "test", tmp_path / "mteb") == ["default"]
    checker = dc.Decontaminator([str(tmp_path / "mteb" / "default")])
    raw = world["raw"]
    results = checker.run([("web", raw / "web.parquet"), ("faq", raw / "faq.jsonl")], tmp_path / "work")
    assert found(results["web"]) == {0: "contaminated_passage_exact"}
    assert found(results["faq"]) == {4: "contaminated_query_exact"}
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    (source,) = dc.parse_eval_specs(["mteb:SciFact"])
    with pytest.raises(dc.DecontaminationError) as err:
        dc.export_mteb_task(source, tmp_path / "work")
    message = str(err.value)
    assert "\n" not in message and message.startswith("mteb:SciFact: its data is not in the local Hugging Face cache")
    assert "BEIR-format export" in message


def test_beir_reader_agrees_with_evaluation(world):
    """The BEIR side read here (without torch) is the one pipeline.evaluate scores: same queries, same relevant
    documents, same document text."""
    from pipeline.evaluation.eval_sets import beir_document, load_beir

    root = Path(world["evals"][0])
    for split in ("test", "dev"):
        ids, queries, relevant = dc.read_beir(root, split)
        ref = load_beir(root, split)
        assert (ids, queries) == (ref.query_ids, ref.queries)
        corpus = [json.loads(x) for x in (root / "corpus.jsonl").read_text().splitlines()]
        assert relevant == {corpus[i]["_id"] for docs in ref.relevant for i in docs}
    assert dc.beir_document("T", " x ") == beir_document("T", " x ") and dc.beir_document(None, "x") == "x"


def test_bad_eval_sets_are_one_line_errors(world, tmp_path):
    raw = world["raw"]

    def run(*against: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "preprocess", "decontaminate", "--raw", str(raw),
                               "--default-type", "retrieval", "--against", *against, "--report",
                               str(tmp_path / "r.jsonl")], capture_output=True, text=True, cwd=REPO)

    proc = run(str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "nope: no such file or directory (expected a BEIR directory" in proc.stderr
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq\td\t1\n")
    proc = run(str(beir))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "qrels/test.tsv: missing (no qrels for split 'test'; have: dev)" in proc.stderr
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\td\t1\n")
    write_jsonl(beir / "queries.jsonl", [{"_id": "q", "text": "x"}])
    write_jsonl(beir / "corpus.jsonl", [{"_id": "d", "text": "y"}, {"_id": "e", "text": 5}])
    with pytest.raises(dc.DecontaminationError, match=r"corpus.jsonl:2: field 'text' not a string \(5\)"):
        dc.Decontaminator([str(beir)]).run([("faq", raw / "faq.jsonl")], tmp_path / "work")
    for cmd in (["decontaminate"], ["build"]):
        helped = subprocess.run([sys.executable, "-m", "preprocess", *cmd, "--help"], capture_output=True, text=True,
                                cwd=REPO)
        assert helped.returncode == 0 and "13-word" in helped.stdout
    with pytest.raises(dc.DecontaminationError, match="unsupported file"):
        dc.parse_eval_specs([str(world["root"] / "beir" / "sci" / "qrels" / "test.tsv")])


# ------------------------------------------------------------------------------------------------------------------
# scaling measurement: python tests/test_decontaminate.py --scale [EVAL_DOCS TRAIN_ROWS]
# ------------------------------------------------------------------------------------------------------------------
def _generate(root: Path, eval_docs: int, train_rows: int) -> None:
    """Synthetic data: a BEIR directory of `eval_docs` documents of 200 words (all relevant, 5 per query, queries of
    10 words) and a training parquet of `train_rows` rows (10-word query, 100-word positive) with 1,000 planted
    20-word passages of evaluation documents. Zipf words over a 200k vocabulary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    vocab = np.array([f"t{i}" for i in range(200_000)])

    def sentences(n: int, length: int) -> list[str]:
        out = []
        for lo in range(0, n, 10_000):
            ids = rng.zipf(1.1, size=(min(10_000, n - lo), length)) % len(vocab)
            out.extend(" ".join(row) for row in vocab[ids])
        return out

    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    docs = sentences(eval_docs, 200)
    with open(beir / "corpus.jsonl", "w") as handle:
        for i, d in enumerate(docs):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n")
    with open(beir / "queries.jsonl", "w") as handle, open(beir / "qrels" / "test.tsv", "w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i, q in enumerate(sentences(eval_docs // 5, 10)):
            handle.write(json.dumps({"_id": f"q{i}", "text": q}) + "\n")
            qrels.writelines(f"q{i}\td{5 * i + j}\t1\n" for j in range(5))
    queries, passages = sentences(train_rows, 10), sentences(train_rows, 100)
    for k in range(1000):
        r = k * (train_rows // 1000)
        passages[r] = passages[r][:200] + " " + " ".join(docs[k].split()[50:70])
    (root / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"query": queries, "passage": passages}), root / "train" / "big.parquet",
                   row_group_size=100_000)


_MEASURED = """
import runpy, sys, time
sys.argv = ["preprocess"] + sys.argv[1:]
started = time.perf_counter()
try:
    runpy.run_module("preprocess", run_name="__main__")
except SystemExit:
    pass
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(f"wall {time.perf_counter() - started:.0f} s, peak RSS {int(hwm[0]) / 1024:,.0f} MiB", file=sys.stderr)
"""  # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's peak across exec)


def _scale(eval_docs: int, train_rows: int) -> None:
    """Generate (in a child process: a forked child's peak RSS would include this one's) and measure."""
    root = Path(f"/tmp/decontaminate-scale-{eval_docs}-{train_rows}")
    if not (root / "train" / "big.parquet").exists():
        subprocess.run([sys.executable, __file__, "--generate", str(root), str(eval_docs), str(train_rows)],
                       check=True)
    command = [sys.executable, "-c", _MEASURED, "decontaminate", "--raw", str(root / "train"), "--default-type",
               "retrieval", "--against", str(root / "beir"), "--report", str(root / "report.jsonl")]
    proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    print(proc.stdout)
    print("\n".join(line for line in proc.stderr.replace("\r", "\n").splitlines() if " INFO " in line
                    or line.startswith("wall")))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--generate"]:
        _generate(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1:2] == ["--scale"]:
        _scale(*([int(x) for x in sys.argv[2:]] or [100_000, 1_000_000]))
