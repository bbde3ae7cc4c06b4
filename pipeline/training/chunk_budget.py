"""``gradcache.chunk_tokens: auto``: the largest power-of-two chunk that fits in the GPU memory a run leaves free, and
no larger than the work a rank has in a step.

GradCache's peak memory is that of one chunk's forward + backward (the rest of the step holds embeddings only), so
the chunk size is what memory decides. On CUDA, at start, before DeepSpeed partitions the model (so no rank takes
part in a collective while it probes, and an out-of-memory error stays local):

    budget     = free GPU memory - reserve for the optimizer and gradients (Adam with ZeRO: 12 bytes per parameter
                 for fp32 master weights and moments, 4 for the fp32 gradient partition, divided over the ranks;
                 plus the 16-bit gradients, 2 per parameter, and the fp32 sums of coalesced fp32 accumulation,
                 4 per parameter) - 10% headroom
    ceiling    = the smallest power of two >= W, W = the most real tokens one rank has in one of the first
                 :data:`WORK_SAMPLE_STEPS` steps (max over ranks; :func:`auto_ceiling`)
    candidates = min(2^17, ceiling), halving, down to the shards' max_len (rounded up to a power of two), >= 1024
    chunk      = the first candidate whose forward + backward of a synthetic packed chunk (sequences of max_len
                 tokens) runs without running out of memory and peaks within the budget

then the minimum over ranks. The value and the reason are logged. Without a GPU, ``auto`` is
min(:data:`DEFAULT_CHUNK_TOKENS`, ceiling).

Why the largest that fits, and why the ceiling (the choice for throughput): a step of S tokens runs in
n = ceil(S / chunk) chunks (:func:`pipeline.model.packing.balanced_chunks`, balanced, never padded - compiled layers
included), so a larger chunk only lowers n: fewer kernel launches per token, fewer ZeRO-3 parameter gathers (three
per chunk and layer), larger matrix products - and never costs padding. Throughput is expected to grow with the
chunk until the GPU saturates and to stay flat after it; where it saturates is a GPU measurement not made yet
(``bench/gpu_bench.py`` on a lent GPU), so nothing smaller than the largest fitting chunk is preferred. A chunk
larger than the work buys nothing and holds memory, so ``auto`` stops at the ceiling: the power of two above W also
keeps steps up to 2x the sampled maximum in one chunk (a larger step runs in one more chunk; memory is what the
probe checked, whatever the data).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from pipeline.config import GradCacheConfig
from pipeline.logs import log

DEFAULT_CHUNK_TOKENS = 8192
LARGEST_CANDIDATE = 1 << 17
SMALLEST_CANDIDATE = 1024
HEADROOM = 0.10
WORK_SAMPLE_STEPS = 8  # steps whose per-rank tokens bound auto (the trainer at start, and --check)


def auto_ceiling(work_tokens: int | None) -> int:
    """The largest chunk ``auto`` considers: the smallest power of two >= `work_tokens` (the most real tokens a rank
    has in a step), at least :data:`SMALLEST_CANDIDATE`, at most :data:`LARGEST_CANDIDATE`; the latter when the
    work is unknown (None)."""
    if work_tokens is None:
        return LARGEST_CANDIDATE
    return min(LARGEST_CANDIDATE, max(SMALLEST_CANDIDATE, 1 << max(int(work_tokens) - 1, 0).bit_length()))


def candidates(max_len: int, ceiling: int = LARGEST_CANDIDATE) -> list[int]:
    """Powers of two from `ceiling` (:func:`auto_ceiling`) down to max(max_len rounded up to a power of two, 1024);
    the floor alone when the ceiling is below it (a chunk must hold the longest sequence)."""
    floor = max(SMALLEST_CANDIDATE, 1 << max(int(max_len) - 1, 1).bit_length())
    out, size = [], min(LARGEST_CANDIDATE, ceiling)
    while size >= floor:
        out.append(size)
        size //= 2
    return out or [floor]


def largest_fitting(sizes: list[int], fits: Callable[[int], bool]) -> int | None:
    """The first (largest) of the descending `sizes` for which `fits` is true; None when none is."""
    for size in sizes:
        if fits(size):
            return size
    return None


def optimizer_reserve_bytes(n_params: int, world_size: int, *, fp32_sums: bool) -> int:
    """Bytes per rank the optimizer step will add once DeepSpeed is set up (see the module docstring)."""
    return int(n_params * (12 + 4) / max(world_size, 1) + 2 * n_params + (4 * n_params if fp32_sums else 0))


def _chunk_fits(model: torch.nn.Module, tokens: int, max_len: int, budget: int, device: torch.device) -> bool:
    """One forward + backward of a packed chunk of `tokens` tokens; True when it ran and peaked within `budget`."""
    seqs = [np.full(min(max_len, tokens - start), 7, dtype=np.int64) for start in range(0, tokens, max_len)]
    params = [p for p in model.parameters() if p.requires_grad]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        emb = model(model.make_inputs(seqs))
        grads = torch.autograd.grad(emb.float().sum(), params)
        del emb, grads
        peak = torch.cuda.max_memory_allocated(device) - before
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()
    return peak <= budget


def probe_chunk_tokens(model: torch.nn.Module, device: torch.device, *, max_len: int, world_size: int,
                       fp32_sums: bool, ceiling: int = LARGEST_CANDIDATE) -> int:
    """The largest candidate chunk up to `ceiling` that fits on this rank (see the module docstring); this rank
    only."""
    free, _ = torch.cuda.mem_get_info(device)
    n_params = sum(p.numel() for p in model.parameters())
    budget = int((free - optimizer_reserve_bytes(n_params, world_size, fp32_sums=fp32_sums)) * (1 - HEADROOM))
    sizes = candidates(max_len, ceiling)
    found = largest_fitting(sizes, lambda t: _chunk_fits(model, t, max_len, budget, device))
    if found is None:
        raise ValueError(f"gradcache.chunk_tokens: auto found no chunk of >= {sizes[-1]} tokens that "
                         f"fits in {budget / 2**30:.1f} GiB; set it by hand, or use gradient checkpointing or offload")
    return found


def unprobed_chunk_tokens(work_tokens: int | None) -> int:
    """``auto`` where no GPU memory is probed: min(:data:`DEFAULT_CHUNK_TOKENS`, :func:`auto_ceiling`)."""
    return min(DEFAULT_CHUNK_TOKENS, auto_ceiling(work_tokens))


def describe_work(work_tokens: int | None) -> str:
    """The ceiling's reason, for the log and ``--check``."""
    if work_tokens is None:
        return "the work per step unknown"
    return (f"at most {auto_ceiling(work_tokens)} = the power of two >= {work_tokens:,}, the most real tokens a rank "
            f"has in one of the first {WORK_SAMPLE_STEPS} steps")


