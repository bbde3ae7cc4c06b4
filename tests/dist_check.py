"""Tiny real distributed workload for the multi-node launch test (run by `deepspeed --hostfile`).

Initialises the process group through DeepSpeed (gloo on CPU), checks the world size, all-reduces a tensor, and
writes ``<out>/rank<R>.json`` with what this rank saw: its rank, node rank (CROSS_RANK, set by DeepSpeed's
per-node launcher), the host alias it was launched for (NODE_ALIAS, sent by the test's ssh config), and whether it
runs inside an ssh session. Exits non-zero if anything is off.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory for rank<R>.json")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--config", default=None, help="(passed by the launch scripts; recorded, not read)")
    parser.add_argument("--local_rank", type=int, default=None, help="(passed by deepspeed's launcher)")
    args = parser.parse_args()

    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if world != args.world_size:
            print(f"rank {rank}: world size {world}, expected {args.world_size}", file=sys.stderr)
            return 1
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        expected = world * (world + 1) / 2
        gathered: list = [None] * world
        dist.all_gather_object(gathered, os.environ.get("NODE_ALIAS"))
        record = {
            "rank": rank,
            "world_size": world,
            "local_rank": int(os.environ.get("LOCAL_RANK", "-1")),
            "node_rank": int(os.environ.get("CROSS_RANK", "-1")),
            "node_alias": os.environ.get("NODE_ALIAS"),
            "aliases_seen": gathered,
            "ssh_session": bool(os.environ.get("SSH_CONNECTION")),
            "hostname": socket.gethostname(),
            "all_reduce": t.item(),
            "all_reduce_ok": t.item() == expected,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "config": args.config,
            "cwd": os.getcwd(),
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        dist.barrier()
        return 0 if record["all_reduce_ok"] else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
