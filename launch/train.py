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
        epilog="Example: deepspeed --num_gpus 8 launch/train.py --config configs/f2llm-0.6b.yaml train.lr=1e-5",
    )
    parser.add_argument("--config", required=True, help="YAML training recipe (see configs/)")
    parser.add_argument("--resume", default=None,
                        help="'auto' = latest complete checkpoint in train.output_dir, or a checkpoint tag")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=1e-5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # DeepSpeed calls torch.distributed collectives that torch 2.13 marks deprecated, once per step per rank.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pipeline.shard_format import ShardError
    from pipeline.trainer import run

    try:
        run(cfg, resume=args.resume)
    except (ShardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
