"""Rank-0-only logging: the one place that decides who prints.

``log(msg)`` writes on global rank 0 only (rank read from torch.distributed when initialised, else from the
``RANK`` environment variable the launchers set); ``log(msg, all_ranks=True)`` prefixes the rank and writes on every
rank, for errors that name the rank at fault.
"""
from __future__ import annotations

import logging
import os
import sys

_LOGGER_NAME = "embedding_pipeline"


def global_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return global_rank() == 0


def get_logger() -> logging.Logger:
    logger = logging.getLogger(_LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def log(msg: str, *, all_ranks: bool = False, level: int = logging.INFO) -> None:
    """Log `msg` on rank 0 (or on every rank, prefixed with the rank, when `all_ranks`)."""
    rank = global_rank()
    if all_ranks:
        get_logger().log(level, f"[rank {rank}] {msg}")
    elif rank == 0:
        get_logger().log(level, msg)
