"""Gradient caching (GradCache, Gao et al. 2021): exact full-batch contrastive gradients in chunk-sized memory.

For this rank's batch of sequences x (queries, positives, negatives) split into chunks c_1..c_K:
  1. e = f_theta(x) chunk by chunk WITHOUT a graph, saving the CPU/CUDA RNG state before each chunk;
  2. L(e) on leaf tensors e (requires_grad), gathered across ranks with gradient inside the loss, and
     g = dL/de by one backward through the loss only (no model activations are alive);
  3. per chunk: restore its RNG state (same dropout masks as in 1), recompute e_c with a graph and backpropagate
     the surrogate s_c = sum(e_c * g_c), whose parameter gradient is sum_c (de_c/dtheta)^T g_c = dL/dtheta.
Peak activation memory is that of ONE chunk, whatever the batch size; the price is one extra no-grad forward.

Exactness rests on step 3 reproducing step 1 bit for bit: the same chunks, the same RNG state, and kernels that give
the same result twice for the same input. Step 3 checks it for free - each re-computed e_c is compared with the cached
one (:attr:`StepStats.replay_max_diff`, the max |e_c' - e_c| over chunks and ranks; 0.0 when the replay is exact). A
non-zero value means g was computed at other embeddings than the ones differentiated: a nondeterministic kernel, an
RNG stream the state capture does not cover, or a one-time initialisation that changed a kernel's result between the
two passes. The trainer logs it every step and warns once; ``python -m pipeline.gradcheck`` fails on it.

Distributed (torch.distributed or DeepSpeed): every rank runs the same number of chunks - the local count is
all-reduced (MAX) and short ranks run dummy chunks (a 2-token sequence, surrogate 0 * sum(e)); under ZeRO-3 each
forward all-gathers the parameters, so a missing forward would deadlock the others; a rank whose batch is empty (a
dataset's last, small global batch) runs dummy chunks only and still joins the loss's gathers. Gradient scale: the
loss of a rank is the sum over its queries times W / G (its mean weighted by its share of the step's queries),
gathered positives receive gradient from all ranks; averaging the parameter gradients over ranks (DeepSpeed does
it, and :class:`pipeline.training.backward.PlainBackward` without it) gives the gradient of the global mean loss
(see :mod:`pipeline.training.losses`). With embedding distillation the teacher embeds the same chunks in step 1
(no graph; its states are constants of the loss, so the gradient stays exact) and the student's cached states are
its raw pooled states (the loss normalises them for the contrastive terms). Teacher scores (score distillation)
travel in the batch and are constants of the loss too. How each backward reaches the gradients
(plain autograd, or DeepSpeed's accumulation boundary and coalesced reduction) is :mod:`pipeline.training.backward`;
the caller runs the optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline.config import GradCacheConfig, LossConfig
from pipeline.data.batch import ContrastiveBatch
from pipeline.model.packing import ChunkInputs, chunk_cost, padding_efficiency, plan_chunks
from pipeline.training.backward import base_module, backward_for
from pipeline.training.distributed import all_reduce_max, is_distributed, world_size
from pipeline.training.losses import PARTS, LossOutput, contrastive_loss

LossHook = Callable[[torch.Tensor], torch.Tensor]  # applied to the step's loss before its backward


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------
@dataclass
class StepStats:
    """One step's loss and work. Query, token and sequence counts are summed over ranks; chunks are this rank's."""

    loss: float  # the step's loss: mean over all ranks' queries (= mean over ranks of each rank's weighted loss)
    parts: dict[str, float] = field(default_factory=dict)  # each part's mean over all ranks' queries (full dim)
    queries: int = 0
    sequences: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0  # what the chunks ran (packed: = real; dummy chunks, 2 tokens each, not counted)
    chunks: int = 0  # this rank's real chunks
    chunks_run: int = 0  # chunks run per forward pass, dummies included (equal on all ranks)
    coalesced: bool = False  # gradient reduction coalesced over the chunks (DeepSpeed)
    replay_max_diff: float = 0.0  # GradCache: max |re-computed - cached| embedding over chunks and ranks (exact: 0)

    @property
    def padding_efficiency(self) -> float:
        return padding_efficiency(self.real_tokens, self.computed_tokens)


# --------------------------------------------------------------------------------------------------------------
# Chunks
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


def step_chunks(lengths: list[int], *, packed: bool, gc: GradCacheConfig) -> list[np.ndarray]:
    """The chunks (index arrays into the step's sequences) GradCache runs for sequences of these `lengths`: the one
    chunking rule of the trainer, validation, ``--check``'s per-step plan and ``pipeline.gradcheck``
    (:func:`pipeline.model.packing.plan_chunks`: packed chunks are the fewest found under ``chunk_tokens``, balanced
    in tokens, never padded - also with compiled layers). ``chunk_tokens: auto`` must have been resolved to a number
    (:func:`pipeline.training.chunk_budget.resolve_chunk_tokens`)."""
    if gc.chunk_tokens == "auto":
        raise ValueError("gradcache.chunk_tokens: auto is resolved at start (chunk_budget.resolve_chunk_tokens)")
    return plan_chunks(lengths, packed=packed, chunk_tokens=gc.chunk_tokens, chunk_size=gc.chunk_size)


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
    chunks = step_chunks([len(s) for s in seqs], packed=model.packed, gc=gc)
    return _Plan(seqs, chunks, all_reduce_max(len(chunks), device))


def _split(e: torch.Tensor, batch: ContrastiveBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = batch.size
    return e[:b], e[b : 2 * b], e[2 * b :]


def _finish_stats(loss: float, out: LossOutput, plan: _Plan, model: nn.Module, device: torch.device,
                  replay_diff: float | None = None) -> StepStats:
    """The step's numbers, summed over ranks in ONE all-reduce: loss (each rank's weighted loss, so the mean over
    ranks is the global mean), queries and part sums (global means per part), sequences and tokens. `replay_diff`
    (GradCache only, so every rank passes it or none does): this rank's max replay difference, max-reduced."""
    real = sum(len(s) for s in plan.seqs)
    computed = sum(chunk_cost([len(plan.seqs[i]) for i in idx], packed=model.packed) for idx in plan.chunks)
    keys = [k for k in PARTS if k in out.sums]  # the same on every rank (dataset type, negatives and config)
    totals = torch.tensor([loss, len(plan.seqs), real, computed, out.queries, *(out.sums[k] for k in keys)],
                          dtype=torch.float64, device=device)
    if is_distributed():
        torch.distributed.all_reduce(totals)
        totals[0] /= world_size()
    queries = int(totals[4])
    replay = 0.0
    if replay_diff is not None:
        replay_t = torch.tensor([replay_diff], dtype=torch.float64, device=device)
        if is_distributed():
            torch.distributed.all_reduce(replay_t, op=torch.distributed.ReduceOp.MAX)
        replay = float(replay_t[0])
    return StepStats(
        loss=float(totals[0]),
        parts={k: float(totals[5 + i]) / max(queries, 1) for i, k in enumerate(keys)},
        queries=queries,
        sequences=int(totals[1]),
        real_tokens=int(totals[2]),
        computed_tokens=int(totals[3]),
        chunks=len(plan.chunks),
        chunks_run=plan.n_run,
        replay_max_diff=replay,
    )


