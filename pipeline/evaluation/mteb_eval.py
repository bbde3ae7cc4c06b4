"""MTEB evaluation of an exported model: ``python -m pipeline.evaluate --model DIR --mteb TASK [TASK ...]``.

MTEB (Muennighoff et al. 2023, "MTEB: Massive Text Embedding Benchmark"; the ``mteb`` package) cannot resolve a
local directory by name (``mteb.get_model(dir)`` builds an empty model card without a loader: "No model
implementation is available for this model"), but it runs any ``SentenceTransformer`` object it is handed. Our
export is a sentence-transformers directory (pooling, normalisation, EOS appended by its tokenizer) whose prompts
include the per-task-type keys MTEB looks up (:func:`pipeline.training.export.mteb_prompts`): retrieval and
reranking queries get the instruction of the retrieval data the model was trained on, classification and
clustering texts the instruction of their type, documents none. So::

    import mteb
    from sentence_transformers import SentenceTransformer
    results = mteb.evaluate(SentenceTransformer("runs/x/export/final"), mteb.get_tasks(tasks=["SciFact"]))

is the whole recipe; :func:`evaluate_mteb` runs it with one-line errors (unknown task, data that cannot be
downloaded) and reports, per task, the main score, every split's scores and the prompts MTEB picked. (MTEB warns
that the per-dataset prompt names of the export are not MTEB task names and ignores them; :func:`evaluate_mteb`
silences that warning.)
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline.evaluation.retrieval import EvaluationError


def _mteb() -> Any:
    try:
        import mteb
    except ImportError:
        raise EvaluationError("--mteb: the mteb package is not installed (pip install -e '.[mteb]')") from None
    return mteb


def load_sentence_transformer(model_dir: str, device: str, *, trust_remote_code: bool = False) -> Any:
    """The model directory as the ``SentenceTransformer`` MTEB runs (``pkg:`` paths allowed); `trust_remote_code`:
    run the code the directory ships (``--trust-remote-code``). One-line errors."""
    from pipeline.config import resolve_resource

    path = resolve_resource(model_dir) or model_dir
    if not (Path(path) / "modules.json").is_file():
        raise EvaluationError(f"--model {path}: not a sentence-transformers directory (no modules.json); MTEB runs "
                              "exports of this pipeline and sentence-transformers models")
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise EvaluationError(f"--model {path}: sentence-transformers cannot load it ({exc})") from None


def resolve_tasks(tasks: Sequence[Any]) -> list[Any]:
    """MTEB task objects from names (``mteb.get_task``) or task objects (passed through); an unknown name is an
    EvaluationError naming it."""
    mteb = _mteb()
    out = []
    for task in tasks:
        if not isinstance(task, str):
            out.append(task)
            continue
        try:
            out.append(mteb.get_task(task))
        except KeyError as exc:
            raise EvaluationError(f"--mteb {task}: not an MTEB task ({' '.join(str(exc).strip(chr(34)).split())})"
                                  ) from None
    return out


_INVALID_KEY = re.compile(r"Task name .* is not valid|Some prompts are not in the expected format")


class _DropInvalidKeyWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _INVALID_KEY.search(record.getMessage())


@contextlib.contextmanager
def _quiet_prompt_key_warnings() -> Iterator[None]:
    """Silence MTEB's warning that a prompt key is not an MTEB task name (the export's per-dataset prompts)."""
    loggers = [logging.getLogger(n) for n in ("mteb.models.abs_encoder", "mteb.models.sentence_transformer_wrapper")]
    drop = _DropInvalidKeyWarnings()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_INVALID_KEY.pattern)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def picked_prompts(model: Any, task: Any) -> dict[str, str | None]:
    """The model prompt names MTEB's sentence-transformers wrapper picks for the task's queries and documents,
    None where it picks none or an empty one (sentence-transformers adds empty ``query`` and ``document``
    prompts): MTEB's own lookup, ``mteb.models.abs_encoder.get_prompt_name``, over the model's prompts."""
    from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
    from mteb.types import PromptType

    with _quiet_prompt_key_warnings():
        prompts, _ = AbsEncoder.validate_task_to_prompt_name(dict(model.prompts or {}), raise_for_invalid_keys=False)
    out: dict[str, str | None] = {}
    for kind in (PromptType.query, PromptType.document):
        name = get_prompt_name(prompts, task.metadata, kind)
        out[kind.value] = name if name and prompts and prompts.get(name) else None
    return out


def evaluate_mteb(model: Any, tasks: Sequence[Any], *, batch_size: int = 32, progress: bool = True
                  ) -> dict[str, dict[str, Any]]:
    """Run MTEB `tasks` (names or task objects) on a ``SentenceTransformer`` `model` with ``mteb.evaluate``.

    Each task's data is loaded first: a task whose data cannot be had (MTEB downloads it from the Hugging Face
    Hub) is an EvaluationError naming the task. Returns {task: {type, main_score, score, scores: {split:
    {subset: {metric: value}}}, prompts, seconds}}; nothing is cached on disk.
    """
    mteb = _mteb()
    objs = resolve_tasks(tasks)
    for task in objs:
        if task.data_loaded:
            continue
        try:
            task.load_data()
        except Exception as exc:  # noqa: BLE001 - hub, network and dataset errors alike mean "no data"
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            raise EvaluationError(f"--mteb {task.metadata.name}: cannot load its data ({reason}); MTEB downloads "
                                  "task data from the Hugging Face Hub, which must be reachable (or cached)"
                                  ) from None
    out: dict[str, dict[str, Any]] = {}
    for task in objs:
        started = time.perf_counter()
        with _quiet_prompt_key_warnings():
            result = mteb.evaluate(model, task, cache=None, show_progress_bar=progress,
                                   encode_kwargs={"batch_size": batch_size, "show_progress_bar": progress})
        (task_result,) = result.task_results
        scores = {split: {entry.get("hf_subset", "default"): {k: v for k, v in entry.items()
                                                              if isinstance(v, (int, float)) and k != "main_score"}
                          for entry in entries}
                  for split, entries in task_result.scores.items()}
        out[task.metadata.name] = {
            "type": task.metadata.type,
            "main_score": task.metadata.main_score,
            "score": float(task_result.get_score()),
            "scores": scores,
            "prompts": picked_prompts(model, task),
            "seconds": round(time.perf_counter() - started, 2),
        }
    return out


def mteb_table(results: dict[str, dict[str, Any]]) -> str:
    header = f"{'MTEB task':<32} {'type':<16} {'main score':<14} {'value':>8}  query prompt / document prompt"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        p = r["prompts"]
        lines.append(f"{name:<32} {r['type']:<16} {r['main_score']:<14} {r['score']:>8.4f}  "
                     f"{p['query'] or 'none'} / {p['document'] or 'none'}")
    return "\n".join(lines)
