"""Streaming writer of one shard table (``corpus`` or ``queries``; layout in :mod:`pipeline.data.shard_format`).

Rows arrive in batches of token ids (+ positive / negative ids for queries) and are buffered until the buffer holds
``batch_bytes`` (token bytes + 8 bytes of offset per row + 8 x (1 + K) id bytes per query row); then a prefix of at
most ``batch_bytes`` (at least one row) is written as one record batch. A new file ``<kind>-<i+1>.arrow`` is started
when the next batch would take the current file past ``max_file_bytes`` (a file with a single batch may exceed it
only when that batch is one row). Memory is one buffer: O(batch_bytes), whatever the table size. Where batches
are cut depends only on the rows and the two limits, so the same rows always give the same files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data.shard_format import CORPUS, QUERIES, corpus_schema, queries_schema, table_file
from preprocess.tokenization import token_list_array

DEFAULT_BATCH_BYTES = 64 << 20
_FILE_OVERHEAD = 4096  # schema message, footer and per-batch metadata (bytes, generous)
_BATCH_OVERHEAD = 512


class TableWriter:
    """Writes `kind` into `directory` as ``<kind>-00000.arrow``, ... (see the module docstring)."""

    def __init__(self, directory: Path, kind: str, token_dtype: np.dtype, metadata: dict[str, str], *,
                 max_file_bytes: int, num_negatives: int = 0, batch_bytes: int = DEFAULT_BATCH_BYTES) -> None:
        if kind not in (CORPUS, QUERIES):
            raise ValueError(f"TableWriter: unknown table kind {kind!r}")
        self.dir = Path(directory)
        self.kind = kind
        self.dtype = np.dtype(token_dtype)
        self.width = max(num_negatives, 1)
        self.schema = (corpus_schema(self.dtype, metadata) if kind == CORPUS
                       else queries_schema(self.dtype, num_negatives, metadata))
        self.max_file_bytes = max_file_bytes
        self.batch_bytes = max(1, min(batch_bytes, max_file_bytes - _FILE_OVERHEAD - _BATCH_OVERHEAD))
        self.files: list[str] = []
        self.rows = 0
        self.tokens = 0
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self._buf_bytes = 0
        self._sink: pa.OSFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._file_bytes = 0

    def _row_bytes(self, lengths: np.ndarray) -> np.ndarray:
        extra = 8 + (8 * (1 + self.width) if self.kind == QUERIES else 0)
        return lengths.astype(np.int64) * self.dtype.itemsize + extra

    def add(self, values: np.ndarray, lengths: np.ndarray, positive: np.ndarray | None = None,
            negatives: np.ndarray | None = None) -> None:
        """Append rows: `values` their concatenated token ids, `lengths` per row; for queries also `positive` [n]
        and `negatives` [n, num_negatives] (-1 padded) corpus ids."""
        if len(lengths) == 0:
            return
        if self.kind == QUERIES:
            if positive is None or negatives is None:
                raise ValueError("TableWriter(queries).add: positive and negatives are required")
            padded = np.full((len(lengths), self.width), -1, dtype=np.int64)
            padded[:, : negatives.shape[1]] = negatives
            negatives = padded
        self._buf.append((values.astype(self.dtype, copy=False), lengths.astype(np.int64), positive, negatives))
        self._buf_bytes += int(self._row_bytes(lengths).sum())
        self.rows += len(lengths)
        self.tokens += int(values.size)
        if self._buf_bytes >= self.batch_bytes:
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        if not self._buf:
            return
        values = np.concatenate([b[0] for b in self._buf])
        lengths = np.concatenate([b[1] for b in self._buf])
        positive = np.concatenate([b[2] for b in self._buf]) if self.kind == QUERIES else None
        negatives = np.concatenate([b[3] for b in self._buf]) if self.kind == QUERIES else None
        self._buf, self._buf_bytes = [], 0
        cum = np.cumsum(self._row_bytes(lengths))
        row, token = 0, 0
        while row < len(lengths):
            base = cum[row - 1] if row else 0
            stop = int(np.searchsorted(cum, base + self.batch_bytes, side="right"))
            stop = max(stop, row + 1)
            if stop == len(lengths) and not final and cum[-1] - base < self.batch_bytes:
                break  # the rest waits for more rows
            n_tok = int(lengths[row:stop].sum())
            self._write(values[token : token + n_tok], lengths[row:stop],
                        None if positive is None else positive[row:stop],
                        None if negatives is None else negatives[row:stop], int(cum[stop - 1] - base))
            row, token = stop, token + n_tok
        if row < len(lengths):
            rest = (values[token:], lengths[row:], None if positive is None else positive[row:],
                    None if negatives is None else negatives[row:])
            self._buf = [rest]
            self._buf_bytes = int(cum[-1] - (cum[row - 1] if row else 0))

    def _open_next(self) -> None:
        self._close_file()
        name = table_file(self.kind, len(self.files))
        self.files.append(name)
        self._sink = pa.OSFile(str(self.dir / name), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._file_bytes = _FILE_OVERHEAD

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
        self._writer, self._sink = None, None

    def _write(self, values: np.ndarray, lengths: np.ndarray, positive: np.ndarray | None,
               negatives: np.ndarray | None, nbytes: int) -> None:
        size = nbytes + _BATCH_OVERHEAD
        if self._writer is None or (self._file_bytes > _FILE_OVERHEAD and self._file_bytes + size > self.max_file_bytes):
            self._open_next()
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        columns: list[pa.Array] = [token_list_array(values, offsets)]
        if self.kind == QUERIES:
            columns.append(pa.array(positive, type=pa.int64()))
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(negatives.reshape(-1), type=pa.int64()),
                                                             self.width))
        self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._file_bytes += size

    def close(self) -> list[str]:
        """Write what is buffered and close; returns the file names written (an empty table: one file, no rows)."""
        self._drain(final=True)
        if self._writer is None:
            self._open_next()
            self._write(np.zeros(0, dtype=self.dtype), np.zeros(0, dtype=np.int64),
                        np.zeros(0, dtype=np.int64), np.zeros((0, self.width), dtype=np.int64), 0)
        self._close_file()
        return list(self.files)
