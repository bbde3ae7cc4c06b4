"""Texts -> token ids exactly as the shards hold them: one rule shared by the build, evaluation and mining.

Each sequence is ``tokenizer(text, add_special_tokens=True)`` truncated so that, with EOS, it holds at most
``max_len`` tokens, and always ends with EOS: tokenizers whose post-processor closes the input with EOS (or [SEP])
keep it through truncation; for the others (Qwen3, Llama) EOS is appended after truncation, as F2LLM does.

The work runs on the Rust `tokenizers.Tokenizer` behind the HF fast tokenizer (a copy with the truncation set in
it): the same ids as the HF call, without the Python wrapper per batch. An :class:`EncodeSpec` is picklable, so
worker processes (``preprocess build``) rebuild the same backend from it without importing transformers.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.shard_format import resolve_eos, token_dtype_for_vocab

MIN_MAX_LEN = 4


@dataclass(frozen=True)
class EncodeSpec:
    """Everything needed to tokenize like the shards; picklable.

    `backend_file`: the serialised Rust tokenizer with the truncation and no padding (see :func:`write_backend`);
    or `tokenizer`: a HF tokenizer directory to derive it from in this process.
    """

    max_len: int
    eos_id: int
    appends_eos: bool
    dtype: str
    backend_file: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False  # with `tokenizer`: run the code its directory ships (transformers' auto_map)


@lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """Load a HF tokenizer once per process (fast/Rust-backed when the directory provides one); `trust_remote_code`:
    run the code the directory ships (transformers' auto_map; without it such a directory fails to load). Callers
    must not modify the returned object (it is shared)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def encode_spec(tokenizer_path: str, max_len: int, *, trust_remote_code: bool = False) -> EncodeSpec:
    """The spec `preprocess build` uses for this tokenizer and max_len: its EOS, whether it appends EOS itself,
    and the token dtype its vocabulary needs. Raises ValueError naming ``--max-len`` when it is too small."""
    if max_len < MIN_MAX_LEN:
        raise ValueError(f"--max-len: must be at least {MIN_MAX_LEN}, got {max_len}")
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    eos_id, appends_eos = resolve_eos(tokenizer)
    dtype = token_dtype_for_vocab(max(len(tokenizer.get_vocab()), len(tokenizer)))
    return EncodeSpec(max_len=max_len, eos_id=eos_id, appends_eos=appends_eos, dtype=dtype.name,
                      tokenizer=tokenizer_path, trust_remote_code=trust_remote_code)


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


@lru_cache(maxsize=4)
def _backend_for(spec: EncodeSpec) -> Any:
    if spec.backend_file is not None:
        from tokenizers import Tokenizer as RustTokenizer

        return RustTokenizer.from_file(spec.backend_file)
    if spec.tokenizer is None:
        raise ValueError("EncodeSpec: needs backend_file or tokenizer")
    return truncating_backend(load_tokenizer(spec.tokenizer, spec.trust_remote_code), spec.max_len,
                              spec.appends_eos)


def encode_batch(spec: EncodeSpec, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize `texts` in one call; returns (concatenated ids, per-sequence lengths)."""
    backend = _backend_for(spec)
    ids = [enc.ids for enc in backend.encode_batch_fast(texts, add_special_tokens=True)]
    if not spec.appends_eos:
        ids = [seq + [spec.eos_id] for seq in ids]
    lengths = np.fromiter((len(seq) for seq in ids), dtype=np.int64, count=len(ids))
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=spec.dtype, count=int(lengths.sum()))
    return values, lengths


def tokenize_texts(
    texts: Sequence[str], spec: EncodeSpec, *, batch: int = 1000, desc: str = "tokenize", progress: bool = True
) -> list[np.ndarray]:
    """Token ids of `texts` (one batched call per `batch` texts), exactly as the shards hold them."""
    out: list[np.ndarray] = []
    with tqdm(total=len(texts), desc=desc, unit="text", dynamic_ncols=True, disable=not progress) as bar:
        for start in range(0, len(texts), batch):
            values, lengths = encode_batch(spec, list(texts[start : start + batch]))
            out.extend(np.split(values, np.cumsum(lengths)[:-1]))
            bar.update(len(lengths))
    return out
