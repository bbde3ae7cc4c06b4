"""Gradient caching (GradCache, Gao et al. 2021): exact full-batch contrastive gradients in chunk-sized memory.

For this rank's batch of sequences x (queries, positives, negatives) split into chunks c_1..c_K:
  1. e = f_theta(x) chunk by chunk WITHOUT a graph, saving the CPU/CUDA RNG state before each chunk;
  2. L(e) on leaf tensors e (requires_grad), gathered across ranks with gradient inside the loss, and
     g = dL/de by one backward through the loss only (no model activations are alive);
  3. per chunk: restore its RNG state (same dropout masks as in 1), recompute e_c with a graph and backpropagate
     the surrogate s_c = sum(e_c * g_c), whose parameter gradient is sum_c (de_c/dtheta)^T g_c = dL/dtheta.
Peak activation memory is that of ONE chunk, whatever the batch size; the price is one extra no-grad forward.

Distributed (torch.distributed or DeepSpeed): every rank runs the same number of chunks - the local count is
all-reduced (MAX) and short ranks run dummy chunks (a 2-token sequence, surrogate 0 * sum(e)); under ZeRO-3 each
forward all-gathers the parameters, so a missing forward would deadlock the others. Gradient scale: the loss of a
rank is the mean over its queries, gathered positives receive gradient from all ranks; averaging the parameter
gradients over ranks (DeepSpeed does it, and :func:`pipeline.distributed.average_gradients` without it) gives the
gradient of the global mean loss (see :mod:`pipeline.losses`).

Under a DeepSpeed engine (the recipe measured exact in shared/NOTES.md): gradient_accumulation_steps must be 1;
before each chunk's backward ``engine.set_gradient_accumulation_boundary(is_last_chunk)``, then
``engine.backward(surrogate, scale_wrt_gas=False)``; ``engine.step()`` once afterwards, by the caller. Optionally the
chunk backwards run inside ``engine.coalesce_grad_reduction()`` (DeepSpeed >= 0.19.2; ZeRO 1/2/3 with a ZeRO
optimizer) so the gradients are reduced once per step instead of once per chunk.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from pipeline import fault_injection
from pipeline.batch import ContrastiveBatch
from pipeline.config import GradCacheConfig, LossConfig
from pipeline.distributed import all_reduce_max, average_gradients, is_distributed, world_size
from pipeline.losses import contrastive_loss
from pipeline.packing import ChunkInputs, chunk_cost, padding_efficiency, plan_chunks


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------
@dataclass
class StepStats:
    """One step's loss and work. Token/sequence counts are summed over ranks; chunks are this rank's."""

    loss: float  # mean over ranks of each rank's loss
    parts: dict[str, float] = field(default_factory=dict)  # this rank's loss parts
    sequences: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    chunks: int = 0  # this rank's real chunks
    chunks_run: int = 0  # chunks run per forward pass, dummies included (equal on all ranks)
    coalesced: bool = False  # gradient reduction coalesced over the chunks (DeepSpeed)

    @property
    def padding_efficiency(self) -> float:
        return padding_efficiency(self.real_tokens, self.computed_tokens)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RngState:
    """CPU and (when on CUDA) the device's RNG state: replaying it reproduces the dropout masks."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def is_deepspeed_engine(model: nn.Module) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return False
    return isinstance(model, DeepSpeedEngine)


def base_module(model: nn.Module) -> nn.Module:
    """The EmbeddingModel inside a DeepSpeed engine (or the model itself)."""
    return model.module if is_deepspeed_engine(model) else model


def coalescing_supported(engine: Any) -> bool:
    """Whether engine.coalesce_grad_reduction() exists and accepts this engine (ZeRO 1-3, ZeRO optimizer)."""
    if not hasattr(engine, "coalesce_grad_reduction"):
        return False
    try:
        managed = engine.managed_gradient_accumulation() if hasattr(engine, "managed_gradient_accumulation") else True
        return (
            managed
            and int(engine.zero_optimization_stage()) in (1, 2, 3)
            and not getattr(engine, "pipeline_parallelism", False)
            and hasattr(engine.optimizer, "_coalesce_grad_reduction")
        )
    except Exception:  # noqa: BLE001 - any surprise means: do not use it
        return False


