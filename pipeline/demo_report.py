"""Before/after report of the end-to-end demo (``launch/demo.sh``, stage 6).

``python -m pipeline.demo_report --base base.json --trained trained.json --metrics RUN/metrics.jsonl --out DIR``

* ``--base`` / ``--trained``: ``python -m pipeline.evaluate --out`` results of the base and the fine-tuned model on
  the same held-out data (refused when their datasets, query/document counts or max_len differ: a before/after
  comparison is only meaningful on the same evaluation set).
* ``--metrics``: the training run's ``metrics.jsonl`` (train loss per logged step; validation records).

Prints a before/after table (MRR@10, nDCG@10, Recall@1/10/100 and their absolute change) and writes
``DIR/demo_report.json`` (the numbers, the loss curve, optional stage timings) and ``DIR/demo.png`` (left: training
loss per step with its moving average and the validation loss; middle: base vs. trained bars per metric; right, when
both were evaluated with ``--dims``: MRR@10 against the embedding dimension, base and trained -
:mod:`pipeline.evaluation.plots`). matplotlib runs with the Agg backend (no display needed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from pipeline.evaluation.plots import dim_curves
from pipeline.mapping_file import read_mapping

METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100")
LABELS = {"mrr@10": "MRR@10", "ndcg@10": "nDCG@10", "recall@1": "R@1", "recall@10": "R@10", "recall@100": "R@100"}


class ReportError(ValueError):
    """Unusable input; the message names the file."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A ``pipeline.evaluate --out`` result given as option `what` (one-line errors naming the option and file)."""
    data = read_mapping(path, "evaluation result", syntax="json", error=ReportError, name=f"{what} {path}")
    if not isinstance(data.get("datasets"), dict) or not data["datasets"]:
        raise ReportError(f"{what} {path}: not a pipeline.evaluate result (no 'datasets')")
    for name, res in data["datasets"].items():
        missing = [m for m in METRICS if not isinstance(res.get(m), (int, float))]
        if missing:
            raise ReportError(f"{what} {path}: dataset {name} lacks {', '.join(missing)}")
    return data


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) loss curves from a metrics.jsonl: lists of (step, loss), by step."""
    train: dict[int, float] = {}
    validation: dict[int, float] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ReportError(f"--metrics {path}: cannot read ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"--metrics {path}: line {n} is not JSON") from None
        loss = rec.get("loss")
        if not isinstance(loss, (int, float)) or not isinstance(rec.get("step"), int):
            continue
        (validation if rec.get("split") == "validation" else train)[rec["step"]] = float(loss)
    if not train:
        raise ReportError(f"--metrics {path}: no training loss records")
    return sorted(train.items()), sorted(validation.items())


def compare(base: dict[str, Any], trained: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per dataset: base and trained metrics and their difference; refuses different evaluation sets."""
    if base.get("max_len") != trained.get("max_len"):
        raise ReportError(f"base and trained were evaluated with different max_len "
                          f"({base.get('max_len')} vs {trained.get('max_len')})")
    if set(base["datasets"]) != set(trained["datasets"]):
        raise ReportError(f"base and trained cover different datasets ({', '.join(base['datasets'])} vs "
                          f"{', '.join(trained['datasets'])})")
    out = {}
    for name, b in base["datasets"].items():
        t = trained["datasets"][name]
        for key in ("queries", "docs", "query_instruction"):
            if b.get(key) != t.get(key):
                raise ReportError(f"dataset {name}: base and trained differ in {key} ({b.get(key)!r} vs "
                                  f"{t.get(key)!r}); compare on the same held-out set and instruction")
        out[name] = {
            "queries": b.get("queries"), "docs": b.get("docs"), "query_instruction": b.get("query_instruction"),
            "base": {m: float(b[m]) for m in METRICS},
            "trained": {m: float(t[m]) for m in METRICS},
            "delta": {m: float(t[m]) - float(b[m]) for m in METRICS},
        }
    return out


