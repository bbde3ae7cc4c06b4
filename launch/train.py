#!/usr/bin/env python
"""Train an embedding model: ``deepspeed [--hostfile hosts | --num_gpus N] launch/train.py --config CONFIG``.

Also runs under ``torchrun`` and as a plain single process. Overrides: ``train.lr=1e-5 model.pooling=mean``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import ConfigError, load_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Contrastive training of an embedding model with GradCache and DeepSpeed ZeRO.",
        epilog="Example: deepspeed --num_gpus 8 launch/train.py --config configs/f2llm-v2-0.6b.yaml train.lr=1e-5",
    )
    parser.add_argument("--config", required=True, help="YAML training recipe (see configs/)")
    parser.add_argument("--resume", default=None,
                        help="'auto' = latest complete checkpoint in train.output_dir, or a checkpoint tag. Refused "
                             "(exit 2) when the checkpoint's run identity differs from this run's: global batch, "
                             "seed, datasets and their checksums, validation fraction, sampling temperature, the "
                             "loss section, the model; another world size at the same global batch is fine")
    parser.add_argument("--resume-force", action="store_true",
                        help="resume even though the run identity changed (a WARNING lists the changes)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=1e-5")
    check = parser.add_argument_group(
        "dry run", "--check validates the config, DeepSpeed JSON, data, tokenizer and hostfile without starting "
        "training (no process group, no model weights) and prints the resolved plan; exit 0 if valid, else 2 with "
        "one 'error: <key or file>: <what>' line per problem. The world size comes from --world-size, --hostfile "
        "(sum of slots, limited by --num_nodes / --num_gpus like deepspeed), --num_nodes x --num_gpus, or this "
        "machine (its GPUs, else 1 process).")
    check.add_argument("--check", action="store_true", help="validate everything and print the plan; do not train")
    check.add_argument("--hostfile", default=None, help="DeepSpeed hostfile ('HOST slots=N' lines) for the world size")
    check.add_argument("--num_nodes", "--num-nodes", type=int, default=None,
                       help="use the first N hosts of --hostfile, or N nodes of --num_gpus each")
    check.add_argument("--num_gpus", "--num-gpus", type=int, default=None, help="ranks per node")
    check.add_argument("--world-size", type=int, default=None, help="the world size, directly")
    check.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                       help="device of the ranks, for dtype/attention/bf16 (auto: this machine's)")
    check.add_argument("--sample-steps", type=int, default=8,
                       help="steps whose batches are built to measure chunks and tokens per step (default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check:
        from pipeline.training.plan import check_command

        return check_command(
            args.config, args.overrides, hostfile=args.hostfile, num_nodes=args.num_nodes, num_gpus=args.num_gpus,
            world_size=args.world_size, device=args.device, sample_steps=max(args.sample_steps, 1), resume=args.resume,
            resume_force=args.resume_force,
        )
    check_only = ("hostfile", "num_nodes", "num_gpus", "world_size")
    if any(getattr(args, name) is not None for name in check_only):
        parser.error("--hostfile, --num_nodes, --num_gpus and --world-size go with --check "
                     "(a launcher sets the world of a real run)")
    # DeepSpeed calls torch.distributed collectives that torch 2.13 marks deprecated, once per step per rank.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pipeline.training.errors import TrainingAborted
    from pipeline.logs import is_rank0
    from pipeline.data.shard_format import ShardError
    from pipeline.training.resume import ResumeRefused
    from pipeline.training.trainer import run

    try:
        run(cfg, resume=args.resume, resume_force=args.resume_force)
    except ResumeRefused as exc:  # every rank refuses alike, before the process group: one line
        if is_rank0():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ShardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingAborted as exc:  # agreed on every rank (checkpoint/export write error, non-finite steps)
        if is_rank0():
            print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
