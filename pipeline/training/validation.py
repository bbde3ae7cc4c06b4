"""Validation loss over every held-out query, reduced over ranks, per dataset and per loss part.

Every rank runs the same validation batches (:meth:`pipeline.data.loader.TrainData.validation_batches`: each
dataset's held-out queries in global batches, the last one smaller; a rank's share may be empty) through
:func:`pipeline.training.gradcache.batch_loss`, which keeps ZeRO-3's gathers and the loss's collectives in step.
Each batch returns this rank's part sums over its queries (:class:`pipeline.training.losses.LossOutput`); they are
summed per dataset and then over ranks in one all-reduce, so every value is a mean over queries, each query
counted once whichever rank held it:

    loss/<d>  = (1 / Q_d) sum_{i in d} l_i            the objective as trained (Matryoshka and part weights)
    <part>/<d> = (1 / Q_d) sum_{i in d} part_i        in_batch, hard_negative, distill: full dimension, unweighted
    loss, <part> = the same over the queries of every dataset (that has the part)

as F2LLM logs its validation losses (per dataset, in-batch and hard-negative, at the full dimension).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import GradCacheConfig, LossConfig
from pipeline.data.loader import TrainData
from pipeline.training.distributed import is_distributed
from pipeline.training.gradcache import batch_loss
from pipeline.training.losses import PARTS

NAMES = {"total": "loss"}  # a part's name in the record (the objective is "loss"; others keep their names)


def validation_values(
    model: nn.Module, data: TrainData, loss_cfg: LossConfig, gc_cfg: GradCacheConfig, device: torch.device, *,
    teacher: nn.Module | None = None,
) -> dict[str, Any] | None:
    """The validation record (see the module docstring), or None when no dataset holds out a query. Collective:
    every rank calls it. `model` in eval mode."""
    names = list(data.plan.datasets)
    sums = np.zeros((len(names), len(PARTS)))
    present = np.zeros((len(names), len(PARTS)))
    queries = np.zeros(len(names))
    batches = 0
    for name, batch in data.validation_batches():
        out = batch_loss(model, batch, loss_cfg, gc_cfg, teacher=teacher)
        d = names.index(name)
        queries[d] += out.queries
        for k, part in enumerate(PARTS):
            if part in out.sums:
                sums[d, k] += out.sums[part]
                present[d, k] = 1
        batches += 1
    if batches == 0:
        return None
    table = torch.tensor(np.concatenate([queries[:, None], sums, present], axis=1), dtype=torch.float64,
                         device=device)
    if is_distributed():
        torch.distributed.all_reduce(table)
    table = table.cpu().numpy()
    queries, sums, present = table[:, 0], table[:, 1 : 1 + len(PARTS)], table[:, 1 + len(PARTS) :] > 0
    values: dict[str, Any] = {"queries": int(queries.sum()), "batches": batches}
    for k, part in enumerate(PARTS):
        key = NAMES.get(part, part)
        has = present[:, k] & (queries > 0)
        if has.any():
            values[key] = float(sums[has, k].sum() / queries[has].sum())
        for d in np.flatnonzero(has):
            values[f"{key}/{names[d]}"] = float(sums[d, k] / queries[d])
    for d in np.flatnonzero(queries > 0):
        values[f"queries/{names[d]}"] = int(queries[d])
    return values