def table(comparison: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, c in comparison.items():
        lines.append(f"held-out retrieval: {name} ({c['queries']:,} queries, {c['docs']:,} documents, "
                     f"query instruction: {c['query_instruction']})")
        header = f"{'metric':<10} {'base':>8} {'trained':>8} {'change':>8}"
        lines += [header, "-" * len(header)]
        for m in METRICS:
            lines.append(f"{LABELS[m]:<10} {c['base'][m]:>8.4f} {c['trained'][m]:>8.4f} {c['delta'][m]:>+8.4f}")
    return "\n".join(lines)


def timing_table(timings: dict[str, Any]) -> str:
    """launch/demo.sh's timings.json ({"stages": [{stage, wall_s, cpu_s}], "total_wall_s", "total_cpu_s"}) as a
    table; a plain {stage: seconds} mapping is accepted too."""
    stages = timings.get("stages")
    if not isinstance(stages, list):
        stages = [{"stage": k, "wall_s": v} for k, v in timings.items() if isinstance(v, (int, float))]
    header = f"{'stage':<10} {'wall':>9} {'CPU':>9}"
    lines = [header, "-" * len(header)]

    def fmt(v: Any) -> str:
        return f"{v:>8.1f}s" if isinstance(v, (int, float)) and math.isfinite(v) else f"{'-':>9}"

    for s in stages:
        lines.append(f"{str(s.get('stage')):<10} {fmt(s.get('wall_s'))} {fmt(s.get('cpu_s'))}")
    if "total_wall_s" in timings:
        lines.append(f"{'total':<10} {fmt(timings.get('total_wall_s'))} {fmt(timings.get('total_cpu_s'))}")
    return "\n".join(lines)


def dims_table(dims: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
    """MRR@10 and nDCG@10 of base and trained at each evaluated embedding dimension."""
    lines = []
    for name in dims["base"]:
        lines.append(f"held-out retrieval by embedding dimension (truncated, re-normalised): {name}")
        header = f"{'dim':>6} {'MRR base':>9} {'trained':>8} {'nDCG base':>10} {'trained':>8}"
        lines += [header, "-" * len(header)]
        base, trained = dims["base"][name], dims["trained"].get(name, {})
        for d in sorted(base, key=int):
            if d in trained:
                lines.append(f"{d:>6} {base[d]['mrr@10']:>9.4f} {trained[d]['mrr@10']:>8.4f} "
                             f"{base[d]['ndcg@10']:>10.4f} {trained[d]['ndcg@10']:>8.4f}")
    return "\n".join(lines)


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(path: Path, train: list[tuple[int, float]], validation: list[tuple[int, float]],
         comparison: dict[str, dict[str, Any]], title: str,
         dims: list[tuple[str, dict[str, Any]]] | None = None) -> None:
    """The demo figure; `dims`: (label, evaluation report) of base and trained, for the Matryoshka panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluation.plots import draw_dims

    if dims:
        fig, (ax_loss, ax_bar, ax_dims) = plt.subplots(1, 3, figsize=(17, 4.5))
        draw_dims(ax_dims, dims, "mrr@10")
        ax_dims.set_title("held-out MRR@10 by embedding dimension")
    else:
        fig, (ax_loss, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps, losses = zip(*train)
    window = max(1, min(5, len(losses) // 4))
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.35, marker=".", label="train loss (per step)")
    if window > 1:
        ax_loss.plot(steps, moving_average(list(losses), window), color="tab:blue",
                     label=f"train loss ({window}-step mean)")
    if validation:
        v_steps, v_losses = zip(*validation)
        ax_loss.plot(v_steps, v_losses, color="tab:orange", marker="o", label="validation loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("contrastive loss (InfoNCE)")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)

    width = 0.8 / (2 * len(comparison))
    xs = range(len(METRICS))
    for i, (name, c) in enumerate(comparison.items()):
        for j, (which, color) in enumerate((("base", "tab:gray"), ("trained", "tab:green"))):
            offset = (2 * i + j - len(comparison) + 0.5) * width
            values = [c[which][m] for m in METRICS]
            label = which if len(comparison) == 1 else f"{name} {which}"
            bars = ax_bar.bar([x + offset for x in xs], values, width, color=color, label=label,
                              alpha=1.0 if i == 0 else 0.6)
            for bar, v in zip(bars, values):
                ax_bar.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax_bar.set_xticks(list(xs), [LABELS[m] for m in METRICS])
    ax_bar.set_ylim(0, 1.08)
    ax_bar.set_title("held-out retrieval: base vs. trained")
    ax_bar.grid(axis="y", alpha=0.3)
    ax_bar.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.demo_report",
        description="Before/after report of the demo: prints the held-out metrics of the base and the trained "
                    "model, writes OUT/demo_report.json and OUT/demo.png (loss curve + before/after bars).",
    )
    p.add_argument("--base", required=True, help="pipeline.evaluate --out JSON of the base model")
    p.add_argument("--trained", required=True, help="pipeline.evaluate --out JSON of the trained model (same data)")
    p.add_argument("--metrics", required=True, help="the training run's metrics.jsonl")
    p.add_argument("--out", required=True, help="output directory (demo_report.json, demo.png)")
    p.add_argument("--timings", help="optional JSON {stage: seconds} recorded into the report")
    p.add_argument("--target-gain", type=float, default=None, metavar="G",
                   help="say whether MRR@10 improved by at least G (absolute) on every dataset")
    p.add_argument("--title", default="all-MiniLM-L6-v2 fine-tuned on stdlib docstring -> code pairs",
                   help="figure title")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = _read_json(Path(args.base), "--base")
    trained = _read_json(Path(args.trained), "--trained")
    train, validation = read_metrics(Path(args.metrics))
    comparison = compare(base, trained)
    curves = [(label, data) for label, data in (("base", base), ("trained", trained)) if dim_curves(data)]
    dims = curves if len(curves) == 2 else None
    timings = None
    if args.timings:
        timings = read_mapping(args.timings, "timings", syntax="json", error=ReportError,
                               name=f"--timings {args.timings}")
    out = Path(args.out)
    figure = out / "demo.png"
    plot(figure, train, validation, comparison, args.title, dims)
    report: dict[str, Any] = {
        "base_model": base.get("model"),
        "trained_model": trained.get("model"),
        "data": base.get("data"),
        "max_len": base.get("max_len"),
        "datasets": comparison,
        "training": {
            "steps": train[-1][0],
            "loss": [{"step": s, "loss": v} for s, v in train],
            "validation_loss": [{"step": s, "loss": v} for s, v in validation],
            "first_loss": train[0][1],
            "last_loss": train[-1][1],
        },
        "figure": str(figure),
    }
    if dims:
        report["dims"] = {label: {name: {str(d): m for d, m in sorted(curve.items())}
                                  for name, curve in dim_curves(data).items()} for label, data in dims}
    if timings is not None:
        report["timings_s"] = timings
    if args.target_gain is not None:
        met = all(c["delta"]["mrr@10"] >= args.target_gain - 1e-12 for c in comparison.values())
        report["target"] = {"metric": "mrr@10", "min_gain": args.target_gain, "met": met}
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except ReportError as exc:
        print(f"demo_report: error: {exc}", file=sys.stderr)
        return 2
    print(table(report["datasets"]))
    tr = report["training"]
    print(f"training: {tr['steps']} steps, loss {tr['first_loss']:.4f} (step 1) -> {tr['last_loss']:.4f} "
          f"(step {tr['steps']})" + "".join(
              f"; validation loss {v['loss']:.4f} at step {v['step']}" for v in tr["validation_loss"][-1:]))
    if "dims" in report:
        print(dims_table(report["dims"]))
    if "timings_s" in report:
        print(timing_table(report["timings_s"]))
    if "target" in report:
        t = report["target"]
        gains = ", ".join(f"{n} {c['delta']['mrr@10']:+.4f}" for n, c in report["datasets"].items())
        print(f"target MRR@10 gain >= {t['min_gain']}: {'met' if t['met'] else 'NOT met'} ({gains})")
    print(f"written: {Path(args.out) / 'demo_report.json'}, {report['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