def _embed_without_grad(
    model: nn.Module, plan: _Plan, device: torch.device, states: list[RngState] | None = None, *, raw: bool = False
) -> torch.Tensor:
    """[n_seqs, d] fp32 embeddings of every chunk of `plan` (dummy chunks run, results dropped), no graph, in the
    layout of `model` (a student, or a teacher). When `states` is given, the RNG state each chunk started from is
    appended to it. `raw`: pooled states before normalisation (for distillation)."""
    pieces: list[tuple[np.ndarray, torch.Tensor]] = []
    width = 0
    with torch.no_grad():
        for inputs, idx in plan.inputs(base_module(model)):
            if states is not None:
                states.append(RngState.capture(device))
            emb = model(inputs, raw=raw)
            width = emb.shape[-1]  # from a dummy chunk too, when this rank's batch is empty
            if idx is not None:
                pieces.append((idx, emb))
    cache = torch.empty((len(plan.seqs), width), dtype=torch.float32, device=device)
    for idx, emb in pieces:
        cache[torch.as_tensor(idx, device=device)] = emb.float()
    return cache


def embed_no_grad(model: nn.Module, seqs: list[np.ndarray], gc_cfg: GradCacheConfig) -> torch.Tensor:
    """[len(seqs), d] fp32 embeddings of this rank's `seqs` (on the model's device), without a graph, in the chunks
    training would run them; the chunk count is the maximum over ranks (short ranks run dummy chunks), so under
    ZeRO-3 every rank takes part in every forward. Every rank must call it, also with no sequences (provided some
    rank has one). Call in eval mode for no dropout."""
    base = base_module(model)
    device = base.device
    chunks = step_chunks([len(s) for s in seqs], packed=base.packed, gc=gc_cfg) if seqs else []
    return _embed_without_grad(model, _Plan(seqs, chunks, all_reduce_max(len(chunks), device)), device)


