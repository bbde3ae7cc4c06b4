"""Errors that end a training run with a one-line message and a non-zero exit code (no traceback).

Raised on every rank alike (the condition is agreed through a collective first), so that every rank tears the
process group down and exits the same way; ``launch/train.py`` prints the message once and exits 1.
"""
from __future__ import annotations


class TrainingAborted(RuntimeError):
    """The run stopped on purpose; the message is one line naming what failed and where (path, step)."""
