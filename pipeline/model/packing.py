"""Chunk planning and model inputs: padding-free packing (decoders) and length-bucketed padding (encoders).

Packed layout (decoders): the n sequences of a chunk are concatenated into ONE row of T = sum(len_i) tokens;
``position_ids`` restart at 0 for every sequence and ``attention_mask`` is None. transformers' masking utilities
detect the restarts (a position that is not the previous one + 1 starts a new sequence) and build a block-diagonal
causal mask for sdpa/eager; with flash_attention_2 the same layout runs through the varlen kernel, for which we also
pass ``cu_seq_lens_q/k`` and ``max_length_q/k`` explicitly (no recomputation, no host sync). Nothing is padded:
computed tokens == real tokens.

Padded layout (encoders, or decoders on request): an [n, L] right-padded matrix with an attention mask, L the
longest sequence of the chunk. Computed tokens = n * L. Length bucketing (sorting by length before chunking) keeps
L close to every member's length.

Padding efficiency = real tokens / computed tokens.

Varlen attention (``attn_implementation: varlen``, :mod:`pipeline.model.attention`): sdpa with a block-diagonal mask
still computes all T x T scores of the packed row (cost ~ T^2 instead of sum(len_i^2)); varlen attention attends
within each sequence only, with no mask at all, so a packed chunk costs what its sequences cost.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class ChunkInputs:
    """Model inputs of one chunk of n sequences, plus what pooling needs to find each sequence's tokens."""

    input_ids: torch.Tensor  # packed: [1, T]; padded: [n, L]
    position_ids: torch.Tensor | None  # packed: [1, T], restarting at 0 per sequence; padded: None
    attention_mask: torch.Tensor | None  # padded: [n, L] (1 = real); packed: None
    lengths: torch.Tensor  # [n] int64, real tokens per sequence
    starts: torch.Tensor  # [n] int64: packed, offset of each sequence in the row; padded, zeros
    cu_seqlens: torch.Tensor | None  # packed: [n + 1] int32 cumulative lengths (flash-attn varlen); padded: None
    max_length: int
    packed: bool

    @property
    def n(self) -> int:
        return int(self.lengths.numel())

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def computed_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> "ChunkInputs":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(
            self,
            input_ids=mv(self.input_ids),
            position_ids=mv(self.position_ids),
            attention_mask=mv(self.attention_mask),
            lengths=mv(self.lengths),
            starts=mv(self.starts),
            cu_seqlens=mv(self.cu_seqlens),
        )


def _as_ids(seq: np.ndarray) -> np.ndarray:
    if seq.ndim != 1 or seq.size == 0:
        raise ValueError(f"token sequence must be a non-empty 1-D array, got shape {seq.shape}")
    return np.asarray(seq, dtype=np.int64)


def pack(seqs: list[np.ndarray], *, pad_to: int | None = None, pad_id: int = 0) -> ChunkInputs:
    """Concatenate `seqs` into one row; position_ids restart at 0 for each sequence.

    `pad_to` (static chunk shapes, for compiled layers): a row shorter than `pad_to` tokens gets one dummy segment of
    `pad_id` tokens filling it to exactly `pad_to`; the dummy segment attends only to itself, is not one of the
    chunk's sequences (``lengths``, ``starts``: the real ones) and its output is never pooled. ``max_length`` is then
    `pad_to`, an upper bound that does not change from chunk to chunk. A row already longer is left as it is.
    """
    if not seqs:
        raise ValueError("pack: no sequences")
    arrays = [_as_ids(s) for s in seqs]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    segments = lengths
    total = int(lengths.sum())
    if pad_to is not None and total < pad_to:
        arrays.append(np.full(pad_to - total, pad_id, dtype=np.int64))
        segments = np.append(lengths, pad_to - total)
    ids = torch.from_numpy(np.concatenate(arrays)).unsqueeze(0)
    pos = torch.from_numpy(np.concatenate([np.arange(n, dtype=np.int64) for n in segments])).unsqueeze(0)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(segments)]).astype(np.int32))
    return ChunkInputs(
        input_ids=ids,
        position_ids=pos,
        attention_mask=None,
        lengths=torch.from_numpy(lengths),
        starts=torch.from_numpy(starts),
        cu_seqlens=cu,
        max_length=max(int(segments.max()), pad_to or 0),
        packed=True,
    )


