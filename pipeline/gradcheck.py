"""Gradient check: GradCache's parameter gradient against the plain (non-cached) full-batch gradient.

    python -m pipeline.gradcheck --config configs/tiny-cpu.yaml                    # one process, plain model
    deepspeed --num_gpus 2 --module pipeline.gradcheck --config configs/tiny-cpu.yaml   # DeepSpeed, config's JSON
    torchrun --nproc_per_node 2 -m pipeline.gradcheck --config configs/tiny-cpu.yaml      # same, torchrun launcher
    ... --ds-config ds_configs/zero2.json gradcache.coalesce_grad_reduction=false        # other JSON, overrides

Builds the configured model (same seed on every rank) and a random batch per rank (rank-dependent lengths, so ranks
run different numbers of chunks and the dummy-chunk padding is exercised; ``--rank-batch-sizes 6,3`` gives the
ranks different numbers of queries, 0 included, as a dataset's last global batch does; the same positive document
appears twice in the global batch, on two ranks when there are two non-empty ones, so the in-batch mask of the
gathered positive ids takes part), then computes from the same RNG state
(dropout masks included) the gradient of the plain step and of the cached step. Error = ||g_cached - g_plain|| /
||g_plain|| over all parameters (L2, full gradients; under ZeRO they are assembled with
deepspeed.utils.safe_get_full_grad on every rank). When distributed it also checks the gradient SCALE: with dropout
off, the cached distributed gradient against a single-process gradient of the global batch on an unsharded copy
of the initial model. With ``loss.distill`` in the config the teacher takes part in both steps (partitioned under
ZeRO-3), so the check covers the distillation term too; with ``loss.score_distill`` every batch carries random
teacher scores (some missing, NaN) and the check covers the score-distillation term. With ``model.lora`` the
gradient is the adapters' (the base is frozen) and their dropout is replayed like the model's; the adapters' B
matrices, zero at initialisation (so that A would get no gradient), are first set to small random values, so that
every adapter weight is checked.

Every computation is repeated (``--repeat``, default 2, at each of ``--threads``' intra-op thread counts): each
repeat's plain and cached gradients and losses must equal the first repeat's bit for bit, so a nondeterministic
kernel or a first call that computes differently from later ones is reported as such, naming the path (the plain
reference or GradCache) - not hidden in a tolerance. GradCache's own replay check must be exact too (its backward
pass re-computes each chunk's embeddings and compares them with the cached ones: :mod:`pipeline.training.gradcache`).
The last line printed is ``max relative gradient error: X`` (the worst over repeats and thread counts); the exit
code is 1 above the tolerance (1e-5) or when a repeat or a replay was not exact.

``--dtype bf16`` checks exactness in bf16 instead, against an fp32 reference: the same initial weights in fp32
compute the full-batch gradient of the global batch in one process (one chunk, one backward, dropout off); then the
bf16 model (a DeepSpeed engine in bf16 when launched with several processes) computes

    (a) GradCache with at least ``--chunks`` chunks per rank (default 32), chunk gradients summed as configured
        (``gradcache.fp32_accumulation``, default on);
    (b) a plain bf16 full-batch backward (one chunk per rank);
    (c) for comparison, (a) with ``gradcache.fp32_accumulation: false`` (bf16 sums on the parameters; DeepSpeed's
        own ``grad_accum_dtype`` still applies where it reduces chunk by chunk).

It prints each relative error to the fp32 gradient, ``bf16 relative gradient error: cached A, plain B`` last, and
exits 1 when A > 1.5 x B: GradCache in bf16 must be as exact as the plain bf16 backward it replaces.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.data.batch import ContrastiveBatch, random_batch
from pipeline.config import Config, ConfigError, GradCacheConfig, load_config
from pipeline.model.compiled import CompileWatch
from pipeline.training.chunk_budget import OptimizerResidency, optimizer_residency, resolve_chunk_tokens
from pipeline.training.teacher import load_teacher
from pipeline.training.distributed import (
    init_distributed, is_distributed, launched_distributed, rank, teardown, world_size,
)
from pipeline.training.backward import base_module, is_deepspeed_engine
from pipeline.training.ds_config import deepspeed_bf16, load_ds_config, training_ds_config
from pipeline.training.gradcache import StepStats, cached_step, plain_step
from pipeline.logs import log
from pipeline.model.embedding import EmbeddingModel

StepFn = Callable[..., StepStats]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipeline.gradcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML recipe (model, loss, gradcache, deepspeed sections)")
    ap.add_argument(
        "--engine",
        choices=["auto", "deepspeed", "torch"],
        default="auto",
        help="auto: DeepSpeed with the config's JSON when launched with several processes, else a plain model; "
        "torch: plain model (+ torch.distributed when launched); deepspeed: always DeepSpeed",
    )
    ap.add_argument("--ds-config", default=None, help="DeepSpeed JSON overriding the config's `deepspeed` path")
    ap.add_argument("--batch-size", type=int, default=None, help="queries per rank (default: train.per_device_batch_size)")
    ap.add_argument("--rank-batch-sizes", default=None, metavar="N,N,...",
                    help="queries of each rank's batch, one number per rank, 0 allowed (a ragged last batch); "
                         "default: --batch-size on every rank")
    ap.add_argument("--dataset-type", default="retrieval", choices=["retrieval", "classification", "clustering"])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="largest accepted relative gradient error (default 1e-5, what README states)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="compute the plain and the cached gradient this many times per thread count; every repeat "
                         "must equal the first bit for bit (default 2: the process's first computation is compared "
                         "with a later one)")
    ap.add_argument("--threads", default=None, metavar="N,N,...",
                    help="run the repeats at each of these intra-op thread counts (torch.set_num_threads); default: "
                         "the process's own")
    ap.add_argument("--no-scale-check", action="store_true", help="skip the distributed gradient-scale check")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="fp32: cached vs plain gradient (default); bf16: both in bf16 against an fp32 reference")
    ap.add_argument("--chunks", type=int, default=32, help="--dtype bf16: GradCache chunks per rank (default 32)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. gradcache.chunk_tokens=128")
    return ap.parse_args(argv)


def make_batch(cfg: Config, vocab: int, eos: int, b: int, dataset_type: str, seed: int, r: int) -> ContrastiveBatch:
    """Rank r's batch: its own seed and longer passages on higher ranks (different chunk counts per rank). With
    ``loss.score_distill``, random teacher scores (:func:`random_teacher_scores`)."""
    n_neg = cfg.loss.hard_negatives.get(dataset_type, 0)
    rng = np.random.default_rng(seed + 1000 * (r + 1))
    batch = random_batch(
        rng, batch_size=b, n_neg=n_neg, vocab_size=vocab, eos_id=eos,
        query_len=(6, 24), passage_len=(12, 48 + 32 * r), dataset_type=dataset_type,
    )
    if cfg.loss.score_distill is not None:
        batch.teacher_scores = random_teacher_scores(np.random.default_rng([seed, r, 5]), b, n_neg)
    return batch


def random_teacher_scores(rng: np.random.Generator, b: int, n_neg: int) -> np.ndarray:
    """[b, 1 + n_neg] cosine-like teacher scores: positives ~ 0.6, negatives ~ 0.3 (spread 0.15), and a fifth of
    the negatives without a score (NaN, as for random documents), so that the masked path is checked too."""
    scores = rng.normal(0.3, 0.15, size=(b, 1 + n_neg))
    scores[:, 0] += 0.3
    scores[:, 1:][rng.random((b, n_neg)) < 0.2] = np.nan
    return scores.astype(np.float32)


def make_batches(cfg: Config, vocab: int, eos: int, sizes: list[int], dataset_type: str, seed: int
                 ) -> list[ContrastiveBatch]:
    """Every rank's batch (:func:`make_batch`, sizes[r] queries on rank r) with positive corpus ids, distinct except
    one document that is the positive of two queries: the first query of the first two non-empty ranks (of the only
    non-empty one's first two queries), the same tokens under the same id."""
    batches = [make_batch(cfg, vocab, eos, b, dataset_type, seed, r) for r, b in enumerate(sizes)]
    offsets = np.cumsum([0, *sizes])
    for r, batch in enumerate(batches):
        batch.positive_ids = np.arange(offsets[r], offsets[r + 1], dtype=np.int64)
    slots = [(r, i) for r, b in enumerate(sizes) for i in range(min(b, 2))]
    holders = [slot for slot in slots if slot[1] == 0]
    pair = holders[:2] if len(holders) >= 2 else slots[:2]
    if len(pair) == 2:
        (r0, i0), (r1, i1) = pair
        batches[r1].positives[i1] = batches[r0].positives[i0].copy()
        batches[r1].positive_ids[i1] = batches[r0].positive_ids[i0]
    return batches


def rank_batch_sizes(args: argparse.Namespace, b: int, n_ranks: int) -> list[int]:
    """Queries per rank: ``--rank-batch-sizes`` (one per rank, >= 0, not all 0) or `b` everywhere; ConfigError."""
    if args.rank_batch_sizes is None:
        return [b] * n_ranks
    try:
        sizes = [int(x) for x in args.rank_batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--rank-batch-sizes: expected comma-separated integers, got {args.rank_batch_sizes!r}") \
            from None
    if len(sizes) != n_ranks or min(sizes) < 0 or sum(sizes) == 0:
        raise ConfigError(f"--rank-batch-sizes: expected {n_ranks} numbers >= 0 (one per rank, not all 0), got "
                          f"{args.rank_batch_sizes!r}")
    return sizes


def full_grad(model: nn.Module) -> torch.Tensor:
    """The whole gradient as one fp32 vector (assembled across ZeRO partitions; collective under ZeRO-3)."""
    if is_deepspeed_engine(model):
        from deepspeed.utils import safe_get_full_grad

        parts = []
        for p in base_module(model).parameters():
            g = safe_get_full_grad(p)
            parts.append(torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape).flatten() if g is None
                         else g.detach().float().flatten().cpu().clone())
        return torch.cat(parts)
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten().cpu().clone()
        for p in model.parameters()
    ])


