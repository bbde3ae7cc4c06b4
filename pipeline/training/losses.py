"""F2LLM contrastive losses: in-batch and hard-negative InfoNCE, Matryoshka weighting, false-negative mask, KD.

Notation: q_i, p_i, n_ij are the embeddings of query i, its positive and its j-th hard negative (j < k = n_neg);
s(a, b) = cos(a, b) = <a/||a||, b/||b||>; tau the temperature (0.05 in F2LLM). B_r queries on rank r (B_r may
differ between ranks, or be 0, in a dataset's last batch), G = sum of B_r over the W ranks (the global batch).

- In-batch InfoNCE (retrieval datasets; van den Oord et al. 2018, "Representation Learning with Contrastive
  Predictive Coding"; F2LLM, arXiv 2510.02294):
      L_ib = mean_i -log( exp(s(q_i, p_i)/tau) / sum_{m < G} exp(s(q_i, P_m)/tau) )
  where P is the concatenation of the positives of ALL ranks, gathered WITH gradient
  (torch.distributed.nn.functional.all_gather), so every passage receives the gradient of every rank's queries.
  Only positives are gathered (not queries, not negatives). A candidate P_m (m != i) whose corpus id is query i's
  own positive id - the same document twice in one global batch, a false negative by construction - is left out of
  i's denominator (the ids are gathered with the positives).
- Hard-negative InfoNCE (all dataset types; nothing is gathered):
      L_hn = mean_i -log( exp(s(q_i, p_i)/tau) / (exp(s(q_i, p_i)/tau) + sum_j exp(s(q_i, n_ij)/tau)) )
- False-negative mask (Qwen3-Embedding, arXiv 2506.05176; optional, off by default): a candidate c != p_i with
  s(q_i, c) > s(q_i, p_i) + margin is left out of the denominator (it is probably a positive). Applied to the
  in-batch candidates and to the hard negatives.
- Matryoshka (MRL; Kusupati et al. 2022, "Matryoshka Representation Learning"; weights of F2LLM v2): both losses are
  computed on the first `dim` coordinates, re-normalised (:func:`pipeline.model.matryoshka.truncate`, the truncation
  retrieval evaluation reads too), for dims D = {8, 16, 32, ... < d} U {d}, sorted in descending order and
  numbered n = 1, 2, ... (n = 1 is the full d):
      L = sum_{n, dim} L(dim) / (n * sqrt(d / dim))
  Off: only dim = d, weight 1.
- Total: L = sum_dims w_dim * (in_batch_weight * L_ib * [type in in_batch_types] + hard_negative_weight * L_hn * [k > 0])
  (+ distill.weight * L_kd + score_distill.weight * L_sd).
- Distillation (F2LLM v2; ``loss.distill``): L_kd = sum over x in {query, positive, negatives} of
  mean over elements (s_x - t_x[..., :d])^2, s the student's and t the teacher's RAW pooled hidden states (before
  L2 normalisation; the teacher truncated to the student's width d and not re-normalised), as F2LLM computes it
  (F2LLM/utils.py, lines 206-208). Total += weight * L_kd. Nothing is gathered; the teacher's states are constants
  (computed without a graph, chunk by chunk, in GradCache's first pass), so the gradient stays exact.
- Score distillation (``loss.score_distill``): the listwise distillation of RocketQAv2 (Ren et al. 2021, "RocketQAv2:
  A Joint Training Method for Dense Passage Retrieval and Passage Re-ranking", dynamic listwise distillation) with a
  fixed teacher, as FlagEmbedding's ``kd_loss`` and sentence-transformers' ``DistillKLDivLoss`` (arXiv 2010.11386)
  compute it: over query i's candidates C_i = [p_i, n_i0 .. n_i(k-1)] (the negatives sampled at this step), with
  t_ic the teacher's score from the shards (`preprocess score`) and s_ic = s(q_i, c) the cosine of the hard-negative
  loss,
      P_i = softmax_c(t_ic / T_t),  Q_i = softmax_c(s_ic / tau),  L_sd = mean_i KL(P_i || Q_i)
                                                                      = mean_i sum_c P_ic (log P_ic - log Q_ic)
  T_t = ``score_distill.teacher_temperature``, tau = ``loss.temperature``; full dimension only (no Matryoshka), no
  false-negative mask (the teacher decides what a negative is worth). A candidate without a teacher score (NaN: a
  random corpus document drawn for a query with an empty pool) is left out of both softmaxes; like every term, the
  mean is over the step's G queries (below). Total += weight * L_sd. The teacher scores are constants of the loss, so GradCache stays exact.

Gradient semantics across ranks. Write l_i for query i's objective (the sum above, one query's terms), S_r the sum
of l_i over rank r's B_r queries, and L = (1 / G) sum_r S_r the global mean the step must minimise. DeepSpeed (like
DDP) averages parameter gradients over ranks: g = (1 / W) sum_r dL_r/dtheta, where L_r is what rank r backpropagates.
A per-rank mean L_r = S_r / B_r gives g = (1 / W) sum_r (1 / B_r) dS_r/dtheta, which equals dL/dtheta only when
every B_r = G / W. So each rank backpropagates its mean weighted by its share of the step's queries:
      L_r = (B_r * W / G) * (S_r / B_r) = (W / G) * S_r,   hence   (1 / W) sum_r dL_r/dtheta = (1 / G) sum_r dS_r/dtheta
                                                                                            = dL/dtheta
(a rank with B_r = 0 contributes 0 and still joins the gathers). The in-batch terms also depend on other ranks'
positives: backward through the differentiable gather sums every rank's gradient into the rank owning a positive, so
the parameter gradient of rank r is W * dL/dtheta restricted to r's own sequences, and the average over ranks is
again exactly dL/dtheta. The mean over ranks of L_r is (1 / W) sum_r (W / G) S_r = L, the logged step loss.
GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") computes this
same loss on cached embeddings. All ranks must pass the same dataset_type (F2LLM's homogeneous macro batches): the
gathers are collectives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.config import LossConfig
from pipeline.data.shard_format import DATASET_TYPES
from pipeline.model.matryoshka import truncate
from pipeline.training.distributed import all_gather_rows, all_gather_with_grad, gather_sizes, rank

PARTS = ("total", "in_batch", "hard_negative", "distill", "score_distill")  # the possible keys of LossOutput.sums


def loss_type_problems(cfg: LossConfig) -> list[str]:
    """One ``"<key>: <what>"`` line per dataset type named in ``loss.in_batch_types`` or as a key of
    ``loss.hard_negatives`` that is not a dataset type (the check ``--check`` and the trainer's start share)."""
    known = ", ".join(DATASET_TYPES)
    problems = [f"loss.in_batch_types[{i}]: unknown dataset type {t!r} (expected one of {known})"
                for i, t in enumerate(cfg.in_batch_types) if t not in DATASET_TYPES]
    problems += [f"loss.hard_negatives.{t}: unknown dataset type {t!r} (expected one of {known})"
                 for t in cfg.hard_negatives if t not in DATASET_TYPES]
    return problems


def matryoshka_dims(hidden: int, dims: list[int] | None = None) -> list[int]:
    """Descending Matryoshka dims: explicit `dims` (validated) or 8, 16, 32, ... below `hidden`, plus `hidden`."""
    if dims is None:
        dims = []
        d = 8
        while d < hidden:
            dims.append(d)
            d *= 2
        dims.append(hidden)
    bad = [d for d in dims if d < 1 or d > hidden]
    if bad:
        raise ValueError(f"loss.matryoshka_dims: {bad} outside 1..{hidden} (the embedding size)")
    return sorted(set(dims), reverse=True)


def matryoshka_weights(dims: list[int], hidden: int) -> list[float]:
    """Weight 1 / (n * sqrt(hidden / dim)) for the n-th dim (n from 1) of the descending `dims`."""
    return [1.0 / (n * math.sqrt(hidden / dim)) for n, dim in enumerate(dims, start=1)]


def _mask_false_negatives(
    scores: torch.Tensor, pos_scores: torch.Tensor, is_positive: torch.Tensor, margin: float | None
) -> torch.Tensor:
    """Cosine scores with candidates scoring above (positive + margin) set to -inf (never the positive itself)."""
    if margin is None:
        return scores
    with torch.no_grad():
        drop = (scores > pos_scores.unsqueeze(1) + margin) & ~is_positive
    return scores.masked_fill(drop, float("-inf"))


def in_batch_infonce(
    q: torch.Tensor,
    p_all: torch.Tensor,
    offset: int,
    temperature: float,
    false_negative_margin: float | None = None,
    *,
    positive_ids: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_ib: query i (local) against all gathered positives; its own positive is row offset + i of `p_all`.

    q: [B, d], p_all: [G, d], both unit length. With corpus ids (`positive_ids` [B] of the local positives,
    `candidate_ids` [G] of the gathered ones), a candidate m != offset + i with query i's own positive id is masked.
    Returns the mean (``reduction="sum"``: the sum) over the B queries.
    """
    scores = q @ p_all.T  # [B, G] cosines
    labels = torch.arange(q.shape[0], device=q.device) + offset
    is_pos = torch.zeros_like(scores, dtype=torch.bool)
    is_pos[torch.arange(q.shape[0], device=q.device), labels] = True
    pos = scores.gather(1, labels.unsqueeze(1)).squeeze(1)
    if positive_ids is not None and candidate_ids is not None:
        same_document = (candidate_ids.unsqueeze(0) == positive_ids.unsqueeze(1)) & ~is_pos
        scores = scores.masked_fill(same_document, float("-inf"))
    scores = _mask_false_negatives(scores, pos, is_pos, false_negative_margin)
    return F.cross_entropy(scores / temperature, labels, reduction=reduction)


def candidate_scores(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, n_neg: int) -> torch.Tensor:
    """[B, 1 + k] scores of query i against [p_i, n_i0 .. n_i(k-1)] (cosines for unit-length inputs).

    q, p: [B, d]; n: [B * k, d] with query i's negatives at rows i*k .. i*k + k - 1."""
    cands = torch.cat([p.unsqueeze(1), n.view(q.shape[0], n_neg, q.shape[-1])], dim=1)  # [B, 1 + k, d]
    return torch.einsum("bd,bcd->bc", q, cands)


def hard_negative_infonce(
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    n_neg: int,
    temperature: float,
    false_negative_margin: float | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_hn: query i against [p_i, n_i0 .. n_i(k-1)] (its own positive and negatives only).

    q, p: [B, d]; n: [B * k, d] with query i's negatives at rows i*k .. i*k + k - 1. Mean (``reduction="sum"``: sum)
    over the B queries.
    """
    b = q.shape[0]
    scores = candidate_scores(q, p, n, n_neg)
    is_pos = torch.zeros_like(scores, dtype=torch.bool)
    is_pos[:, 0] = True
    scores = _mask_false_negatives(scores, scores[:, 0], is_pos, false_negative_margin)
    labels = torch.zeros(b, dtype=torch.long, device=q.device)
    return F.cross_entropy(scores / temperature, labels, reduction=reduction)


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """mean over elements of (s - t[..., :d])^2: the teacher's raw pooled states truncated to the student's width d,
    NOT re-normalised - as F2LLM computes it (F2LLM/utils.py in codefuse-ai/CodeFuse-Embeddings, lines 206-208:
    ``F.mse_loss(output[...], t_out[...][..., :d])``). The teacher is a constant (detached). ``reduction="sum"``:
    the sum over rows of each row's mean over its d elements."""
    if teacher.shape[-1] < student.shape[-1]:
        raise ValueError(
            f"distillation: teacher width {teacher.shape[-1]} is smaller than the student's {student.shape[-1]}"
        )
    target = teacher.detach()[..., : student.shape[-1]].to(student.dtype)
    if reduction == "sum":
        return F.mse_loss(student, target, reduction="sum") / student.shape[-1]
    return F.mse_loss(student, target)


def distillation_loss(
    student: tuple[torch.Tensor, torch.Tensor, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    reduction: str = "mean",
) -> torch.Tensor:
    """L_kd = mse(q, t_q) + mse(p, t_p) + mse(n, t_n) (:func:`embedding_mse` each; raw pooled states of query,
    positive and negatives, the negatives' term left out when there are none), as F2LLM v2 sums them.
    ``reduction="sum"``: the sum over queries of each query's L_kd (its negatives' rows averaged), i.e. B x L_kd."""
    total = student[0].new_zeros(())
    queries = max(student[0].shape[0], 1)
    for s, t in zip(student, teacher):
        if s.shape[0] > 0:
            total = total + (embedding_mse(s, t, "sum") / (s.shape[0] // queries) if reduction == "sum"
                             else embedding_mse(s, t))
    return total


def score_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, teacher_temperature: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_sd = mean_i KL(softmax(t_i / T_t) || softmax(s_i / tau)) (module docstring), candidates whose teacher score
    is NaN left out of both distributions. student: [B, C] cosines; teacher: [B, C] scores (constants), column 0 the
    positive, which must have a score. ``reduction="sum"``: the sum over the B queries instead of the mean."""
    if student.shape != teacher.shape:
        raise ValueError(f"score distillation: student scores {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    teacher = teacher.detach().to(student.dtype)
    known = torch.isfinite(teacher)
    if not bool(known[:, 0].all()):
        raise ValueError("score distillation: a positive has no finite teacher score (rescore the shards)")
    log_p = torch.where(known, F.log_softmax((teacher / teacher_temperature).masked_fill(~known, -math.inf), -1), 0.0)
    log_q = torch.where(known, F.log_softmax((student / temperature).masked_fill(~known, -math.inf), -1), 0.0)
    per_query = (log_p.exp() * known * (log_p - log_q)).sum(-1)
    return per_query.sum() if reduction == "sum" else per_query.mean()


@dataclass
class LossOutput:
    """The scalar to backpropagate and its parts, summed over this rank's queries.

    `total` = (W / G) x S_r (see the module docstring: its gradient, averaged over ranks, is that of the global mean).
    `sums`: per part (:data:`PARTS`), full dimension, unweighted by Matryoshka and by the part weights, the sum over
    this rank's `queries` queries; ``"total"`` is the whole objective S_r (Matryoshka and part weights included)."""

    total: torch.Tensor
    sums: dict[str, float] = field(default_factory=dict)
    queries: int = 0

    @property
    def parts(self) -> dict[str, float]:
        """This rank's mean of each part (NaN on a rank without queries)."""
        return {k: v / self.queries if self.queries else float("nan") for k, v in self.sums.items()}


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    n_neg: int,
    dataset_type: str,
    cfg: LossConfig,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    positive_ids: torch.Tensor | None = None,
    teacher_scores: torch.Tensor | None = None,
) -> LossOutput:
    """The F2LLM objective of this rank's local embeddings (gathers sizes, positives and their ids across ranks
    inside: every rank calls it once per step, with the same dataset_type, also with no queries).

    q, p: [B, d]; n: [B * n_neg, d] (may be empty when n_neg == 0). Inputs are re-normalised for the contrastive
    terms (cosine similarity); with ``cfg.distill``, `teacher` holds the teacher's (q, p, n) states and q, p, n must
    be the student's raw pooled states (not normalised), as the distillation term reads them. `positive_ids` [B]:
    the positives' corpus ids (same-document in-batch candidates masked); None = all distinct, on every rank. With
    ``cfg.score_distill``, `teacher_scores` [B, 1 + n_neg] holds the teacher's scores of each query's candidates.
    """
    if q.shape != p.shape:
        raise ValueError(f"contrastive_loss: queries {tuple(q.shape)} vs positives {tuple(p.shape)}")
    if n.shape[0] != q.shape[0] * n_neg:
        raise ValueError(f"contrastive_loss: {n.shape[0]} negatives for {q.shape[0]} queries x {n_neg}")
    hidden = q.shape[-1]
    use_in_batch = dataset_type in cfg.in_batch_types and cfg.in_batch_weight != 0
    use_hard = n_neg > 0 and cfg.hard_negative_weight != 0
    if not (use_in_batch or use_hard):
        raise ValueError(
            f"contrastive_loss: no loss applies to dataset type {dataset_type!r} with {n_neg} negatives"
        )
    if cfg.matryoshka:
        dims = matryoshka_dims(hidden, cfg.matryoshka_dims)
        weights = matryoshka_weights(dims, hidden)
    else:
        dims, weights = [hidden], [1.0]
    sizes = gather_sizes(q.shape[0], q.device)  # every rank's B_r: the rank weight needs G, the gather the offsets
    scale = len(sizes) / sum(sizes)  # W / G
    p_all, offset, ids_all = p, 0, None
    if use_in_batch:
        offset = sum(sizes[: rank()])
        p_all = all_gather_with_grad(p, sizes)
        if positive_ids is not None:
            ids_all = all_gather_rows(positive_ids, sizes)
    objective = q.new_zeros(())  # S_r
    sums: dict[str, torch.Tensor] = {}
    for dim, w in zip(dims, weights):
        qd = truncate(q, dim)
        if use_in_batch:
            pd_all = truncate(p_all, dim)
            l_ib = in_batch_infonce(qd, pd_all, offset, cfg.temperature, cfg.false_negative_margin,
                                    positive_ids=positive_ids, candidate_ids=ids_all, reduction="sum")
            objective = objective + w * cfg.in_batch_weight * l_ib
            if dim == hidden:
                sums["in_batch"] = l_ib.detach()
        if use_hard:
            pd = truncate(p, dim)
            nd = truncate(n, dim)
            l_hn = hard_negative_infonce(qd, pd, nd, n_neg, cfg.temperature, cfg.false_negative_margin,
                                         reduction="sum")
            objective = objective + w * cfg.hard_negative_weight * l_hn
            if dim == hidden:
                sums["hard_negative"] = l_hn.detach()
    if cfg.distill is not None:
        if teacher is None:
            raise ValueError("contrastive_loss: loss.distill is set but no teacher embeddings were given")
        l_kd = distillation_loss((q, p, n), teacher, reduction="sum")
        objective = objective + cfg.distill.weight * l_kd
        sums["distill"] = l_kd.detach()
    if cfg.score_distill is not None:
        if teacher_scores is None:
            raise ValueError("contrastive_loss: loss.score_distill is set but the batch carries no teacher scores")
        student_scores = candidate_scores(truncate(q, hidden), truncate(p, hidden), truncate(n, hidden), n_neg)
        l_sd = score_distillation_loss(student_scores, teacher_scores, cfg.temperature,
                                       cfg.score_distill.teacher_temperature, reduction="sum")
        objective = objective + cfg.score_distill.weight * l_sd
        sums["score_distill"] = l_sd.detach()
    sums["total"] = objective.detach()
    return LossOutput(objective * scale, {k: float(v) for k, v in sums.items()}, q.shape[0])
