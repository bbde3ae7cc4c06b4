"""Merging chosen by evaluation: ``python -m pipeline.merge --search RUN_DIR --out BEST (--data | --beir | --mteb)``.

Qwen3-Embedding reports +2.5 MTEB (eng, v2) at 0.6B from merging checkpoints (Zhang et al. 2025,
arXiv:2506.05176, Table 5; slerp); F2LLM saves checkpoints "for ckpt merging" and ships no merge. Which merge helps
is an empirical question, so this command builds the usual candidates from one run's exports, scores every one on
held-out data with ``pipeline.evaluate``'s own metrics and writes the best as a normal export directory - model
soups' selection of ingredients by held-out score (Wortsman et al. 2022, arXiv:2203.05482, "greedy soup"), here
over a fixed list of recipes.

Checkpoints (:func:`find_checkpoints`): ``RUN_DIR/export/final`` and the merge exports
``RUN_DIR/export/merge_step_<N>`` that ``train.merge_every`` / ``train.merge_window`` write
(:func:`pipeline.training.export.merge_export_name`), ordered by the step each recorded (else the N of its name,
:func:`pipeline.merge.input_step`). The *sequence* merged is the merge exports oldest first, then ``final`` when it
recorded a later step than the last of them (a run whose length is not a multiple of ``merge_every``); when the
last merge export is at the final step it already holds the final weights, and a ``final`` without a recorded step
(exports of earlier versions) is left out of the sequence, since it may be a duplicate. Candidates
(:func:`plan_candidates`), theta_1 .. theta_n the sequence:

* each checkpoint alone: ``final``, then every merge export, newest first;
* ``mean`` of the last k, k = 2 .. n: (1 / k) sum_{i > n - k} theta_i - LAWA, latest weight averaging (Kaddour
  2022, arXiv:2209.14981), the uniform average of the last k checkpoints of one run;
* ``ema`` over the whole sequence at decays d = 0.5, 0.7, 0.9 (``--ema-decays``): theta_1 weighs d^(n-1), theta_k
  (k >= 2) (1 - d) d^(n-k) (:func:`pipeline.merge.linear_coefficients`). These three span what the uniform means
  cannot express: at 0.5 the newest checkpoint weighs 0.5 and the rest decay geometrically (recency-weighted, close
  to the last two); at 0.9 the newest weighs 0.1 and, over the few checkpoints a run exports (n <= 10), the oldest
  weighs d^(n-1) >= 0.39 - the most of all - so it tests whether the earlier checkpoints are the better ones, which a
  mean of the last k dilutes; 0.7 lies between;
* ``slerp`` of the last two at t = 0.5 (the merge Qwen3-Embedding used; :func:`pipeline.merge.slerp`).

Linear candidates with the same coefficients over the same inputs (e.g. ema at 0.5 of two checkpoints = their
mean) are evaluated once. With fewer than two checkpoints in the sequence the candidates are the single exports
only, and a log line says so.

Scoring (:class:`RetrievalScorer`, :class:`MtebScorer`): ``--data`` and ``--beir`` are read and tokenized ONCE, as
``pipeline.evaluate`` reads them (:func:`pipeline.evaluate.evaluation_inputs`, held in memory by
:meth:`pipeline.evaluate.EvalInputs.in_memory`), and every candidate embeds the same token arrays; each set is
scored by :func:`pipeline.evaluate.evaluate_inputs` (exact search, MRR@10 / nDCG@10 / Recall@k of
:func:`pipeline.evaluation.retrieval.retrieval_metrics`), so a candidate's score is what ``python -m
pipeline.evaluate --model BEST`` reports with the same options. All candidates share the tokenizer, pooling and
prompts (checked once, :func:`pipeline.merge.check_inputs`), so one tokenization serves all. ``--mteb`` runs the
tasks through :func:`pipeline.evaluation.mteb_eval.evaluate_mteb`; their data is loaded once, MTEB tokenizes per
model. The metric (``--metric``) defaults per source to what that source reports first: MRR@10 for ``--data``
(the demo's headline metric), nDCG@10 for ``--beir`` (what BEIR reports), the task's main
score for ``--mteb``; several datasets or tasks are averaged with equal weight (MTEB's mean over tasks).

Selection: the highest score wins; ties go to the candidate listed first (``final``, then single exports, then
merges): a merge is taken only when it scores strictly higher. Selecting the best of ~10 candidates on one set is
optimistic for that set (the winner's score includes its share of evaluation noise): the gain to expect on new data
is measured on data the search did not see.

Memory and disk: candidates stream one at a time - built (merged by :func:`pipeline.merge.merge_models`, which reads
the inputs tensor by tensor from memory-mapped safetensors, into a scratch directory ``.BEST.search`` next to
BEST), loaded, scored, released; only the scores stay, and the directory of the best so far (a merge's is kept, a
single export's is its own). At most one candidate's weights are in memory, and two merged directories on disk.

Output: BEST is the winner as a normal export directory (a merge: :func:`pipeline.merge.merge_models`' output with
its ``merge.json``; a single export: a copy of it), loadable by ``SentenceTransformer(BEST)`` and
``pipeline.evaluate --model BEST``, plus ``merge_search.json``: the run, evaluation source and options, metric, the
winner and every candidate's recipe (method, inputs, steps, coefficients, the ``pipeline.merge`` command that
rebuilds it) and scores. Written to ``.BEST.tmp`` and renamed into place (``--overwrite`` to replace BEST). The
table (candidates sorted by score, the winner marked) is printed, and a PNG (``--plot``, default
``BEST.search.png`` next to BEST) shows every candidate's score and, for the means, the score against k.
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.merge import MergeError, ModelDir, check_inputs, linear_coefficients, merge_models

DEFAULT_EMA_DECAYS = (0.5, 0.7, 0.9)
SLERP_T = 0.5
RECORD = "merge_search.json"
RETRIEVAL_METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100")
MTEB_METRIC = "main_score"
PRIMARY_METRIC = {"data": "mrr@10", "beir": "ndcg@10", "mteb": MTEB_METRIC}
METRIC_LABELS = {"mrr@10": "MRR@10", "ndcg@10": "nDCG@10", "recall@1": "R@1", "recall@10": "R@10",
                 "recall@100": "R@100", MTEB_METRIC: "main score"}


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and candidates
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """One export of the run: its directory and training step (None when unknown)."""

    path: Path
    step: int | None

    @property
    def label(self) -> str:
        return "final" if self.path.name == "final" else (
            f"step {self.step}" if self.step is not None else self.path.name)


@dataclass
class Candidate:
    """One model to score: a checkpoint alone (``method`` "single") or a merge of checkpoints (oldest first)."""

    name: str
    method: str  # single | mean | ema | slerp
    inputs: list[Checkpoint]
    ema_decay: float | None = None
    t: float | None = None
    coefficients: list[float] | None = None  # mean / ema (pipeline.merge.linear_coefficients)

    def describe(self) -> str:
        """The recipe in a few words, e.g. ``mean of steps 12, 14, 15``."""
        if self.method == "single":
            ckpt = self.inputs[0]
            return f"export {ckpt.path.name}" + (f" (step {ckpt.step})" if ckpt.step is not None else "")
        steps = [c.step for c in self.inputs]
        what = (f"steps {', '.join(map(str, steps))}" if None not in steps
                else ", ".join(c.path.name for c in self.inputs))
        if self.method == "ema":
            return f"ema d={self.ema_decay:g} of {what}"
        if self.method == "slerp":
            return f"slerp t={self.t:g} of {what}"
        return f"mean of {what}"

    def command(self, out: str | Path = "OUT") -> str:
        """The ``pipeline.merge`` command that rebuilds this candidate (a copy for a single export)."""
        paths = [shlex.quote(str(c.path)) for c in self.inputs]
        if self.method == "single":
            return f"cp -r {paths[0]} {shlex.quote(str(out))}"
        extra = (f" --ema-decay {self.ema_decay:g}" if self.method == "ema" else
                 f" --weights {self.t:g}" if self.method == "slerp" else "")
        return (f"python -m pipeline.merge --method {self.method}{extra} --out "
                f"{shlex.quote(str(out))} {' '.join(paths)}")

    def recipe(self) -> dict[str, Any]:
        return {"method": self.method, "inputs": [str(c.path) for c in self.inputs],
                "steps": [c.step for c in self.inputs], "coefficients": self.coefficients,
                "ema_decay": self.ema_decay, "t": self.t, "description": self.describe(), "command": self.command()}


def export_root(run_dir: Path) -> Path:
    """``RUN_DIR/export``, or RUN_DIR itself when it is an export directory (holds ``final`` or merge exports)."""
    from pipeline.training.export import merge_export_step

    if (run_dir / "export").is_dir():
        return run_dir / "export"
    if (run_dir / "final").is_dir() or any(merge_export_step(p.name) is not None for p in run_dir.iterdir()):
        return run_dir
    return run_dir / "export"


def find_checkpoints(run_dir: str | Path) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """(``final`` or None, the merge exports ordered by step) of a run directory; MergeError when it has none."""
    from pipeline.merge import input_step
    from pipeline.training.export import merge_export_step

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MergeError(f"--search {run_dir}: no such directory")
    root = export_root(run_dir)
    final = None
    if (root / "final" / "config.json").is_file():
        final = Checkpoint(root / "final", input_step(root / "final"))
    merges = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and merge_export_step(path.name) is not None and (path / "config.json").is_file():
                merges.append(Checkpoint(path, input_step(path)))
    if final is None and not merges:
        raise MergeError(f"--search {run_dir}: no exports (no {root / 'final'} and no {root}/merge_step_<N>; "
                         "train.merge_every / train.merge_window write the merge exports)")
    merges.sort(key=lambda c: (c.step, c.path.name))  # a merge_step_<N> name always gives a step
    return final, merges


def merge_sequence(final: Checkpoint | None, merges: Sequence[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints merged, oldest first: the merge exports, then ``final`` when it recorded a later step."""
    from pipeline.logs import log

    sequence = list(merges)
    if final is not None and merges:
        if final.step is None:
            log(f"{final.path}: records no training step; left out of the merges (it may hold the weights of "
                f"{merges[-1].path.name}), scored alone")
        elif final.step > merges[-1].step:
            sequence.append(final)
    return sequence


