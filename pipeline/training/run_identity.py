"""The run identity: what fixes a run's data stream and its math, recorded in every checkpoint, compared at resume.

A resumed run continues the saved one only if both would draw the same batches and optimise the same objective on
the same model. The data stream is a pure function of (seed, epoch, step) and the global batch
(:mod:`pipeline.data.sampler`): it is fixed by the global batch G = per-device batch x world size (not by how G is
split over ranks), ``train.seed``, the trained datasets and their content (the sha256 of every file in the shards'
manifest), ``data.validation_fraction`` (which queries are held out), ``data.sampling_temperature`` and
``data.drop_last`` (whether each dataset's last, smaller batch is trained). The math is
fixed by the whole ``loss`` section (hard-negative counts per type, temperature, weights, Matryoshka,
``loss.distill``) and the model's identity (``model.name_or_path`` or ``model.from_config``, pooling, normalize,
dtype, the attention mask, ``model.lora`` and ``model.trust_remote_code``). Everything else (learning rate, run
length, logging, chunking, ZeRO stage, world size at equal G) may change between a run and its resume.

How some of these are compared:

* ``model.attention_mask`` as resolved (:func:`pipeline.model.attention.resolve_attention_mask` on the model's
  transformers config): "causal" or "bidirectional", the mask the run trains with. ``auto`` on an encoder, or on a
  decoder whose config says ``is_causal: false``, is the same run as an explicit ``bidirectional``; ``auto`` on a
  causal decoder the same as ``causal``. Resolved rather than as written because the identity is about the function
  trained: spelling ``auto`` out is no change, while ``auto`` meaning another mask (the model's config says
  otherwise) is one. Computing it loads the model's config (``config.json`` only, no weights).
* ``model.lora``: null (full fine-tuning) or every field of :class:`pipeline.config.LoraConfig` (r, alpha, dropout,
  target_modules, the last sorted: a set of module names). peft keeps r and alpha as plain attributes, not in the
  checkpoint, so a resume with another alpha would otherwise silently scale the adapters differently.
* ``loss.distill.teacher``: ``{"sha256": ...}``, a hash over the teacher directory's files
  (:func:`pipeline.data.shard_format.model_dir_sha256`, as ``preprocess score`` records its teacher), not its path:
  a moved or copied teacher with the same files is the same teacher, one with changed weights is not. A teacher
  that is not a local directory (a hub name) is compared by its name. Every rank hashes the teacher once at start
  (sha256, about 1 GiB/s per core; the page cache serves a node's other ranks).

Checkpoints written before identity version 2 (no ``version`` key) did not record ``model.lora``,
``model.attention_mask`` and ``model.trust_remote_code``, and recorded the teacher by its path: those keys are not
compared for them (:func:`unrecorded_keys`; resume warns) rather than refused as changed.

:func:`run_identity` computes it from (config, shards manifest, world size); :func:`identity_changes` lists the
differences as ``"<key> <saved> -> <current>"``, one entry per changed key.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from pipeline.config import Config, LossConfig, LoraConfig, ModelConfig

VERSION = 2
# Keys an identity without "version" (version 1) does not record comparably: not compared for it.
_SINCE_VERSION_2 = ("version", "model.attention_mask", "model.lora", "model.trust_remote_code",
                    "loss.distill.teacher")
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
        "loss": loss_identity(cfg.loss),
        "model": {
            "name_or_path": m.name_or_path,
            "from_config": m.from_config,
            "pooling": m.pooling,
            "normalize": m.normalize,
            "dtype": m.dtype,
            "attention_mask": attention_mask(m),
            "lora": lora_identity(m.lora),
            "trust_remote_code": m.trust_remote_code,
        },
        "version": VERSION,
    }


def attention_mask(cfg: ModelConfig) -> str:
    """``model.attention_mask`` resolved for the model: "causal" or "bidirectional" (module docstring). ValueError
    naming the key when the model's config cannot load or the mask cannot work with the model."""
    from pipeline.model.attention import resolve_attention_mask
    from pipeline.model.embedding import is_decoder_config, load_hf_config

    hf_config = load_hf_config(cfg)
    return resolve_attention_mask(cfg.attention_mask, hf_config, decoder=is_decoder_config(hf_config))


def lora_identity(cfg: LoraConfig | None) -> dict[str, Any] | None:
    """``model.lora`` as compared: None, or every field, the target module names sorted (their order means
    nothing)."""
    if cfg is None:
        return None
    targets = cfg.target_modules
    return {**dataclasses.asdict(cfg),
            "target_modules": targets if isinstance(targets, str) else sorted(set(targets))}


def loss_identity(cfg: LossConfig) -> dict[str, Any]:
    """The ``loss`` section as compared: every field, ``distill.teacher`` as the hash of its files."""
    loss = dataclasses.asdict(cfg)
    if cfg.distill is not None:
        loss["distill"]["teacher"] = teacher_identity(cfg.distill.teacher)
    return loss


def teacher_identity(teacher: str) -> dict[str, str] | str:
    """``{"sha256": ...}`` over the files of the teacher directory (:func:`pipeline.data.shard_format.
    model_dir_sha256`); a teacher that is not a local directory (a hub name): its name. ValueError naming
    ``loss.distill.teacher`` for a directory without model files."""
    from pipeline.data.shard_format import model_dir_sha256

    if not Path(teacher).is_dir():
        return teacher
    try:
        digest, _ = model_dir_sha256(teacher)
    except ValueError as exc:
        raise ValueError(f"loss.distill.teacher: {exc}") from None
    return {"sha256": digest}


def unrecorded_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys of the `current` identity that the `saved` one does not record comparably (written by an older
    version): they are not compared (:func:`identity_changes`)."""
    if "version" in saved:
        return []
    return [key for key in _SINCE_VERSION_2 if key != "version" and _lookup(current, key) is not _MISSING]


def _lookup(identity: dict[str, Any], dotted: str) -> Any:
    """The value at `dotted` in the nested `identity`, or _MISSING."""
    value: Any = identity
    for part in dotted.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
    return value


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"<dotted key> <saved value> -> <current value>"`` for every key whose value differs (keys of nested
    mappings are compared one by one; a key only one side has shows ``unset`` on the other). Keys `saved` does not
    record comparably (:func:`unrecorded_keys`) are left out."""
    changes: list[str] = []
    skip = frozenset() if "version" in saved else frozenset(_SINCE_VERSION_2)
    _diff("", saved, current, changes, skip)
    return changes


def _diff(key: str, old: Any, new: Any, out: list[str], skip: frozenset[str]) -> None:
    if key in skip:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for name in [*new, *(k for k in old if k not in new)]:
            _diff(f"{key}.{name}" if key else str(name), old.get(name, _MISSING), new.get(name, _MISSING), out, skip)
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
