"""``gradcache.chunk_tokens``: ``auto`` - the largest power-of-two chunk that fits in the GPU memory a run leaves free,
and no larger than the work a rank has in a step -, and an explicit number checked to fit.

GradCache's peak memory is that of one chunk's forward + backward (the rest of the step holds embeddings only), so
the chunk size is what memory decides. On CUDA, at start, after the distillation teacher is loaded (the memory it
holds is not free) and before DeepSpeed partitions the student (so no rank takes part in a collective while it
probes, and an out-of-memory error stays local until the ranks agree):

    budget     = (free GPU memory - reserve) x (1 - 10% headroom)
    reserve    = what the optimizer and the step's gradients will hold per rank once DeepSpeed is set up (below)
    ceiling    = the smallest power of two >= W, W = the most real tokens one rank has in one of the first
                 :data:`WORK_SAMPLE_STEPS` steps (max over ranks; :func:`auto_ceiling`)
    candidates = min(2^17, ceiling), halving, down to the shards' max_len (rounded up to a power of two), >= 1024
    chunk      = the first candidate whose forward + backward of a synthetic packed chunk (sequences of max_len
                 tokens) runs without running out of memory and peaks within the budget

then the minimum over ranks. The value and the reason are logged. Without a GPU, ``auto`` is
min(:data:`DEFAULT_CHUNK_TOKENS`, ceiling).

When no candidate peaks within the budget (an estimate), but the smallest ran without running out of memory, the
run falls back to the smallest (:func:`pipeline.fallbacks.fall_back`: one WARNING naming the setting, the budget and
the peak; :attr:`ChunkChoice.fallback`). When even the smallest runs out of memory on a rank, every rank stops with
one line. An explicit number is a request: on CUDA one forward + backward of a chunk of that size runs at start, and
if it runs out of memory on any rank every rank stops with one line (:func:`pipeline.fallbacks.explicit_failure`).

The reserve, in bytes per rank, for P trainable parameters (``requires_grad``: the adapters alone under LoRA - frozen
weights have neither gradients nor optimizer state) on N ranks, with Adam in mixed precision as DeepSpeed runs it
(:func:`optimizer_reserve_bytes`, the settings read from the run's DeepSpeed config by :func:`optimizer_residency`):

    reserve = P x (12 g / d1  +  4 g / d2  +  b / d3  +  4 s)

    12 g / d1  fp32 master weights and Adam's two moments; d1 = N at ZeRO stage >= 1 (optimizer states partitioned),
               else 1
    4 g / d2   the fp32 gradient the optimizer steps with; d2 = N at stage >= 2 (gradients partitioned), else 1: at
               stage 1 with bf16 and fp32 grad_accum_dtype DeepSpeed's BF16_Optimizer accumulates the whole fp32
               gradient on every rank, and without ZeRO its FP16_Optimizer keeps a whole fp32 copy
    g          the share of the optimizer state on the GPU: 0 with ``zero_optimization.offload_optimizer.device``
               cpu or nvme (master weights, moments and their fp32 gradient partition live in host memory or on
               disk), 1 - ``offload_optimizer.ratio`` at stage 3 (partial offload), 1 without offload
    b / d3     the gradient in the parameters' dtype, b = 2 bytes (bf16, fp16) or 4 (fp32); d3 = 1 when the step's
               gradients stay whole on the parameters until one reduction at its end ("coalesced": DeepSpeed's
               coalesced reduction, stage 1-3 with a ZeRO optimizer, or a plain module), else d2 (stage 2/3 reduce
               each backward's gradients into the rank's partition)
    4 s        the fp32 sums of GradCache's fp32 accumulation (:class:`pipeline.training.backward.FP32Accumulator`):
               s = 1 for 16-bit parameters with ``gradcache.fp32_accumulation`` when coalesced, else 0 (DeepSpeed's
               grad_accum_dtype then sums into the fp32 gradient above)

DeepSpeed's reduce buckets and the parameters it gathers stay inside the headroom; under ZeRO-3 the probe runs on
the whole student, whose 16-bit weights are partitioned afterwards (more memory free than probed). Examples for
bf16 Adam with fp32 accumulation: Qwen3-4B with LoRA r 16 on all linear layers (P = 33.0M of 4.02B) on one
80 GB GPU, ZeRO-2: 22 x 33.0M = 0.73 GB (all 4.02B parameters counted: 88 GB, more than the GPU); full fine-tuning
of 4.02B on 8 ranks, ZeRO-2 or -3 coalesced: (12/8 + 4/8 + 2 + 4) x 4.02B = 32 GB; with
``ds_configs/zero3_offload.json``: (2 + 4) x 4.02B = 24 GB (no optimizer state on the GPU).

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
import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipeline.config import GradCacheConfig
from pipeline.fallbacks import Fallback, explicit_failure, fall_back, one_line
from pipeline.logs import log

DEFAULT_CHUNK_TOKENS = 8192
LARGEST_CANDIDATE = 1 << 17
SMALLEST_CANDIDATE = 1024
HEADROOM = 0.10
WORK_SAMPLE_STEPS = 8  # steps whose per-rank tokens bound auto (the trainer at start, and --check)
SETTING = "gradcache.chunk_tokens"
NO_FIT_ADVICE = ("use model.gradient_checkpointing, DeepSpeed offload (deepspeed: ds_configs/zero3_offload.json) or "
                 "model.lora")

PeakFn = Callable[[int], int]  # bytes one forward + backward of a `tokens`-token chunk peaks at; raises on OOM
AgreeFn = Callable[[list[int]], list[int]]  # element-wise maximum over ranks (one collective; identity alone)


def _alone(values: list[int]) -> list[int]:
    return values


@dataclass(frozen=True)
class OptimizerResidency:
    """Where a run keeps optimizer state and gradients on a rank: the terms of the reserve (module docstring). The
    defaults keep everything whole on the GPU (the largest reserve)."""

    stage: int = 0  # ZeRO stage 0-3
    on_gpu: float = 1.0  # g: the share of the optimizer state (and its fp32 gradient) on the GPU; 0: off it, or none
    coalesced: bool = True  # the step's gradients stay whole on the parameters until one reduction at its end

    @classmethod
    def plain(cls) -> "OptimizerResidency":
        """A plain module without an optimizer (``pipeline.gradcheck`` without DeepSpeed): gradients only."""
        return cls(stage=0, on_gpu=0.0, coalesced=True)


def optimizer_residency(ds_config: dict[str, Any], *, coalesce: bool) -> OptimizerResidency:
    """The :class:`OptimizerResidency` of a DeepSpeed engine built with `ds_config` (the dict given to
    ``deepspeed.initialize``); `coalesce`: ``gradcache.coalesce_grad_reduction``. The ZeRO section is read with
    DeepSpeed's own ``get_zero_config``, the engine's source of its stage. Coalescing needs a ZeRO optimizer (stage
    1-3), which DeepSpeed replaces by its BF16_Optimizer at stage 1 with bf16 and fp32 grad_accum_dtype without cpu
    offload (``DeepSpeedEngine._do_optimizer_sanity_check``)."""
    from deepspeed.runtime.config import DtypeEnum
    from deepspeed.runtime.zero.config import get_zero_config

    zero = get_zero_config(ds_config)
    stage = int(zero.stage)
    offload = zero.offload_optimizer
    device = "none" if offload is None else str(getattr(offload.device, "value", offload.device))
    if stage == 0 or device == "none":
        on_gpu = 1.0
    else:
        on_gpu = 1.0 - float(offload.ratio) if stage == 3 else 0.0
    bf16 = bool((ds_config.get("bf16") or {}).get("enabled", False))
    accum = (ds_config.get("data_types") or {}).get("grad_accum_dtype")
    try:
        fp32_accum = accum is not None and DtypeEnum(accum).value == torch.float32
    except ValueError:
        raise ValueError(f"data_types.grad_accum_dtype: {accum!r} is not a dtype DeepSpeed knows") from None
    bf16_optimizer = stage == 1 and bf16 and fp32_accum and device != "cpu"
    return OptimizerResidency(stage=stage, on_gpu=on_gpu, coalesced=coalesce and 1 <= stage <= 3 and not bf16_optimizer)


def optimizer_reserve_bytes(trainable: int, world_size: int, residency: OptimizerResidency, *, param_bytes: int,
                            fp32_sums: bool) -> int:
    """Bytes per rank that the optimizer and the step's gradients of `trainable` parameters (`param_bytes` each)
    will hold once DeepSpeed is set up: P x (12 g / d1 + 4 g / d2 + b / d3 + 4 s) (module docstring)."""
    n = max(int(world_size), 1)
    d1 = n if residency.stage >= 1 else 1
    d2 = n if residency.stage >= 2 else 1
    d3 = 1 if residency.coalesced else d2
    g = residency.on_gpu
    return int(trainable * (12 * g / d1 + 4 * g / d2 + param_bytes / d3 + (4 if fp32_sums else 0)))


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


def chunk_peak_bytes(model: torch.nn.Module, tokens: int, *, max_len: int, device: torch.device) -> int:
    """Bytes allocated above the start at the peak of one forward + backward of a synthetic packed chunk of `tokens`
    tokens (sequences of `max_len`): the chunk's activations and the backward's transient buffers. Each parameter's
    gradient is dropped as soon as it is accumulated (a post-accumulate hook), because the run's persistent
    gradients are in the reserve (:func:`optimizer_reserve_bytes`), which would otherwise count them twice. Raises
    ``torch.cuda.OutOfMemoryError`` when it runs out of memory. The RNG states are restored afterwards (the probe
    draws no dropout mask of the run)."""
    seqs = [np.full(min(max_len, tokens - start), 7, dtype=np.int64) for start in range(0, tokens, max_len)]
    params = [p for p in model.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        with torch.random.fork_rng(devices=[device]):
            emb = model(model.make_inputs(seqs))
            emb.float().sum().backward()
            del emb
        return torch.cuda.max_memory_allocated(device) - before
    finally:
        for hook in hooks:
            hook.remove()
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class ChunkRun:
    """One forward + backward of a chunk of `tokens` tokens: its peak, or the out-of-memory error it raised."""

    tokens: int
    peak: int | None  # bytes; None: ran out of memory
    error: BaseException | None = None  # the out-of-memory error, without its traceback (which holds the tensors)

    def fits(self, budget: int) -> bool:
        return self.peak is not None and self.peak <= budget


def run_chunk(peak: PeakFn, tokens: int) -> ChunkRun:
    """`peak` of `tokens`, an out-of-memory error recorded rather than raised."""
    try:
        return ChunkRun(tokens, int(peak(tokens)))
    except torch.cuda.OutOfMemoryError as exc:
        return ChunkRun(tokens, None, exc.with_traceback(None))


@dataclass(frozen=True)
class Probe:
    """One rank's probe of the descending candidate `sizes` against `budget`: the runs made, down to the first that
    fit (or all of them)."""

    sizes: tuple[int, ...]
    budget: int
    runs: tuple[ChunkRun, ...]

    @property
    def last(self) -> ChunkRun:
        """The last run: the chunk found, else the smallest candidate."""
        return self.runs[-1]

    @property
    def fits(self) -> bool:
        """A candidate ran within the budget."""
        return self.last.fits(self.budget)

    @property
    def fell_back(self) -> bool:
        """No candidate fit, but the smallest ran without running out of memory (it peaked above the budget)."""
        return not self.fits and self.last.peak is not None

    @property
    def failed(self) -> bool:
        """Even the smallest candidate ran out of memory."""
        return not self.fits and self.last.peak is None


def probe(sizes: list[int], budget: int, peak: PeakFn) -> Probe:
    """Run the descending `sizes` until one fits within `budget` (:func:`largest_fitting`), or all have run."""
    runs: list[ChunkRun] = []

    def fits(tokens: int) -> bool:
        runs.append(run_chunk(peak, tokens))
        return runs[-1].fits(budget)

    largest_fitting(sizes, fits)
    return Probe(tuple(sizes), budget, tuple(runs))


@dataclass(frozen=True)
class ChunkChoice:
    """The GradCache settings a run uses (``chunk_tokens`` a number), and the fallback ``auto`` took, if any."""

    gradcache: GradCacheConfig
    fallback: Fallback | None = None


def unprobed_chunk_tokens(work_tokens: int | None) -> int:
    """``auto`` where no GPU memory is probed: min(:data:`DEFAULT_CHUNK_TOKENS`, :func:`auto_ceiling`)."""
    return min(DEFAULT_CHUNK_TOKENS, auto_ceiling(work_tokens))


def planned_chunk_tokens(work_tokens: int | None, device_type: str) -> int:
    """``auto`` as ``--check`` plans with it, without probing: where :func:`resolve_chunk_tokens` probes (CUDA), the
    largest candidate it starts from (:func:`auto_ceiling`; the probe picks it or less); elsewhere what it picks
    (:func:`unprobed_chunk_tokens`)."""
    return auto_ceiling(work_tokens) if device_type == "cuda" else unprobed_chunk_tokens(work_tokens)


def describe_work(work_tokens: int | None) -> str:
    """The ceiling's reason, for the log and ``--check``."""
    if work_tokens is None:
        return "the work per step unknown"
    return (f"at most {auto_ceiling(work_tokens)} = the power of two >= {work_tokens:,}, the most real tokens a rank "
            f"has in one of the first {WORK_SAMPLE_STEPS} steps")


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _auto(result: Probe, free: int, reserve: int, agree: AgreeFn, work_tokens: int | None
          ) -> tuple[int, Fallback | None]:
    """The chunk every rank runs after its own :func:`probe` `result` (one collective: the smallest chunk, whether
    any rank fell back, whether any rank failed), and the fallback taken."""
    neg_tokens, fell_back, failed = agree([-result.last.tokens, int(result.fell_back), int(result.failed)])
    if failed:
        error = result.last.error
        where = " on another rank" if not result.failed else f" ({one_line(error)})" if error is not None else ""
        raise ValueError(f"{SETTING}: auto found no chunk that fits: even the smallest candidate, {result.sizes[-1]} "
                         f"tokens, ran out of GPU memory{where}; {NO_FIT_ADVICE}")
    tokens = -neg_tokens
    budget = (f"{_gib(result.budget)} = (free {_gib(free)} - reserve {_gib(reserve)} for the optimizer and "
              f"gradients) x {1 - HEADROOM:.2f}")
    if fell_back:
        why = (f"no candidate chunk peaked within the estimated budget of {budget}: the smallest, {tokens} tokens, "
               f"peaked at {_gib(result.last.peak)}" if result.fell_back else
               f"another rank found no candidate chunk within its estimated budget (here {budget})")
        return tokens, fall_back(SETTING, ValueError(why), f"chunk_tokens {tokens}, the smallest candidate, which ran "
                                                           "without running out of memory but peaked above the "
                                                           "estimated budget")
    log(f"{SETTING} auto: {tokens} (the largest power of two whose forward + backward fits in the estimated budget of "
        f"{budget}, minimum over ranks; {describe_work(work_tokens)}: chunks are balanced and never padded, so the "
        "largest chunk that fits gives the fewest chunks per step without padding)")
    return tokens, None