def plan_candidates(final: Checkpoint | None, merges: Sequence[Checkpoint],
                    ema_decays: Sequence[float] = DEFAULT_EMA_DECAYS) -> list[Candidate]:
    """The candidates in evaluation (and tie-break) order: singles (final, then merge exports newest first), means
    of the last k, ema at each decay, slerp of the last two. Linear merges with coefficients equal to an earlier
    one's (same inputs) are left out."""
    from pipeline.logs import log

    singles = ([final] if final is not None else []) + list(reversed(merges))
    candidates = [Candidate(c.label, "single", [c]) for c in singles]
    sequence = merge_sequence(final, merges)
    n = len(sequence)
    if n < 2:
        what = f"{len(merges)} merge export(s)" + (" and final" if final is not None else "")
        log(f"merge search: {what}, {n} checkpoint(s) to merge: merging needs at least 2 (train.merge_every / "
            f"train.merge_window), so the candidates are the single exports only")
        return candidates
    seen: list[tuple[list[Path], list[float]]] = []

    def linear(name: str, method: str, inputs: list[Checkpoint], decay: float | None) -> Candidate | None:
        coefficients = linear_coefficients(method, len(inputs), None, decay if decay is not None else 0.5)
        paths = [c.path for c in inputs]
        for other_paths, other in seen:
            if other_paths == paths and all(abs(a - b) < 1e-12 for a, b in zip(other, coefficients)):
                log(f"merge search: {name} has the coefficients of an earlier candidate; scored once")
                return None
        seen.append((paths, coefficients))
        return Candidate(name, method, inputs, ema_decay=decay, coefficients=coefficients)

    for k in range(2, n + 1):
        cand = linear(f"mean last {k}", "mean", sequence[n - k:], None)
        if cand is not None:
            candidates.append(cand)
    for decay in ema_decays:
        cand = linear(f"ema {decay:g}", "ema", sequence, decay)
        if cand is not None:
            candidates.append(cand)
    candidates.append(Candidate("slerp last 2", "slerp", sequence[-2:], t=SLERP_T))
    return candidates


