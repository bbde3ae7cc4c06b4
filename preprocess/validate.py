"""`preprocess validate`: full integrity check of a shard directory.

Checks, per dataset: files present, sizes and sha256 as in the manifest, Arrow structure (`validate(full=True)`),
the expected schema, counts equal to the manifest's, every sequence non-empty, at most `max_len`
tokens and ending with EOS, token ids below the vocabulary size, positive ids inside the corpus and negative ids
inside the corpus or -1; teacher scores (when `preprocess score` wrote them): [n_queries, 1 + K] float32, finite
for the positive and every filled slot, NaN exactly for the empty ones. The first problem found is raised as a
ShardError naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.shard_format import CORPUS, QUERIES, SCORES_FILE, ShardError
from pipeline.data.shards import ChunkedTokenTable, ShardDataset, ShardReader, TokenTable, _open_arrow


def _check_tokens(table: TokenTable | ChunkedTokenTable, max_len: int, eos_id: int, vocab_size: int) -> None:
    """Every part (record batch) of `table`; row numbers in messages are global rows of the table."""
    base = 0
    for part in table.parts:
        _check_part(part, base, max_len, eos_id, vocab_size)
        base += len(part)


def _check_part(table: TokenTable, base: int, max_len: int, eos_id: int, vocab_size: int) -> None:
    path = table.source
    lengths = table.lengths
    if len(lengths) and lengths.min() < 1:
        raise ShardError(f"{path}: row {base + int(np.argmin(lengths))} is empty")
    if len(lengths) and lengths.max() > max_len:
        raise ShardError(f"{path}: row {base + int(np.argmax(lengths))} has {int(lengths.max())} tokens > max_len "
                         f"{max_len}")
    if table.offsets[-1] != len(table.values):
        raise ShardError(f"{path}: offsets end at {table.offsets[-1]} but the token buffer holds {len(table.values)}")
    if len(lengths):
        last = table.values[table.offsets[1:] - 1]
        bad = np.flatnonzero(last != eos_id)
        if bad.size:
            raise ShardError(f"{path}: row {base + int(bad[0])} does not end with EOS id {eos_id}")
        top = int(table.values.max()) if len(table.values) else 0
        if top >= vocab_size:
            raise ShardError(f"{path}: token id {top} outside the vocabulary ({vocab_size})")


def validate_shards(root: str | Path) -> dict[str, int]:
    """Validate everything; returns {dataset: n_queries}. Raises ShardError on the first problem."""
    reader = ShardReader(root, verify=True)
    manifest = reader.manifest
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    out: dict[str, int] = {}
    for name, ds in reader.datasets.items():
        counts = ds.meta["counts"]
        for path in ds.table_paths(CORPUS) + ds.table_paths(QUERIES):
            try:
                _open_arrow(path).validate(full=True)
            except Exception as exc:  # pyarrow raises ArrowInvalid for structural problems
                raise ShardError(f"{path}: Arrow validation failed ({exc})") from None
        corpus_path, queries_path = ds.table_paths(CORPUS)[0], ds.table_paths(QUERIES)[0]
        if ds.num_docs != counts["corpus_docs"]:
            raise ShardError(f"{corpus_path}: {ds.num_docs} documents, manifest says {counts['corpus_docs']}")
        if ds.num_queries != counts["queries"]:
            raise ShardError(f"{queries_path}: {ds.num_queries} queries, manifest says {counts['queries']}")
        _check_tokens(ds.corpus, reader.max_len, reader.eos_id, vocab_size)
        _check_tokens(ds.queries, reader.max_len, reader.eos_id, vocab_size)
        if len(ds.positives) and (ds.positives.min() < 0 or ds.positives.max() >= ds.num_docs):
            raise ShardError(f"{queries_path}: positive id outside the corpus [0, {ds.num_docs})")
        if ds.negatives.size and (ds.negatives.min() < -1 or ds.negatives.max() >= ds.num_docs):
            raise ShardError(f"{queries_path}: negative id outside the corpus [0, {ds.num_docs}) and not -1")
        if SCORES_FILE in ds.meta["files"]:
            _check_scores(ds)
        out[name] = ds.num_queries
    return out


def _check_scores(ds: ShardDataset) -> None:
    path = ds.root / SCORES_FILE
    try:
        _open_arrow(path).validate(full=True)
    except ShardError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid for structural problems
        raise ShardError(f"{path}: Arrow validation failed ({exc})") from None
    if not ds.has_scores:
        raise ShardError(f"{path}: listed in the manifest's files but the dataset entry has no 'scores' record")
    scores = ds.scores
    empty = np.concatenate([np.zeros((ds.num_queries, 1), dtype=bool), ds.negatives < 0], axis=1)
    bad = np.argwhere(np.isfinite(scores) == empty)
    if bad.size:
        i, c = (int(x) for x in bad[0])
        what = "a score for an empty slot" if empty[i, c] else "no finite score"
        raise ShardError(f"{path}: query row {i}, column {c}: {what} (NaN must mark exactly the empty slots)")
