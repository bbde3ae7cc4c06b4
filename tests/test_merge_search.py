"""`python -m pipeline.merge --search`: on a run directory of tiny exports built so that one merge is known to be
best (merge exports theta_0 + e_i, a final theta_0 - sum e_i: only the mean of all four is theta_0, and the held-out
relevance is theta_0's own top-1), the search picks it, writes it as a loadable export equal to ``pipeline.merge``'s
recomputation with its recipe and every candidate's scores, a table and a plot; the evaluation data is tokenized once
(raw pairs and BEIR), one candidate's weights are in memory at a time; too few exports give the singles only; bad
runs, sources and options are one-line errors."""
from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_model import one_torch_thread
from test_merge import export_tiny

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

WORDS = ("river stone apple music window garden paper winter silver forest engine mountain coffee yellow doctor "
         "ocean bridge candle pocket rabbit planet button sugar violin desert camera island ladder mirror jacket "
         "thunder market pencil castle tiger orange summer basket cloud rocket").split()
MERGE_STEPS = (2, 4, 6)
FINAL_STEP = 7
NOISE = 1.0  # per tensor, in units of the tensor's own standard deviation


def _texts(rng: np.random.Generator, n: int, words: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=words)) for _ in range(n)]


def _with_weights(src: Path, out: Path, tensors: dict[str, torch.Tensor], step: int) -> Path:
    """A copy of the export `src` with other weights, recording training step `step`."""
    shutil.copytree(src, out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    path = out / "config_sentence_transformers.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "training_step": step}))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, theta_0's export): merge exports at steps 2, 4, 6 hold theta_0 + e_i, the final (step 7)
    theta_0 - (e_1 + e_2 + e_3), e_i independent noise of the tensors' own scale. The sequence merged is
    (2, 4, 6, 7), and its mean - "mean last 4" - is theta_0 (up to rounding); no other candidate is."""
    root = tmp_path_factory.mktemp("search")
    base = export_tiny(root / "base", 0, step=0)
    theta = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    noise = [{k: NOISE * v.float().std() * torch.randn(v.shape, generator=gen) for k, v in theta.items()}
             for _ in MERGE_STEPS]
    export = root / "run" / "export"
    export.mkdir(parents=True)
    from pipeline.training.export import merge_export_name

    for step, e in zip(MERGE_STEPS, noise):
        _with_weights(base, export / merge_export_name(step), {k: v + e[k] for k, v in theta.items()}, step)
    _with_weights(base, export / "final", {k: v - sum(e[k] for e in noise) for k, v in theta.items()}, FINAL_STEP)
    return root / "run", base


@pytest.fixture(scope="module")
def heldout(run_dir, tmp_path_factory) -> Path:
    """Raw held-out pairs whose positive is theta_0's own top-1 document (queries with a clear margin only):
    theta_0 scores MRR@10 = 1, a model of other weights less."""
    from pipeline.data.tokenization import encode_spec, tokenize_texts
    from pipeline.evaluation.retrieval import cosine_scores, embed
    from pipeline.model.embedding import load_model_dir

    base = str(run_dir[1])
    rng = np.random.default_rng(0)
    queries, docs = _texts(rng, 40, 5), _texts(rng, 40, 10)
    spec = encode_spec(base, 32)
    model, _ = load_model_dir(base, "cpu")
    scores = cosine_scores(embed(model, tokenize_texts(queries, spec, progress=False), progress=False),
                           embed(model, tokenize_texts(docs, spec, progress=False), progress=False))
    top2 = torch.topk(scores, 2, dim=1)
    rows = []
    for qi, query in enumerate(queries):
        if float(top2.values[qi, 0] - top2.values[qi, 1]) > 1e-3:
            rows.append({"query": query, "pos": [docs[int(top2.indices[qi, 0])]],
                         "neg": [d for d in docs if d != docs[int(top2.indices[qi, 0])]][:2]})
    assert len(rows) >= 20
    # every document is in the corpus: the unused ones as negatives of the first row
    used = {d for r in rows for d in r["pos"] + r["neg"]}
    rows[0]["neg"] += [d for d in docs if d not in used]
    out = tmp_path_factory.mktemp("heldout") / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _search(run: Path, out: Path, *extra: str) -> list[str]:
    return ["--search", str(run), "--out", str(out), "--query-instruction", "", "--max-len", "32", "--no-progress",
            *extra]


def test_search_picks_the_known_best_merge_and_writes_it(run_dir, heldout, tmp_path, monkeypatch, capsys):
    import pipeline.data.tokenization as tokenization
    import pipeline.merge_search as merge_search
    from pipeline.merge import main, merge_models

    run, _ = run_dir
    tokenize_calls: list[int] = []
    real_tokenize = tokenization.tokenize_texts

    def counting_tokenize(texts, *args, **kwargs):
        tokenize_calls.append(len(texts))
        return real_tokenize(texts, *args, **kwargs)

    live = {"now": 0, "max": 0, "loads": 0}
    real_load = merge_search.load_candidate

    def tracked_load(model_dir, args):
        assert live["now"] == 0, "a candidate was loaded while another one's weights were still alive"
        model = real_load(model_dir, args)
        live["now"] += 1
        live["loads"] += 1
        live["max"] = max(live["max"], live["now"])
        weakref.finalize(model, lambda: live.__setitem__("now", live["now"] - 1))
        return model

    on_disk: list[int] = []
    real_merge = merge_search.merge_models

    def tracked_merge(inputs, out, **kwargs):
        on_disk.append(len([p for p in Path(out).parent.iterdir() if p.name.startswith("candidate_")]))
        return real_merge(inputs, out, **kwargs)

    monkeypatch.setattr(tokenization, "tokenize_texts", counting_tokenize)
    monkeypatch.setattr(merge_search, "load_candidate", tracked_load)
    monkeypatch.setattr(merge_search, "merge_models", tracked_merge)
    best = tmp_path / "best"
    assert main(_search(run, best, "--data", str(heldout))) == 0
    stdout = capsys.readouterr().out

    # the candidates: 4 singles, means of the last 2..4, ema at 3 decays, slerp of the last two
    record = json.loads((best / "merge_search.json").read_text())
    names = [c["name"] for c in record["candidates"]]
    assert names == ["final", "step 6", "step 4", "step 2", "mean last 2", "mean last 3", "mean last 4", "ema 0.5",
                     "ema 0.7", "ema 0.9", "slerp last 2"]
    assert record["metric"] == "mrr@10"
    scores = {c["name"]: c["score"] for c in record["candidates"]}
    assert scores["mean last 4"] == pytest.approx(1.0)
    assert max(v for k, v in scores.items() if k != "mean last 4") < 0.95, scores
    # the winner is the argmax of the table (first row, marked), and what is recorded
    assert record["best"]["name"] == "mean last 4" == max(scores, key=scores.get)
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("---")) + 1
    table = lines[start : start + len(names)]
    by_score = sorted(record["candidates"], key=lambda c: -c["score"])
    for i, (row, cand) in enumerate(zip(table, by_score)):  # sorted, the winner first and marked
        assert row.startswith(("* " if i == 0 else "  ") + cand["name"] + " ") and f"{cand['score']:10.4f}" in row
    assert table[0].startswith("* mean last 4") and sum(ln.startswith("*") for ln in table) == 1, stdout
    assert record["best"]["recipe"]["inputs"] == [str(run / "export" / n) for n in
                                                  ("merge_step_00000002", "merge_step_00000004",
                                                   "merge_step_00000006", "final")]
    assert record["best"]["recipe"]["steps"] == [2, 4, 6, 7]
    assert record["gain_over_final"] == pytest.approx(1.0 - scores["final"])
    assert "best: mean last 4 (mean of steps 2, 4, 6, 7), mrr@10 1.0000" in stdout

    # BEST is pipeline.merge's mean of those inputs, with merge.json, and loads as an export
    again = merge_models(record["best"]["recipe"]["inputs"], tmp_path / "again", progress=False).out
    merged, expected = load_file(str(best / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
    assert json.loads((best / "merge.json").read_text())["method"] == "mean"
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(str(best), device="cpu").encode(["river stone"], convert_to_tensor=True)
    assert emb.shape == (1, 64)
    from pipeline.evaluate import build_parser, run as evaluate_run

    report = evaluate_run(build_parser().parse_args(["--model", str(best), "--data", str(heldout), "--max-len", "32",
                                                     "--query-instruction", "", "--no-progress"]))
    assert report["datasets"]["pairs"]["mrr@10"] == pytest.approx(record["best"]["score"], abs=1e-12)

    # the plot next to BEST; nothing of the search left behind
    png = tmp_path / "best.search.png"
    assert record["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "best", "best.search.png"]

    # tokenized once (queries, corpus) for 11 candidates, before evaluate_run above added its own two calls
    assert len(tokenize_calls) == 4 and tokenize_calls[:2] == tokenize_calls[2:], tokenize_calls
    # one candidate in memory at a time; at most the best so far on disk while the next merge is built
    assert live["loads"] == len(names) and live["max"] == 1
    assert len(on_disk) == 7 and max(on_disk) <= 1, on_disk


def test_a_single_export_is_the_answer_when_no_merge_is_better(run_dir, heldout, tmp_path, capsys, pipeline_log):
    """Fewer than two checkpoints to merge: the singles only, said in a log line; BEST is a copy of the winner."""
    from pipeline.merge import main

    run, base = run_dir
    export = tmp_path / "run" / "export"
    shutil.copytree(base, export / "final")
    shutil.copytree(base, export / "merge_step_00000000")  # the same step as final: nothing to merge
    shutil.copytree(run / "export" / "merge_step_00000002", tmp_path / "run" / "unrelated")
    best = tmp_path / "best"
    assert main(_search(tmp_path / "run", best, "--data", str(heldout), "--metric", "ndcg@10")) == 0
    record = json.loads((best / "merge_search.json").read_text())
    assert [c["name"] for c in record["candidates"]] == ["final", "step 0"]
    assert record["best"]["name"] == "final" and record["gain_over_final"] == 0.0  # a tie goes to final
    assert record["metric"] == "ndcg@10" and record["best"]["score"] == pytest.approx(1.0)
    assert (best / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    assert not (best / "merge.json").exists()
    logged = " ".join(r.getMessage() for r in pipeline_log.records)
    assert "merging needs at least 2" in logged and "single exports only" in logged, logged


@pytest.fixture
def two_exports(run_dir, tmp_path) -> Path:
    """A run of two checkpoints: merge export step 6, final step 7."""
    run, _ = run_dir
    for name in ("merge_step_00000006", "final"):
        shutil.copytree(run / "export" / name, tmp_path / "run" / "export" / name)
    return tmp_path / "run"


def test_beir_source_is_tokenized_once(two_exports, tmp_path, monkeypatch, pipeline_log):
    """--beir: the streamed corpus is tokenized once (block by block) and held for every candidate; nDCG@10 picks;
    ema at 0.5 of two checkpoints is their mean, scored once."""
    import pipeline.data.tokenization as tokenization
    from pipeline.merge import main

    beir = tmp_path / "beir" / "tiny"
    (beir / "qrels").mkdir(parents=True)
    rng = np.random.default_rng(1)
    docs, queries = _texts(rng, 10, 8), _texts(rng, 4, 4)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                for i, t in enumerate(queries)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{2 * i}\t{1 + i % 2}\n" for i in range(4)))
    calls: list[int] = []
    real = tokenization.tokenize_texts
    monkeypatch.setattr(tokenization, "tokenize_texts", lambda texts, *a, **k: calls.append(len(texts)) or
                        real(texts, *a, **k))
    best = tmp_path / "best"
    assert main(["--search", str(two_exports), "--out", str(best), "--beir", str(beir), "--corpus-block", "4",
                 "--max-len", "32", "--no-progress"]) == 0
    record = json.loads((best / "merge_search.json").read_text())
    assert [c["name"] for c in record["candidates"]] == ["final", "step 6", "mean last 2", "ema 0.7", "ema 0.9",
                                                         "slerp last 2"]
    assert any("ema 0.5 has the coefficients of an earlier candidate" in r.getMessage()
               for r in pipeline_log.records)
    assert record["metric"] == "ndcg@10" and record["source"]["beir"] == [str(beir)]
    assert calls == [4, 4, 4, 2], calls  # the queries, then the corpus in blocks of 4: once for 6 candidates
    scores = [c["score"] for c in record["candidates"]]
    assert record["best"]["score"] == max(scores)
    assert record["best"]["name"] == record["candidates"][scores.index(max(scores))]["name"]


def test_mteb_source_loads_the_task_data_once(two_exports, tmp_path):
    """--mteb (a task object from Python; tests/test_mteb.py's in-memory task): data loaded once, the main score
    picks, averaged over tasks."""
    from test_mteb import _task

    from pipeline.merge import build_parser
    from pipeline.merge_search import search

    task = _task()
    loads = []
    real_load = task.load_data
    task.load_data = lambda *a, **k: loads.append(1) or real_load(*a, **k)
    args = build_parser().parse_args(["--search", str(two_exports), "--out", str(tmp_path / "best"), "--mteb", "x",
                                      "--ema-decays", "0.5", "--no-progress"])
    args.mteb = [task]
    found = search(args)
    assert [s.candidate.name for s in found.scored] == ["final", "step 6", "mean last 2", "slerp last 2"]
    assert loads == [1] and found.metric == "main_score"
    values = [s.scores.metrics["main_score"] for s in found.scored]
    assert found.best.scores.metrics["main_score"] == max(values)
    assert found.record["source"] == {"mteb": ["TinyWebRetrieval"], "mteb_batch_size": 32}
    recorded = json.loads((tmp_path / "best" / "merge_search.json").read_text())
    assert recorded["best"]["name"] == found.best.candidate.name


def test_errors_are_one_line(run_dir, heldout, tmp_path, capsys):
    from pipeline.merge import main

    run, base = run_dir
    empty = tmp_path / "empty"
    (empty / "export").mkdir(parents=True)
    (tmp_path / "taken").mkdir()
    beir_bad = tmp_path / "beir_bad"
    beir_bad.mkdir()
    out = tmp_path / "best"
    cases = [
        (_search(tmp_path / "nope", out, "--data", str(heldout)), f"error: --search {tmp_path / 'nope'}: no such "
                                                                   "directory"),
        (_search(empty, out, "--data", str(heldout)), f"error: --search {empty}: no exports (no "
                                                      f"{empty / 'export' / 'final'} and no "),
        (_search(run, out), "error: --search: give the evaluation data: --data PATH, --beir DIR ... or --mteb"),
        (_search(run, out, "--data", str(tmp_path / "missing")), f"error: --data {tmp_path / 'missing'}: no such "
                                                                 "file or directory"),
        (_search(run, out, "--beir", str(beir_bad)), f"error: {beir_bad / 'qrels' / 'test.tsv'}: missing"),
        (_search(run, out, "--data", str(heldout), "--metric", "recall@5"),
         "error: --metric recall@5: not reported for --data (choose from mrr@10, ndcg@10, recall@1"),
        (_search(run, out, "--data", str(heldout), "--ema-decays", "1.5"), "error: --ema-decays: must be in [0, 1]"),
        (_search(run, tmp_path / "taken", "--data", str(heldout)), f"error: --out {tmp_path / 'taken'}: exists"),
        (_search(run, out, "--data", str(heldout), "--method", "ema"), "error: --method: not used by --search"),
        ([*_search(run, out, "--data", str(heldout)), str(base)], f"error: --search {run}: builds its candidates"),
        ([str(base), str(base), "--out", str(out), "--data", str(heldout)], "error: --data: only with --search"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), (argv, err)
        assert not out.exists() and not (tmp_path / ".best.search").exists()
