"""Reimplementation of the seed's (F2LLM ``run.py``) training step, the baseline of ``bench/bench_trainer.py``.

What F2LLM does per optimizer step, and this module does the same way:

* collate (in the data loader, so outside the timed step here as well): the micro-batch's B queries, B positives
  and B * k hard negatives are stacked in that order and RIGHT-PADDED with the pad id to the longest sequence
  (``pad_sequence(batch_first=True)``), attention mask = 1 on real tokens; ``padding="batch"`` (default) pads all
  (2 + k) * B sequences into ONE [(2 + k) B, L] tensor, as F2LLM's collate does; ``padding="group"`` pads queries,
  positives and negatives separately (three tensors, three forwards; kinder to the seed: short queries are not
  padded to the longest passage);
* forward: the HF backbone on (input_ids, attention_mask); pooling = the hidden state at the last non-pad
  position of each row (``hidden[i, seq_len_i - 1]``, the EOS);
* loss (F2LLM ``utils.py``): embeddings L2-normalised, temperature tau;
  in-batch InfoNCE (retrieval types only) of each local query against the positives of ALL ranks gathered by a
  NON-differentiable all-gather (``torch.distributed.all_gather`` into a list; accelerate's ``gather`` is the
  same), label = B * rank + i; so only queries get the in-batch gradient, passages (even the rank's own) none;
  hard-negative InfoNCE of query i against [p_i, n_i1..n_ik] (local, differentiable); total = sum of the two;
* backward: ONE ``engine.backward(loss)`` of the whole micro-batch (every activation alive at once, no gradient
  caching), then ``engine.step()`` by the caller, under the same DeepSpeed engine type as the trainer.

Deliberate choices in the seed's favour: the gather of the last-token states is one vectorised index (F2LLM
stacks a Python list of per-row slices); collate is not timed; fp32 on CPU for both (the seed uses bf16 on GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.batch import ContrastiveBatch
from pipeline.config import LossConfig


@dataclass
class PaddedGroup:
    input_ids: torch.Tensor  # [n, L], right-padded
    attention_mask: torch.Tensor  # [n, L], 1 = real token
    seq_lens: torch.Tensor  # [n]

    @property
    def computed_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def real_tokens(self) -> int:
        return int(self.seq_lens.sum())


@dataclass
class SeedBatch:
    """A collated micro-batch: one padded group (F2LLM) or three (queries, positives, negatives)."""

    groups: list[PaddedGroup]
    bs: int
    n_neg: int
    dataset_type: str

    @property
    def computed_tokens(self) -> int:
        return sum(g.computed_tokens for g in self.groups)

    @property
    def real_tokens(self) -> int:
        return sum(g.real_tokens for g in self.groups)


def pad_group(seqs: list[np.ndarray], pad_id: int) -> PaddedGroup:
    """F2LLM's collate: pad_sequence(batch_first=True, padding_value=pad_id) + mask of the real tokens."""
    tensors = [torch.as_tensor(np.asarray(s, dtype=np.int64)) for s in seqs]
    lens = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    ids = nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad_id)
    mask = (torch.arange(ids.shape[1]).unsqueeze(0) < lens.unsqueeze(1)).long()
    return PaddedGroup(ids, mask, lens)


def seed_collate(batch: ContrastiveBatch, pad_id: int, padding: str = "batch") -> SeedBatch:
    if padding == "batch":
        groups = [pad_group(batch.sequences(), pad_id)]
    elif padding == "group":
        groups = [pad_group(list(g), pad_id) for g in (batch.queries, batch.positives, batch.negatives) if len(g)]
    else:
        raise ValueError(f"padding must be 'batch' or 'group', got {padding!r}")
    return SeedBatch(groups, batch.size, batch.n_neg, batch.dataset_type)


class SeedEmbedder(nn.Module):
    """HF backbone + last-token pooling at the last non-pad position (F2LLM's ``F2LLM.forward``)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        if hasattr(backbone, "config"):
            backbone.config.use_cache = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, seq_lens.to(hidden.device) - 1].float()


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """accelerate.gather / torch.distributed.all_gather into a list: the result carries no gradient."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t.detach()
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t.detach().contiguous())
    return torch.cat(out)


def seed_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None, n_neg: int, dataset_type: str,
              cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """F2LLM's inbatch_loss + hard_loss (fixed temperature, weight 1 each, no Matryoshka)."""
    tau = cfg.temperature
    bs = q.shape[0]
    qn = F.normalize(q, p=2, dim=-1)
    total = q.new_zeros(())
    parts: dict[str, float] = {}
    if dataset_type in cfg.in_batch_types:
        p_all = F.normalize(gather_no_grad(p), p=2, dim=-1)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        labels = torch.arange(bs, device=q.device) + bs * rank
        l_ib = F.cross_entropy(qn @ p_all.T / tau, labels)
        total = total + l_ib
        parts["in_batch"] = float(l_ib.detach())
    if n_neg > 0 and n is not None:
        cands = F.normalize(torch.cat([p.unsqueeze(1), n.view(bs, n_neg, -1)], dim=1), p=2, dim=-1)
        logits = (qn.unsqueeze(1) * cands).sum(-1) / tau
        l_hn = F.cross_entropy(logits, torch.zeros(bs, dtype=torch.long, device=q.device))
        total = total + l_hn
        parts["hard_negative"] = float(l_hn.detach())
    parts["total"] = float(total.detach())
    return total, parts


def seed_step(engine, batch: SeedBatch, loss_cfg: LossConfig, device: torch.device | str = "cpu"
              ) -> tuple[float, dict[str, float]]:
    """Forward the whole micro-batch with graphs, the F2LLM loss, one ``engine.backward(loss)``.

    `engine`: a DeepSpeed engine around a :class:`SeedEmbedder` (or the bare module: plain ``loss.backward()``).
    The caller runs ``engine.step()``.
    """
    embs = [engine(g.input_ids.to(device), g.attention_mask.to(device), g.seq_lens.to(device)) for g in batch.groups]
    e = torch.cat(embs)
    b, k = batch.bs, batch.n_neg
    q, p = e[:b], e[b:2 * b]
    n = e[2 * b:] if k > 0 else None
    loss, parts = seed_loss(q, p, n, k, batch.dataset_type, loss_cfg)
    if hasattr(engine, "backward") and hasattr(engine, "step"):
        engine.backward(loss)
    else:
        loss.backward()
    return float(loss.detach()), parts