def resolve_chunk_tokens(
    gc: GradCacheConfig, model: torch.nn.Module, device: torch.device, *, max_len: int, world_size: int,
    agree_min: Callable[[int], int] = lambda value: value, work_tokens: int | None = None,
) -> GradCacheConfig:
    """`gc` with ``chunk_tokens: auto`` replaced by a number (probed on CUDA; `agree_min` = minimum over ranks), at
    most :func:`auto_ceiling` of `work_tokens` (the most real tokens a rank has in a step, the same on every rank;
    None: unknown). The choice and its reason are logged."""
    if gc.chunk_tokens != "auto":
        return gc
    ceiling = auto_ceiling(work_tokens)
    if device.type != "cuda":
        tokens = unprobed_chunk_tokens(work_tokens)
        log(f"gradcache.chunk_tokens auto: {tokens} (no GPU memory to probe on {device.type}: "
            f"{DEFAULT_CHUNK_TOKENS}, {describe_work(work_tokens)})")
    else:
        sixteen_bit = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
        fp32_sums = sixteen_bit and gc.fp32_accumulation and gc.coalesce_grad_reduction
        mine = probe_chunk_tokens(model, device, max_len=max_len, world_size=world_size, fp32_sums=fp32_sums,
                                  ceiling=ceiling)
        tokens = agree_min(mine)
        log(f"gradcache.chunk_tokens auto: {tokens} (the largest power of two whose forward + backward fits in the "
            f"GPU memory left for activations, minimum over ranks; {describe_work(work_tokens)}: chunks are balanced "
            "and never padded, so the largest chunk that fits gives the fewest chunks per step without padding)")
    return dataclasses.replace(gc, chunk_tokens=tokens)
