"""Readers of the raw formats users bring, with row validation.

* F2LLM layout: ``<dataset>.parquet`` with string columns ``query``, ``passage`` and ``negative_1`` .. ``negative_K``
  (K >= 0, may differ between datasets; read in numeric order).
* JSONL (FlagEmbedding's format): one ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` per line. A line with
  several positives becomes one training row per positive, each with the same query and the same negatives
  (Tevatron/FlagEmbedding sample one positive per step; one row per pair keeps every positive and the row count
  honest). ``pos`` may also be a single string.

A row that cannot be trained on is skipped and counted under a reason (see :data:`SKIP_REASONS`); only a file that
cannot be read at all, or that has none of the needed columns, is an error.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

RAW_SUFFIXES = (".parquet", ".jsonl")
NEGATIVE_COLUMN = re.compile(r"^negative_(\d+)$")
SKIP_REASONS = (
    "missing_query",
    "empty_query",
    "non_string_query",
    "missing_passage",
    "empty_passage",
    "non_string_passage",
    "null_negative",
    "empty_negative",
    "non_string_negative",
    "invalid_json",
    "invalid_utf8",
    "unencodable_text",
)


class RawDataError(ValueError):
    """A raw file that cannot be read at all; the message names the file and the problem."""


@dataclass
class RawRow:
    query: str
    positive: str
    negatives: list[str]


@dataclass
class RawStats:
    raw_rows: int = 0
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)


def discover(raw: str | Path) -> dict[str, Path]:
    """Map dataset name -> raw file for a directory of .parquet/.jsonl files, or a single such file."""
    raw = Path(raw)
    if raw.is_file():
        files = [raw]
    elif raw.is_dir():
        files = sorted(p for p in raw.iterdir() if p.is_file() and p.suffix in RAW_SUFFIXES)
    else:
        raise RawDataError(f"{raw}: no such file or directory")
    found: dict[str, Path] = {}
    for path in files:
        if path.suffix not in RAW_SUFFIXES:
            raise RawDataError(f"{path}: unsupported raw format (expected .parquet or .jsonl)")
        if path.stem in found:
            raise RawDataError(f"{path}: dataset name {path.stem!r} also used by {found[path.stem]}")
        found[path.stem] = path
    if not found:
        raise RawDataError(f"{raw}: no .parquet or .jsonl files found")
    return found


def _check_text(value: Any, what: str) -> str | None:
    """Return the skip reason for a query/passage/negative value, or None when it is usable."""
    if value is None:
        return f"missing_{what}" if what != "negative" else "null_negative"
    if not isinstance(value, str):
        return f"non_string_{what}"
    if not value.strip():
        return f"empty_{what}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "unencodable_text"
    return None


def _validated(query: Any, positive: Any, negatives: list[Any], stats: RawStats) -> RawRow | None:
    for value, what in [(query, "query"), (positive, "passage")] + [(n, "negative") for n in negatives]:
        reason = _check_text(value, what)
        if reason:
            stats.skipped[reason] += 1
            return None
    stats.rows += 1
    return RawRow(query, positive, list(negatives))


def _read_parquet(path: Path, stats: RawStats, batch_rows: int = 8192) -> Iterator[RawRow]:
    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RawDataError(f"{path}: cannot read parquet ({exc})") from None
    names = handle.schema_arrow.names
    missing = [c for c in ("query", "passage") if c not in names]
    if missing:
        raise RawDataError(
            f"{path}: no usable columns: missing {', '.join(missing)} (found: {', '.join(names) or 'none'})"
        )
    neg_cols = sorted((c for c in names if NEGATIVE_COLUMN.match(c)), key=lambda c: int(c.split("_")[1]))
    columns = ["query", "passage", *neg_cols]
    try:
        for batch in handle.iter_batches(batch_size=batch_rows, columns=columns):
            cols = [batch.column(c).to_pylist() for c in columns]
            for values in zip(*cols):
                stats.raw_rows += 1
                row = _validated(values[0], values[1], list(values[2:]), stats)
                if row is not None:
                    yield row
    except (pa.ArrowInvalid, OSError) as exc:
        raise RawDataError(f"{path}: cannot read parquet ({exc})") from None


def _read_jsonl(path: Path, stats: RawStats) -> Iterator[RawRow]:
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise RawDataError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for line in handle:
            if not line.strip():
                continue
            stats.raw_rows += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                stats.skipped["invalid_utf8"] += 1
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                stats.skipped["invalid_json"] += 1
                continue
            if not isinstance(record, dict):
                stats.skipped["invalid_json"] += 1
                continue
            positives = record.get("pos")
            if isinstance(positives, list) and not positives:
                positives = None
            positives = positives if isinstance(positives, list) else [positives]
            negatives = record.get("neg") or []
            if not isinstance(negatives, list):
                negatives = [negatives]
            first = True
            for positive in positives:
                if not first:
                    stats.raw_rows += 1  # every extra positive is one more training row
                first = False
                row = _validated(record.get("query"), positive, negatives, stats)
                if row is not None:
                    yield row


def read_rows(path: str | Path, stats: RawStats) -> Iterator[RawRow]:
    """Yield the usable rows of a raw file; skipped rows are counted in `stats.skipped` by reason."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_parquet(path, stats)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, stats)
    raise RawDataError(f"{path}: unsupported raw format (expected .parquet or .jsonl)")
