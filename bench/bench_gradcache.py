"""GradCache / packing benchmark on CPU (tiny random Qwen3): prints a markdown table of medians.

    PYTHONPATH=. python bench/bench_gradcache.py                  # everything (~10 min on 2 cores)
    PYTHONPATH=. python bench/bench_gradcache.py --sections time,packing --repeats 5

Workload: queries ~ N(30, 8) tokens, passages log-normal with median 200 (sigma 0.6), capped at 1024, every
sequence ending in EOS; hard negatives per query (--n-neg). Sections:
- time: cached vs plain step time per sample at the same B and chunk budget (target cached <= 1.45x plain);
- packing: one training step (cached) per layout: padding efficiency (real / computed tokens; target packed >= 95%)
  and real tokens/s; padded-unsorted is F2LLM's layout (right padding to the longest of each group of sequences in
  batch order), padded-bucketed sorts by length first; packed-sdpa is the block-diagonal-mask path, packed-varlen
  the segment attention (pipeline.model.packing.segment_attention);
- memory: peak RSS of one cached step as B grows 8 -> 1024 at a fixed chunk budget, each B in a fresh subprocess
  (step memory = peak RSS - RSS before the step; target flat, <= 1.5x from 8 to 1024);
- coalesce: 2-process DeepSpeed (gloo, torchrun) ZeRO-2 and ZeRO-3 cached steps with engine.coalesce_grad_reduction()
  on vs off (alternating steps on one engine), small chunks so that per-chunk reductions matter.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.process_memory import peak_rss_bytes, reset_peak_rss, status_kib

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 2**20
TINY_QWEN3 = dict(
    model_type="qwen3", vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
    attention_dropout=0.1, pad_token_id=0, eos_token_id=102,
)


# ---------------------------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------------------------
def realistic_batch(seed: int, batch_size: int, n_neg: int):
    from pipeline.data.batch import ContrastiveBatch

    rng = np.random.default_rng(seed)

    def seq(n: int) -> np.ndarray:
        s = rng.integers(1000, 30000, size=n, dtype=np.int64)
        s[-1] = 102
        return s

    def q() -> np.ndarray:
        return seq(int(np.clip(rng.normal(30, 8), 6, 64)))

    def p() -> np.ndarray:
        return seq(int(np.clip(rng.lognormal(np.log(200), 0.6), 16, 1024)))

    return ContrastiveBatch([q() for _ in range(batch_size)], [p() for _ in range(batch_size)],
                            [p() for _ in range(batch_size * n_neg)], n_neg, "retrieval")


def build_model(attn: str = "sdpa", packing: str = "packed", seed: int = 0, dropout: float = 0.1):
    import torch

    from pipeline.config import ModelConfig
    from pipeline.model.embedding import EmbeddingModel

    torch.manual_seed(seed)
    model = EmbeddingModel.from_config(
        ModelConfig(from_config={**TINY_QWEN3, "attention_dropout": dropout}, attn_implementation=attn, packing=packing),
        "cpu",
    )
    model.train()
    return model


def timed_step(model, step, batch, loss_cfg, gc_cfg, seed: int = 0):
    import torch

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    t = time.perf_counter()
    stats = step(model, batch, loss_cfg, gc_cfg)
    return time.perf_counter() - t, stats


@dataclass
class Row:
    benchmark: str
    setting: str
    result: str
    target: str
    command: str


def cmd(sections: str, extra: str = "") -> str:
    return f"PYTHONPATH=. python bench/bench_gradcache.py --sections {sections}{extra}"


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------
def bench_time(args: argparse.Namespace) -> list[Row]:
    from pipeline.config import GradCacheConfig, LossConfig
    from pipeline.training.gradcache import cached_step, plain_step

    rows = []
    loss_cfg = LossConfig(matryoshka=True)
    gc_cfg = GradCacheConfig(chunk_tokens=args.chunk_tokens)
    batch = realistic_batch(1, args.batch_size, args.n_neg)
    for attn in args.attn:
        model = build_model(attn)
        timed_step(model, cached_step, realistic_batch(2, 2, args.n_neg), loss_cfg, gc_cfg)  # warm-up
        times: dict[str, list[float]] = {"plain": [], "cached": []}
        for r in range(args.time_repeats):  # interleaved, so load changes hit both alike
            for name, step in (("plain", plain_step), ("cached", cached_step)):
                dt, stats = timed_step(model, step, batch, loss_cfg, gc_cfg, seed=r)
                times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["cached"] / med["plain"]
        per = {k: 1000 * v / args.batch_size for k, v in med.items()}
        rows.append(Row(
            "cached vs plain step time",
            f"B={args.batch_size}, {args.n_neg} hard neg, {stats.real_tokens} tokens, chunk_tokens "
            f"{args.chunk_tokens} ({stats.chunks} chunks), packed {attn}, median of {args.time_repeats}",
            f"plain {per['plain']:.0f} ms/sample, cached {per['cached']:.0f} ms/sample: **{ratio:.2f}x**",
            "<= 1.45x",
            cmd("time", f" --attn {attn} --batch-size {args.batch_size} --time-repeats {args.time_repeats}"),
        ))
    return rows


def bench_packing(args: argparse.Namespace) -> list[Row]:
    from pipeline.config import GradCacheConfig, LossConfig
    from pipeline.training.gradcache import cached_step

    loss_cfg = LossConfig(matryoshka=True)
    batch = realistic_batch(3, args.batch_size, args.n_neg)
    n_seq = len(batch.sequences())
    layouts = [
        # name, attn, packing, chunking (token budget or sequence count), bucket
        ("padded-unsorted (F2LLM)", "sdpa", "padded", dict(chunk_size=args.padded_group), False),
        ("padded-bucketed", "sdpa", "padded", dict(chunk_tokens=args.chunk_tokens), True),
        ("packed-sdpa", "sdpa", "packed", dict(chunk_tokens=args.chunk_tokens), True),
        ("packed-varlen", "varlen", "packed", dict(chunk_tokens=args.chunk_tokens), True),
    ]
    results = {}
    import pipeline.training.gradcache as gcmod
    from pipeline.model.packing import plan_chunks

    for name, attn, packing, chunking, bucket in layouts:
        model = build_model(attn, packing)
        gc_cfg = GradCacheConfig(chunk_tokens=chunking.get("chunk_tokens"), chunk_size=chunking.get("chunk_size"))
        original = gcmod.plan_chunks
        if not bucket:  # F2LLM: groups in batch order, padded to their longest member
            gcmod.plan_chunks = lambda lengths, **kw: plan_chunks(lengths, bucket=False, **kw)  # type: ignore
        try:
            timed_step(model, cached_step, realistic_batch(2, 2, args.n_neg), loss_cfg, gc_cfg)  # warm-up
            times, stats = [], None
            for r in range(args.repeats):
                dt, stats = timed_step(model, cached_step, batch, loss_cfg, gc_cfg, seed=r)
                times.append(dt)
        finally:
            gcmod.plan_chunks = original
        results[name] = (statistics.median(times), stats)
    base_t = results["padded-unsorted (F2LLM)"][0]
    bucket_t = results["padded-bucketed"][0]
    rows = []
    for name, (t, stats) in results.items():
        tok_s = stats.real_tokens / t
        rows.append(Row(
            "packed vs padded",
            f"{name}: B={args.batch_size}, {n_seq} sequences, {stats.real_tokens} tokens, {stats.chunks} chunks, "
            f"cached step, median of {args.repeats}",
            f"padding efficiency **{100 * stats.padding_efficiency:.1f}%**, {tok_s:.0f} tokens/s "
            f"({base_t / t:.2f}x vs padded-unsorted, {bucket_t / t:.2f}x vs padded-bucketed)",
            ">= 95% (packed)" if name.startswith("packed") else "-",
            cmd("packing", f" --batch-size {args.batch_size} --repeats {args.repeats}"),
        ))
    return rows


def memory_worker(batch_size: int, n_neg: int, chunk_tokens: int, attn: str, threads: int, dropout: float) -> dict:
    """One cached step in this (fresh) process: peak RSS during the step (VmHWM, reset just before it) and its
    increase over the RSS before the step."""
    import torch

    from pipeline.config import GradCacheConfig, LossConfig
    from pipeline.training.gradcache import cached_step

    torch.set_num_threads(threads)
    model = build_model(attn, dropout=dropout)
    loss_cfg, gc_cfg = LossConfig(matryoshka=True), GradCacheConfig(chunk_tokens=chunk_tokens)
    timed_step(model, cached_step, realistic_batch(2, 1, n_neg), loss_cfg, gc_cfg)  # warm-up, tiny
    batch = realistic_batch(4, batch_size, n_neg)
    reset = reset_peak_rss()
    base = status_kib("VmRSS") * 1024
    dt, stats = timed_step(model, cached_step, batch, loss_cfg, gc_cfg)
    peak = peak_rss_bytes(reset)
    return dict(batch_size=batch_size, base=base, peak=peak, delta=peak - base, seconds=dt, peak_reset=reset,
                tokens=stats.real_tokens, chunks=stats.chunks)






def memory_sweep(args: argparse.Namespace, dropout: float) -> list[dict]:
    results = []
    for b in args.memory_batches:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "memory", "--batch-size", str(b),
             "--n-neg", str(args.memory_n_neg), "--chunk-tokens", str(args.chunk_tokens), "--attn", args.attn[-1],
             "--threads", str(args.threads), "--dropout", str(dropout)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1200,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory worker B={b} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def bench_memory(args: argparse.Namespace) -> list[Row]:
    rows = []
    for dropout in args.memory_dropout:
        results = memory_sweep(args, dropout)
        first, last = results[0], results[-1]
        desc = ", ".join(f"B={r['batch_size']}: {r['delta'] / MIB:.0f} MiB (peak {r['peak'] / MIB:.0f})"
                         for r in results)
        rows.append(Row(
            "peak memory vs batch size",
            f"cached step, chunk_tokens {args.chunk_tokens}, {args.memory_n_neg} hard neg, packed {args.attn[-1]}, "
            f"attention dropout {dropout}; B={last['batch_size']} is {last['tokens']} tokens in {last['chunks']} "
            f"chunks; step memory = peak RSS during the step (VmHWM reset before it) - RSS before it (fresh process per B)",
            f"{desc}; B={last['batch_size']} / B={first['batch_size']}: **{last['peak'] / first['peak']:.2f}x** peak "
            f"RSS, {last['delta'] / first['delta']:.2f}x step memory",
            "<= 1.5x (flat)",
            cmd("memory", f" --memory-batches {' '.join(map(str, args.memory_batches))} --memory-dropout {dropout}"),
        ))
    return rows


def coalesce_worker(args: argparse.Namespace) -> None:
    """Under torchrun (2 processes): time cached steps with coalescing on/off for ZeRO-2 and ZeRO-3."""
    import deepspeed
    import torch

    from pipeline.config import GradCacheConfig, LossConfig
    from pipeline.training.distributed import init_distributed, rank, teardown, world_size
    from pipeline.training.ds_config import load_ds_config
    from pipeline.training.backward import coalescing_supported
    from pipeline.training.gradcache import cached_step

    torch.set_num_threads(1)
    init_distributed(use_deepspeed=True)
    out = {}
    try:
        batch = realistic_batch(10 + rank(), args.coalesce_batch, 1)
        loss_cfg = LossConfig(matryoshka=True)
        for stage in (2, 3):
            model = build_model("varlen")
            ds = load_ds_config(REPO / "ds_configs" / f"zero{stage}.json", micro_batch=args.coalesce_batch,
                                world_size=world_size(), use_bf16=False)
            ds.pop("optimizer")
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-6),
                                              config=ds)
            times: dict[bool, list[float]] = {True: [], False: []}
            for r in range(2 * args.repeats + 2):
                on = r % 2 == 0
                gc_cfg = GradCacheConfig(chunk_tokens=None, chunk_size=args.coalesce_chunk, coalesce_grad_reduction=on)
                torch.distributed.barrier()
                t = time.perf_counter()
                stats = cached_step(engine, batch, loss_cfg, gc_cfg)
                engine.step()
                dt = time.perf_counter() - t
                if r >= 2:  # first pair = warm-up
                    times[on].append(dt)
            out[stage] = dict(on=statistics.median(times[True]), off=statistics.median(times[False]),
                              chunks=stats.chunks_run, supported=coalescing_supported(engine),
                              params=sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                         for p in model.parameters()))
        if rank() == 0:
            print(json.dumps(out), flush=True)
    finally:
        teardown()


def bench_coalesce(args: argparse.Namespace) -> list[Row]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(Path(__file__).resolve()), "--worker", "coalesce",
         "--repeats", str(args.repeats), "--coalesce-batch", str(args.coalesce_batch),
         "--coalesce-chunk", str(args.coalesce_chunk)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"coalesce worker failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for stage, r in res.items():
        rows.append(Row(
            "coalesce_grad_reduction",
            f"2-process DeepSpeed ZeRO-{stage} (gloo, torchrun), B={args.coalesce_batch}/rank, 1 hard neg, "
            f"chunks of {args.coalesce_chunk} sequences ({r['chunks']} chunks), {r['params'] / 1e6:.1f}M params, "
            f"cached step + engine.step(), median of {args.repeats}",
            f"on {r['on']:.2f} s, off {r['off']:.2f} s: on/off **{r['on'] / r['off']:.2f}x**"
            + ("" if r["supported"] else " (not supported: ran uncoalesced)"),
            "measure",
            cmd("coalesce"),
        ))
    return rows


# ---------------------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="time,packing,memory,coalesce")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the packing and coalesce measurements")
    ap.add_argument("--time-repeats", type=int, default=5, help="repeats of the cached-vs-plain timing")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-neg", type=int, default=3)
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--padded-group", type=int, default=16, help="sequences per padded-unsorted group")
    ap.add_argument("--attn", nargs="+", default=["varlen"], help="attention of the packed model(s) in 'time'")
    ap.add_argument("--memory-batches", type=int, nargs="+", default=[8, 128, 1024])
    ap.add_argument("--memory-n-neg", type=int, default=1)
    ap.add_argument("--memory-dropout", type=float, nargs="+", default=[0.1, 0.0],
                    help="attention dropout of the memory sweep(s); CPU sdpa materialises L x L scores with dropout")
    ap.add_argument("--coalesce-batch", type=int, default=16)
    ap.add_argument("--coalesce-chunk", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine OpenMP spin-waits make 2 threads 10-100x slower)")
    ap.add_argument("--dropout", type=float, default=0.1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["memory", "coalesce"], help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker == "memory":
        print(json.dumps(memory_worker(args.batch_size, args.n_neg, args.chunk_tokens, args.attn[-1], args.threads,
                                        args.dropout)))
        return
    if args.worker == "coalesce":
        coalesce_worker(args)
        return
    import torch

    from pipeline.logs import log

    torch.set_num_threads(args.threads)
    sections = {"time": bench_time, "packing": bench_packing, "memory": bench_memory, "coalesce": bench_coalesce}
    rows: list[Row] = []
    t0 = time.perf_counter()
    for name in args.sections.split(","):
        if name not in sections:
            raise SystemExit(f"error: unknown section {name!r}; choose from {', '.join(sections)}")
        t = time.perf_counter()
        rows.extend(sections[name](args))
        log(f"bench: section {name} took {time.perf_counter() - t:.0f} s")
    log(f"bench: total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| Benchmark | Setting | Result | Target | Command |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.benchmark} | {r.setting} | {r.result} | {r.target} | `{r.command}` |")


if __name__ == "__main__":
    main()
