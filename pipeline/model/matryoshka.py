"""Matryoshka truncation (Kusupati et al. 2022, "Matryoshka Representation Learning"): the embedding at dim m.

An embedding e in R^d, read at Matryoshka dim m <= d, is its first m coordinates e[:m], re-normalised:

    e_m = e[:m] / ||e[:m]||,   so that   <a_m, b_m> = cos(a[:m], b[:m])

Training's losses score the unit vectors (:func:`truncate`; :mod:`pipeline.training.losses`); retrieval evaluation
ranks by cosine, which normalises by itself, so it searches the un-normalised view (:func:`leading`: no copy of a
corpus block per dim; :mod:`pipeline.evaluation.retrieval`). Both read the same coordinates: one definition here,
below the model's consumers, so that neither imports the other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def leading(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` coordinates of the embeddings `x` [..., d] (a view, not re-normalised): for consumers that
    compare by cosine, which divides by the norms itself."""
    return x[..., :dim]


def truncate(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The embeddings `x` [..., d] at Matryoshka dim `dim`: :func:`leading` re-normalised to unit length (F.normalize,
    eps 1e-12), so that dot products are cosines."""
    return F.normalize(leading(x, dim), dim=-1)