def _check_engine(engine: Any) -> None:
    if engine.gradient_accumulation_steps() != 1:
        raise ValueError(
            f"GradCache under DeepSpeed needs gradient_accumulation_steps 1, got {engine.gradient_accumulation_steps()}"
        )


@dataclass
class _Plan:
    seqs: list[np.ndarray]
    chunks: list[np.ndarray]  # index arrays into seqs
    n_run: int  # chunks every rank runs (max over ranks)

    def inputs(self, model: nn.Module) -> Iterator[tuple[ChunkInputs, np.ndarray | None]]:
        """(inputs, indices) per chunk, then (dummy inputs, None) up to n_run."""
        for idx in self.chunks:
            yield model.make_inputs([self.seqs[i] for i in idx]), idx
        for _ in range(self.n_run - len(self.chunks)):
            yield model.make_inputs([np.array([model.pad_id, model.pad_id], dtype=np.int64)]), None


def _plan(model: nn.Module, batch: ContrastiveBatch, gc: GradCacheConfig, device: torch.device) -> _Plan:
    seqs = batch.sequences()
    chunks = plan_chunks(
        [len(s) for s in seqs], packed=model.packed, chunk_tokens=gc.chunk_tokens, chunk_size=gc.chunk_size
    )
    return _Plan(seqs, chunks, all_reduce_max(len(chunks), device))


