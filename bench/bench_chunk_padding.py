"""Padding of GradCache's chunks on F2LLM-shaped data, as ``launch/train.py --check`` plans them (GitHub issue 22).

    PYTHONPATH=. python bench/bench_chunk_padding.py                      # the issue's table (~2 min on 2 cores)
    PYTHONPATH=. python bench/bench_chunk_padding.py --world-sizes 1 --chunk-tokens 16384 --queries 600 --steps 2
    PYTHONPATH=. python bench/bench_chunk_padding.py --passage-median 930 --out /tmp/bench_chunk_padding_long

Builds (once; reused while its parameters are unchanged) shards shaped like F2LLM's retrieval training data, then
runs ``--check`` - in process, :func:`pipeline.training.plan.check_run`, which chunks every rank's batches of the
first ``--steps`` steps with the trainer's own planner (:func:`pipeline.training.gradcache.step_chunks`) - for the
F2LLM v2 0.6B recipe (``configs/f2llm-v2-0.6b.yaml``; its Qwen/Qwen3-0.6B replaced by a Qwen3-0.6B-shaped model
from its config, ``bench.gpu_bench.QWEN3_06B``, which --check only counts on the meta device), ``--device cuda``,
at every world size x ``gradcache.chunk_tokens`` x ``model.compile`` true/false, and prints one markdown table:
chunks per rank (mean and max over the steps of the most any rank runs), real and computed tokens per step (all
ranks) and the padding efficiency (real / computed) of what runs now, next to two designs computed here from the
same batches for comparison (not run by the trainer):

* before (issue 22): compiled layers padded every chunk to exactly chunk_tokens (in-order greedy chunks, each
  computed as chunk_tokens tokens);
* buckets (rejected): the balanced chunks of now, each rounded up to a multiple of the shards' max_len (a static
  shape per bucket, up to chunk_tokens / max_len buckets).

Data (a word-level tokenizer with 200 words; every text of k words is k + 1 tokens with the EOS the build appends,
so lengths are exact): one retrieval dataset of ``--queries`` queries, each with its positive passage and 7 hard
negatives drawn from a corpus of 2 passages per query; lengths in tokens log-normal, queries median 34 (sigma 0.45),
passages median 229 (sigma 0.56: p99 ~840; ``--passage-median``, ``--passage-sigma``), clipped to [4, 1024];
``preprocess build --max-len 1024``. With the recipe's 16 queries per rank (1 + 1 + 7 sequences each) a rank has
~35k real tokens per step.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

CONFIG = REPO / "configs" / "f2llm-v2-0.6b.yaml"
DATASET = "f2llm_shaped_retrieval"
MAX_LEN = 1024
N_NEG = 7
WORDS = 200  # the word-level tokenizer's vocabulary (tests/data_helpers.make_word_tokenizer)
QUERY_TOKENS = dict(median=34.0, sigma=0.45)
PASSAGE_TOKENS = dict(median=229.0, sigma=0.56)  # p99 = 229 x exp(2.326 x 0.56) = 843
MIN_TOKENS = 4


@dataclass(frozen=True)
class DataSpec:
    """What the shards are built from; the shards are rebuilt when it changes."""

    queries: int
    seed: int
    max_len: int = MAX_LEN
    query_tokens: tuple[float, float] = (QUERY_TOKENS["median"], QUERY_TOKENS["sigma"])
    passage_tokens: tuple[float, float] = (PASSAGE_TOKENS["median"], PASSAGE_TOKENS["sigma"])


@dataclass
class Row:
    world: int
    chunk_tokens: int
    compile: bool
    chunks_mean: float
    chunks_max: int
    real_tokens: float  # per step, all ranks
    computed_tokens: float  # per step, all ranks
    efficiency: float
    before_efficiency: float  # eager runs were never padded: 1.0
    buckets_efficiency: float | None  # compiled rows only


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def token_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, max_len: int) -> np.ndarray:
    """n log-normal lengths in tokens (median, sigma of the log), rounded, clipped to [MIN_TOKENS, max_len]."""
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, size=n)), MIN_TOKENS, max_len).astype(np.int64)


def text_of(rng: np.random.Generator, tokens: int) -> str:
    """A text of `tokens` - 1 random words w0..w199: `tokens` tokens once the build appends EOS."""
    return " ".join(f"w{w}" for w in rng.integers(0, WORDS, size=tokens - 1))


def write_raw(raw: Path, spec: DataSpec) -> None:
    """The retrieval dataset (F2LLM's parquet layout: query, passage, negative_1..7) and its registry."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    rng = np.random.default_rng(spec.seed)
    n_docs = 2 * spec.queries
    corpus = [text_of(rng, int(t)) for t in token_lengths(rng, n_docs, *spec.passage_tokens, spec.max_len)]
    queries = [text_of(rng, int(t)) for t in token_lengths(rng, spec.queries, *spec.query_tokens, spec.max_len)]
    negatives = np.empty((spec.queries, N_NEG), dtype=np.int64)
    for q in range(spec.queries):  # passage q is query q's positive; negatives: any other passage
        picks = rng.choice(n_docs - 1, size=N_NEG, replace=False)
        negatives[q] = picks + (picks >= q)
    columns = {"query": queries, "passage": corpus[: spec.queries]}
    columns.update({f"negative_{j + 1}": [corpus[i] for i in negatives[:, j]] for j in range(N_NEG)})
    raw.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), raw / f"{DATASET}.parquet")
    (raw / "datasets.yaml").write_text(yaml.safe_dump({"datasets": {DATASET: {"type": "retrieval"}}}))


