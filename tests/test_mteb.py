"""The export in MTEB: a retrieval task defined here with in-memory data (nothing downloaded) runs through
``mteb.evaluate`` on an exported tiny Qwen3; MTEB picks the trained instruction for queries and no prompt for
documents, and its nDCG@10 equals ``pipeline.evaluate``'s on the same data. ``--mteb`` on a task whose data cannot be
had, or an unknown task, is one line."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import minilm_dir
from helpers_model import one_torch_thread, tiny_model

REPO = Path(__file__).resolve().parents[1]
WEB = "Given a web search query, retrieve relevant passages"
WEB_PROMPT = f"Instruct: {WEB}\nQuery: "
TOPIC_PROMPT = "Instruct: Identify the topic of the text\nQuery: "

QUERIES = {f"q{i}": text for i, text in enumerate([
    "how tall is the eiffel tower", "best way to cook rice", "symptoms of the flu", "python list comprehension",
    "who painted the mona lisa", "distance from earth to moon"])}
DOCS = {f"d{i}": text for i, text in enumerate([
    "The Eiffel Tower is 330 metres tall and stands in Paris.", "Rinse the rice, then simmer it covered for 18 minutes.",
    "Fever, cough and aches are common flu symptoms.", "A list comprehension builds a list from an iterable in one line.",
    "Leonardo da Vinci painted the Mona Lisa in the early 1500s.", "The Moon is about 384,400 km from the Earth.",
    "Paris is the capital of France.", "Brown rice takes longer to cook than white rice.",
    "Influenza spreads through droplets.", "Python dictionaries map keys to values.",
    "The Louvre museum holds the Mona Lisa.", "The Sun is 150 million km away."])}
QRELS = {"q0": {"d0": 2, "d6": 1}, "q1": {"d1": 2, "d7": 1}, "q2": {"d2": 2, "d8": 1}, "q3": {"d3": 1},
         "q4": {"d4": 2, "d10": 1}, "q5": {"d5": 3, "d11": 0}}

_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 exported as training exports it, trained (per its prompts) on two retrieval datasets,
    a clustering one and a classification one without instruction."""
    from transformers import AutoTokenizer

    from pipeline.data.shard_format import DEFAULT_QUERY_TEMPLATE
    from pipeline.training.export import TrainedDataset, export_model

    out = tmp_path_factory.mktemp("mteb") / "export"
    datasets = {
        "web_search": TrainedDataset("retrieval", WEB, 500),
        "faq": TrainedDataset("retrieval", "Find the answer to the question", 100),
        "topics": TrainedDataset("clustering", "Identify the topic of the text", 50),
        "sentiment": TrainedDataset("classification", None, 80),
    }
    export_model(tiny_model(seed=3).eval(), AutoTokenizer.from_pretrained(minilm_dir()), out, eos_id=102,
                 max_seq_length=64, datasets=datasets, query_template=DEFAULT_QUERY_TEMPLATE)
    return out


def _task():
    from datasets import Dataset

    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    class TinyWebRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="TinyWebRetrieval", type="Retrieval", main_score="ndcg_at_10",
            description="Six web queries against twelve passages, graded relevance; defined in the test.",
            reference="https://github.com/embeddings-benchmark/mteb", dataset={"path": "NA", "revision": "NA"},
            category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"),
            dialect=[], domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived",
            modalities=["text"], sample_creation="found", bibtex_citation="",
        )

        def load_data(self, num_proc=None, **kwargs) -> None:
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": k, "text": v} for k, v in QUERIES.items()]),
                corpus=Dataset.from_list([{"id": k, "text": v, "title": ""} for k, v in DOCS.items()]),
                relevant_docs=QRELS, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return TinyWebRetrieval()


def test_export_prompts_follow_mteb_keys(export_dir):
    prompts = json.loads((export_dir / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {
        "web_search": WEB_PROMPT, "faq": "Instruct: Find the answer to the question\nQuery: ", "topics": TOPIC_PROMPT,
        # MTEB's keys: the retrieval prompt of the dataset with the most queries; no document prompt; none for a
        # type trained without an instruction
        "Retrieval-query": WEB_PROMPT, "Reranking-query": WEB_PROMPT, "Clustering": TOPIC_PROMPT,
    }


def test_mteb_evaluate_runs_the_export_with_the_trained_prompts(export_dir, tmp_path):
    from pipeline.evaluate import build_parser, run
    from pipeline.evaluation.mteb_eval import evaluate_mteb, load_sentence_transformer

    model = load_sentence_transformer(str(export_dir), "cpu")
    seen: dict[str, list] = {"query": [], "document": []}
    for kind in seen:  # record the prompt MTEB hands sentence-transformers for each kind of text
        encode = getattr(model, f"encode_{kind}")

        def recording(texts, *args, _encode=encode, _kind=kind, **kwargs):
            seen[_kind].append((kwargs.get("prompt"), kwargs.get("prompt_name"), len(texts)))
            return _encode(texts, *args, **kwargs)

        setattr(model, f"encode_{kind}", recording)
    results = evaluate_mteb(model, [_task()], batch_size=4, progress=False)
    res = results["TinyWebRetrieval"]
    assert res["main_score"] == "ndcg_at_10" and 0.0 <= res["score"] <= 1.0
    assert res["prompts"] == {"query": "Retrieval-query", "document": None}
    assert seen["query"] == [(WEB_PROMPT, None, len(QUERIES))]
    (doc_prompt, doc_prompt_name, n_docs), = seen["document"]
    assert not doc_prompt and doc_prompt_name is None and n_docs == len(DOCS)  # sentence-transformers' empty one
    test = res["scores"]["test"]["default"]
    assert test["ndcg_at_10"] == pytest.approx(res["score"])

    # The same data as a BEIR directory through pipeline.evaluate (our tokenization, packing and search; the
    # model's Retrieval-query prompt by default): the same nDCG@10 and recall.
    beir = tmp_path / "tiny_web"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                               for k, v in DOCS.items()))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in QUERIES.items()))
    with open(beir / "qrels" / "test.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["query-id", "corpus-id", "score"])
        writer.writerows((q, d, g) for q, docs in QRELS.items() for d, g in docs.items())
    ours = run(build_parser().parse_args(["--model", str(export_dir), "--beir", str(beir), "--no-progress",
                                          "--max-len", "64"]))["datasets"]["tiny_web"]
    assert ours["query_instruction"] == "model prompt 'Retrieval-query'"
    assert ours["ndcg@10"] == pytest.approx(test["ndcg_at_10"], abs=1e-4)
    assert ours["recall@10"] == pytest.approx(test["recall_at_10"], abs=1e-4)
    assert ours["mrr@10"] == pytest.approx(test["mrr_at_10"], abs=1e-4)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_mteb_cli_says_in_one_line_when_it_cannot(export_dir):
    proc = _cli("--model", str(export_dir), "--mteb", "SciFact", "--no-progress")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: --mteb SciFact: cannot load its data (")
    assert "Hugging Face Hub" in errors[0] and proc.stderr.strip().splitlines()[-1] == errors[0]
    proc = _cli("--model", str(export_dir), "--mteb", "NoSuchTask")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --mteb NoSuchTask: not an MTEB task")
    proc = _cli("--model", str(export_dir), "--mteb", "SciFact", "--dims", "32")
    assert proc.returncode == 2 and "--dims" in proc.stderr.strip().splitlines()[-1]
