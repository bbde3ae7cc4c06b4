"""Checkpoint merging: ``python -m pipeline.merge --out DIR MODEL_DIR [MODEL_DIR ...] [--method mean|ema|slerp]``;
``python -m pipeline.merge --search RUN_DIR --out BEST (--data PATH | --beir DIR ... | --mteb TASK ...)`` builds
the usual merges of a run's exports, scores each with ``pipeline.evaluate``'s metrics and writes the best
(:mod:`pipeline.merge_search`).

Averages the weights of several model directories of one run - typically the exports ``export/merge_step_<N>``
(N zero-padded to 8 digits: ``merge_step_00009500``, :func:`pipeline.training.export.merge_export_name`) that
``train.merge_every`` / ``train.merge_window`` write near the end of training, as F2LLM saved checkpoints "for
ckpt merging" every 500 steps in the last 2,500 (its ``utils.py``) - into one model directory.

Methods, for every floating-point tensor of the models theta_1 .. theta_n (in the order given, see Order below),
computed in fp32 and stored in the first input's dtype:

* ``mean``: theta = sum_i w_i theta_i, w = ``--weights`` (default uniform) normalised to sum 1: uniform weight
  averaging of checkpoints of one run ("model soups", Wortsman et al. 2022, arXiv:2203.05482; LAWA, Kaddour
  2022, arXiv:2209.14981).
* ``ema``: an exponential moving average over the inputs in the given order, decay d = ``--ema-decay``:
  e_1 = theta_1, e_k = d e_{k-1} + (1 - d) theta_k, theta = e_n; that is theta_1 weighted d^(n-1) and theta_k
  (k >= 2) weighted (1 - d) d^(n-k) (the weights sum to 1). d = 0 keeps the last model, d = 1 the first.
* ``slerp``: spherical linear interpolation between exactly two models, per tensor, at t = ``--weights T``
  (default 0.5; 0 = the first model, 1 = the second). With v0, v1 flattened, Omega the angle between them:
  slerp = sin((1 - t) Omega) / sin(Omega) v0 + sin(t Omega) / sin(Omega) v1 (Shoemake 1985). As in mergekit
  (``mergekit/merge_methods/slerp.py``, arcee-ai/mergekit), the angle comes from the normalised tensors, the
  coefficients multiply the original ones, and nearly parallel tensors (|cos Omega| > 0.9995) are interpolated
  linearly, (1 - t) v0 + t v1; here also tensors of (near) zero norm. Checkpoints of one run are often that close:
  the command reports how many tensors took the linear path.

Non-floating-point tensors (integer buffers) must be equal in all inputs and are copied.

Order: ``ema`` and ``slerp`` depend on the order of the inputs (ema weighs the last one most, slerp's t runs from
the first to the second), ``mean`` does not (each ``--weights`` value stays with its model). Each input's step is
the one its export recorded (``training_step``, :func:`pipeline.training.export.export_step`), else, for exports of
earlier versions, the N of a directory named ``merge_step_<N>`` (padded or not), else none. ``ema`` and ``slerp``
refuse inputs given with a later step before an earlier one (one line naming the two inputs and their steps, exit
2): list them oldest first, as ``RUN/export/merge_step_*`` does. The inputs are never reordered - what is computed
is the formula above over the inputs as given, and ``merge.json`` records them with their steps; inputs without a
step, and equal steps (the final exports of two runs), are not checked.

Refused with one line naming the directories and what differs (exit 2): inputs of another architecture
(``model_type``, any other ``config.json`` value but dropout, dtype, cache and name fields, parameter names or
shapes), another tokenizer (vocabulary hash, :func:`pipeline.data.shard_format.tokenizer_fingerprint`), or other
sentence-transformers settings (modules, pooling, ``max_seq_length``, query prompts).

The output has the inputs' layout (an export's: :mod:`pipeline.training.export`): every file of the first input
but its weights and model card is copied (``config.json``, tokenizer, ``modules.json``, ``sentence_bert_config.json``,
``1_Pooling/``, ``2_Normalize``, ``config_sentence_transformers.json`` with the prompts), the merged weights are
written as safetensors with the first input's file split (``model.safetensors`` or the shards of an index), and
``merge.json`` records the inputs, their steps, method and coefficients. A LoRA export's ``adapter/`` (peft's
adapter alone, :mod:`pipeline.model.lora`) is left out: the average of merged weights W_i + (alpha / r) B_i A_i is
no rank-r adapter on the base, so the output is the full merged model only (it loads with ``AutoModel`` and
sentence-transformers as the inputs do); this is logged and recorded in ``merge.json`` (``left_out``). The step an
export recorded is dropped from the copied ``config_sentence_transformers.json`` (the merged weights are of no one
step). It is written to ``.DIR.tmp`` and renamed into place (an existing DIR is replaced only with
``--overwrite``, once the new one is complete). Memory: tensors are read one at a time from memory-mapped
safetensors files; the merged tensors of one output file are held until it is written (one model at most), plus one
tensor's fp32 working copies.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

METHODS = ("mean", "ema", "slerp")
DEFAULT_EMA_DECAY = 0.5
SLERP_DOT_THRESHOLD = 0.9995  # mergekit's DOT_THRESHOLD: |cos| above it -> linear interpolation
SLERP_EPS = 1e-8
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# config.json fields that training changes without changing the architecture or what the weights mean.
CONFIG_IGNORED = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "architectures")
ST_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
NOT_COPIED = ("*.safetensors", WEIGHTS_INDEX, "pytorch_model*.bin", "README.md", "merge.json")
# Top-level entries of the first input not copied to the output, and why (recorded in merge.json, logged).
LEFT_OUT = {
    "adapter": "LoRA adapter (peft) of the first input: the average of the inputs' merged weights is not a rank-r "
               "adapter on the base; the output is the full merged model",
}
ORDERED_METHODS = ("ema", "slerp")  # methods whose result depends on the order of the inputs


class MergeError(ValueError):
    """Inputs that cannot be merged, or bad options; the message is one line naming them."""


# --------------------------------------------------------------------------------------------------------------
# The merge rules
# --------------------------------------------------------------------------------------------------------------
def linear_coefficients(method: str, n: int, weights: Sequence[float] | None = None,
                        ema_decay: float = DEFAULT_EMA_DECAY) -> list[float]:
    """Coefficients c_i of theta = sum_i c_i theta_i for ``mean`` and ``ema`` (see the module docstring)."""
    if method == "mean":
        w = [1.0] * n if weights is None else [float(x) for x in weights]
        if len(w) != n:
            raise MergeError(f"--weights: {len(w)} value(s) for {n} models")
        if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
            raise MergeError(f"--weights: must be finite, >= 0 and not all 0, got {list(w)}")
        return [x / sum(w) for x in w]
    if method == "ema":
        if weights is not None:
            raise MergeError("--weights: not used by --method ema (the order of the models and --ema-decay set them)")
        if not 0 <= ema_decay <= 1:
            raise MergeError(f"--ema-decay: must be in [0, 1], got {ema_decay}")
        return [ema_decay ** (n - 1)] + [(1 - ema_decay) * ema_decay ** (n - k) for k in range(2, n + 1)]
    raise MergeError(f"--method: {method} is not a linear merge (mean, ema)")


def slerp_t(n: int, weights: Sequence[float] | None) -> float:
    """The interpolation point of ``slerp``: ``--weights T`` (one value in [0, 1]) or 0.5."""
    if n != 2:
        raise MergeError(f"--method slerp: interpolates exactly two models, got {n}")
    if weights is None:
        return 0.5
    if len(weights) != 1 or not 0 <= weights[0] <= 1:
        raise MergeError(f"--weights: slerp takes one value t in [0, 1] (0 = the first model, 1 = the second), "
                         f"got {list(weights)}")
    return float(weights[0])


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = SLERP_EPS) -> tuple[torch.Tensor, bool]:
    """Spherical linear interpolation of two tensors (fp32 result, same shape) and whether it fell back to linear
    interpolation (nearly parallel or near-zero tensors); the rule of mergekit's ``slerp``."""
    a, b = v0.float(), v1.float()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na <= eps or nb <= eps:
        return torch.lerp(a, b, t), True
    dot = float(torch.dot(a.flatten(), b.flatten()) / (na * nb))
    if abs(dot) > dot_threshold:
        return torch.lerp(a, b, t), True
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s0 = math.sin((1 - t) * omega) / math.sin(omega)
    s1 = math.sin(t * omega) / math.sin(omega)
    return s0 * a + s1 * b, False


