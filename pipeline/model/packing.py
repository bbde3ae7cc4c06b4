"""Chunk planning and model inputs: padding-free packing (decoders) and length-bucketed padding (encoders).

Packed layout (decoders): the n sequences of a chunk are concatenated into ONE row of T = sum(len_i) tokens;
``position_ids`` restart at 0 for every sequence and ``attention_mask`` is None. transformers' masking utilities
detect the restarts (a position that is not the previous one + 1 starts a new sequence) and build a block-diagonal
causal mask for sdpa/eager; with flash_attention_2 the same layout runs through the varlen kernel, for which we also
pass ``cu_seq_lens_q/k`` and ``max_length_q/k`` explicitly (no recomputation, no host sync). Nothing is padded:
computed tokens == real tokens, also with compiled layers (``model.compile``: the token dimension is dynamic,
:mod:`pipeline.model.compiled`).

Packed chunks under a token budget C (:func:`balanced_chunks`): the fewest chunks that fit, balanced in tokens - a
step of S real tokens becomes n ~ ceil(S / C) chunks of ~S / n tokens each, not C, C, ..., a remainder.

Padded layout (encoders, or decoders on request): an [n, L] right-padded matrix with an attention mask, L the
longest sequence of the chunk. Computed tokens = n * L. Length bucketing (sorting by length before chunking) keeps
L close to every member's length.

Padding efficiency = real tokens / computed tokens.

Varlen attention (``attn_implementation: varlen``, :mod:`pipeline.model.attention`): sdpa with a block-diagonal mask
still computes all T x T scores of the packed row (cost ~ T^2 instead of sum(len_i^2)); varlen attention attends
within each sequence only, with no mask at all, so a packed chunk costs what its sequences cost.
"""
from __future__ import annotations

import heapq
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


def pack(seqs: list[np.ndarray], *, max_length: int | None = None) -> ChunkInputs:
    """Concatenate `seqs` into one row; position_ids restart at 0 for each sequence.

    `max_length` (compiled layers): the bound on the sequence lengths the attention kernels are given, when it
    exceeds the chunk's longest sequence - a constant, so that a compiled graph does not specialise on each chunk's
    longest sequence (flash-attn and PyTorch's varlen kernel take it as an upper bound). None: the longest.
    """
    if not seqs:
        raise ValueError("pack: no sequences")
    arrays = [_as_ids(s) for s in seqs]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ids = torch.from_numpy(np.concatenate(arrays)).unsqueeze(0)
    pos = torch.from_numpy(np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])).unsqueeze(0)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return ChunkInputs(
        input_ids=ids,
        position_ids=pos,
        attention_mask=None,
        lengths=torch.from_numpy(lengths),
        starts=torch.from_numpy(starts),
        cu_seqlens=cu,
        max_length=max(int(lengths.max()), max_length or 0),
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


def build_inputs(seqs: list[np.ndarray], *, packed: bool, pad_id: int, max_length: int | None = None) -> ChunkInputs:
    """Packed (`max_length`: see :func:`pack`) or padded inputs of `seqs`."""
    return pack(seqs, max_length=max_length) if packed else pad(seqs, pad_id)


def chunk_cost(lengths: list[int] | np.ndarray, *, packed: bool) -> int:
    """Computed tokens of one chunk, = ``ChunkInputs.computed_tokens`` of its inputs: sum of lengths (packed, compiled
    or not: nothing is padded) or n * max length (padded)."""
    if len(lengths) == 0:
        return 0
    if packed:
        return int(np.sum(lengths))
    return int(len(lengths) * np.max(lengths))


def balanced_chunks(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Packed chunks of at most `budget` tokens each, as few as found and balanced in tokens.

    A sequence longer than the budget gets a chunk of its own. The others (S tokens, the longest L) go into n
    chunks, n tried from ceil(S / budget) upwards (no fewer can hold them): longest first, each to the chunk with the
    fewest tokens so far (LPT scheduling). The chunk that takes the last sequence p held at most (S - p) / n before,
    so the largest chunk is <= S / n + L: n = ceil(S / (budget - L)) always fits (and n = the number of sequences
    does), and with L << budget the first n tried almost always does - n chunks of ~S / n tokens, where filling each
    chunk up to the budget in turn would give budget, budget, ..., remainder. Indices ascend within a chunk; chunks
    are ordered by their first index; deterministic (ties go to the lower chunk)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    alone = [np.array([i], dtype=np.int64) for i in np.flatnonzero(lengths > budget)]
    rest = np.flatnonzero(lengths <= budget)
    chunks = alone
    if rest.size:
        order = rest[np.argsort(-lengths[rest], kind="stable")]
        n = max(1, -(-int(lengths[rest].sum()) // budget))
        while True:
            members = _longest_first(lengths, order, n)
            if max(int(lengths[m].sum()) for m in members) <= budget:
                break
            n += 1
        chunks = chunks + [np.sort(np.array(m, dtype=np.int64)) for m in members]
    return sorted(chunks, key=lambda c: int(c[0]))


def _longest_first(lengths: np.ndarray, order: np.ndarray, n: int) -> list[list[int]]:
    """`order` (indices, longest first) dealt into n chunks, each to the one with the fewest tokens so far (the
    lower chunk on a tie); empty chunks dropped (n larger than the sequences)."""
    heap = [(0, k) for k in range(n)]
    members: list[list[int]] = [[] for _ in range(n)]
    for idx in order:
        load, k = heapq.heappop(heap)
        members[k].append(int(idx))
        heapq.heappush(heap, (load + int(lengths[idx]), k))
    return [m for m in members if m]


def plan_chunks(
    lengths: list[int] | np.ndarray,
    *,
    packed: bool,
    chunk_tokens: int | None = None,
    chunk_size: int | None = None,
    bucket: bool = True,
) -> list[np.ndarray]:
    """Split sequence indices into chunks; returns a list of index arrays covering every index exactly once.

    - ``chunk_tokens``: each chunk's computed tokens (:func:`chunk_cost`) stay <= the budget; a single sequence
      longer than the budget gets a chunk of its own. Packed: :func:`balanced_chunks` (the fewest chunks found,
      balanced in tokens). Padded: greedy over the length-bucketed order.
    - else ``chunk_size``: at most that many sequences per chunk.
    - neither: one chunk.
    Padded chunks are length-bucketed when ``bucket`` (indices sorted by length, longest first), so each chunk pads
    to a similar length. Packed chunks by ``chunk_size`` keep the input order (packing wastes nothing).
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
    if packed:
        return balanced_chunks(lengths, chunk_tokens)
    chunks: list[np.ndarray] = []
    current: list[int] = []
    longest = 0  # longest length so far
    for idx in order:
        length = int(lengths[idx])
        if current and (len(current) + 1) * max(longest, length) > chunk_tokens:
            chunks.append(np.array(current, dtype=np.int64))
            current, longest = [], 0
        current.append(int(idx))
        longest = max(longest, length)
    if current:
        chunks.append(np.array(current, dtype=np.int64))
    return chunks


def padding_efficiency(real_tokens: int, computed_tokens: int) -> float:
    """real tokens / computed tokens (1.0 = no padding)."""
    return real_tokens / computed_tokens if computed_tokens else 1.0