def clear_grads(model: nn.Module) -> None:
    """Drop the accumulated gradient: an lr-0 optimizer step under DeepSpeed (clears ZeRO's buffers), else zero_grad."""
    if is_deepspeed_engine(model):
        model.step()
        model.zero_grad()
    else:
        model.zero_grad(set_to_none=True)


def run_gradient(
    model: nn.Module, step: StepFn, batch: ContrastiveBatch, cfg: Config, seed: int, gc: GradCacheConfig | None = None,
    teacher: nn.Module | None = None,
) -> tuple[torch.Tensor, StepStats]:
    torch.manual_seed(seed)  # same dropout masks for every step function
    stats = step(model, batch, cfg.loss, gc or cfg.gradcache, teacher=teacher)
    g = full_grad(model)
    clear_grads(model)
    return g, stats


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def build_engine(model: EmbeddingModel, cfg: Config, ds_path: str, micro_batch: int, *, bf16: bool | None = None
                 ) -> nn.Module:
    """A DeepSpeed engine around `model` (bf16 as the trainer decides, unless `bf16` says otherwise)."""
    import deepspeed

    if bf16 is None:
        bf16 = deepspeed_bf16(cfg.model.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    ds = load_ds_config(ds_path, micro_batch=micro_batch, grad_accum=1, world_size=world_size(), use_bf16=bf16)
    if bf16 and cfg.gradcache.fp32_accumulation:
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"  # as training_ds_config
    # The optimizer only clears gradients here (lr 0: weights never move). A client torch AdamW replaces the JSON's
    # DeepSpeed AdamW so that no optimizer op has to be JIT-compiled (minutes on a fresh CPU machine).
    ds.pop("optimizer", None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    stage = engine.zero_optimization_stage()
    log(f"deepspeed: ZeRO stage {stage}, world size {world_size()}, {ds_path}")
    return engine


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if (args.batch_size or cfg.train.per_device_batch_size) < 1:
            raise ConfigError("--batch-size / train.per_device_batch_size must be >= 1")
        if args.repeat < 1:
            raise ConfigError(f"--repeat must be >= 1, got {args.repeat}")
        thread_counts(args.threads)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    use_ds = args.engine == "deepspeed" or (args.engine == "auto" and launched_distributed())
    n_ranks = int(os.environ.get("WORLD_SIZE", "1"))
    my_rank = int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed)
    if args.dtype == "bf16":
        cfg.model.dtype, cfg.model.compile = "float32", False  # the fp32 reference; its bf16 copy is made below
    model = EmbeddingModel.from_config(cfg.model, device)
    if cfg.model.lora is not None:
        perturb_adapters(model, args.seed)
    b = args.batch_size or cfg.train.per_device_batch_size
    try:
        sizes = rank_batch_sizes(args, b, n_ranks)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    vocab = model.backbone.config.vocab_size
    eos = model.backbone.config.eos_token_id
    eos = int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 1))
    batches = make_batches(cfg, vocab, eos, sizes, args.dataset_type, args.seed)
    if args.dtype == "bf16":
        return bf16_main(model, batches, my_rank, cfg, args, use_ds, b)
    teacher = None
    if cfg.loss.distill is not None:  # a frozen copy here; partitioned (ZeRO-3) for the distributed steps below
        # Loaded before the chunk_tokens probe: the GPU memory it holds is not free for chunks.
        teacher = load_teacher(cfg.loss.distill, device, student_hidden=model.hidden_size, zero_stage=0, world_size=1,
                               trust_remote_code=cfg.model.trust_remote_code)
    try:
        residency = OptimizerResidency.plain()
        if use_ds:
            ds_cfg = dataclasses.replace(cfg, deepspeed=args.ds_config or cfg.deepspeed)
            residency = optimizer_residency(training_ds_config(ds_cfg, world_size=n_ranks, device_type=device.type),
                                            coalesce=cfg.gradcache.coalesce_grad_reduction)
        cfg.gradcache = resolve_chunk_tokens(cfg.gradcache, model, device, max_len=max_sequence(batches),
                                             world_size=n_ranks, residency=residency).gradcache
    except ValueError as exc:  # bad DeepSpeed JSON, no chunk that fits: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The reference copy before the layers are compiled: compiling sets each layer's forward to a function bound to
    # that layer, which a deepcopy shares (the copy would run the original's layers and leave its own without grads).
    reference = copy.deepcopy(model) if n_ranks > 1 and not args.no_scale_check else None
    CompileWatch.start(model, cfg.gradcache, max_len=max_sequence(batches))
    g_ref = None
    if reference is not None:
        # Before any process group exists: one process computing the global batch, unsharded, dropout off.
        g_ref = reference_gradient(reference, batches, cfg, teacher=teacher)
        del reference
    init_distributed(use_deepspeed=use_ds)
    try:
        return check(model, batches[my_rank], cfg, args, use_ds, b, g_ref, teacher)
    except ValueError as exc:  # bad DeepSpeed JSON, batch or setting: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        teardown()


