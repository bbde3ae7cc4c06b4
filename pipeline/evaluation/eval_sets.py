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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.data.beir import BEIR_CORPUS, beir_document, corpus_documents, corpus_index, read_judged
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
# BEIR directories (the files read and checked by pipeline.data.beir)
# --------------------------------------------------------------------------------------------------------------
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
        for _, doc in corpus_documents(self.root, error=EvaluationError):
            texts.append(beir_document(doc.get("title"), doc["text"]))
            if len(texts) == block:
                yield texts
                texts = []
        if texts:
            yield texts


def load_beir(root: str | Path, split: str = "test") -> BeirSet:
    """Read and check a BEIR directory (``corpus.jsonl``: ``_id``, ``title``, ``text``; ``queries.jsonl``: ``_id``,
    ``text``; ``qrels/<split>.tsv``) without keeping the corpus in memory: one pass over corpus.jsonl maps the ids
    the qrels and queries need to corpus indices. Every problem is an EvaluationError naming the file and line: a
    missing file, a line that is not a JSON object with the string fields, a qrels line without an integer grade,
    a qrels query or document id that queries.jsonl / corpus.jsonl lacks, a judged document id that occurs twice."""
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"--beir {root}: not a directory")
    judged = read_judged(root, split, error=EvaluationError)
    qrels = judged.grades
    # the judged documents, and a document with a query's own id (left out of that query's ranking)
    index, n_docs = corpus_index(root, judged.documents() | set(qrels), error=EvaluationError)
    if n_docs == 0:
        raise EvaluationError(f"{root / BEIR_CORPUS}: no documents")
    judged.check_documents(index, root / BEIR_CORPUS, error=EvaluationError)

    relevant = [[index[d] for d, g in docs.items() if g > 0] for docs in qrels.values()]
    grades = [[float(g) for g in docs.values() if g > 0] for docs in qrels.values()]
    exclude = np.array([index.get(qid, -1) for qid in qrels], dtype=np.int64)
    return BeirSet(name=root.name, root=root, split=split, query_ids=list(qrels),
                   queries=[judged.queries[q] for q in qrels],
                   relevant=relevant, grades=grades, exclude=exclude, n_docs=n_docs)
