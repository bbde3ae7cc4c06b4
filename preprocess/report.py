"""`preprocess stats` (counts and length percentiles) and `preprocess show` (one example decoded to text)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.shard_format import ShardError
from pipeline.data.shards import ShardReader

PERCENTILES = (50, 90, 99)


def _length_summary(lengths: np.ndarray, max_len: int) -> dict[str, Any]:
    if not len(lengths):
        return {"count": 0}
    pct = np.percentile(lengths, PERCENTILES)
    return {
        "count": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "mean": round(float(lengths.mean()), 1),
        **{f"p{p}": int(v) for p, v in zip(PERCENTILES, pct)},
        "max": int(lengths.max()),
        "at_max_len": int((lengths >= max_len).sum()),
    }


def shard_stats(root: str | Path) -> dict[str, Any]:
    """Per dataset: type, counts, negatives per query, and query/document length percentiles."""
    reader = ShardReader(root)
    out: dict[str, Any] = {}
    for name, ds in reader.datasets.items():
        negs_per_query = (ds.negatives >= 0).sum(axis=1) if ds.num_negatives else np.zeros(ds.num_queries)
        out[name] = {
            "type": ds.type,
            "instruction": ds.instruction,
            "queries": _length_summary(ds.queries.lengths, reader.max_len),
            "docs": _length_summary(ds.corpus.lengths, reader.max_len),
            "negatives_per_query": round(float(negs_per_query.mean()), 2) if ds.num_queries else 0.0,
            "skipped": ds.meta["counts"]["skipped"],
        }
    return out


def stats_table(stats: dict[str, Any], max_len: int) -> str:
    header = (
        f"{'dataset':<22} {'type':<14} {'queries':>8} {'docs':>9} {'neg/q':>6} "
        f"{'q p50/p90/p99/max':>20} {'doc p50/p90/p99/max':>22} {'docs@max':>9}"
    )
    lines = [f"max_len {max_len}", header, "-" * len(header)]
    for name, s in stats.items():
        q, d = s["queries"], s["docs"]

        def pcts(x: dict[str, Any]) -> str:
            return "/".join(str(x.get(k, "-")) for k in ("p50", "p90", "p99", "max"))

        lines.append(
            f"{name:<22} {s['type']:<14} {q['count']:>8,} {d['count']:>9,} {s['negatives_per_query']:>6} "
            f"{pcts(q):>20} {pcts(d):>22} {d.get('at_max_len', 0):>9,}"
        )
    return "\n".join(lines)


def show_example(root: str | Path, dataset: str, index: int, tokenizer: Any | None = None, *,
                 trust_remote_code: bool = False) -> dict[str, Any]:
    """One training example decoded back to text: what the model will see (special tokens kept), with the teacher's
    scores when the shards have them. Without `tokenizer`, the manifest's is loaded (`trust_remote_code`: running the
    code its directory ships)."""
    reader = ShardReader(root, datasets=[dataset])
    ds = reader[dataset]
    if not 0 <= index < ds.num_queries:
        raise ShardError(f"{ds.root}: index {index} out of range [0, {ds.num_queries})")
    if tokenizer is None:
        from pipeline.data.tokenization import load_tokenizer

        path = reader.manifest["tokenizer"]["name_or_path"]
        try:
            tokenizer = load_tokenizer(path, trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ShardError(f"cannot load tokenizer {path!r} recorded in the manifest ({exc}); pass --tokenizer") from None
        reader.check_tokenizer(tokenizer)
    example = ds.example(index)

    def decode(ids: np.ndarray) -> str:
        return tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    out = {
        "dataset": dataset,
        "index": index,
        "type": ds.type,
        "query": decode(example["query"]),
        "positive": decode(example["positive"]),
        "negatives": [decode(n) for n in example["negatives"]],
    }
    if ds.has_scores:  # `preprocess score`: the teacher's scores of the positive and of each listed negative
        row = ds.scores[index]
        out["teacher_scores"] = {"positive": float(row[0]),
                                 "negatives": [float(x) for x in row[1:][ds.negatives[index] >= 0]]}
    return out
