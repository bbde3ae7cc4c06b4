"""Small torch.distributed helpers: init/teardown, rank/world size, differentiable all-gather, reductions.

Every function works unchanged in a single process (no process group): gathers return the input, reductions are
identities. Collectives here must be called by every rank the same number of times, in the same order.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.logs import log


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launched_world_size() -> int:
    """The world size the launcher (torchrun, deepspeed) set in WORLD_SIZE, 1 without one: known before the process
    group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_distributed() -> bool:
    """True when a launcher (torchrun, deepspeed) started several processes (WORLD_SIZE > 1)."""
    return launched_world_size() > 1


DEFAULT_TIMEOUT_S = 300.0  # train.collective_timeout_s's default; torch's own is 10 min (NCCL) / 30 min (gloo)


def interface_towards(address: str) -> str | None:
    """The network interface this host sends from to reach `address` (an IP or a host name): the one holding the
    source address the kernel picks for it (the address's own interface when it is local). None when `address`
    does not resolve, has no route, or is reached over loopback."""
    import socket

    try:
        import psutil  # a DeepSpeed dependency (its launcher uses it)
    except ImportError:
        return None
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(address, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)  # UDP: nothing is sent; the kernel picks the route and the source address
            source = probe.getsockname()[0]
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == source for a in addrs if a.family == family):
            return None if name == "lo" or source.startswith("127.") or source == "::1" else name
    return None


def choose_gloo_interface() -> str | None:
    """Set GLOO_SOCKET_IFNAME, when unset and MASTER_ADDR is not loopback, to the interface towards MASTER_ADDR.

    Unset, gloo binds the address this host's name resolves to, and falls back to loopback when the name resolves
    to none of its addresses (or resolves to 127.0.1.1, as Debian's /etc/hosts does): every rank then advertises a
    loopback address to the others and a multi-node rendezvous fails ("Gloo connectFullMesh failed ... Connection
    refused" after minutes). The route to the master address is what every host has. Returns the interface set.
    """
    master = os.environ.get("MASTER_ADDR", "")
    if os.environ.get("GLOO_SOCKET_IFNAME") or not master or master == "localhost" or master.startswith("127."):
        return None
    iface = interface_towards(master)
    if iface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = iface
    return iface


def init_distributed(*, use_deepspeed: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Initialise the default process group when launched with WORLD_SIZE > 1 (or always for DeepSpeed).

    Backend: nccl on CUDA, gloo on CPU (DeepSpeed picks it by itself through its accelerator). Launched with several
    processes and GLOO_SOCKET_IFNAME unset, gloo gets the interface towards MASTER_ADDR (:func:`choose_gloo_interface`).
    `timeout_s` bounds every collective of the group: gloo raises in the waiting rank ("Timed out waiting ...");
    NCCL's watchdog aborts the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, set to 3 = abort without cleanup unless
    already set).
    """
    if timeout_s <= 0:
        raise ValueError(f"train.collective_timeout_s: must be > 0, got {timeout_s}")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if not is_distributed() and (launched_distributed() or use_deepspeed):
        iface = choose_gloo_interface() if launched_distributed() else None
        if iface is not None:
            log(f"distributed: GLOO_SOCKET_IFNAME={iface} (this host's interface towards MASTER_ADDR "
                f"{os.environ['MASTER_ADDR']}; set GLOO_SOCKET_IFNAME to choose another)")
        if use_deepspeed:
            import deepspeed

            if "MASTER_ADDR" not in os.environ:  # single process without a launcher
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
                os.environ.setdefault("RANK", "0")
                os.environ.setdefault("LOCAL_RANK", "0")
                os.environ.setdefault("WORLD_SIZE", "1")
            deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
        else:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and is_distributed():
        torch.cuda.set_device(local_rank)
    info = DistInfo(rank(), world_size(), local_rank, dist.get_backend() if is_distributed() else None)
    if info.world_size > 1:
        log(f"distributed: world size {info.world_size}, backend {info.backend}")
    return info


def teardown() -> None:
    """Destroy the process group (without it, multi-node launches linger for minutes after the last step)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_with_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `t` from all ranks along dim 0, keeping the autograd graph.

    Backward: each rank receives the SUM over ranks of the gradients flowing into its slice
    (torch.distributed.nn.functional.all_gather). Ranks may hold different numbers of rows: sizes are exchanged
    first (unless given as `sizes`) and shorter inputs are zero-padded (the padding is dropped from the result).
    """
    if not is_distributed() or world_size() == 1:
        return t
    import torch.distributed.nn.functional as dist_fn

    if sizes is None:
        sizes = gather_sizes(t.shape[0], t.device)
    longest = max(sizes)
    padded = t
    if t.shape[0] < longest:
        padded = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    with warnings.catch_warnings():  # deprecated in favour of functional collectives, whose backward is not wired
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def all_gather_rows(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate `t` ([sizes[rank], ...], any dtype) from all ranks along dim 0, without gradient; shorter inputs
    are zero-padded to the longest for the collective and the padding dropped."""
    if not is_distributed() or world_size() == 1:
        return t
    longest = max(sizes)
    padded = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))]) if t.shape[0] < longest else t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's `n`, as a list indexed by rank."""
    if not is_distributed() or world_size() == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [int(x.item()) for x in out]


def all_reduce_max(value: int, device: torch.device | str = "cpu") -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in place (what DDP / DeepSpeed do); one flat all-reduce."""
    if not is_distributed() or world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_rows_to_rank0(t: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's rows of `t` ([n_r, ...], n_r may differ by rank) on rank 0, as a list indexed by rank; None on
    the other ranks. One size all-gather and one gather (no other rank holds more than its own rows)."""
    if not is_distributed() or world_size() == 1:
        return [t]
    sizes = gather_sizes(t.shape[0], t.device)
    longest = max(sizes)
    padded = t if t.shape[0] == longest else torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes] if rank() == 0 else None
    dist.gather(padded.contiguous(), parts, dst=0)
    if parts is None:
        return None
    return [p[:n] for p, n in zip(parts, sizes)]


def broadcast_from_rank0(obj: object) -> object:
    """Rank 0's `obj` (any picklable value) on every rank."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
