"""The run identity: what fixes a run's data stream and its math, recorded in every checkpoint, compared at resume.

A resumed run continues the saved one only if both would draw the same batches and optimise the same objective on
the same model. The data stream is a pure function of (seed, epoch, step) and the global batch
(:mod:`pipeline.data.sampler`): it is fixed by the global batch G = per-device batch x world size (not by how G is
split over ranks), ``train.seed``, the trained datasets and their content (the sha256 of every file in the shards'
manifest), ``data.validation_fraction`` (which queries are held out), ``data.sampling_temperature`` and
``data.drop_last`` (whether each dataset's last, smaller batch is trained). The math is
fixed by the whole ``loss`` section (hard-negative counts per type, temperature, weights, Matryoshka,
``loss.distill``) and the model's identity (``model.name_or_path`` or ``model.from_config``, pooling, normalize,
dtype). Everything else (learning rate, run length, logging, chunking, ZeRO stage, world size at equal G) may change
between a run and its resume.

:func:`run_identity` computes it from (config, shards manifest, world size); :func:`identity_changes` lists the
differences as ``"<key> <saved> -> <current>"``, one entry per changed key.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from pipeline.config import Config

_MISSING = object()
_SHA256 = re.compile(r"[0-9a-f]{64}")


def run_identity(cfg: Config, manifest: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The identity of a run of `cfg` on the shards described by `manifest` with `world_size` ranks: a JSON-ready
    mapping (nested by config section) of everything that fixes the data stream and the math."""
    from pipeline.data.loader import select_datasets

    names = select_datasets(cfg.data, manifest)
    m = cfg.model
    return {
        "train": {"seed": cfg.train.seed},
        "global batch": cfg.train.per_device_batch_size * world_size,
        "data": {
            "datasets": names,
            "sha256": {
                name: {file: entry["sha256"] for file, entry in sorted(manifest["datasets"][name]["files"].items())}
                for name in names
            },
            "validation_fraction": cfg.data.validation_fraction,
            "sampling_temperature": cfg.data.sampling_temperature,
            "drop_last": cfg.data.drop_last,
        },
        "loss": dataclasses.asdict(cfg.loss),
        "model": {
            "name_or_path": m.name_or_path,
            "from_config": m.from_config,
            "pooling": m.pooling,
            "normalize": m.normalize,
            "dtype": m.dtype,
        },
    }


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"<dotted key> <saved value> -> <current value>"`` for every key whose value differs (keys of nested
    mappings are compared one by one; a key only one side has shows ``unset`` on the other)."""
    changes: list[str] = []
    _diff("", saved, current, changes)
    return changes


def _diff(key: str, old: Any, new: Any, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for name in [*new, *(k for k in old if k not in new)]:
            _diff(f"{key}.{name}" if key else str(name), old.get(name, _MISSING), new.get(name, _MISSING), out)
    elif _canonical(old) != _canonical(new):
        out.append(f"{key} {_render(old)} -> {_render(new)}")


def _canonical(value: Any) -> Any:
    """What a value compares as: its JSON round trip (a checkpoint stores JSON, so tuples are lists, ints in float
    fields stay equal to their floats)."""
    return _MISSING if value is _MISSING else json.loads(json.dumps(value))


def _render(value: Any) -> str:
    """A value as the change list shows it: strings bare, anything else compact JSON (at most 120 characters);
    sha256 digests shortened to their first 12 hex digits."""
    if value is _MISSING:
        return "unset"
    value = _short_digests(value)
    if isinstance(value, str):
        return value
    text = json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= 120 else text[:117] + "..."


def _short_digests(value: Any) -> Any:
    if isinstance(value, str):
        return value[:12] if _SHA256.fullmatch(value) else value
    if isinstance(value, dict):
        return {k: _short_digests(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short_digests(v) for v in value]
    return value
