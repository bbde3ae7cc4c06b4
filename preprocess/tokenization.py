"""Batched fast-tokenizer calls in worker processes, streamed into one contiguous token buffer on disk.

Each sequence is ``tokenizer(text, add_special_tokens=True)`` truncated so that, with EOS, it holds at most
``max_len`` tokens, and always ends with EOS: tokenizers whose post-processor closes the input with EOS (or [SEP])
keep it through truncation; for the others (Qwen3, Llama) EOS is appended after truncation, as F2LLM does.

Workers run the Rust `tokenizers.Tokenizer` behind the HF fast tokenizer directly (serialised once, truncation
set in it): the same ids as the HF call, without importing transformers/torch in every worker or paying the
Python wrapper per batch.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

MIN_MAX_LEN = 4


@dataclass(frozen=True)
class EncodeSpec:
    """Everything a worker needs to tokenize; picklable.

    `backend_file`: the serialised Rust tokenizer with the build's truncation and no padding (see
    :func:`write_backend`); or, for in-process use, `tokenizer`: a HF tokenizer directory to derive it from.
    """

    max_len: int
    eos_id: int
    appends_eos: bool
    dtype: str
    backend_file: str | None = None
    tokenizer: str | None = None


@lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Any:
    """Load a HF tokenizer once per process (fast/Rust-backed when the directory provides one)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def truncating_backend(tokenizer: Any, max_len: int, appends_eos: bool) -> Any:
    """A copy of `tokenizer`'s Rust backend that truncates to `max_len` (`max_len - 1` when EOS is appended
    afterwards) and never pads."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')}: a fast tokenizer (tokenizer.json) is required"
        )
    from tokenizers import Tokenizer as RustTokenizer

    copy = RustTokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.enable_truncation(max_len if appends_eos else max_len - 1)
    return copy


def write_backend(tokenizer: Any, max_len: int, appends_eos: bool, path: Path) -> Path:
    """Serialise :func:`truncating_backend` to `path` (workers load it without importing transformers)."""
    truncating_backend(tokenizer, max_len, appends_eos).save(str(path))
    return path


@lru_cache(maxsize=4)
def _backend_for(spec: EncodeSpec) -> Any:
    if spec.backend_file is not None:
        from tokenizers import Tokenizer as RustTokenizer

        return RustTokenizer.from_file(spec.backend_file)
    if spec.tokenizer is None:
        raise ValueError("EncodeSpec: needs backend_file or tokenizer")
    return truncating_backend(load_tokenizer(spec.tokenizer), spec.max_len, spec.appends_eos)


def encode_batch(spec: EncodeSpec, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize `texts` in one call; returns (concatenated ids, per-sequence lengths)."""
    backend = _backend_for(spec)
    ids = [enc.ids for enc in backend.encode_batch_fast(texts, add_special_tokens=True)]
    if not spec.appends_eos:
        ids = [seq + [spec.eos_id] for seq in ids]
    lengths = np.fromiter((len(seq) for seq in ids), dtype=np.int64, count=len(ids))
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=spec.dtype, count=int(lengths.sum()))
    return values, lengths


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
