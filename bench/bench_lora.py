"""LoRA vs full fine-tuning: peak memory per rank and step time of the real trainer, 2 CPU ranks.

    PYTHONPATH=. python bench/bench_lora.py                       # tiny Qwen3 and the demo model (all-MiniLM-L6-v2)
    PYTHONPATH=. python bench/bench_lora.py --models tiny --quick  # plumbing check: 1 warm-up + 1 step

For each model (``tiny``: configs/tiny-cpu.yaml, attention dropout off; ``minilm``: configs/demo-minilm.yaml, the
demo's model) and each method (``full``: every weight trained; ``lora``: ``model.lora`` with its defaults, r 16,
alpha 32, dropout 0.05 on every linear layer) one FRESH 2-rank launch (deepspeed launcher, gloo, ZeRO as in the
config, OMP_NUM_THREADS=1 per rank) builds :class:`pipeline.training.trainer.Trainer` from the config, then runs
--warmup + --steps training steps as ``Trainer.fit`` does (``cached_step`` + ``engine.step()``) on the first batches of
its loader (the same batches for both methods: same data, seed and batch size), each step timed between barriers.

Reported per rank, the larger of the two ranks: peak RSS of the whole process (``ru_maxrss``: model, engine,
optimizer states, steps); RSS once the trainer is built; the step's own peak above that (VmHWM reset before the
steps); the optimizer's state (fp32 master partitions and Adam moments this rank holds); trainable parameters and
median step time. Data: example shards built here (``preprocess example`` + ``preprocess build`` with
all-MiniLM-L6-v2's tokenizer, the tokenizer of both models), dataset ``web_search``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_trainer import build_data, free_port, worker_env  # noqa: E402
from bench.process_memory import reset_peak_rss, status_kib  # noqa: E402

MIB = 2**20
MODELS = {"tiny": REPO / "configs" / "tiny-cpu.yaml", "minilm": REPO / "configs" / "demo-minilm.yaml"}
METHODS = ("full", "lora")
MARK = "BENCH_LORA_JSON "


def launch(args: argparse.Namespace, model: str, method: str, shards: Path, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(Path(__file__).resolve()), "--worker", "--models", model, "--method", method, "--shards", str(shards),
           "--run-dir", str(run_dir), "--batch-size", str(args.batch_size), "--n-neg", str(args.n_neg),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=args.timeout)
    text = proc.stdout + proc.stderr
    for line in text.splitlines():
        if MARK in line:
            return json.loads(line.split(MARK, 1)[1])
    raise RuntimeError(f"{model}/{method} failed ({proc.returncode}):\n{text[-4000:]}")


def worker_config(args: argparse.Namespace):
    from pipeline.config import load_config

    overrides = [
        f"data.shards={args.shards}", "data.datasets=[web_search]", "data.validation_fraction=0.01",
        f"loss.hard_negatives={{retrieval: {args.n_neg}, clustering: {args.n_neg}, classification: 1}}",
        f"train.per_device_batch_size={args.batch_size}", f"train.max_steps={args.steps + args.warmup}",
        f"train.output_dir={args.run_dir}", "train.eval_every=0", "train.save_every=0", "train.log_every=0",
    ]
    if args.models == "tiny":
        overrides.append("model.from_config.attention_dropout=0.0")
    if args.method == "lora":
        overrides.append("model.lora={}")
    return load_config(MODELS[args.models], overrides)


def optimizer_state_bytes(engine) -> int:
    """Bytes of this rank's optimizer tensors: its fp32 master partitions (ZeRO-3 ``fp32_partitioned_groups_flat``,
    ZeRO-1/2 ``single_partition_of_fp32_groups``) and Adam's state for each of them."""
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    masters = (getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups",
               None) or [p for group in inner.param_groups for p in group["params"]])
    total = 0
    for master in masters:
        total += master.numel() * master.element_size()
        for value in inner.state.get(master, {}).values():
            if hasattr(value, "numel"):
                total += value.numel() * value.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    import torch

    from pipeline.training.gradcache import cached_step
    from pipeline.training.trainer import Trainer

    torch.set_num_threads(1)
    cfg = worker_config(args)
    trainer = Trainer(cfg)
    engine, dist = trainer.engine, torch.distributed
    engine.train()
    batches = []
    for _, batch in trainer.data.loader(0):
        batches.append(batch)
        if len(batches) == args.warmup + args.steps:
            break
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters() if p.requires_grad)
    setup_rss = status_kib("VmRSS") * 1024
    reset = reset_peak_rss()
    times = []
    for batch in batches:
        dist.barrier()
        started = time.perf_counter()
        cached_step(engine, batch, cfg.loss, trainer.gradcache)
        engine.step()
        dist.barrier()
        times.append(time.perf_counter() - started)
    step_peak = status_kib("VmHWM") * 1024 if reset else 0
    optimizer = optimizer_state_bytes(engine)  # after the steps: Adam's moments exist
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = torch.tensor([lifetime_peak, setup_rss, step_peak - setup_rss, optimizer], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if dist.get_rank() == 0:
        worst = torch.stack(every).max(0).values.tolist()
        print(MARK + json.dumps(dict(
            peak_rss=worst[0], setup_rss=worst[1], step_rss=worst[2], optimizer_bytes=worst[3],
            trainable=trainable, total=sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters()),
            step_s=statistics.median(times[args.warmup:]), times=times, zero=int(engine.zero_optimization_stage()),
        )), flush=True)
    trainer.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="LoRA vs full fine-tuning: peak RSS per rank and step time of the "
                                             "trainer, 2 CPU ranks (fresh launch per model and method).")
    ap.add_argument("--models", default="tiny,minilm", help="comma list of: tiny, minilm")
    ap.add_argument("--batch-size", type=int, default=16, help="queries per rank")
    ap.add_argument("--n-neg", type=int, default=7, help="hard negatives per query")
    ap.add_argument("--steps", type=int, default=4, help="measured steps")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps, not timed")
    ap.add_argument("--passages", type=int, default=4000, help="example corpus size")
    ap.add_argument("--max-len", type=int, default=256, help="preprocess build --max-len")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 1 measured step, batch 4, 3 negatives")
    ap.add_argument("--cache-dir", default=None, help="where example shards are built (default: a temp dir)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per launch")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick and not args.worker:
        args.steps, args.warmup, args.batch_size, args.n_neg, args.passages, args.max_len = 1, 1, 4, 3, 800, 128
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS):
        print(f"error: --models: unknown {sorted(set(models) - set(MODELS))} (choose from {sorted(MODELS)})",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.gettempdir()) / "bench_trainer_cache"
    cache.mkdir(parents=True, exist_ok=True)
    shards = build_data(cache, args.passages, args.max_len)
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        for model in models:
            for method in METHODS:
                r = launch(args, model, method, shards, Path(tmp) / f"{model}_{method}")
                results.setdefault(model, {})[method] = r
                print(f"[bench_lora] {model} {method}: peak RSS {r['peak_rss'] / MIB:.0f} MiB, step "
                      f"{r['step_s']:.2f} s", file=sys.stderr, flush=True)
    given = "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(f"\nCommand: `PYTHONPATH=. python bench/bench_lora.py{given}`")
    print(f"\n2 ranks x {args.batch_size} queries, {args.n_neg} hard negatives, web_search, max_len {args.max_len}; "
          f"median of {args.steps} steps after {args.warmup} warm-up; memory: the larger rank\n")
    print("| model | method | trainable params | optimizer state / rank | RSS after setup / rank | step peak above "
          "setup | peak RSS / rank | step time |")
    print("|---|---|---|---|---|---|---|---|")
    for model, by_method in results.items():
        for method, r in by_method.items():
            share = f"{r['trainable'] / 1e6:.3f}M of {r['total'] / 1e6:.2f}M ({100 * r['trainable'] / r['total']:.2f}%)"
            print(f"| {model} (ZeRO-{r['zero']}) | {method} | {share} | {r['optimizer_bytes'] / MIB:.1f} MiB | "
                  f"{r['setup_rss'] / MIB:.0f} MiB | {r['step_rss'] / MIB:.0f} MiB | {r['peak_rss'] / MIB:.0f} MiB | "
                  f"{r['step_s']:.2f} s |")
    for model, by_method in results.items():
        full, lora = by_method["full"], by_method["lora"]
        print(f"\n{model}: LoRA / full: peak RSS {lora['peak_rss'] / full['peak_rss']:.2f}x "
              f"({(lora['peak_rss'] - full['peak_rss']) / MIB:+.0f} MiB), optimizer state "
              f"{lora['optimizer_bytes'] / max(full['optimizer_bytes'], 1):.3f}x, step time "
              f"{lora['step_s'] / full['step_s']:.2f}x")
    print(f"\n(total {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
