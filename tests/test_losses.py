"""Each loss against a value computed by hand (explicit small vectors, plain math) on a small example."""
from __future__ import annotations

import math

import pytest
import torch

from helpers_model import one_torch_thread
from pipeline.config import DistillConfig, LossConfig
from pipeline.training.losses import (
    contrastive_loss,
    distillation_loss,
    embedding_mse,
    hard_negative_infonce,
    in_batch_infonce,
    loss_type_problems,
    matryoshka_dims,
    matryoshka_weights,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# Two queries in 2-D, unit vectors, one hard negative each.
Q = t([[1.0, 0.0], [0.0, 1.0]])
P = t([[1.0, 0.0], [0.6, 0.8]])
N = t([[0.0, 1.0], [1.0, 0.0]])
# cos: q1.p1 = 1, q1.p2 = 0.6, q1.n1 = 0; q2.p1 = 0, q2.p2 = 0.8, q2.n2 = 0


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_hard_negative_by_hand():
    tau = 0.5
    # query 1: -log(e^{1/tau} / (e^{1/tau} + e^{0/tau})) = log(1 + e^{(0 - 1)/tau}); query 2 likewise with 0.8
    expected = (softplus((0 - 1.0) / tau) + softplus((0 - 0.8) / tau)) / 2
    assert expected == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1.6))) / 2)
    got = hard_negative_infonce(Q, P, N, 1, tau)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_in_batch_by_hand():
    tau = 0.05
    # query 1 vs {p1 (own), p2}: log(1 + e^{(0.6 - 1)/tau}); query 2 vs {p1, p2 (own)}: log(1 + e^{(0 - 0.8)/tau})
    expected = (softplus(-0.4 / tau) + softplus(-0.8 / tau)) / 2
    got = in_batch_infonce(Q, P, 0, tau)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((math.log(1 + math.exp(-8)) + math.log(1 + math.exp(-16))) / 2)


def test_in_batch_offset_selects_own_positive_in_gathered_set():
    # "rank 1" holds query 2 only; the gathered positives are [p1, p2], its own positive is row offset 1.
    tau = 0.5
    got = in_batch_infonce(Q[1:], P, 1, tau)
    assert float(got) == pytest.approx(softplus((0 - 0.8) / tau), rel=1e-12)


def test_total_by_dataset_type():
    cfg = LossConfig(temperature=0.5, matryoshka=False)
    ib = (softplus((0.6 - 1.0) / 0.5) + softplus((0 - 0.8) / 0.5)) / 2
    hn = (softplus((0 - 1.0) / 0.5) + softplus((0 - 0.8) / 0.5)) / 2
    retrieval = contrastive_loss(Q, P, N, 1, "retrieval", cfg)
    assert float(retrieval.total) == pytest.approx(ib + hn, rel=1e-12)
    assert retrieval.parts["in_batch"] == pytest.approx(ib, rel=1e-6)
    assert retrieval.parts["hard_negative"] == pytest.approx(hn, rel=1e-6)
    for kind in ("classification", "clustering"):  # hard-negative loss only: in-batch would be false negatives
        out = contrastive_loss(Q, P, N, 1, kind, cfg)
        assert float(out.total) == pytest.approx(hn, rel=1e-12)
        assert "in_batch" not in out.parts
    weighted = contrastive_loss(Q, P, N, 1, "retrieval", LossConfig(temperature=0.5, in_batch_weight=0.25,
                                                                    hard_negative_weight=2.0))
    assert float(weighted.total) == pytest.approx(0.25 * ib + 2.0 * hn, rel=1e-12)