# --------------------------------------------------------------------------------------------------------------
# Scoring: the evaluation data read once, every candidate scored on it
# --------------------------------------------------------------------------------------------------------------
def load_candidate(model_dir: Path, args: argparse.Namespace) -> Any:
    """The candidate at `model_dir` as ``pipeline.evaluate`` loads it: an EmbeddingModel for --data / --beir, a
    SentenceTransformer for --mteb (the one place a candidate's weights enter memory)."""
    if args.mteb:
        from pipeline.evaluation.mteb_eval import load_sentence_transformer

        return load_sentence_transformer(str(model_dir), args.device, trust_remote_code=args.trust_remote_code)
    from pipeline.model.embedding import load_model_dir

    return load_model_dir(str(model_dir), args.device, trust_remote_code=args.trust_remote_code)[0]


@dataclass
class Scores:
    metrics: dict[str, float]  # each metric averaged over the datasets / tasks
    datasets: dict[str, dict[str, float]]
    seconds: float


class RetrievalScorer:
    """``--data`` / ``--beir``: the sets tokenized once with the first checkpoint's tokenizer and prompts (all
    candidates share them), held as token arrays, scored by :func:`pipeline.evaluate.evaluate_inputs`."""

    metrics = RETRIEVAL_METRICS

    def __init__(self, args: argparse.Namespace, model_dir: Path, beir_sets: Sequence[Any]) -> None:
        from pipeline.data.tokenization import load_tokenizer
        from pipeline.evaluate import evaluation_inputs
        from pipeline.evaluation.retrieval import EvaluationError

        self.args = args
        try:
            tokenizer = load_tokenizer(str(model_dir), args.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"{model_dir}: cannot load its tokenizer ({exc})") from None
        started = time.perf_counter()
        self.inputs = [inputs.in_memory() for inputs in evaluation_inputs(args, str(model_dir), tokenizer, beir_sets)]
        self.read_seconds = time.perf_counter() - started
        if not self.inputs:
            raise EvaluationError(f"--data {args.data}: no dataset to evaluate")
        self.description = {name: {"queries": len(i.queries), "docs": len(i.corpus), **i.record}
                            for name, i in ((i.name, i) for i in self.inputs)}

    def score(self, model: Any) -> dict[str, dict[str, float]]:
        from pipeline.evaluate import evaluate_inputs

        out = {}
        for inputs in self.inputs:
            res = evaluate_inputs(model, inputs, self.args)
            out[inputs.name] = {m: res[m] for m in self.metrics}
        return out


