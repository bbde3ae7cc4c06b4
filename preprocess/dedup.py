"""Dense first-seen ids for a stream of 128-bit keys, in memory that does not grow with the stream (spilled to disk).

The build numbers documents by first appearance: occurrence o (0, 1, 2, ... over the stream) gets
``id(o) = number of distinct keys whose first occurrence precedes the first occurrence f(o) of key(o)``, and
``o`` is *new* when ``f(o) == o``. Holding a dict of every key costs ~100 bytes per distinct document in Python;
here the work is done on disk in three steps:

1. :meth:`ExternalDedup.add`: every occurrence ``(hi, lo, o)`` (24 bytes) is appended to one of 256 bucket files
   chosen by the top bits of ``hi`` (:class:`preprocess.spill.BucketSpill`; keys are uniform hashes, so the buckets
   are even).
2. :meth:`ExternalDedup.finish`: per bucket (all occurrences of a key land in one bucket), a lexsort by
   (key, o) gives every occurrence its ``f``; the new occurrences are set in a bitmap over the stream (1 bit per
   occurrence) whose per-word popcounts, prefix-summed (``rank[w]`` = set bits before word w), give
   ``id = rank[f >> 6] + popcount(word[f >> 6] & ((1 << (f & 63)) - 1))``. Each bucket's ``(o, id)`` pairs are then
   routed to range files of ``range_size`` consecutive occurrences.
3. :meth:`ExternalDedup.take` hands the ids back in stream order, one range file at a time.

Memory: the bitmap and its ranks (2 bits per occurrence, i.e. 32 MiB per 10^8 occurrences), one bucket
(24 bytes x occurrences / 256, sorted with ~3x that in temporaries), one range (16 bytes x range_size) and the
add buffer (24 bytes x ``flush_every``). Disk: 40 bytes per occurrence, removed with the work directory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess.spill import BucketSpill

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount64(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (byte lookup table; numpy < 2.0 has no bitwise_count)."""
    return _POPCOUNT8[words.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int64)


class ExternalDedup:
    """See the module docstring. Usage: ``add`` (any number of times), ``finish`` once, then ``take`` in order."""

    def __init__(self, workdir: str | Path, *, range_size: int = 1 << 21, flush_every: int = 1 << 20) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.range_size = range_size
        self.count = 0
        self._spill = BucketSpill(self.dir, width=3, flush_every=flush_every)
        self._finished = False
        self._bitmap = np.zeros(0, dtype=np.uint64)
        self._rank = np.zeros(0, dtype=np.int64)
        self._pos = 0
        self._range_index = -1
        self._range_ids = np.zeros(0, dtype=np.int64)
        self.distinct = 0

    def _range(self, r: int) -> Path:
        return self.dir / f"range-{r:06d}.i64"

    # ------------------------------------------------------------------------------------------------ step 1
    def add(self, keys: np.ndarray) -> None:
        """Append occurrences: `keys` is [n, 2] uint64 (the two halves of each 128-bit key), in stream order."""
        if self._finished:
            raise RuntimeError("ExternalDedup.add after finish")
        n = len(keys)
        if n == 0:
            return
        records = np.empty((n, 3), dtype=np.uint64)
        records[:, :2] = keys
        records[:, 2] = np.arange(self.count, self.count + n, dtype=np.uint64)
        self.count += n
        self._spill.add(records)

    # ------------------------------------------------------------------------------------------------ step 2
    def finish(self) -> int:
        """Resolve every occurrence's id; returns the number of distinct keys."""
        self._finished = True
        n = self.count
        self._bitmap = np.zeros((n + 63) // 64, dtype=np.uint64)
        firsts: list[tuple[Path, int]] = []
        for path, records in self._spill.buckets():
            order = np.lexsort((records[:, 2], records[:, 1], records[:, 0]))
            records = records[order]
            head = np.ones(len(records), dtype=bool)
            head[1:] = (records[1:, 0] != records[:-1, 0]) | (records[1:, 1] != records[:-1, 1])
            occurrence = records[:, 2].astype(np.int64)
            first = occurrence[head][np.cumsum(head) - 1]  # each occurrence's key's first occurrence
            new = occurrence[head]
            np.bitwise_or.at(self._bitmap, new >> 6, np.uint64(1) << (new & 63).astype(np.uint64))
            pairs = np.stack([occurrence, first], axis=1)
            pairs.tofile(path)  # (o, f), rewritten in place of the bucket
            firsts.append((path, len(pairs)))
        counts = _popcount64(self._bitmap)
        self._rank = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._rank[1:])
        self.distinct = int(self._rank[-1])
        for path, _ in firsts:
            pairs = np.fromfile(path, dtype=np.int64).reshape(-1, 2)
            path.unlink()
            occurrence, first = pairs[:, 0], pairs[:, 1]
            pairs[:, 1] = self._ids_of(first)
            target = occurrence // self.range_size
            order = np.argsort(target, kind="stable")
            pairs, target = pairs[order], target[order]
            ranges = np.unique(target)
            bounds = np.searchsorted(target, np.append(ranges, ranges[-1] + 1) if len(ranges) else ranges)
            for i, r in enumerate(ranges.tolist()):
                with open(self._range(r), "ab") as handle:
                    handle.write(pairs[bounds[i] : bounds[i + 1]].tobytes())
        return self.distinct

    def _ids_of(self, first: np.ndarray) -> np.ndarray:
        word = first >> 6
        below = (np.uint64(1) << (first & 63).astype(np.uint64)) - np.uint64(1)
        return self._rank[word] + _popcount64(self._bitmap[word] & below)

    # ------------------------------------------------------------------------------------------------ step 3
    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `n` occurrences in stream order: (ids int64, new bool)."""
        if not self._finished:
            raise RuntimeError("ExternalDedup.take before finish")
        if self._pos + n > self.count:
            raise ValueError(f"ExternalDedup.take: {n} occurrences asked, {self.count - self._pos} left")
        ids = np.empty(n, dtype=np.int64)
        done = 0
        while done < n:
            r = (self._pos + done) // self.range_size
            if r != self._range_index:
                self._load_range(r)
            start = r * self.range_size
            lo = self._pos + done - start
            k = min(n - done, len(self._range_ids) - lo)
            ids[done : done + k] = self._range_ids[lo : lo + k]
            done += k
        positions = np.arange(self._pos, self._pos + n, dtype=np.int64)
        words = self._bitmap[positions >> 6]
        new = ((words >> (positions & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)
        self._pos += n
        return ids, new

    def _load_range(self, r: int) -> None:
        path = self._range(r)
        pairs = np.fromfile(path, dtype=np.int64).reshape(-1, 2)
        path.unlink()
        start = r * self.range_size
        ids = np.full(min(self.range_size, self.count - start), -1, dtype=np.int64)
        ids[pairs[:, 0] - start] = pairs[:, 1]
        self._range_ids, self._range_index = ids, r