def test_retrieval_without_negatives_is_in_batch_only():
    cfg = LossConfig(temperature=0.5)
    out = contrastive_loss(Q, P, Q[:0], 0, "retrieval", cfg)
    assert float(out.total) == pytest.approx((softplus(-0.4 / 0.5) + softplus(-0.8 / 0.5)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="no loss applies"):
        contrastive_loss(Q, P, Q[:0], 0, "classification", cfg)


def test_same_document_in_batch_is_masked_by_hand():
    """Queries 1 and 3 have the same positive document (corpus id 7, under two rows): each is a false negative of
    the other and leaves the other's denominator; query 2 (id 9) keeps every candidate."""
    tau = 0.5
    q = t([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    p = t([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    ids = torch.tensor([7, 9, 7])
    s = q @ p.T

    def row(i: int, keep: list[int]) -> float:
        return -(float(s[i, i]) / tau - math.log(sum(math.exp(float(s[i, m]) / tau) for m in keep)))

    masked = (row(0, [0, 1]) + row(1, [0, 1, 2]) + row(2, [1, 2])) / 3
    got = in_batch_infonce(q, p, 0, tau, positive_ids=ids, candidate_ids=ids)
    assert float(got) == pytest.approx(masked, rel=1e-12)
    unmasked = (row(0, [0, 1, 2]) + row(1, [0, 1, 2]) + row(2, [0, 1, 2])) / 3
    assert float(in_batch_infonce(q, p, 0, tau)) == pytest.approx(unmasked, rel=1e-12) and unmasked > masked + 0.1
    # through the objective: the ids are the batch's positive corpus ids (gathered with the positives)
    cfg = LossConfig(temperature=tau, matryoshka=False, hard_negative_weight=0.0)
    out = contrastive_loss(q, p, q[:0], 0, "retrieval", cfg, positive_ids=ids)
    assert out.parts["in_batch"] == pytest.approx(masked, rel=1e-12)


def test_loss_sums_weight_and_parts():
    """total = (W / G) x sum of the per-query objectives (one process: the mean); sums and parts per query."""
    cfg = LossConfig(temperature=0.5, matryoshka=False)
    out = contrastive_loss(Q, P, N, 1, "retrieval", cfg)
    ib = (softplus((0.6 - 1.0) / 0.5) + softplus((0 - 0.8) / 0.5)) / 2
    hn = (softplus((0 - 1.0) / 0.5) + softplus((0 - 0.8) / 0.5)) / 2
    assert out.queries == 2 and set(out.sums) == {"in_batch", "hard_negative", "total"}
    assert out.sums["in_batch"] == pytest.approx(2 * ib) and out.sums["hard_negative"] == pytest.approx(2 * hn)
    assert out.sums["total"] == pytest.approx(2 * (ib + hn)) and float(out.total) == pytest.approx(ib + hn)
    assert out.parts == pytest.approx({"in_batch": ib, "hard_negative": hn, "total": ib + hn})
    # distillation summed over queries: B x the F2LLM mean (negatives' rows averaged per query)
    student = (t([[1.0, 0.0], [0.0, 1.0]]), t([[0.5, 0.5], [0.0, 0.0]]), t([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]))
    teacher = (t([[0.0, 0.0], [0.0, 0.0]]),) * 2 + (t([[0.0, 0.0]] * 4),)
    assert float(distillation_loss(student, teacher, reduction="sum")) == pytest.approx(
        2 * float(distillation_loss(student, teacher)), rel=1e-12)


def test_unknown_dataset_types_in_loss_keys():
    assert loss_type_problems(LossConfig()) == []
    problems = loss_type_problems(LossConfig(in_batch_types=["retrieval", "qa"], hard_negatives={"retreival": 7}))
    assert problems == [
        "loss.in_batch_types[1]: unknown dataset type 'qa' (expected one of retrieval, classification, clustering)",
        "loss.hard_negatives.retreival: unknown dataset type 'retreival' (expected one of retrieval, "
        "classification, clustering)",
    ]


def test_false_negative_mask_by_hand():
    # q1 scores p2 (1.0) above its own positive p1 (0.8) + margin 0.1: p2 is dropped from q1's denominator.
    q = t([[1.0, 0.0], [0.0, 1.0]])
    p = t([[0.8, 0.6], [1.0, 0.0]])
    tau = 0.05
    # q2: own positive p2 scores 0, p1 scores 0.6 = 0 + 0.6 > margin -> also dropped; both losses become exactly 0.
    assert float(in_batch_infonce(q, p, 0, tau, false_negative_margin=0.1)) == pytest.approx(0.0, abs=1e-12)
    # margin 0.3: kept for q1 (1.0 < 0.8 + 0.3), still dropped for q2 (0.6 > 0 + 0.3)
    expected = (softplus((1.0 - 0.8) / tau) + 0.0) / 2
    assert float(in_batch_infonce(q, p, 0, tau, false_negative_margin=0.3)) == pytest.approx(expected, rel=1e-12)
    unmasked = (softplus((1.0 - 0.8) / tau) + softplus((0.6 - 0.0) / tau)) / 2
    assert float(in_batch_infonce(q, p, 0, tau)) == pytest.approx(unmasked, rel=1e-12)
    # hard negatives too: n1 = p2 scores 1.0 > 0.8 + 0.1
    assert float(hard_negative_infonce(q[:1], p[:1], p[1:], 1, tau, 0.1)) == pytest.approx(0.0, abs=1e-12)


def test_matryoshka_dims_and_weights():
    assert matryoshka_dims(64) == [64, 32, 16, 8]
    w = matryoshka_weights([64, 32, 16, 8], 64)
    # 1/(n * sqrt(64/dim)): 1/(1*1), 1/(2*sqrt 2), 1/(3*2), 1/(4*sqrt 8)
    assert w == pytest.approx([1.0, 0.35355339059, 0.16666666667, 0.08838834765], rel=1e-9)
    dims = matryoshka_dims(2560)
    assert dims == [2560, 2048, 1024, 512, 256, 128, 64, 32, 16, 8]
    assert matryoshka_weights(dims, 2560)[:2] == pytest.approx([1.0, 1 / (2 * math.sqrt(1.25))])
    assert matryoshka_dims(100) == [100, 64, 32, 16, 8]
    with pytest.raises(ValueError, match="matryoshka_dims"):
        matryoshka_dims(64, [8, 128])


def test_matryoshka_total_by_hand():
    # One classification query, dims [4, 2]; truncation to 2 dims re-normalises.
    q = t([[0.6, 0.0, 0.8, 0.0]])
    p = t([[0.6, 0.8, 0.0, 0.0]])
    n = t([[0.0, 0.6, 0.8, 0.0]])
    # full: q.p = 0.36, q.n = 0.64; first 2 dims: q -> (1, 0), p -> (0.6, 0.8), n -> (0, 1): q.p = 0.6, q.n = 0
    tau = 1.0
    l4 = math.log(1 + math.exp(0.64 - 0.36))
    l2 = math.log(1 + math.exp(0.0 - 0.6))
    cfg = LossConfig(temperature=tau, matryoshka=True, matryoshka_dims=[2, 4])
    out = contrastive_loss(q, p, n, 1, "classification", cfg)
    assert float(out.total) == pytest.approx(l4 + l2 / (2 * math.sqrt(2)), rel=1e-12)
    off = contrastive_loss(q, p, n, 1, "classification", LossConfig(temperature=tau, matryoshka=False))
    assert float(off.total) == pytest.approx(l4, rel=1e-12)


def test_distillation_by_hand():
    """F2LLM v2's loss: raw states, teacher truncated to the student's width and NOT re-normalised."""
    student = t([[1.0, 0.0], [0.0, 1.0]])
    teacher = t([[0.6, 0.8, 5.0], [0.0, 2.0, 1.0]])  # truncated to 2 dims: (0.6, 0.8), (0, 2)
    # mean of squared differences over 4 elements: (0.4^2 + 0.8^2 + 0 + 1^2) / 4 = 0.45
    assert float(embedding_mse(student, teacher)) == pytest.approx(0.45, rel=1e-12)
    with pytest.raises(ValueError, match="teacher width"):
        embedding_mse(teacher, student)
    # query + positive + negatives, each a mean; no negatives: their term left out
    kd = distillation_loss((student, 2 * student, student[:0]), (teacher, teacher, teacher[:0]))
    second = ((2.0 - 0.6) ** 2 + 0.8**2 + 0.0 + 0.0) / 4
    assert float(kd) == pytest.approx(0.45 + second, rel=1e-12)
    # in the objective: weight x L_kd added to the contrastive terms, logged as the "distill" part
    q, p_, n = t([[1.0, 0.0]]), t([[0.6, 0.8]]), t([[0.0, 1.0]])
    tq, tp, tn = t([[2.0, 0.0, 1.0]]), t([[0.6, 0.8, 0.0]]), t([[0.0, 1.0, 3.0]])
    cfg = LossConfig(matryoshka=False, distill=DistillConfig(teacher="unused", weight=0.5))
    plain = contrastive_loss(q, p_, n, 1, "classification", LossConfig(matryoshka=False))
    out = contrastive_loss(q, p_, n, 1, "classification", cfg, (tq, tp, tn))
    assert out.parts["distill"] == pytest.approx(0.5, rel=1e-6)  # (1 - 2)^2 / 2 for the query; 0 for the others
    assert float(out.total) == pytest.approx(float(plain.total) + 0.5 * 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="no teacher embeddings"):
        contrastive_loss(q, p_, n, 1, "classification", cfg)


def test_loss_gradient_flows_to_all_inputs():
    q, p, n = (x.clone().requires_grad_(True) for x in (Q, P, N))
    contrastive_loss(q, p, n, 1, "retrieval", LossConfig(matryoshka=False)).total.backward()
    for x in (q, p, n):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