class MtebScorer:
    """``--mteb``: the tasks resolved and their data loaded once, each candidate run by
    :func:`pipeline.evaluation.mteb_eval.evaluate_mteb` (main score per task)."""

    metrics = (MTEB_METRIC,)

    def __init__(self, args: argparse.Namespace, tasks: Sequence[Any]) -> None:
        self.args = args
        self.tasks = list(tasks)
        self.read_seconds = 0.0
        self.description = {t.metadata.name: {"type": t.metadata.type, "main_score": t.metadata.main_score}
                            for t in self.tasks}

    def score(self, model: Any) -> dict[str, dict[str, float]]:
        from pipeline.evaluation.mteb_eval import evaluate_mteb

        res = evaluate_mteb(model, self.tasks, batch_size=self.args.mteb_batch_size,
                            progress=not self.args.no_progress)
        return {name: {MTEB_METRIC: r["score"]} for name, r in res.items()}


def source_kind(args: argparse.Namespace) -> str:
    return "mteb" if args.mteb else "beir" if args.beir else "data"


def resolve_metric(args: argparse.Namespace) -> str:
    """``--metric``, or the source's primary metric (:data:`PRIMARY_METRIC`); MergeError naming the choices."""
    kind = source_kind(args)
    metric = args.metric or PRIMARY_METRIC[kind]
    allowed = (MTEB_METRIC,) if kind == "mteb" else RETRIEVAL_METRICS
    if metric not in allowed:
        raise MergeError(f"--metric {metric}: not reported for --{kind} (choose from {', '.join(allowed)})")
    return metric


