"""Evaluation sets: queries, a candidate corpus and each query's relevant corpus ids, from raw pairs or shards.

* Raw data (:mod:`pipeline.data.raw`): each distinct query text is one query; its relevant documents are all
  positives of all its rows; the corpus is every positive and negative of the file, deduplicated in the order
  ``preprocess build`` assigns corpus ids (:func:`pipeline.data.raw.group_rows`).
* Shards: query rows with identical token sequences are merged, as raw queries with identical text are, so both
  paths give the same numbers on the same data.
* BEIR directories (Thakur et al. 2021, "BEIR: A Heterogeneous Benchmark for Zero-shot Evaluation of Information
  Retrieval Models"; the layout of BEIR's ``GenericDataLoader``): ``corpus.jsonl``, ``queries.jsonl`` and
  ``qrels/<split>.tsv`` with graded judgements, read as BEIR reads them; the corpus is streamed, never held.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.data.raw import RawStats, group_rows, read_rows
from pipeline.evaluation.retrieval import EvaluationError


@dataclass
class RawEvalSet:
    queries: list[str]  # raw query texts, no instruction
    docs: list[str]
    relevant: list[list[int]]
    skipped: dict[str, int]


def load_raw_eval_set(path: Path) -> RawEvalSet:
    """Queries (distinct texts, first-seen order), deduplicated corpus (positives and negatives) and relevance."""
    stats = RawStats()
    grouped = group_rows(read_rows(path, stats))
    if not grouped.queries:
        raise EvaluationError(
            f"{path}: no usable rows ({stats.raw_rows} read, skipped: {dict(stats.skipped) or 'none'})"
        )
    return RawEvalSet(grouped.queries, grouped.docs, grouped.positives_per_query(), dict(stats.skipped))


def shard_relevance(queries: Any, positives: np.ndarray) -> tuple[list[int], list[list[int]]]:
    """Merge shard query rows with identical tokens: (row index of each distinct query, its relevant corpus ids)."""
    first: dict[bytes, int] = {}
    rows: list[int] = []
    relevant: list[list[int]] = []
    for i in range(len(queries)):
        key = np.asarray(queries[i], dtype=np.int64).tobytes()
        qi = first.setdefault(key, len(first))
        if qi == len(rows):
            rows.append(i)
            relevant.append([])
        pos = int(positives[i])
        if pos not in relevant[qi]:
            relevant[qi].append(pos)
    return rows, relevant


# --------------------------------------------------------------------------------------------------------------
# BEIR directories
# --------------------------------------------------------------------------------------------------------------
BEIR_CORPUS = "corpus.jsonl"
BEIR_QUERIES = "queries.jsonl"
BEIR_QRELS = "qrels"


def beir_document(title: str | None, text: str) -> str:
    """A BEIR document as BEIR's own dense evaluation embeds it: title and text joined by one space, stripped
    (``(doc["title"] + " " + doc["text"]).strip()`` in beir/retrieval/models/sentence_bert.py,
    beir-cellar/beir); a missing or null title counts as empty."""
    return f"{title or ''} {text}".strip()


@dataclass
class BeirSet:
    """One BEIR directory's split: the judged queries, their relevance and the corpus (read again when streamed).

    Queries are those of ``qrels/<split>.tsv``, in order of first appearance (as BEIR keeps them); `relevant[i]`
    lists the corpus indices (line order of corpus.jsonl, blank lines skipped) judged > 0 for query i with their
    `grades`; `exclude[i]` is the corpus index of a document whose ``_id`` is the query's own (BEIR's
    ``ignore_identical_ids``), else -1."""

    name: str
    root: Path
    split: str
    query_ids: list[str]
    queries: list[str]
    relevant: list[list[int]]
    grades: list[list[float]]
    exclude: np.ndarray
    n_docs: int

    @property
    def queries_without_relevant(self) -> int:
        return sum(1 for r in self.relevant if not r)

    def documents(self, block: int) -> Iterator[list[str]]:
        """The corpus as texts (:func:`beir_document`), `block` documents at a time, in corpus index order."""
        texts: list[str] = []
        for _, doc in _jsonl(self.root / BEIR_CORPUS, ("_id", "text"), optional=("title",)):
            texts.append(beir_document(doc.get("title"), doc["text"]))
            if len(texts) == block:
                yield texts
                texts = []
        if texts:
            yield texts


def _jsonl(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file; a line that is not a JSON object with string
    `required` fields (and string or null `optional` ones) is an EvaluationError naming the file and line."""
    if not path.is_file():
        raise EvaluationError(f"{path}: missing (a BEIR directory holds {BEIR_CORPUS}, {BEIR_QUERIES} and "
                              f"{BEIR_QRELS}/<split>.tsv)")
    with open(path, encoding="utf-8") as handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvaluationError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise EvaluationError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            for key in required:
                if not isinstance(obj.get(key), str):
                    what = "missing" if key not in obj else f"not a string ({obj[key]!r:.40})"
                    raise EvaluationError(f"{path}:{n}: field {key!r} {what}")
            for key in optional:
                if obj.get(key) is not None and not isinstance(obj[key], str):
                    raise EvaluationError(f"{path}:{n}: field {key!r} not a string ({obj[key]!r:.40})")
            yield n, obj


