"""Command line of the offline data jobs:
``python -m preprocess {build,merge,validate,stats,show,example,code-pairs,mine-negatives,score,decontaminate}
--help``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.data.shard_format import ShardError
from pipeline.data.raw import RawDataError
from pipeline.data.registry import RegistryError

USER_ERRORS = (ShardError, RawDataError, RegistryError, ValueError, OSError)


def _cmd_build(args: argparse.Namespace) -> int:
    from preprocess.build import BuildOptions, ShardBuilder, summary_table

    builder = ShardBuilder(
        BuildOptions(
            raw=args.raw,
            tokenizer=args.tokenizer,
            out=args.out,
            registry=args.registry,
            max_len=args.max_len,
            workers=args.workers,
            max_rows_per_dataset=args.max_rows_per_dataset,
            seed=args.seed,
            overwrite=args.overwrite,
            default_type=args.default_type,
            max_file_gb=args.max_file_gb,
            num_parts=args.num_parts,
            part=args.part,
            trust_remote_code=args.trust_remote_code,
            decontaminate=args.decontaminate,
            eval_split=args.eval_split,
        )
    )
    results = builder.run()
    print(summary_table(results))
    if args.decontaminate:
        from preprocess.decontaminate import REPORT_FILE

        for r in results:
            skipped = {k: v for k, v in r.meta["counts"]["skipped"].items() if k.startswith("contaminated_")}
            reasons = ", ".join(f"{k} {v:,}" for k, v in skipped.items()) or "none"
            print(f"{r.name}: {sum(skipped.values()):,} rows dropped as contaminated ({reasons})")
        print(f"decontamination report: {os.path.join(args.out, REPORT_FILE)}")
    what = f"part {args.part} of {args.num_parts}" if args.num_parts > 1 else "shards"
    print(f"{what} written to {args.out}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from preprocess.build import summary_table
    from preprocess.merge import MergeOptions, PartMerger

    results = PartMerger(MergeOptions(parts=args.parts, out=args.out, max_file_gb=args.max_file_gb,
                                      overwrite=args.overwrite)).run()
    print(summary_table(results))
    print(f"{len(args.parts)} parts merged into {args.out}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from preprocess.validate import validate_shards

    counts = validate_shards(args.out)
    print(f"{args.out}: OK ({len(counts)} datasets, {sum(counts.values()):,} queries)")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from pipeline.data.shards import ShardReader
    from preprocess.report import shard_stats, stats_table

    stats = shard_stats(args.out)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(stats_table(stats, ShardReader(args.out).max_len))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from preprocess.report import show_example
    from pipeline.data.tokenization import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, args.trust_remote_code) if args.tokenizer else None
    if tokenizer is not None:
        from pipeline.data.shards import ShardReader

        ShardReader(args.out, datasets=[args.dataset]).check_tokenizer(tokenizer)
    example = show_example(args.out, args.dataset, args.index, tokenizer, trust_remote_code=args.trust_remote_code)
    print(json.dumps(example, indent=2, ensure_ascii=False))
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    from preprocess.synth import SynthOptions, generate

    written = generate(SynthOptions(out=args.out, passages=args.passages, negatives=args.negatives, seed=args.seed))
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"registry: {os.path.join(args.out, 'datasets.yaml')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess",
        description="Tokenize raw query/passage/negative datasets into memory-mapped token shards, and inspect them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="tokenize raw datasets (parquet / JSONL) into a shard directory")
    p.add_argument("--raw", required=True, help="directory of <dataset>.parquet / <dataset>.jsonl files, or one file")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory (the model's)")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--registry", help="datasets.yaml: type and instruction per dataset")
    p.add_argument("--default-type", choices=["retrieval", "classification", "clustering"],
                   help="type for datasets missing from the registry (default: missing ones are an error)")
    p.add_argument("--max-len", type=int, default=1024, help="max tokens per sequence, EOS included (default 1024)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="tokenizer worker processes (default: CPU count, at most 8)")
    p.add_argument("--max-rows-per-dataset", type=int, help="subsample each dataset to at most N rows (seeded)")
    p.add_argument("--seed", type=int, default=0, help="subsampling seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an output built with other settings")
    p.add_argument("--max-file-gb", type=float, default=4.0,
                   help="split each table into files of at most this many GiB (default 4)")
    p.add_argument("--num-parts", type=int, default=1,
                   help="build only part --part of N, split by a hash of the query text (one task per machine; "
                   "join with `merge`)")
    p.add_argument("--part", type=int, default=0, help="which part, 0 .. num-parts - 1 (default 0)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code the tokenizer directory ships (transformers' auto_map) to load it; only "
                        "for a directory from a trusted source")
    p.add_argument("--decontaminate", nargs="+", metavar="EVAL",
                   help="drop every row whose query or positive matches an evaluation query or relevant document "
                        "(equal after normalisation, or a shared 13-word window): BEIR directories, raw "
                        ".jsonl/.parquet pairs or directories of them, or mteb:TASK (from the local Hugging Face "
                        "cache only); counted per reason in the manifest, listed in OUT/decontamination.jsonl")
    p.add_argument("--eval-split", default="test",
                   help="--decontaminate: the BEIR / MTEB split whose qrels define the evaluation queries and "
                        "relevant documents (default test)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("merge", help="join the parts of `build --num-parts N` into one shard directory")
    p.add_argument("parts", nargs="+", metavar="PART_DIR", help="the N part directories (any order)")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--max-file-gb", type=float, default=4.0,
                   help="split each table into files of at most this many GiB (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("validate", help="check a shard directory completely (checksums, structure, EOS, ids)")
    p.add_argument("out", help="shard directory")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("stats", help="per-dataset counts and length percentiles")
    p.add_argument("out", help="shard directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("show", help="one training example decoded back to text, as JSON")
    p.add_argument("out", help="shard directory")
    p.add_argument("--dataset", required=True, help="dataset name")
    p.add_argument("--index", type=int, default=0, help="query row index (default 0)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded in the manifest)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code the tokenizer directory ships (transformers' auto_map) to load it")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("example", help="generate synthetic example raw datasets and their registry")
    p.add_argument("--out", required=True, help="output directory for the raw files")
    p.add_argument("--passages", type=int, default=20_000, help="retrieval corpus size (default 20000)")
    p.add_argument("--negatives", type=int, default=7, help="hard negatives per retrieval query (default 7)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_example)

    from preprocess import code_pairs, decontaminate, mine_negatives, score

    p = sub.add_parser("code-pairs", help="docstring -> code retrieval pairs (raw JSONL, split by module) from a "
                       "Python source tree")
    code_pairs.add_arguments(p)
    p.set_defaults(func=code_pairs.run_cli)

    p = sub.add_parser("mine-negatives", help="mine hard negatives for raw datasets with an embedding model")
    mine_negatives.add_arguments(p)
    p.set_defaults(func=mine_negatives.run_cli)

    p = sub.add_parser("score", help="teacher scores of every query's positive and negative pool, into the shards "
                       "(score distillation; torchrun for all GPUs of a node)")
    score.add_arguments(p)
    p.set_defaults(func=score.run_cli)

    p = sub.add_parser("decontaminate", help="report the training rows whose query or positive matches an "
                       "evaluation query or relevant document (exact after normalisation, or a shared 13-word "
                       "window), per dataset, without building")
    decontaminate.add_arguments(p)
    p.set_defaults(func=decontaminate.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
