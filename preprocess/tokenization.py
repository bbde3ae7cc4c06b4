"""Token buffers of `preprocess build`: the tokenizer worker pool and the on-disk sink of token ids.

The tokenization rule itself (truncation, EOS) is :mod:`pipeline.data.tokenization`, shared with evaluation and
mining. Workers run :func:`pipeline.data.tokenization.encode_batch` from a serialised Rust backend
(:func:`write_backend`), so they do not import transformers or torch.
"""
from __future__ import annotations

import multiprocessing as mp
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from pipeline.data.tokenization import EncodeSpec, encode_batch, truncating_backend


def write_backend(tokenizer: Any, max_len: int, appends_eos: bool, path: Path) -> Path:
    """Serialise :func:`pipeline.data.tokenization.truncating_backend` to `path` (for the worker processes)."""
    truncating_backend(tokenizer, max_len, appends_eos).save(str(path))
    return path


class TokenSink:
    """Appends token batches to a raw file; `finish()` returns a memory-mapped values array and int64 offsets."""

    def __init__(self, path: Path, dtype: str) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self._handle = open(path, "wb")
        self._lengths: list[np.ndarray] = []
        self.tokens = 0

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        self._handle.write(values.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths)
        self.tokens += int(values.size)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self._handle.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype), offsets
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,)), offsets


def token_list_array(values: np.ndarray, offsets: np.ndarray) -> pa.LargeListArray:
    """Zero-copy Arrow `large_list<uint>` over a (possibly memory-mapped) values array and int64 offsets."""
    value_array = pa.Array.from_buffers(
        pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)]
    )
    return pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), value_array)


class Tokenizer:
    """Runs :func:`encode_batch` over text batches inline (workers <= 1) or in a pool of spawned processes."""

    def __init__(self, spec: EncodeSpec, workers: int, batch_texts: int = 1000) -> None:
        self.spec = spec
        self.batch_texts = batch_texts
        self._pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None

    def __enter__(self) -> "Tokenizer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def encode(self, texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (values, lengths) per batch of texts, in input order."""
        batches: Iterable[list[str]] = (
            texts[i : i + self.batch_texts] for i in range(0, len(texts), self.batch_texts)
        )
        func: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] = partial(encode_batch, self.spec)
        if self._pool is None:
            return map(func, batches)
        return self._pool.imap(func, batches)