def build_shards(out: Path, spec: DataSpec) -> tuple[Path, Path]:
    """(tokenizer dir, shard dir) under `out`, built when missing or made from another :class:`DataSpec`."""
    sys.path.insert(0, str(REPO / "tests"))
    from data_helpers import make_word_tokenizer
    from preprocess.build import BuildOptions, ShardBuilder

    tokenizer, shards, stamp = out / "tokenizer", out / "shards", out / "spec.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted and (shards / "manifest.json").is_file():
        return tokenizer, shards
    make_word_tokenizer(tokenizer, n_words=WORDS)
    write_raw(out / "raw", spec)
    ShardBuilder(BuildOptions(raw=str(out / "raw"), tokenizer=str(tokenizer), out=str(shards),
                              registry=str(out / "raw" / "datasets.yaml"), max_len=spec.max_len, workers=1,
                              overwrite=True)).run()
    stamp.write_text(wanted)
    return tokenizer, shards


# ---------------------------------------------------------------------------------------------------------------
# The designs compared
# ---------------------------------------------------------------------------------------------------------------
def in_order_chunks(lengths: list[int], budget: int) -> int:
    """Chunks of the planner before issue 22: filled up to the budget in input order (the count)."""
    chunks, load = 0, 0
    for length in lengths:
        if chunks == 0 or load + length > budget:
            chunks, load = chunks + 1, 0
        load += length
    return chunks