def pad(seqs: list[np.ndarray], pad_id: int) -> ChunkInputs:
    """Right-pad `seqs` to the longest one: input_ids [n, L] and attention_mask [n, L]."""
    if not seqs:
        raise ValueError("pad: no sequences")
    arrays = [_as_ids(s) for s in seqs]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    width = int(lengths.max())
    ids = np.full((len(arrays), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(arrays), width), dtype=np.int64)
    for i, a in enumerate(arrays):
        ids[i, : a.size] = a
        mask[i, : a.size] = 1
    return ChunkInputs(
        input_ids=torch.from_numpy(ids),
        position_ids=None,
        attention_mask=torch.from_numpy(mask),
        lengths=torch.from_numpy(lengths),
        starts=torch.zeros(len(arrays), dtype=torch.int64),
        cu_seqlens=None,
        max_length=width,
        packed=False,
    )


def build_inputs(seqs: list[np.ndarray], *, packed: bool, pad_id: int, pad_to: int | None = None) -> ChunkInputs:
    """Packed (padded to `pad_to` tokens when given) or padded inputs of `seqs`."""
    return pack(seqs, pad_to=pad_to, pad_id=pad_id) if packed else pad(seqs, pad_id)


def chunk_cost(lengths: list[int] | np.ndarray, *, packed: bool, pad_to: int | None = None) -> int:
    """Computed tokens of one chunk: sum of lengths (packed; at least `pad_to` when chunks are padded to a static
    length) or n * max length (padded)."""
    if len(lengths) == 0:
        return 0
    if packed:
        return max(int(np.sum(lengths)), pad_to or 0)
    return int(len(lengths) * np.max(lengths))


def plan_chunks(
    lengths: list[int] | np.ndarray,
    *,
    packed: bool,
    chunk_tokens: int | None = None,
    chunk_size: int | None = None,
    bucket: bool = True,
) -> list[np.ndarray]:
    """Split sequence indices into chunks; returns a list of index arrays covering every index exactly once.

    - ``chunk_tokens``: greedy, each chunk's computed tokens (:func:`chunk_cost`) stay <= the budget; a single
      sequence longer than the budget gets a chunk of its own.
    - else ``chunk_size``: at most that many sequences per chunk.
    - neither: one chunk.
    Padded chunks are length-bucketed when ``bucket`` (indices sorted by length, longest first), so each chunk pads
    to a similar length. Packed chunks keep the input order (packing wastes nothing, sorting gains nothing).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = lengths.size
    if n == 0:
        return []
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    order = np.argsort(-lengths, kind="stable") if (bucket and not packed) else np.arange(n)
    if chunk_tokens is None and chunk_size is None:
        return [order]
    if chunk_tokens is None:
        return [order[i : i + chunk_size] for i in range(0, n, chunk_size)]
    chunks: list[np.ndarray] = []
    current: list[int] = []
    total = 0  # packed: sum of lengths so far
    longest = 0  # padded: longest length so far
    for idx in order:
        length = int(lengths[idx])
        if packed:
            fits = total + length <= chunk_tokens
        else:
            fits = (len(current) + 1) * max(longest, length) <= chunk_tokens
        if current and not fits:
            chunks.append(np.array(current, dtype=np.int64))
            current, total, longest = [], 0, 0
        current.append(int(idx))
        total += length
        longest = max(longest, length)
    if current:
        chunks.append(np.array(current, dtype=np.int64))
    return chunks


def padding_efficiency(real_tokens: int, computed_tokens: int) -> float:
    """real tokens / computed tokens (1.0 = no padding)."""
    return real_tokens / computed_tokens if computed_tokens else 1.0