def score_candidate(model_dir: Path, scorer: Any, args: argparse.Namespace) -> Scores:
    """Load the candidate, score it, release it: only the scores outlive this call."""
    started = time.perf_counter()
    model = load_candidate(model_dir, args)
    alive = weakref.ref(model)
    try:
        datasets = scorer.score(model)
    finally:
        del model
        if alive() is not None:  # held by a reference cycle: free it before the next candidate loads
            gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    metrics = {m: sum(d[m] for d in datasets.values()) / len(datasets) for m in scorer.metrics}
    return Scores(metrics, datasets, round(time.perf_counter() - started, 2))


# --------------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Scored:
    candidate: Candidate
    scores: Scores


@dataclass
class SearchResult:
    out: Path
    metric: str
    scored: list[Scored]  # in evaluation order
    best: Scored
    final: Scored | None
    plot: Path | None
    table: str
    record: dict[str, Any] = field(repr=False)


def _build(candidate: Candidate, scratch: Path, index: int, trust_remote_code: bool) -> tuple[Path, bool]:
    """(directory of the candidate, whether it is a scratch directory of ours)."""
    if candidate.method == "single":
        return candidate.inputs[0].path, False
    out = scratch / f"candidate_{index:03d}"
    weights = [candidate.t] if candidate.method == "slerp" else None
    merge_models([c.path for c in candidate.inputs], out, method=candidate.method, weights=weights,
                 ema_decay=candidate.ema_decay if candidate.ema_decay is not None else 0.5, progress=False,
                 trust_remote_code=trust_remote_code)
    return out, True


def search(args: argparse.Namespace) -> SearchResult:
    """``python -m pipeline.merge --search RUN_DIR --out BEST ...`` (see the module docstring). `args`: the merge
    command's namespace (``search``, ``out``, ``metric``, ``ema_decays``, ``search_plot``, ``overwrite``, and the
    evaluation options of :func:`pipeline.evaluate.add_source_arguments`)."""
    from tqdm import tqdm

    from pipeline.evaluate import check_options
    from pipeline.logs import log
    from pipeline.training.export import move_into_place

    started = time.perf_counter()
    if not (args.data or args.beir or args.mteb):
        raise MergeError("--search: give the evaluation data: --data PATH, --beir DIR ... or --mteb TASK ...")
    check_options(args)
    metric = resolve_metric(args)
    decays = list(args.ema_decays) if args.ema_decays is not None else list(DEFAULT_EMA_DECAYS)
    bad = [d for d in decays if not 0 <= d <= 1]
    if bad:
        raise MergeError(f"--ema-decays: must be in [0, 1], got {bad[0]:g}")
    final, merges = find_checkpoints(args.search)
    checkpoints = ([final] if final is not None else []) + merges
    out = Path(args.out)
    if any(out.resolve() == c.path.resolve() for c in checkpoints):
        raise MergeError(f"--out {out}: is one of the run's exports")
    if out.exists() and not args.overwrite:
        raise MergeError(f"--out {out}: exists (pass --overwrite to replace it)")
    plot_path = Path(args.search_plot) if args.search_plot else out.with_name(f"{out.name}.search.png")
    if args.mteb:  # the source is checked before any model is opened
        from pipeline.evaluation.mteb_eval import resolve_tasks

        tasks, beir_sets = resolve_tasks(args.mteb), []
    else:
        from pipeline.evaluate import check_source

        tasks, beir_sets = [], check_source(args)
    candidates = plan_candidates(final, merges, decays)
    models = [ModelDir.open(c.path) for c in checkpoints]
    check_inputs(models, trust_remote_code=args.trust_remote_code)  # one tokenizer and prompts serve all
    for m in models:
        m.close()
    log(f"merge search: {len(candidates)} candidates from {len(checkpoints)} exports of {args.search} "
        f"({', '.join(c.label for c in checkpoints)}), scored by {METRIC_LABELS[metric]} on "
        f"{_source_text(args)}")

    scorer: Any = MtebScorer(args, tasks) if args.mteb else RetrievalScorer(args, checkpoints[0].path, beir_sets)
    scratch = out.with_name(f".{out.name}.search")
    tmp = out.with_name(f".{out.name}.tmp")
    scored: list[Scored] = []
    best: Scored | None = None
    best_dir: tuple[Path, bool] | None = None  # (directory, whether it is a merge in `scratch`)
    try:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        for i, cand in enumerate(tqdm(candidates, desc="merge search", unit="candidate",
                                      disable=args.no_progress)):
            model_dir, ours = _build(cand, scratch, i, args.trust_remote_code)
            entry = Scored(cand, score_candidate(model_dir, scorer, args))
            scored.append(entry)
            value = entry.scores.metrics[metric]
            log(f"merge search [{i + 1}/{len(candidates)}] {cand.name} ({cand.describe()}): "
                f"{METRIC_LABELS[metric]} {value:.4f}")
            if best is None or value > best.scores.metrics[metric]:  # ties: the earlier candidate stays
                if best_dir is not None and best_dir[1]:
                    shutil.rmtree(best_dir[0])
                best, best_dir = entry, (model_dir, ours)
            elif ours:
                shutil.rmtree(model_dir)
        assert best is not None and best_dir is not None
        final_entry = next((s for s in scored if final is not None and s.candidate.method == "single"
                            and s.candidate.inputs[0] == final), None)
        table = search_table(scored, best, final_entry, metric, scorer.metrics)
        try:
            plot = plot_search(plot_path, scored, best, final_entry, metric)
            record = _record(args, scorer, metric, scored, best, final_entry, plot, out)
            record["search_seconds"] = round(time.perf_counter() - started, 1)
            shutil.rmtree(tmp, ignore_errors=True)
            if best_dir[1]:
                best_dir[0].rename(tmp)
            else:
                shutil.copytree(best_dir[0], tmp)
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            move_into_place(tmp, out)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            where = f": {exc.filename}" if exc.filename else ""
            raise OSError(f"--out {out}: write failed ({exc.strerror or exc}{where}); nothing was replaced"
                          ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"merge search: best {best.candidate.name} ({best.candidate.describe()}), {METRIC_LABELS[metric]} "
        f"{best.scores.metrics[metric]:.4f}, written to {out}")
    return SearchResult(out, metric, scored, best, final_entry, plot, table, record)