def perturb_adapters(model: nn.Module, seed: int) -> None:
    """Set every LoRA B matrix (zero at initialisation) to N(0, 0.02^2) values, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict):
            for layer in lora_b.values():
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.02)


def max_sequence(batches: list[ContrastiveBatch]) -> int:
    return max(len(s) for bt in batches for s in bt.sequences())


def global_batch(batches: list[ContrastiveBatch]) -> ContrastiveBatch:
    """Every rank's batch as one (the global batch a single process computes)."""
    return ContrastiveBatch(
        queries=[s for bt in batches for s in bt.queries],
        positives=[s for bt in batches for s in bt.positives],
        negatives=[s for bt in batches for s in bt.negatives],
        n_neg=batches[0].n_neg,
        dataset_type=batches[0].dataset_type,
        positive_ids=None if batches[0].positive_ids is None else np.concatenate([bt.positive_ids for bt in batches]),
        teacher_scores=None if batches[0].teacher_scores is None else np.concatenate(
            [bt.teacher_scores for bt in batches]),
    )


def reference_gradient(
    model: EmbeddingModel, batches: list[ContrastiveBatch], cfg: Config, gc: GradCacheConfig | None = None, *,
    teacher: nn.Module | None = None,
) -> torch.Tensor:
    """Gradient of the global-batch loss (mean over all ranks' queries) in one process, dropout off."""
    model.eval()
    plain_step(model, global_batch(batches), cfg.loss, gc or cfg.gradcache, teacher=teacher)
    return full_grad(model)