def _verify(tokens: int, peak: PeakFn, agree: AgreeFn) -> None:
    """An explicit ``chunk_tokens``: one forward + backward of a chunk of that size on every rank; ValueError on every
    rank when it ran out of memory on any (one collective)."""
    run = run_chunk(peak, tokens)
    (oom,) = agree([int(run.peak is None)])
    if oom:
        exc = run.error if run.error is not None else RuntimeError(
            f"a chunk of {tokens} tokens ran out of GPU memory on another rank")
        raise explicit_failure(SETTING, tokens, exc, "set it to auto (the largest chunk that fits) or smaller")
    log(f"{SETTING} {tokens}: one forward + backward of a chunk of {tokens} tokens ran, peaking at {_gib(run.peak)} "
        "(checked at start)")


def resolve_chunk_tokens(
    gc: GradCacheConfig, model: torch.nn.Module, device: torch.device, *, max_len: int, world_size: int,
    residency: OptimizerResidency = OptimizerResidency(), agree: AgreeFn = _alone, work_tokens: int | None = None,
    free_memory: Callable[[], int] | None = None, peak: PeakFn | None = None,
) -> ChunkChoice:
    """`gc` with ``chunk_tokens: auto`` replaced by a number (probed on CUDA), at most :func:`auto_ceiling` of
    `work_tokens` (the most real tokens a rank has in a step, the same on every rank; None: unknown); an explicit
    number checked on CUDA by one forward + backward (module docstring). `residency`: where the run keeps optimizer
    state and gradients (:func:`optimizer_residency`); `agree`: element-wise maximum over ranks (every rank calls
    it the same number of times). `free_memory` (bytes) and `peak` (:data:`PeakFn`) default to CUDA's
    ``mem_get_info`` and :func:`chunk_peak_bytes` of `model`. The choice and its reason are logged."""
    if device.type == "cuda":
        peak = peak or functools.partial(chunk_peak_bytes, model, max_len=max_len, device=device)
    if isinstance(gc.chunk_tokens, int):
        if device.type == "cuda":
            _verify(gc.chunk_tokens, peak, agree)
        return ChunkChoice(gc)
    if gc.chunk_tokens != "auto":
        return ChunkChoice(gc)
    if device.type != "cuda":
        tokens = unprobed_chunk_tokens(work_tokens)
        log(f"{SETTING} auto: {tokens} (no GPU memory to probe on {device.type}: {DEFAULT_CHUNK_TOKENS}, "
            f"{describe_work(work_tokens)})")
        return ChunkChoice(dataclasses.replace(gc, chunk_tokens=tokens))
    trainable = [p for p in model.parameters() if p.requires_grad]
    param_bytes = trainable[0].element_size() if trainable else 2
    reserve = optimizer_reserve_bytes(
        sum(p.numel() for p in trainable), world_size, residency, param_bytes=param_bytes,
        fp32_sums=param_bytes == 2 and gc.fp32_accumulation and residency.coalesced)
    free = int(free_memory() if free_memory is not None else torch.cuda.mem_get_info(device)[0])
    budget = int((free - reserve) * (1 - HEADROOM))
    result = probe(candidates(max_len, auto_ceiling(work_tokens)), budget, peak)
    tokens, fallback = _auto(result, free, reserve, agree, work_tokens)
    return ChunkChoice(dataclasses.replace(gc, chunk_tokens=tokens), fallback)
