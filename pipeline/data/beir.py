"""The BEIR directory format, read and checked line by line: the one reader of ``pipeline.evaluate --beir`` and of
``preprocess decontaminate`` (which must not import torch, so nothing here does).

A BEIR directory (Thakur et al. 2021, "BEIR: A Heterogeneous Benchmark for Zero-shot Evaluation of Information
Retrieval Models"; the layout of BEIR's ``GenericDataLoader``) holds ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (a header line, then ``query-id<TAB>corpus-id<TAB>
score`` with an integer grade). A split's queries are those its qrels judge, in order of first appearance (as BEIR
keeps them); corpus indices are line order in corpus.jsonl, blank lines skipped.

Every problem is one line naming the file and line, raised as the caller's error type (`error`, a ValueError
subclass): a missing file, a line that is not a JSON object with the string fields, a qrels line without an integer
grade, a judged query or document id that queries.jsonl / corpus.jsonl lacks, a needed document id that occurs twice.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

BEIR_CORPUS = "corpus.jsonl"
BEIR_QUERIES = "queries.jsonl"
BEIR_QRELS = "qrels"

Error = type[ValueError]


def beir_document(title: str | None, text: str) -> str:
    """A BEIR document as BEIR's own dense evaluation embeds it: title and text joined by one space, stripped
    (``(doc["title"] + " " + doc["text"]).strip()`` in beir/retrieval/models/sentence_bert.py,
    beir-cellar/beir); a missing or null title counts as empty."""
    return f"{title or ''} {text}".strip()


def jsonl_objects(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = (), *, error: Error
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a BEIR JSONL file; a line that is not a JSON object with string
    `required` fields (and string or null `optional` ones) is an `error` naming the file and line."""
    if not path.is_file():
        raise error(f"{path}: missing (a BEIR directory holds {BEIR_CORPUS}, {BEIR_QUERIES} and "
                    f"{BEIR_QRELS}/<split>.tsv)")
    with open(path, encoding="utf-8") as handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            for key in required:
                if not isinstance(obj.get(key), str):
                    what = "missing" if key not in obj else f"not a string ({obj[key]!r:.40})"
                    raise error(f"{path}:{n}: field {key!r} {what}")
            for key in optional:
                if obj.get(key) is not None and not isinstance(obj[key], str):
                    raise error(f"{path}:{n}: field {key!r} not a string ({obj[key]!r:.40})")
            yield n, obj


def corpus_documents(root: Path, *, error: Error) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every document of ``corpus.jsonl`` (string ``_id`` and ``text``, optional ``title``)."""
    return jsonl_objects(root / BEIR_CORPUS, ("_id", "text"), optional=("title",), error=error)


@dataclass
class Judged:
    """A split's judgements and the texts of the queries they judge.

    `grades`: {query id: {document id: grade}} (a repeated pair keeps its last grade, as BEIR's loader), queries in
    order of first appearance; `lines`: the first qrels line of each (query, document) pair; `queries`: the judged
    queries' texts from queries.jsonl."""

    path: Path
    grades: dict[str, dict[str, int]]
    lines: dict[tuple[str, str], int]
    queries: dict[str, str]

    def documents(self) -> set[str]:
        """Every judged document id (any grade)."""
        return {d for docs in self.grades.values() for d in docs}

    def check_documents(self, index: dict[str, int], corpus: Path, *, error: Error) -> None:
        """An `error` at the first qrels line judging a document that `index` (corpus ids -> indices) lacks."""
        unknown = [(self.lines[(q, d)], d) for q, docs in self.grades.items() for d in docs if d not in index]
        if unknown:
            line, did = min(unknown)
            raise error(f"{self.path}:{line}: document id {did!r} is not in {corpus} "
                        f"({len(unknown)} unknown document judgement(s))")


def read_judged(root: Path, split: str, *, error: Error) -> Judged:
    """``qrels/<split>.tsv`` of the BEIR directory `root` and the texts of the queries it judges (checked: the
    qrels lines, every judged query id present in queries.jsonl)."""
    path = root / BEIR_QRELS / f"{split}.tsv"
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise error(f"{path}: missing (no qrels for split {split!r}; "
                    f"{'have: ' + ', '.join(have) if have else 'no qrels/*.tsv at all'})")
    grades: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for n, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL), 1):
            if n == 1 or not row or not "".join(row).strip():
                continue  # the header (query-id, corpus-id, score), blank lines
            if len(row) < 3:
                raise error(f"{path}:{n}: expected query-id, corpus-id and score separated by tabs, got {row!r:.80}")
            qid, did, score = row[0], row[1], row[2].strip()
            try:
                grade = int(score)
            except ValueError:
                raise error(f"{path}:{n}: score {score!r} is not an integer relevance grade") from None
            grades.setdefault(qid, {})[did] = grade
            lines.setdefault((qid, did), n)
    if not grades:
        raise error(f"{path}: no judgements (expected a header line, then query-id, corpus-id, score)")
    queries: dict[str, str] = {}
    for _, q in jsonl_objects(root / BEIR_QUERIES, ("_id", "text"), error=error):
        if q["_id"] in grades:
            queries[q["_id"]] = q["text"]
    missing = [qid for qid in grades if qid not in queries]
    if missing:
        first = min(lines[(missing[0], d)] for d in grades[missing[0]])
        raise error(f"{path}:{first}: query id {missing[0]!r} is not in {root / BEIR_QUERIES} "
                    f"({len(missing)} unknown query id(s))")
    return Judged(path, grades, lines, queries)


def corpus_index(root: Path, needed: Iterable[str], *, error: Error) -> tuple[dict[str, int], int]:
    """One pass over corpus.jsonl: the corpus index of each `needed` document id that it holds, and its document
    count; a needed id that occurs twice is an `error` (it must name one document)."""
    needed = set(needed)
    index: dict[str, int] = {}
    n_docs = 0
    for n, doc in corpus_documents(root, error=error):
        did = doc["_id"]
        if did in needed:
            if did in index:
                raise error(f"{root / BEIR_CORPUS}:{n}: document id {did!r} occurs twice (a judged id must be unique)")
            index[did] = n_docs
        n_docs += 1
    return index, n_docs


def is_beir_dir(path: Path) -> bool:
    """Whether `path` looks like a BEIR directory (any of its three parts present)."""
    return (path / BEIR_QUERIES).is_file() or (path / BEIR_CORPUS).is_file() or (path / BEIR_QRELS).is_dir()