def bucketed_cost(loads: list[int], granule: int) -> int:
    """Computed tokens of chunks of these token `loads`, each rounded up to a multiple of `granule`."""
    return sum(-(-load // granule) * granule for load in loads)


def rank_lengths(cfg_overrides: list[str], world: int, steps: int) -> list[list[list[int]]]:
    """[step][rank] -> sequence lengths of the first `steps` steps, built by the trainer's data code."""
    from pipeline.config import load_config
    from pipeline.data.loader import TrainData, rank_batch

    cfg = load_config(CONFIG, cfg_overrides)
    data = TrainData(cfg.data, cfg.loss, seed=cfg.train.seed, per_device_batch=cfg.train.per_device_batch_size,
                     world_size=world, rank=0, verify=False)
    steps = min(steps, data.steps_per_epoch)
    return [[[len(s) for s in rank_batch(data.plan, data.schedule, data.reader, 0, step, rank)[1].sequences()]
             for rank in range(world)] for step in range(steps)]


def alternatives(lengths: list[list[list[int]]], budget: int, max_len: int) -> tuple[float, float]:
    """Padding efficiency of the two designs not run (module docstring) on these batches: (before, buckets)."""
    from pipeline.model.packing import plan_chunks

    real = before = buckets = 0
    for step in lengths:
        for rank in step:
            real += sum(rank)
            before += in_order_chunks(rank, budget) * budget
            chunks = plan_chunks(rank, packed=True, chunk_tokens=budget)
            buckets += bucketed_cost([sum(rank[i] for i in c) for c in chunks], max_len)
    return real / before, real / buckets


def measure(tokenizer: Path, shards: Path, out: Path, worlds: list[int], budgets: list[int], steps: int) -> list[Row]:
    """One --check per world size x chunk_tokens x compile (module docstring)."""
    import yaml

    from bench.gpu_bench import QWEN3_06B
    from pipeline.training.plan import check_run

    shape = yaml.safe_dump(QWEN3_06B, default_flow_style=True, width=10**6).strip()  # YAML 1.1 floats (1.0e-06)
    base = ["model.name_or_path=null", f"model.from_config={shape}", f"model.tokenizer={tokenizer}",
            f"data.shards={shards}", f"train.output_dir={out / 'run'}"]
    rows = []
    for world in worlds:
        lengths = rank_lengths(base, world, steps)
        for budget in budgets:
            before, buckets = alternatives(lengths, budget, MAX_LEN)
            for compiled in (True, False):
                overrides = [*base, f"gradcache.chunk_tokens={budget}", f"model.compile={str(compiled).lower()}"]
                report = check_run(CONFIG, overrides, world_size=world, device="cuda", sample_steps=steps)
                if not report.ok:
                    raise SystemExit("check failed: " + "; ".join(map(str, report.problems)))
                s = report.plan.sample
                rows.append(Row(world, budget, compiled, s.chunks_run_mean, s.chunks_run_max, s.real_tokens_mean,
                                s.computed_tokens_mean, s.real_tokens_mean / s.computed_tokens_mean,
                                before if compiled else 1.0, buckets if compiled else None))
    return rows


def table(rows: list[Row], steps: int) -> str:
    lines = [
        f"| world | chunk_tokens | model.compile | chunks per rank (mean / max) | real tokens per step | computed "
        f"tokens per step | padding efficiency | before (issue 22) | buckets of max_len (rejected) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.world} | {r.chunk_tokens} | {str(r.compile).lower()} | {r.chunks_mean:.2f} / {r.chunks_max} | "
            f"{r.real_tokens:,.0f} | {r.computed_tokens:,.0f} | **{r.efficiency:.1%}** | "
            f"{r.before_efficiency:.1%} | {'-' if r.buckets_efficiency is None else f'{r.buckets_efficiency:.1%}'} |")
    lines.append(f"\nmeans over the first {steps} steps; real and computed tokens summed over the ranks; before and "
                 "buckets: the same batches' padding efficiency with compiled chunks padded to chunk_tokens (the "
                 "planner before issue 22) or rounded up to a multiple of max_len (eager runs were never padded)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_chunk_padding"),
                    help="work directory: tokenizer, raw data, shards (reused when unchanged), --check's output dir")
    ap.add_argument("--queries", type=int, default=4400, help="queries of the dataset (4400: 8 steps at 32 ranks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passage-median", type=float, default=PASSAGE_TOKENS["median"],
                    help="median passage length in tokens (default 229; the issue's long-passage data: 930)")
    ap.add_argument("--passage-sigma", type=float, default=PASSAGE_TOKENS["sigma"],
                    help="sigma of the log of the passage lengths (default 0.56)")
    ap.add_argument("--world-sizes", default="1,32", help="comma-separated world sizes (default 1,32)")
    ap.add_argument("--chunk-tokens", default="16384,65536,131072", help="comma-separated gradcache.chunk_tokens")
    ap.add_argument("--steps", type=int, default=8, help="steps measured (--check's --sample-steps)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = DataSpec(queries=args.queries, seed=args.seed, passage_tokens=(args.passage_median, args.passage_sigma))
    tokenizer, shards = build_shards(args.out, spec)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    budgets = [int(b) for b in args.chunk_tokens.split(",")]
    rows = measure(tokenizer, shards, args.out, worlds, budgets, args.steps)
    print(table(rows, args.steps))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
