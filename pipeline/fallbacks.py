"""Fail-soft ``auto`` settings: what a run does when an automatic choice fails at its first use on real hardware.

Three settings choose a fast path by themselves when set to ``auto``, and each can fail only on the machine that
runs it (a GPU node, a Triton build, a model family):

* ``model.compile`` - torch.compile of the layers raises (a missing compiler, an operator inductor cannot lower):
  the layers run eagerly (:mod:`pipeline.model.compiled`);
* ``model.kernels`` - liger-kernel's patch fails for the model (a module it expects is missing, an API it lacks):
  the transformers layers stay as they are (:mod:`pipeline.model.kernels`);
* ``gradcache.chunk_tokens`` - the memory probe cannot fit one chunk within its budget: the smallest candidate chunk,
  which the probe ran without running out of memory (:mod:`pipeline.training.chunk_budget`).

With ``auto`` the failure becomes a :class:`Fallback`: one WARNING that names the setting, the exception and the
fallback (:func:`fall_back`), a record in ``metrics.jsonl`` (split ``fallback``) and in ``RUN/fallbacks.json``, which
``launch/train.py --check`` shows for the run directory. An explicit value (``true``, ``liger``, a number) is a
request, not a preference: its failure stops the run at once with a one-line error (:func:`explicit_failure`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.logs import log

FALLBACKS_FILE = "fallbacks.json"
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Fallback:
    """An ``auto`` setting that failed at its first use, and what the run does instead."""

    setting: str  # the config key, e.g. "model.compile"
    error: str  # the exception, one line: "TypeName: message"
    fallback: str  # what runs instead, e.g. "eager layers"

    def describe(self) -> str:
        return f"{self.setting}: auto failed ({self.error}); falling back to {self.fallback}"

    def values(self) -> dict[str, str]:
        return asdict(self)


def one_line(exc: BaseException) -> str:
    """``TypeName: message`` on one line, at most :data:`MAX_ERROR_CHARS` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def fall_back(setting: str, exc: BaseException, fallback: str) -> Fallback:
    """The :class:`Fallback` of `setting` after `exc`, logged once as a WARNING (rank 0)."""
    record = Fallback(setting, one_line(exc), fallback)
    log(record.describe(), level=logging.WARNING)
    return record


def explicit_failure(setting: str, value: object, exc: BaseException, advice: str) -> ValueError:
    """The one-line error of an explicitly requested `value` of `setting` that failed with `exc`."""
    return ValueError(f"{setting}: {value} failed ({one_line(exc)}); {advice}")


def save_fallbacks(run_dir: str | Path, fallbacks: list[Fallback]) -> None:
    """Write ``RUN/fallbacks.json`` (an empty list when nothing fell back: a later run's file is never stale)."""
    path = Path(run_dir) / FALLBACKS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([f.values() for f in fallbacks], indent=2) + "\n")


def load_fallbacks(run_dir: str | Path) -> list[Fallback]:
    """The fallbacks the last run in `run_dir` recorded ([] when it recorded none, or there is no such file)."""
    path = Path(run_dir) / FALLBACKS_FILE
    if not path.is_file():
        return []
    try:
        return [Fallback(**entry) for entry in json.loads(path.read_text())]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a fallbacks file ({one_line(exc)})") from None