def _source_text(args: argparse.Namespace) -> str:
    if args.mteb:
        return "MTEB " + ", ".join(_task_names(args.mteb))
    if args.beir:
        return "BEIR " + ", ".join(args.beir) + f" ({args.split})"
    return f"--data {args.data}"


def _task_names(tasks: Sequence[Any]) -> list[str]:
    """``--mteb`` as names (it may hold task objects when called from Python)."""
    return [t if isinstance(t, str) else t.metadata.name for t in tasks]


def _record(args: argparse.Namespace, scorer: Any, metric: str, scored: Sequence[Scored], best: Scored,
            final: Scored | None, plot: Path | None, out: Path) -> dict[str, Any]:
    """The content of BEST/merge_search.json."""
    keys = {"data": ("data", "dataset", "registry", "query_instruction", "prompt_name", "max_len", "batch_tokens",
                     "corpus_block"),
            "beir": ("beir", "split", "query_instruction", "prompt_name", "max_len", "batch_tokens", "corpus_block"),
            "mteb": ("mteb", "mteb_batch_size")}[source_kind(args)]
    gain = None if final is None else best.scores.metrics[metric] - final.scores.metrics[metric]
    return {
        "run_dir": str(args.search),
        "metric": metric,
        "source": {k: _task_names(getattr(args, k)) if k == "mteb" else getattr(args, k)
                   for k in keys if getattr(args, k, None) not in (None, [])},
        "evaluation_sets": scorer.description,
        "tokenized_once_seconds": round(scorer.read_seconds, 2),
        "best": {"name": best.candidate.name, "recipe": {**best.candidate.recipe(),
                                                         "command": best.candidate.command(out)},
                 "score": best.scores.metrics[metric], "scores": best.scores.metrics},
        "final_score": None if final is None else final.scores.metrics[metric],
        "gain_over_final": gain,
        "plot": None if plot is None else str(plot),
        "candidates": [{"name": s.candidate.name, "recipe": s.candidate.recipe(), "score": s.scores.metrics[metric],
                        "scores": s.scores.metrics, "datasets": s.scores.datasets, "seconds": s.scores.seconds}
                       for s in scored],
    }


