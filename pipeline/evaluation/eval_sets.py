"""Evaluation sets: queries, a candidate corpus and each query's relevant corpus ids, from raw pairs or shards.

* Raw data (:mod:`pipeline.data.raw`): each distinct query text is one query; its relevant documents are all
  positives of all its rows; the corpus is every positive and negative of the file, deduplicated in the order
  ``preprocess build`` assigns corpus ids (:func:`pipeline.data.raw.group_rows`).
* Shards: query rows with identical token sequences are merged, as raw queries with identical text are, so both
  paths give the same numbers on the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