def _read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    """BEIR qrels: a header line, then ``query-id<TAB>corpus-id<TAB>score`` (integer grade) per line. Returns
    {query: {doc: grade}} (a repeated pair keeps its last grade, as BEIR's loader) and the line of each pair."""
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise EvaluationError(f"{path}: missing (no qrels for split {path.stem!r}; "
                              f"{'have: ' + ', '.join(have) if have else 'no qrels/*.tsv at all'})")
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        for n, row in enumerate(reader, 1):
            if n == 1 or not row or not "".join(row).strip():
                continue  # the header (query-id, corpus-id, score), blank lines
            if len(row) < 3:
                raise EvaluationError(f"{path}:{n}: expected query-id, corpus-id and score separated by tabs, "
                                      f"got {row!r:.80}")
            qid, did, score = row[0], row[1], row[2].strip()
            try:
                grade = int(score)
            except ValueError:
                raise EvaluationError(f"{path}:{n}: score {score!r} is not an integer relevance grade") from None
            qrels.setdefault(qid, {})[did] = grade
            lines[(qid, did)] = n
    if not qrels:
        raise EvaluationError(f"{path}: no judgements (expected a header line, then query-id, corpus-id, score)")
    return qrels, lines


def load_beir(root: str | Path, split: str = "test") -> BeirSet:
    """Read and check a BEIR directory (``corpus.jsonl``: ``_id``, ``title``, ``text``; ``queries.jsonl``: ``_id``,
    ``text``; ``qrels/<split>.tsv``) without keeping the corpus in memory: one pass over corpus.jsonl maps the ids
    the qrels and queries need to corpus indices. Every problem is an EvaluationError naming the file and line: a
    missing file, a line that is not a JSON object with the string fields, a qrels line without an integer grade,
    a qrels query or document id that queries.jsonl / corpus.jsonl lacks, a judged document id that occurs twice."""
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"--beir {root}: not a directory")
    qrels_path = root / BEIR_QRELS / f"{split}.tsv"
    qrels, lines = _read_qrels(qrels_path)

    texts: dict[str, str] = {}
    for _, q in _jsonl(root / BEIR_QUERIES, ("_id", "text")):
        if q["_id"] in qrels:
            texts[q["_id"]] = q["text"]
    missing_q = [qid for qid in qrels if qid not in texts]
    if missing_q:
        first = min(lines[(missing_q[0], d)] for d in qrels[missing_q[0]])
        raise EvaluationError(f"{qrels_path}:{first}: query id {missing_q[0]!r} is not in {root / BEIR_QUERIES} "
                              f"({len(missing_q)} unknown query id(s))")

    needed = {d for docs in qrels.values() for d in docs} | set(qrels)
    index: dict[str, int] = {}
    n_docs = 0
    corpus_path = root / BEIR_CORPUS
    for n, doc in _jsonl(corpus_path, ("_id", "text"), optional=("title",)):
        did = doc["_id"]
        if did in needed:
            if did in index:
                raise EvaluationError(f"{corpus_path}:{n}: document id {did!r} occurs twice (a judged id must be "
                                      "unique)")
            index[did] = n_docs
        n_docs += 1
    if n_docs == 0:
        raise EvaluationError(f"{corpus_path}: no documents")
    unknown = [(lines[(q, d)], d) for q, docs in qrels.items() for d in docs if d not in index]
    if unknown:
        line, did = min(unknown)
        raise EvaluationError(f"{qrels_path}:{line}: document id {did!r} is not in {corpus_path} "
                              f"({len(unknown)} unknown document judgement(s))")

    relevant = [[index[d] for d, g in docs.items() if g > 0] for docs in qrels.values()]
    grades = [[float(g) for g in docs.values() if g > 0] for docs in qrels.values()]
    exclude = np.array([index.get(qid, -1) for qid in qrels], dtype=np.int64)
    return BeirSet(name=root.name, root=root, split=split, query_ids=list(qrels), queries=[texts[q] for q in qrels],
                   relevant=relevant, grades=grades, exclude=exclude, n_docs=n_docs)