def _teacher_states(teacher: nn.Module | None, plan: _Plan, batch: ContrastiveBatch, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The teacher's raw pooled states of the step's sequences, (queries, positives, negatives): the same chunks as
    the student's no-grad pass (so ZeRO-3's gathers of a partitioned teacher stay in step across ranks), no graph,
    constants of the loss. The global RNG state is left as it was (the student's dropout masks do not move)."""
    if teacher is None:
        return None
    rng = RngState.capture(device)
    states = _embed_without_grad(teacher, plan, device, raw=True)
    rng.restore()
    return _split(states, batch)


def _loss_of(e: torch.Tensor, batch: ContrastiveBatch, loss_cfg: LossConfig,
             teacher_states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, device: torch.device
             ) -> LossOutput:
    """The contrastive loss of the step's embeddings `e` [queries; positives; negatives] (:func:`_split`), with the
    batch's positive corpus ids (same-document candidates masked) and teacher scores (``loss.score_distill``) as
    constant tensors: the one loss call of validation, the cached step and the plain step."""
    positive_ids = None if batch.positive_ids is None else torch.as_tensor(batch.positive_ids, dtype=torch.int64,
                                                                           device=device)
    scores = None if batch.teacher_scores is None else torch.as_tensor(batch.teacher_scores, dtype=torch.float32,
                                                                       device=device)
    return contrastive_loss(*_split(e, batch), batch.n_neg, batch.dataset_type, loss_cfg, teacher_states,
                            positive_ids, scores)


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------
def batch_loss(
    model: nn.Module, batch: ContrastiveBatch, loss_cfg: LossConfig, gc_cfg: GradCacheConfig, *,
    teacher: nn.Module | None = None,
) -> LossOutput:
    """The contrastive loss of `batch` without gradients (validation): chunked like training, with the chunk
    count padded across ranks, so ZeRO-3's parameter gathers stay in step; the batch may be empty (every rank
    calls it for every validation batch). Returns this rank's part sums and query count, to be reduced over ranks
    by the caller. Call in eval mode for no dropout."""
    base = base_module(model)
    device = base.device
    plan = _plan(base, batch, gc_cfg, device)
    embeddings = _embed_without_grad(model, plan, device, raw=loss_cfg.distill is not None)
    with torch.no_grad():
        return _loss_of(embeddings, batch, loss_cfg, _teacher_states(teacher, plan, batch, device), device)


def cached_step(
    model: nn.Module,
    batch: ContrastiveBatch,
    loss_cfg: LossConfig,
    gc_cfg: GradCacheConfig,
    *,
    loss_hook: LossHook | None = None,
    teacher: nn.Module | None = None,
) -> StepStats:
    """Accumulate the exact gradient of the contrastive loss of `batch` into the parameters' grads, chunk by chunk.

    `model`: an EmbeddingModel (single process or torch.distributed; parameter grads are averaged over ranks here)
    or a DeepSpeed engine around one (DeepSpeed reduces; call ``engine.step()`` afterwards). Call with zeroed grads.
    `loss_hook` transforms the loss before its backward (fault injection in tests; identity when None). `teacher`
    (with ``loss_cfg.distill``): its states join the loss as constants; the cached student states are then raw.
    """
    backward = backward_for(model, coalesce=gc_cfg.coalesce_grad_reduction, fp32_accumulation=gc_cfg.fp32_accumulation)
    base = backward.base
    device = base.device
    plan = _plan(base, batch, gc_cfg, device)
    raw = loss_cfg.distill is not None

    # 1. Embeddings without a graph, remembering the RNG state each chunk started from (and the teacher's states).
    states: list[RngState] = []
    cache = _embed_without_grad(model, plan, device, states, raw=raw)
    rng_after = RngState.capture(device)
    teacher_states = _teacher_states(teacher, plan, batch, device)

    # 2. Loss on leaf embeddings (gathered across ranks inside), gradient w.r.t. them.
    cache.requires_grad_(True)
    out = _loss_of(cache, batch, loss_cfg, teacher_states, device)
    total = out.total if loss_hook is None else loss_hook(out.total)
    total.backward()
    grad = cache.grad
    loss = float(total.detach())

    # 3. Replay each chunk with a graph; backpropagate sum(e_c * g_c). Check that the replay reproduced e_c.
    cached = cache.detach()
    replay_diff = torch.zeros((), dtype=torch.float32, device=device)
    with backward.accumulate():
        for k, (inputs, idx) in enumerate(plan.inputs(base)):
            states[k].restore()
            emb = model(inputs, raw=raw)
            if idx is None:
                surrogate = emb.sum() * 0.0
            else:
                rows = torch.as_tensor(idx, device=device)
                replayed = emb.float()
                replay_diff = torch.maximum(replay_diff, (replayed.detach() - cached[rows]).abs().max())
                surrogate = (replayed * grad[rows]).sum()
            backward.backward(surrogate, last=k == plan.n_run - 1)
    rng_after.restore()
    backward.finish()
    stats = _finish_stats(loss, out, plan, base, device, replay_diff=float(replay_diff))
    stats.coalesced = backward.coalesced
    return stats


def plain_step(
    model: nn.Module,
    batch: ContrastiveBatch,
    loss_cfg: LossConfig,
    gc_cfg: GradCacheConfig,
    *,
    loss_hook: LossHook | None = None,
    teacher: nn.Module | None = None,
) -> StepStats:
    """The same gradient without caching: every chunk's graph is kept alive until one backward of the loss.

    Chunks (and so dropout masks, given the same RNG state) are those of :func:`cached_step`, making the two
    directly comparable; memory grows with the batch. Under DeepSpeed one ``engine.backward(loss)`` at the boundary.
    """
    backward = backward_for(model)
    base = backward.base
    device = base.device
    plan = _plan(base, batch, gc_cfg, device)
    raw = loss_cfg.distill is not None
    teacher_states = _teacher_states(teacher, plan, batch, device)
    pieces: list[tuple[np.ndarray, torch.Tensor]] = []
    dummy = None
    empty = None  # a [0, d] slice of a dummy chunk's embedding: an empty batch's embeddings, still in the graph
    for inputs, idx in plan.inputs(base):
        emb = model(inputs, raw=raw)
        if idx is None:  # keeps every rank's backward graph (ZeRO-3 gathers) the same size
            dummy = emb.sum() * 0.0 if dummy is None else dummy + emb.sum() * 0.0
            empty = emb[:0].float()
        else:
            pieces.append((idx, emb.float()))
    if pieces:
        order = torch.as_tensor(np.concatenate([idx for idx, _ in pieces]), device=device)
        e = torch.empty((len(plan.seqs), pieces[0][1].shape[-1]), dtype=torch.float32, device=device)
        e = e.index_copy(0, order, torch.cat([emb for _, emb in pieces]))
    else:  # no queries on this rank: the loss's gathers (and their backward) must still run
        e = empty
    out = _loss_of(e, batch, loss_cfg, teacher_states, device)
    loss = out.total if loss_hook is None else loss_hook(out.total)
    backward.backward(loss if dummy is None else loss + dummy, last=True)
    backward.finish()
    return _finish_stats(float(loss.detach()), out, plan, base, device)


def train_step(
    model: nn.Module,
    batch: ContrastiveBatch,
    loss_cfg: LossConfig,
    gc_cfg: GradCacheConfig,
    *,
    loss_hook: LossHook | None = None,
    teacher: nn.Module | None = None,
) -> StepStats:
    """:func:`cached_step` when ``gc_cfg.enabled``, else :func:`plain_step` (same gradient, memory grows with B)."""
    step = cached_step if gc_cfg.enabled else plain_step
    return step(model, batch, loss_cfg, gc_cfg, loss_hook=loss_hook, teacher=teacher)