def ranked(scored: Sequence[Scored], metric: str) -> list[Scored]:
    """Candidates by score, best first; equal scores keep the evaluation order (the tie-break of the search)."""
    return sorted(scored, key=lambda s: -s.scores.metrics[metric])


def search_table(scored: Sequence[Scored], best: Scored, final: Scored | None, metric: str,
                 metrics: Sequence[str]) -> str:
    """One line per candidate, best first: name, recipe, every metric, the difference to ``final`` in `metric`;
    the winner marked ``*``."""
    cols = [metric] + [m for m in metrics if m != metric]
    width = max(len(s.candidate.describe()) for s in scored)
    name_w = max(len(s.candidate.name) for s in scored)
    header = (f"  {'candidate':<{name_w}}  {'recipe':<{width}} " + " ".join(f"{METRIC_LABELS[m]:>10}" for m in cols)
              + f" {'vs final':>9}")
    lines = [header, "-" * len(header)]
    for s in ranked(scored, metric):
        mark = "*" if s is best else " "
        diff = "" if final is None else f"{s.scores.metrics[metric] - final.scores.metrics[metric]:+9.4f}"
        lines.append(f"{mark} {s.candidate.name:<{name_w}}  {s.candidate.describe():<{width}} "
                     + " ".join(f"{s.scores.metrics[m]:>10.4f}" for m in cols) + f" {diff:>9}")
    lines.append(f"* best by {METRIC_LABELS[metric]}; ties go to the candidate scored first (final, single "
                 "exports, then merges)")
    return "\n".join(lines)


def plot_search(path: Path, scored: Sequence[Scored], best: Scored, final: Scored | None, metric: str) -> Path:
    """PNG: every candidate's score (bars, best first, the winner highlighted, ``final`` as a dashed line) and, when
    there are means of the last k, the score against k (k = 1: the newest checkpoint alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = sorted((len(s.candidate.inputs), s) for s in scored if s.candidate.method == "mean")
    fig, axes = plt.subplots(1, 2 if means else 1, figsize=(12 if means else 7, 0.35 * len(scored) + 2),
                             squeeze=False)
    ax = axes[0][0]
    order = ranked(scored, metric)[::-1]
    values = [s.scores.metrics[metric] for s in order]
    colors = ["C1" if s is best else ("C2" if s is final else "C0") for s in order]
    ax.barh(range(len(order)), values, color=colors)
    ax.set_yticks(range(len(order)), [f"{s.candidate.name}: {s.candidate.describe()}" for s in order], fontsize=8)
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.25, 1e-3)
    ax.set_xlim(lo - pad, hi + pad)
    for y, v in enumerate(values):
        ax.annotate(f"{v:.4f}", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    if final is not None:
        ax.axvline(final.scores.metrics[metric], color="C2", linestyle="--", linewidth=1, label="final")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(METRIC_LABELS[metric])
    ax.set_title(f"merge candidates by {METRIC_LABELS[metric]} (best: {best.candidate.name})")
    if means:
        ax2 = axes[0][1]
        newest = means[0][1].candidate.inputs[-1]
        single = next((s for s in scored if s.candidate.method == "single" and s.candidate.inputs[0] == newest), None)
        points = ([(1, single)] if single is not None else []) + means
        ax2.plot([k for k, _ in points], [s.scores.metrics[metric] for _, s in points], marker="o",
                 label="mean of the newest k")
        if final is not None:
            ax2.axhline(final.scores.metrics[metric], color="C2", linestyle="--", linewidth=1, label="final")
        ax2.set_xticks([k for k, _ in points])
        ax2.set_xlabel("k (checkpoints averaged, newest first)")
        ax2.set_ylabel(METRIC_LABELS[metric])
        ax2.set_title("uniform mean of the last k checkpoints")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
