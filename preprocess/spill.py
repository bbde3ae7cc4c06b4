"""Records too many to hold, spilled to disk in buckets: the external-memory step of the build's document dedup
(:mod:`preprocess.dedup`) and of decontamination's window index (:mod:`preprocess.decontaminate`).

uint64 records (rows of ``width`` columns) are buffered in memory and, every ``flush_every`` records, appended to one
of ``BUCKETS`` = 256 files chosen by the top 8 bits of the record's first column. The keys are uniform hashes, so the
buckets are even, and all records of one key land in one bucket: a bucket can then be sorted on its own. Memory: the
buffer (8 x width bytes x flush_every) while adding, one bucket at a time while reading.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

BUCKETS = 256
BUCKET_SHIFT = np.uint64(64 - 8)  # top 8 bits of the first column -> bucket (BUCKETS = 2^8)


class BucketSpill:
    """See the module docstring. Usage: :meth:`add` any number of times, then :meth:`buckets` once."""

    def __init__(self, workdir: Path, *, width: int, flush_every: int) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.width = width
        self.flush_every = flush_every
        self.count = 0  # records added
        self._pending: list[np.ndarray] = []
        self._pending_n = 0

    def path(self, b: int) -> Path:
        return self.dir / f"bucket-{b:03d}.u64"

    def add(self, records: np.ndarray) -> None:
        """Append `records`: [n, width] uint64 ([n] when width is 1)."""
        if len(records) == 0:
            return
        self._pending.append(records)
        self._pending_n += len(records)
        self.count += len(records)
        if self._pending_n >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records to their buckets (in the order they were added, within a bucket)."""
        if not self._pending:
            return
        records = np.concatenate(self._pending).reshape(-1, self.width)
        self._pending, self._pending_n = [], 0
        bucket = (records[:, 0] >> BUCKET_SHIFT).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        records, bucket = records[order], bucket[order]
        bounds = np.searchsorted(bucket, np.arange(BUCKETS + 1))
        for b in range(BUCKETS):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if hi > lo:
                with open(self.path(b), "ab") as handle:
                    handle.write(records[lo:hi].tobytes())

    def buckets(self) -> Iterator[tuple[Path, np.ndarray]]:
        """(file, records [m, width] uint64) of every non-empty bucket, in bucket order (the buffer flushed first);
        the files stay: the caller removes or reuses each."""
        self.flush()
        for b in range(BUCKETS):
            path = self.path(b)
            if path.exists():
                yield path, np.fromfile(path, dtype=np.uint64).reshape(-1, self.width)