def _split(e: torch.Tensor, batch: ContrastiveBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = batch.size
    return e[:b], e[b : 2 * b], e[2 * b :]


def _finish_stats(loss: float, parts: dict[str, float], plan: _Plan, model: nn.Module, device: torch.device) -> StepStats:
    real = sum(len(s) for s in plan.seqs)
    computed = sum(chunk_cost([len(plan.seqs[i]) for i in idx], packed=model.packed) for idx in plan.chunks)
    totals = torch.tensor([loss, len(plan.seqs), real, computed], dtype=torch.float64, device=device)
    if is_distributed():
        torch.distributed.all_reduce(totals)
        totals[0] /= world_size()
    return StepStats(
        loss=float(totals[0]),
        parts=parts,
        sequences=int(totals[1]),
        real_tokens=int(totals[2]),
        computed_tokens=int(totals[3]),
        chunks=len(plan.chunks),
        chunks_run=plan.n_run,
    )


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------
def _embed_without_grad(
    model: nn.Module, base: nn.Module, plan: _Plan, device: torch.device, states: list[RngState] | None = None
) -> torch.Tensor:
    """[n_seqs, d] fp32 embeddings of every chunk of `plan` (dummy chunks run, results dropped), no graph.
    When `states` is given, the RNG state each chunk started from is appended to it."""
    pieces: list[tuple[np.ndarray, torch.Tensor]] = []
    with torch.no_grad():
        for inputs, idx in plan.inputs(base):
            if states is not None:
                states.append(RngState.capture(device))
            emb = model(inputs)
            if idx is not None:
                pieces.append((idx, emb))
    cache = torch.empty((len(plan.seqs), pieces[0][1].shape[-1]), dtype=torch.float32, device=device)
    for idx, emb in pieces:
        cache[torch.as_tensor(idx, device=device)] = emb.float()
    return cache


def batch_loss(model: nn.Module, batch: ContrastiveBatch, loss_cfg: LossConfig, gc_cfg: GradCacheConfig) -> float:
    """The contrastive loss of `batch` without gradients (validation): chunked like training, with the chunk
    count padded across ranks, so ZeRO-3's parameter gathers stay in step. Call in eval mode for no dropout."""
    base = base_module(model)
    device = base.device
    plan = _plan(base, batch, gc_cfg, device)
    embeddings = _embed_without_grad(model, base, plan, device)
    with torch.no_grad():
        out = contrastive_loss(*_split(embeddings, batch), batch.n_neg, batch.dataset_type, loss_cfg)
    return float(out.total)


def cached_step(
    model: nn.Module,
    batch: ContrastiveBatch,
    loss_cfg: LossConfig,
    gc_cfg: GradCacheConfig,
) -> StepStats:
    """Accumulate the exact gradient of the contrastive loss of `batch` into the parameters' grads, chunk by chunk.

    `model`: an EmbeddingModel (single process or torch.distributed; parameter grads are averaged over ranks here)
    or a DeepSpeed engine around one (DeepSpeed reduces; call ``engine.step()`` afterwards). Call with zeroed grads.
    """
    engine = model if is_deepspeed_engine(model) else None
    base = base_module(model)
    device = base.device
    if engine is not None:
        _check_engine(engine)
    plan = _plan(base, batch, gc_cfg, device)

    # 1. Embeddings without a graph, remembering the RNG state each chunk started from.
    states: list[RngState] = []
    cache = _embed_without_grad(model, base, plan, device, states)
    rng_after = RngState.capture(device)

    # 2. Loss on leaf embeddings (gathered across ranks inside), gradient w.r.t. them.
    cache.requires_grad_(True)
    out = contrastive_loss(*_split(cache, batch), batch.n_neg, batch.dataset_type, loss_cfg)
    total = fault_injection.poison_loss(out.total)  # identity unless a resilience test asks for NaN
    total.backward()
    grad = cache.grad
    loss = float(total.detach())
    parts = out.parts
    del out

    # 3. Replay each chunk with a graph; backpropagate sum(e_c * g_c).
    coalesce = engine is not None and gc_cfg.coalesce_grad_reduction and coalescing_supported(engine)
    if engine is not None and coalesce:
        engine.set_gradient_accumulation_boundary(True)  # restored by the context on exit; step() needs it
    ctx = engine.coalesce_grad_reduction() if coalesce else contextlib.nullcontext()
    with ctx:
        for k, (inputs, idx) in enumerate(plan.inputs(base)):
            states[k].restore()
            emb = model(inputs)
            if idx is None:
                surrogate = emb.sum() * 0.0
            else:
                surrogate = (emb.float() * grad[torch.as_tensor(idx, device=device)]).sum()
            if engine is None:
                surrogate.backward()
            else:
                engine.set_gradient_accumulation_boundary(False if coalesce else k == plan.n_run - 1)
                engine.backward(surrogate, scale_wrt_gas=False)
    rng_after.restore()
    if engine is None:
        average_gradients([p for p in base.parameters() if p.requires_grad])
    stats = _finish_stats(loss, parts, plan, base, device)
    stats.coalesced = coalesce
    return stats


def plain_step(
    model: nn.Module,
    batch: ContrastiveBatch,
    loss_cfg: LossConfig,
    gc_cfg: GradCacheConfig,
) -> StepStats:
    """The same gradient without caching: every chunk's graph is kept alive until one backward of the loss.

    Chunks (and so dropout masks, given the same RNG state) are those of :func:`cached_step`, making the two
    directly comparable; memory grows with the batch. Under DeepSpeed one ``engine.backward(loss)`` at the boundary.
    """
    engine = model if is_deepspeed_engine(model) else None
    base = base_module(model)
    device = base.device
    if engine is not None:
        _check_engine(engine)
    plan = _plan(base, batch, gc_cfg, device)
    pieces: list[tuple[np.ndarray, torch.Tensor]] = []
    dummy = None
    for inputs, idx in plan.inputs(base):
        emb = model(inputs)
        if idx is None:  # keeps every rank's backward graph (ZeRO-3 gathers) the same size
            dummy = emb.sum() * 0.0 if dummy is None else dummy + emb.sum() * 0.0
        else:
            pieces.append((idx, emb.float()))
    order = torch.as_tensor(np.concatenate([idx for idx, _ in pieces]), device=device)
    e = torch.empty((len(plan.seqs), pieces[0][1].shape[-1]), dtype=torch.float32, device=device)
    e = e.index_copy(0, order, torch.cat([emb for _, emb in pieces]))
    out = contrastive_loss(*_split(e, batch), batch.n_neg, batch.dataset_type, loss_cfg)
    loss = fault_injection.poison_loss(out.total)  # identity unless a resilience test asks for NaN
    total = loss if dummy is None else loss + dummy
    if engine is None:
        total.backward()
        average_gradients([p for p in base.parameters() if p.requires_grad])
    else:
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(total, scale_wrt_gas=False)
    return _finish_stats(float(loss.detach()), out.parts, plan, base, device)


# --------------------------------------------------------------------------------------------------------------
# Non-finite steps
# --------------------------------------------------------------------------------------------------------------
def local_grads_finite(model: nn.Module) -> bool:
    """Whether this rank's gradients after the step's backward are all finite. No collective: all-reduce the
    answer (MAX of "not finite") so that every rank takes the same decision.

    Under ZeRO-3 a rank holds the reduced gradient partitions of its parameter shards
    (``deepspeed.utils.safe_get_local_grad``); otherwise the ``.grad`` of the parameters (plain model, ZeRO-0), plus
    the optimizer's reduced partitions where a ZeRO-1/2 optimizer keeps them (``averaged_gradients``).
    """
    engine = model if is_deepspeed_engine(model) else None
    base = base_module(model)
    grads: list[torch.Tensor] = []
    for p in base.parameters():
        if not p.requires_grad:
            continue
        if engine is not None and hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_local_grad

            g = safe_get_local_grad(p)
        else:
            g = p.grad
        if g is not None:
            grads.append(g)
    averaged = getattr(engine.optimizer, "averaged_gradients", None) if engine is not None else None
    if engine is not None and int(engine.zero_optimization_stage()) in (1, 2) and isinstance(averaged, dict):
        for group in averaged.values():
            if isinstance(group, torch.Tensor):
                grads.append(group)
            elif group:
                grads.extend(g for g in group if g is not None)
    if not grads:
        return True
    bad = torch.zeros((), dtype=torch.bool, device=grads[0].device)
    for g in grads:
        bad |= ~torch.isfinite(g.detach()).all().to(bad.device)
    return not bool(bad)


def discard_gradients(model: nn.Module) -> None:
    """Throw away the step's gradients WITHOUT an optimizer update (a skipped step).

    Under DeepSpeed this is what its own optimizers do on an fp16 overflow (``_overflow_clean_up``):
    ``optimizer.zero_grad(set_to_none=True)``, which also resets ZeRO's micro-step counter so that the next backward
    overwrites (not accumulates into) the reduced partitions, and dropping the reduced-gradient lists (or, with CPU
    offload, resetting the offload buffers). ``engine.step()`` is not called: optimizer moments and step count,
    the lr scheduler and the engine's step counters stay where they were.
    """
    engine = model if is_deepspeed_engine(model) else None
    if engine is None:
        for p in base_module(model).parameters():
            p.grad = None
        return
    optimizer = engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    if getattr(optimizer, "offload_optimizer", False) and hasattr(optimizer, "reset_cpu_buffers"):
        optimizer.reset_cpu_buffers()
    elif isinstance(getattr(optimizer, "averaged_gradients", None), dict):
        optimizer.averaged_gradients = {}
    engine.zero_grad()


def train_step(
    model: nn.Module,
    batch: ContrastiveBatch,
    loss_cfg: LossConfig,
    gc_cfg: GradCacheConfig,
) -> StepStats:
    """:func:`cached_step` when ``gc_cfg.enabled``, else :func:`plain_step` (same gradient, memory grows with B)."""
    return (cached_step if gc_cfg.enabled else plain_step)(model, batch, loss_cfg, gc_cfg)