# --------------------------------------------------------------------------------------------------------------
# Reading and checking the inputs
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ModelDir:
    """One input: its config, where each tensor is stored, and the tensors' shapes (from the file headers)."""

    path: Path
    config: dict[str, Any]
    files: dict[str, str]  # tensor name -> safetensors file name inside `path`
    shapes: dict[str, tuple[int, ...]]
    step: int | None = None  # training step of the weights (input_step), None when unknown
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "ModelDir":
        from safetensors import safe_open

        from pipeline.config import resolve_resource

        path = Path(resolve_resource(str(path)) or path)
        if not (path / "config.json").is_file():
            raise MergeError(f"{path}: not a model directory (no config.json)")
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise MergeError(f"{path / 'config.json'}: cannot read ({exc})") from None
        if (path / WEIGHTS_INDEX).is_file():
            try:
                files = dict(json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise MergeError(f"{path / WEIGHTS_INDEX}: not a safetensors index ({exc})") from None
        elif (path / WEIGHTS_FILE).is_file():
            files = {}
        else:
            raise MergeError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (merging reads safetensors weights)")
        shapes: dict[str, tuple[int, ...]] = {}
        for name in sorted(set(files.values())) or [WEIGHTS_FILE]:
            try:
                with safe_open(str(path / name), framework="pt") as handle:
                    for key in handle.keys():
                        files[key] = name
                        shapes[key] = tuple(handle.get_slice(key).get_shape())
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad header
                raise MergeError(f"{path / name}: cannot read safetensors ({exc})") from None
        missing = sorted(k for k in files if k not in shapes)
        if missing:
            raise MergeError(f"{path / WEIGHTS_INDEX}: {missing[0]} is mapped to a file that does not hold it")
        return cls(path, config, files, shapes, input_step(path))

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def input_step(path: Path) -> int | None:
    """The training step of the model directory `path`: the one its export recorded, else the N of a
    ``merge_step_<N>`` directory name (exports of earlier versions recorded none), else None."""
    from pipeline.training.export import export_step, merge_export_step

    try:
        step = export_step(path)
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    return step if step is not None else merge_export_step(path.name)


def check_step_order(models: Sequence[ModelDir], method: str) -> None:
    """For a method that depends on the order (``ema``, ``slerp``): MergeError naming the first two inputs given
    with a later step before an earlier one. Inputs without a step are skipped; equal steps are in order."""
    if method not in ORDERED_METHODS:
        return
    stepped = [m for m in models if m.step is not None]
    for before, after in zip(stepped, stepped[1:]):
        if before.step > after.step:
            raise MergeError(f"{before.path}, {after.path}: out of order for --method {method} (step {before.step} "
                             f"given before step {after.step}; list the models oldest first)")


def _diff(a: dict[str, Any], b: dict[str, Any], skip: Sequence[str] = ()) -> list[str]:
    """Keys whose values differ (present in one only counts), sorted, without the `skip` ones and dropouts."""
    keys = (set(a) | set(b)) - set(skip)
    return sorted(k for k in keys if "dropout" not in k and a.get(k) != b.get(k))


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: cannot read ({exc})") from None


def check_architecture(first: ModelDir, other: ModelDir) -> None:
    """Same model_type, config (but training-only fields), parameter names and shapes; else MergeError."""
    where = f"{first.path}, {other.path}"
    a, b = first.config.get("model_type"), other.config.get("model_type")
    if a != b:
        raise MergeError(f"{where}: different architecture (model_type {a} vs {b})")
    keys = _diff(first.config, other.config, CONFIG_IGNORED)
    if keys:
        k = keys[0]
        more = f"; also {', '.join(keys[1:])}" if len(keys) > 1 else ""
        raise MergeError(f"{where}: different architecture (config.json {k}: {first.config.get(k)!r} vs "
                         f"{other.config.get(k)!r}{more})")
    only = sorted(set(first.shapes) ^ set(other.shapes))
    if only:
        owner = first.path if only[0] in first.shapes else other.path
        raise MergeError(f"{where}: different parameters ({only[0]} only in {owner}; {len(only)} name(s) differ)")
    for name, shape in first.shapes.items():
        if other.shapes[name] != shape:
            raise MergeError(f"{where}: different shapes ({name} {list(shape)} vs {list(other.shapes[name])})")


def check_tokenizer(first: ModelDir, other: ModelDir, fingerprints: dict[Path, dict[str, Any]], *,
                    trust_remote_code: bool = False) -> None:
    """Same vocabulary (:func:`pipeline.data.shard_format.tokenizer_fingerprint`); else MergeError.
    `trust_remote_code`: run the code a tokenizer directory ships (``--trust-remote-code``)."""
    from pipeline.data.shard_format import tokenizer_fingerprint
    from pipeline.data.tokenization import load_tokenizer

    for model in (first, other):
        if model.path not in fingerprints:
            try:
                tokenizer = load_tokenizer(str(model.path), trust_remote_code)
                fingerprints[model.path] = tokenizer_fingerprint(tokenizer, str(model.path))
            except (OSError, ValueError, TypeError) as exc:
                raise MergeError(f"{model.path}: cannot load its tokenizer ({' '.join(str(exc).split())})") from None
    a, b = fingerprints[first.path], fingerprints[other.path]
    if (a["vocab_size"], a["vocab_sha256"]) != (b["vocab_size"], b["vocab_sha256"]):
        raise MergeError(f"{first.path}, {other.path}: different tokenizers (vocab {a['vocab_size']}, sha256 "
                         f"{a['vocab_sha256'][:12]} vs vocab {b['vocab_size']}, sha256 {b['vocab_sha256'][:12]})")


def check_sentence_transformers(first: ModelDir, other: ModelDir) -> None:
    """Same sentence-transformers modules, pooling, max_seq_length and query prompts; else MergeError."""
    from pipeline.training.export import model_prompts

    where = f"{first.path}, {other.path}"
    for name in ST_FILES:
        a, b = _json(first.path / name), _json(other.path / name)
        if a == b:
            continue
        if not isinstance(a, dict) or not isinstance(b, dict):
            raise MergeError(f"{where}: different sentence-transformers {name} ({'absent' if a is None else 'present'}"
                             f" vs {'absent' if b is None else 'present'})")
        k = _diff(a, b)[0]
        raise MergeError(f"{where}: different sentence-transformers {name} ({k} {a.get(k)!r} vs {b.get(k)!r})")
    try:
        a, b = model_prompts(first.path), model_prompts(other.path)
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    if a != b:
        k = min(set(a) ^ set(b) or {k for k in a if a[k] != b[k]})
        raise MergeError(f"{where}: different query prompts ({k}: {a.get(k)!r} vs {b.get(k)!r})")


def check_inputs(models: Sequence[ModelDir], *, trust_remote_code: bool = False) -> None:
    """Every input against the first: architecture, tokenizer, sentence-transformers settings."""
    fingerprints: dict[Path, dict[str, Any]] = {}
    for other in models[1:]:
        check_architecture(models[0], other)
        check_tokenizer(models[0], other, fingerprints, trust_remote_code=trust_remote_code)
        check_sentence_transformers(models[0], other)


# --------------------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------------------
@dataclass
class MergeResult:
    out: Path
    method: str
    inputs: list[str]
    coefficients: list[float] | None  # mean / ema
    t: float | None  # slerp
    ema_decay: float | None
    tensors: int
    linear_fallback: int  # slerp: tensors interpolated linearly
    steps: list[int | None]  # each input's training step (input_step), None when unknown
    left_out: dict[str, str]  # entries of the first input not in the output -> why (LEFT_OUT)


def _copy_ignore(root: Path) -> Callable[[str, list[str]], set[str]]:
    """The ``shutil.copytree`` ignore function for copying the first input `root`: its weights and what the merge
    writes itself (:data:`NOT_COPIED`, at every level) and, at the top level, :data:`LEFT_OUT`."""
    patterns = shutil.ignore_patterns(*NOT_COPIED)

    def ignore(directory: str, names: list[str]) -> set[str]:
        ignored = set(patterns(directory, names))
        if Path(directory) == root:
            ignored |= {n for n in names if n in LEFT_OUT}
        return ignored

    return ignore


def _drop_recorded_step(model_dir: Path) -> None:
    """Remove the training step an export recorded from the copy `model_dir` (the merged weights are of no step)."""
    from pipeline.training.export import ST_CONFIG, STEP_KEY

    path = model_dir / ST_CONFIG
    cfg = _json(path)
    if isinstance(cfg, dict) and STEP_KEY in cfg:
        del cfg[STEP_KEY]
        path.write_text(json.dumps(cfg, indent=2))


def merge_models(inputs: Sequence[str | Path], out: str | Path, *, method: str = "mean",
                 weights: Sequence[float] | None = None, ema_decay: float = DEFAULT_EMA_DECAY,
                 overwrite: bool = False, progress: bool = True, trust_remote_code: bool = False) -> MergeResult:
    """Merge the model directories `inputs` into `out` (see the module docstring); `trust_remote_code`: run the code
    the inputs' tokenizer directories ship, to compare them. MergeError: bad input."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from pipeline.logs import log
    from pipeline.training.export import move_into_place

    if method not in METHODS:
        raise MergeError(f"--method: expected one of {', '.join(METHODS)}, got {method}")
    if len(inputs) < 2:
        raise MergeError(f"MODEL_DIR: give at least two model directories to merge, got {len(inputs)}")
    coefficients = linear_coefficients(method, len(inputs), weights, ema_decay) if method != "slerp" else None
    t = slerp_t(len(inputs), weights) if method == "slerp" else None
    out = Path(out)
    models = [ModelDir.open(p) for p in inputs]
    if any(out.resolve() == m.path.resolve() for m in models):
        raise MergeError(f"--out {out}: is one of the inputs")
    if out.exists() and not overwrite:
        raise MergeError(f"--out {out}: exists (pass --overwrite to replace it)")
    check_step_order(models, method)
    check_inputs(models, trust_remote_code=trust_remote_code)

    first = models[0]
    left_out = {name: why for name, why in LEFT_OUT.items() if (first.path / name).exists()}
    tmp = out.with_name(f".{out.name}.tmp")
    fallback = 0
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(first.path, tmp, ignore=_copy_ignore(first.path))
        _drop_recorded_step(tmp)
        if (first.path / WEIGHTS_INDEX).is_file():
            shutil.copy2(first.path / WEIGHTS_INDEX, tmp / WEIGHTS_INDEX)
        by_file: dict[str, list[str]] = {}
        for name, file in first.files.items():
            by_file.setdefault(file, []).append(name)
        bar = tqdm(total=len(first.files), desc=f"merge ({method})", unit="tensor", disable=not progress)
        for file, names in sorted(by_file.items()):
            merged: dict[str, torch.Tensor] = {}
            for name in names:
                v0 = first.tensor(name)
                if not v0.dtype.is_floating_point:
                    merged[name] = _equal_everywhere(v0, models, name)
                elif t is not None:
                    value, linear = slerp(t, v0, models[1].tensor(name))
                    fallback += linear
                    merged[name] = value.to(v0.dtype)
                else:
                    acc = v0.float() * coefficients[0]
                    for model, c in zip(models[1:], coefficients[1:]):
                        acc.add_(model.tensor(name).float(), alpha=c)
                    merged[name] = acc.to(v0.dtype)
                del v0
                bar.update(1)
            save_file(merged, str(tmp / file), metadata={"format": "pt"})
            del merged
        bar.close()
        result = MergeResult(out=out, method=method, inputs=[str(m.path) for m in models], coefficients=coefficients,
                             t=t, ema_decay=ema_decay if method == "ema" else None, tensors=len(first.files),
                             linear_fallback=fallback, steps=[m.step for m in models], left_out=left_out)
        record = {k: v for k, v in vars(result).items() if k != "out"}
        (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
        move_into_place(tmp, out)
        for name, why in left_out.items():
            log(f"{first.path / name}: left out of {out} ({why})")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f": {exc.filename}" if exc.filename else ""
        raise OSError(f"--out {out}: write failed ({exc.strerror or exc}{where}); nothing was replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for m in models:
            m.close()
    return result


def _equal_everywhere(value: torch.Tensor, models: Sequence[ModelDir], name: str) -> torch.Tensor:
    for other in models[1:]:
        if not torch.equal(value, other.tensor(name)):
            raise MergeError(f"{models[0].path}, {other.path}: {name} differs and is not floating point "
                             f"(cannot be averaged)")
    return value


# --------------------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from pipeline.evaluate import add_source_arguments

    p = argparse.ArgumentParser(
        prog="python -m pipeline.merge",
        usage="python -m pipeline.merge --out DIR MODEL_DIR [MODEL_DIR ...] [--method mean|ema|slerp] [options]\n"
              "       python -m pipeline.merge --search RUN_DIR --out BEST (--data PATH | --beir DIR ... | "
              "--mteb TASK ...) [options]",
        description="Merge model directories of one run (e.g. RUN/export/merge_step_<N>, written by "
                    "train.merge_every / train.merge_window) into one HF + sentence-transformers model directory; "
                    "or, with --search, build the usual merges of a run's exports, score each on held-out data and "
                    "write the best.",
        epilog="mean: sum_i w_i theta_i, w normalised to sum 1. ema: e_1 = theta_1, e_k = d e_(k-1) + (1 - d) "
               "theta_k in the given order. slerp: spherical interpolation of two models at t per tensor, linear "
               "for nearly parallel tensors (mergekit's rule). ema and slerp take the models oldest first: inputs "
               "whose steps (recorded by the export, or the N of a merge_step_<N> name) are out of order are "
               "refused, never reordered. Inputs must share architecture, tokenizer, pooling and prompts; else one "
               "'error:' line, exit 2. A LoRA export's adapter/ is left out: the merged weights are no rank-r "
               "adapter; the output is the full merged model. "
               "--search RUN_DIR: the candidates are RUN_DIR/export/final, each merge export, the mean of the last "
               "k checkpoints (k = 2..n; final counts when it is later than the last merge export), ema of all at "
               "each --ema-decays value, and slerp of the last two; each is built and scored one at a time on the "
               "evaluation data, tokenized once, with pipeline.evaluate's metrics (--metric; default MRR@10 for "
               "--data, nDCG@10 for --beir, the main score for --mteb, averaged over datasets/tasks). The table is "
               "printed, a PNG written (--plot), and the best candidate written to --out as a normal export with "
               "merge_search.json (every candidate's recipe and scores). Ties go to final, then single exports.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL_DIR",
                   help="model directories; oldest first for ema and slerp (checked against their steps)")
    p.add_argument("--out", required=True, help="output model directory (written to .DIR.tmp, then renamed); with "
                                                "--search: where the best candidate is written")
    p.add_argument("--method", choices=METHODS, default=None, help="merge rule (default mean)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="mean: one weight per model (default uniform; normalised to sum 1); slerp: t in [0, 1] "
                        "(default 0.5; 0 = the first model, 1 = the second)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help=f"ema: decay d in [0, 1] (default {DEFAULT_EMA_DECAY}); the last model weighs 1 - d")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code the inputs' tokenizer directories ship (transformers' auto_map) to "
                        "load them; only for directories from a trusted source")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    search = p.add_argument_group(
        "choosing the merge by evaluation (--search)",
        "the evaluation options are pipeline.evaluate's, with the same defaults")
    search.add_argument("--search", metavar="RUN_DIR",
                        help="a training run directory (or its export/ directory): score the candidates built from "
                             "export/final and export/merge_step_<N> and write the best to --out")
    search.add_argument("--metric", help="the score that picks the best: mrr@10, ndcg@10, recall@1, recall@10, "
                                         "recall@100 (--data, --beir) or main_score (--mteb); default mrr@10 for "
                                         "--data, ndcg@10 for --beir, main_score for --mteb")
    search.add_argument("--ema-decays", type=float, nargs="+", metavar="D",
                        help="ema candidates at these decays (default 0.5 0.7 0.9: the newest checkpoint weighs "
                             "0.5 / 0.3 / 0.1, from recency-weighted to oldest-weighted)")
    search.add_argument("--plot", dest="search_plot", metavar="PNG",
                        help="where the score plot goes (default BEST.search.png next to --out)")
    add_source_arguments(search, required=False)
    return p


SEARCH_ONLY = ("metric", "ema_decays", "search_plot", "data", "beir", "mteb", "registry", "dataset",
               "query_instruction", "prompt_name")


def _check_mode(args: argparse.Namespace) -> None:
    """--search and a plain merge take different options: MergeError naming the first that does not apply."""
    flag = {"ema_decays": "--ema-decays", "search_plot": "--plot", "query_instruction": "--query-instruction",
            "prompt_name": "--prompt-name"}
    if args.search is None:
        for key in SEARCH_ONLY:
            if getattr(args, key) is not None:
                name = flag.get(key, f"--{key.replace('_', '-')}")
                raise MergeError(f"{name}: only with --search RUN_DIR (it scores the merge candidates)")
        return
    if args.models:
        raise MergeError(f"--search {args.search}: builds its candidates from the run's exports; give no MODEL_DIR "
                         f"(got {args.models[0]})")
    for key, name in (("method", "--method"), ("weights", "--weights"), ("ema_decay", "--ema-decay")):
        if getattr(args, key) is not None:
            raise MergeError(f"{name}: not used by --search (it tries mean, ema at --ema-decays and slerp itself)")


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.data.raw import RawDataError
    from pipeline.data.registry import RegistryError
    from pipeline.data.shard_format import ShardError
    from pipeline.evaluation.retrieval import EvaluationError

    args = build_parser().parse_args(argv)
    try:
        _check_mode(args)
        if args.search is not None:
            from pipeline.merge_search import search

            found = search(args)
        else:
            result = merge_models(args.models, args.out, method=args.method or "mean", weights=args.weights,
                                  ema_decay=DEFAULT_EMA_DECAY if args.ema_decay is None else args.ema_decay,
                                  overwrite=args.overwrite, progress=not args.no_progress,
                                  trust_remote_code=args.trust_remote_code)
    except (MergeError, EvaluationError, ShardError, RawDataError, RegistryError, ConfigError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. --max-len too small, a model directory that cannot be loaded
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.search is not None:
        print(found.table)
        best, metric = found.best, found.metric
        gain = "" if found.final is None else (
            f" ({best.scores.metrics[metric] - found.final.scores.metrics[metric]:+.4f} vs final)")
        print(f"best: {best.candidate.name} ({best.candidate.describe()}), {metric} "
              f"{best.scores.metrics[metric]:.4f}{gain}; written to {found.out} (recipe and every candidate's "
              f"scores in {found.out / 'merge_search.json'})")
        if found.plot is not None:
            print(f"figure written to {found.plot}")
        return 0
    if result.t is not None:
        how = (f"t = {result.t:g}; {result.linear_fallback} of {result.tensors} tensors nearly parallel "
               f"(|cos| > {SLERP_DOT_THRESHOLD}): interpolated linearly")
    else:
        how = "coefficients " + ", ".join(f"{c:.4g}" for c in result.coefficients or [])
    print(f"merged {len(result.inputs)} models ({result.method}; {how}) into {result.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