@dataclass
class Bf16Errors:
    """``--dtype bf16``'s relative errors of the whole gradient against the fp32 full-batch gradient: (a) `cached`,
    GradCache in 16 bits with `chunked`'s chunks, (b) `plain`, one 16-bit full-batch backward, (c) `bf16_sums`, (a)
    with the chunk gradients summed in 16 bits; `stats` is (a)'s step."""

    cached: float
    plain: float
    bf16_sums: float
    stats: StepStats
    chunked: GradCacheConfig

    @property
    def ok(self) -> bool:
        """GradCache in 16 bits must be as exact as the plain 16-bit backward it replaces: (a) <= 1.5 x (b)."""
        return self.cached <= 1.5 * self.plain


def bf16_gradient_errors(
    model32: EmbeddingModel, batches: list[ContrastiveBatch], my_rank: int, cfg: Config, *, chunks: int, seed: int,
    runner_for: Callable[[nn.Module], nn.Module] = lambda model: model, dtype: torch.dtype = torch.bfloat16,
) -> Bf16Errors:
    """The computation of ``--dtype bf16`` (module docstring): the fp32 full-batch gradient of every rank's batch
    from `model32` (one chunk, one process, dropout off: call it before any process group exists), then a `dtype`
    copy of the model - run through ``runner_for(copy)`` (e.g. a DeepSpeed engine around it; the copy itself by
    default) - computes (a), (b) and (c) on rank `my_rank`'s batch, at least `chunks` chunks for (a) and (c)."""
    one_chunk = dataclasses.replace(cfg.gradcache, chunk_tokens=None, chunk_size=None)
    g_ref = reference_gradient(copy.deepcopy(model32), batches, cfg, one_chunk)
    runner = runner_for(copy.deepcopy(model32).to(dtype))
    runner.eval()
    batch = batches[my_rank]
    n_seqs = len(batch.sequences())
    chunked = dataclasses.replace(cfg.gradcache, chunk_tokens=None, chunk_size=max(1, n_seqs // chunks))
    summed_bf16 = dataclasses.replace(chunked, fp32_accumulation=False)
    step_seed = seed + 7
    g_cached, stats = run_gradient(runner, cached_step, batch, cfg, step_seed, chunked)
    g_plain, _ = run_gradient(runner, plain_step, batch, cfg, step_seed, one_chunk)
    g_bf16_sums, _ = run_gradient(runner, cached_step, batch, cfg, step_seed, summed_bf16)
    err_cached, err_plain, err_bf16_sums = (rel_error(g, g_ref) for g in (g_cached, g_plain, g_bf16_sums))
    return Bf16Errors(err_cached, err_plain, err_bf16_sums, stats, chunked)


def bf16_main(
    model32: EmbeddingModel, batches: list[ContrastiveBatch], my_rank: int, cfg: Config, args: argparse.Namespace,
    use_ds: bool, b: int,
) -> int:
    """``--dtype bf16`` (see the module docstring): :func:`bf16_gradient_errors`, logged and judged."""
    owns_group = not is_distributed()  # a caller's process group (a benchmark) is left to the caller

    def runner_for(model16: nn.Module) -> nn.Module:
        init_distributed(use_deepspeed=use_ds)
        return build_engine(model16, cfg, args.ds_config or cfg.deepspeed, b, bf16=True) if use_ds else model16

    try:
        errors = bf16_gradient_errors(model32, batches, my_rank, cfg, chunks=args.chunks, seed=args.seed,
                                      runner_for=runner_for)
        err_cached, err_plain, err_bf16_sums = errors.cached, errors.plain, errors.bf16_sums
        stats = errors.stats
        accumulation = ("fp32" if errors.chunked.fp32_accumulation else "bf16") + (
            ", coalesced" if stats.coalesced else "")
        log(f"bf16 check: {b} queries/rank x {world_size()} ranks, {stats.sequences} sequences, {stats.chunks} "
            f"chunks on rank 0 (run {stats.chunks_run}); reference: fp32, one chunk, one process")
        log(f"(a) GradCache bf16, {stats.chunks_run} chunks, chunk gradients summed in {accumulation}: "
            f"relative error {err_cached:.3e}")
        log(f"(b) plain bf16 full-batch backward (one chunk): relative error {err_plain:.3e}")
        log(f"(c) as (a) with gradcache.fp32_accumulation false: relative error {err_bf16_sums:.3e}")
        ok = errors.ok
        if rank() == 0:
            print(f"bf16 relative gradient error: cached {err_cached:.3e}, plain {err_plain:.3e} "
                  f"({'ok' if ok else 'FAIL'}: cached {'<=' if ok else '>'} 1.5 x plain)", flush=True)
        return 0 if ok else 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if owns_group:
            teardown()


@dataclass
class Repeat:
    """One repeat of the cached-vs-plain comparison: both gradients, both step results."""

    g_plain: torch.Tensor
    g_cached: torch.Tensor
    plain: StepStats
    cached: StepStats

    @property
    def error(self) -> float:
        return rel_error(self.g_cached, self.g_plain)


def repeat_problems(runs: list[Repeat], threads: int) -> list[str]:
    """Why the repeats of one thread count are not all equal to the first bit for bit (losses and gradients of the
    plain reference and of GradCache, each path named), and any GradCache replay that did not reproduce its
    embeddings. Empty when every repeat equals the first and every replay was exact."""
    problems = []
    first = runs[0]
    for k, run in enumerate(runs[1:], start=1):
        for path, g, g0, loss, loss0 in (
            ("plain reference step", run.g_plain, first.g_plain, run.plain.loss, first.plain.loss),
            ("GradCache step", run.g_cached, first.g_cached, run.cached.loss, first.cached.loss),
        ):
            if loss != loss0 or not torch.equal(g, g0):
                problems.append(
                    f"{threads} threads, repeat {k + 1}: the {path} differs from repeat 1 (loss {loss:.8f} vs "
                    f"{loss0:.8f}, gradient {rel_error(g, g0):.3e} relative): the computation is not deterministic")
    for k, run in enumerate(runs):
        if run.cached.replay_max_diff != 0.0:
            problems.append(
                f"{threads} threads, repeat {k + 1}: GradCache's backward pass re-computed embeddings "
                f"{run.cached.replay_max_diff:.3e} away from the cached ones (the replay is not exact)")
    return problems


def thread_counts(spec: str | None) -> list[int]:
    """``--threads 1,2`` -> [1, 2]; None -> [the current torch.get_num_threads()]; ConfigError on bad input."""
    if spec is None:
        return [torch.get_num_threads()]
    try:
        counts = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--threads: expected comma-separated integers, got {spec!r}") from None
    if not counts or min(counts) < 1:
        raise ConfigError(f"--threads: every count must be >= 1, got {spec!r}")
    return counts


def check(
    model: EmbeddingModel,
    batch: ContrastiveBatch,
    cfg: Config,
    args: argparse.Namespace,
    use_ds: bool,
    b: int,
    g_ref: torch.Tensor | None,
    teacher: nn.Module | None = None,
) -> int:
    runner: nn.Module = build_engine(model, cfg, args.ds_config or cfg.deepspeed, b) if use_ds else model
    runner.train()
    if teacher is not None and use_ds and int(runner.zero_optimization_stage()) == 3:
        teacher = load_teacher(cfg.loss.distill, model.device, student_hidden=model.hidden_size, zero_stage=3,
                               world_size=world_size(), trust_remote_code=cfg.model.trust_remote_code)
    step_seed = args.seed + 7 + rank()
    problems: list[str] = []
    errors: list[float] = []
    runs: list[Repeat] = []
    default_threads = torch.get_num_threads()
    for threads in thread_counts(args.threads):
        torch.set_num_threads(threads)
        runs = []
        for _ in range(args.repeat):
            g_plain, s_plain = run_gradient(runner, plain_step, batch, cfg, step_seed, teacher=teacher)
            g_cached, s_cached = run_gradient(runner, cached_step, batch, cfg, step_seed, teacher=teacher)
            runs.append(Repeat(g_plain, g_cached, s_plain, s_cached))
        problems += repeat_problems(runs, threads)
        errors += [run.error for run in runs]
        first = runs[0]
        if abs(first.plain.loss - first.cached.loss) > 1e-5 * max(1.0, abs(first.plain.loss)):
            log(f"loss differs: plain {first.plain.loss:.8f} vs cached {first.cached.loss:.8f}")
        log(f"{threads} threads, {args.repeat} repeats: cached vs plain relative gradient error "
            f"{', '.join(sorted({f'{run.error:.3e}' for run in runs}))}; GradCache replay max difference "
            f"{max(run.cached.replay_max_diff for run in runs):.3e}")
    torch.set_num_threads(default_threads)
    s_cached, g_plain = runs[0].cached, runs[0].g_plain
    log(
        f"batch: {s_cached.queries} queries over {world_size()} ranks ({batch.size} on rank 0), {batch.n_neg} "
        f"negatives, {s_cached.sequences} sequences, {s_cached.real_tokens} tokens, padding efficiency "
        f"{s_cached.padding_efficiency:.3f}; chunks on rank 0 {s_cached.chunks}, run {s_cached.chunks_run}; loss "
        f"{s_cached.loss:.6f}; coalesced grad reduction {'on' if s_cached.coalesced else 'off'}"
    )
    extras = (", with a distillation teacher" if teacher is not None else "") + (
        ", with teacher scores" if batch.teacher_scores is not None else "")
    log(f"cached vs plain (dropout on{extras}): relative "
        f"gradient error {max(errors):.3e} (||g|| = {float(g_plain.norm()):.4e}; loss parts {s_cached.parts})")
    if g_ref is not None:
        runner.eval()
        g_dist, _ = run_gradient(runner, cached_step, batch, cfg, step_seed, teacher=teacher)
        scale_err = rel_error(g_dist, g_ref)
        log(f"scale check (dropout off): distributed cached vs single-process global batch: {scale_err:.3e}")
        errors.append(scale_err)
    worst = max(errors)
    if rank() == 0:
        for problem in problems:
            print(f"FAIL: {problem}", flush=True)
        print(f"max relative gradient error: {worst:.3e}" + ("" if not problems else
              f" (FAIL: {len(problems)} repeat(s) not bit-identical or replays not exact, above)"), flush=True)
    return 0 if worst <= args.tolerance and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
