"""Matryoshka curves: retrieval metrics against the embedding dimension, for one or several evaluated models.

Input: ``python -m pipeline.evaluate --dims ... --out`` reports, whose datasets hold ``dims`` = {dim: metrics}
(metrics of the embeddings truncated to their first `dim` coordinates and re-normalised, as training's Matryoshka
loss sees them). matplotlib runs with the Agg backend (no display needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

DIM_METRICS = ("mrr@10", "ndcg@10", "recall@10")
LABELS = {"mrr@10": "MRR@10", "ndcg@10": "nDCG@10", "recall@1": "Recall@1", "recall@10": "Recall@10",
          "recall@100": "Recall@100"}


def dim_curves(report: dict[str, Any]) -> dict[str, dict[int, dict[str, float]]]:
    """{dataset: {dim: metrics}} of an evaluation report; datasets evaluated at one dim only are left out."""
    out = {}
    for name, res in report.get("datasets", {}).items():
        dims = res.get("dims")
        if isinstance(dims, dict) and len(dims) > 1:
            out[name] = {int(d): m for d, m in dims.items()}
    return out


def draw_dims(ax: Any, runs: Sequence[tuple[str, dict[str, Any]]], metric: str) -> None:
    """One line per (run, dataset): `metric` against the dimension (log2 axis, one tick per evaluated dim)."""
    styles = ("-", "--", ":", "-.")
    ticks: set[int] = set()
    several = len({name for _, report in runs for name in dim_curves(report)}) > 1
    for i, (label, report) in enumerate(runs):
        for j, (name, curve) in enumerate(sorted(dim_curves(report).items())):
            dims = sorted(curve)
            ticks.update(dims)
            values = [curve[d][metric] for d in dims]
            ax.plot(dims, values, marker="o", linestyle=styles[j % len(styles)], color=f"C{i}",
                    label=f"{label} ({name})" if several else label)
            ax.annotate(f"{values[-1]:.3f}", (dims[-1], values[-1]), xytext=(3, 0), textcoords="offset points",
                        fontsize=7, va="center")
    ax.set_xscale("log", base=2)
    ax.margins(x=0.12)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("embedding dimension (truncated, re-normalised)")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_dims(path: str | Path, runs: Sequence[tuple[str, dict[str, Any]]], *, title: str = "",
              metrics: Sequence[str] = DIM_METRICS) -> Path:
    """One PNG: a panel per metric, each metric against the dimension for every run (label, report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(dim_curves(report) for _, report in runs):
        raise ValueError("no evaluation at several dims to plot (run pipeline.evaluate with --dims)")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        draw_dims(ax, runs, metric)
        ax.set_title(f"{LABELS.get(metric, metric)} by dimension")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
