"""Mining search: faiss (approximate candidates, rescored exactly) against exact search, recall@k and speed.

    PYTHONPATH=. python bench/bench_search.py --source code       # real MiniLM embeddings of Python code pairs
    PYTHONPATH=. python bench/bench_search.py --source synthetic  # 1M clustered vectors, for speed at scale
    PYTHONPATH=. python bench/bench_search.py --quick              # plumbing check, seconds

Both searches are the ones `preprocess mine-negatives` runs (:func:`preprocess.search.search_slice`, exact, and
:func:`preprocess.search.faiss_search_slice`, with ``--faiss-index`` / ``--faiss-nprobe``), on the same query and
document embeddings in one process, each search timed --repeats times (median), the index build (k-means
training + adding the documents) once. Recall@k is
:func:`preprocess.search.recall_at_k` of the faiss top-k against the exact top-k (k = --top-k, mining's default 100).

Sources:

* ``code``: ``preprocess code-pairs`` over a Python source tree (default: this interpreter's site-packages, all
  docstring -> function pairs), queries = docstrings, documents = functions, embedded with all-MiniLM-L6-v2 (the
  model shipped for tests and the demo) at --max-len tokens. Embeddings are cached under --work.
* ``synthetic``: --docs unit vectors in --dim dimensions drawn around --clusters random centres (angular spread set
  by --spread), queries = noisy copies of random documents. Only for timing at scale: recall on real embeddings
  depends on their geometry, which this does not reproduce.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def code_embeddings(args: argparse.Namespace, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(query, document) MiniLM embeddings of code-pairs over --src (cached)."""
    cache = work / f"code_{args.max_pairs}_{args.max_len}.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["q"], data["d"]
    import subprocess

    from bench.bench_preprocess import _minilm_dir
    from pipeline.data.tokenization import encode_spec, tokenize_texts
    from pipeline.evaluation.retrieval import embed
    from pipeline.model.embedding import load_model_dir

    pairs = work / "pairs"
    cmd = [sys.executable, "-m", "preprocess", "code-pairs", args.src, "--out", str(pairs), "--heldout-fraction", "0",
           "--max-pairs", str(args.max_pairs)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    with open(next((pairs / "train").glob("*.jsonl"))) as handle:
        records = [json.loads(line) for line in handle]
    queries = [r["query"] for r in records]
    docs = list(dict.fromkeys(p for r in records for p in r["pos"]))
    model, model_dir = load_model_dir(_minilm_dir(), "cpu")
    spec = encode_spec(model_dir, args.max_len)
    q = embed(model, tokenize_texts(queries, spec, desc="tokenize queries"), chunk_size=64, desc="embed queries")
    d = embed(model, tokenize_texts(docs, spec, desc="tokenize docs"), chunk_size=64, desc="embed docs")
    np.savez(cache, q=q.numpy(), d=d.numpy())
    return q.numpy(), d.numpy()


def synthetic_embeddings(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    centres = unit(rng.standard_normal((args.clusters, args.dim)))
    docs = np.empty((args.docs, args.dim), dtype=np.float32)
    for s in range(0, args.docs, 1 << 18):
        n = min(1 << 18, args.docs - s)
        docs[s : s + n] = unit(centres[rng.integers(0, args.clusters, n)]
                               + args.spread / np.sqrt(args.dim) * rng.standard_normal((n, args.dim)))
    picked = rng.integers(0, args.docs, args.queries)
    queries = unit(docs[picked] + args.spread / np.sqrt(args.dim) * rng.standard_normal((args.queries, args.dim)))
    return queries, docs


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/bench_search.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["code", "synthetic"], default="code")
    parser.add_argument("--src", default=sysconfig.get_paths()["purelib"],
                        help="Python source tree for --source code (default: site-packages)")
    parser.add_argument("--max-pairs", type=int, default=60_000, help="code pairs kept (default 60k)")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per sequence when embedding (default 64)")
    parser.add_argument("--docs", type=int, default=1_000_000, help="synthetic documents (default 1M)")
    parser.add_argument("--queries", type=int, default=2000, help="synthetic queries (default 2000)")
    parser.add_argument("--dim", type=int, default=384, help="synthetic dimension (default 384, MiniLM's)")
    parser.add_argument("--clusters", type=int, default=4096, help="synthetic cluster centres (default 4096)")
    parser.add_argument("--spread", type=float, default=1.0, help="synthetic noise scale around a centre")
    parser.add_argument("--top-k", type=int, default=100, help="k of the search and of recall@k (default 100)")
    parser.add_argument("--index", default="auto", help="faiss index factory string (default auto)")
    parser.add_argument("--nprobe", default="1,4,16,64", help="comma-separated nprobe values (default 1,4,16,64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each search (median; default 3)")
    parser.add_argument("--work", default="/tmp/bench_search", help="scratch / cache directory")
    parser.add_argument("--quick", action="store_true", help="small synthetic corpus, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.source, args.docs, args.queries, args.clusters, args.repeats = "synthetic", 20_000, 200, 64, 1
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from preprocess.search import (
        auto_factory,
        build_index,
        recall_at_k,
        search_index,
        search_slice,
        set_nprobe,
    )

    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    q_np, d_np = code_embeddings(args, work) if args.source == "code" else synthetic_embeddings(args)
    q, d = torch.from_numpy(q_np), torch.from_numpy(d_np)
    ids = torch.arange(d.shape[0])
    index = auto_factory(d.shape[0]) if args.index == "auto" else args.index
    print(f"{args.source}: {q.shape[0]:,} queries, {d.shape[0]:,} documents, dim {d.shape[1]}, top-k {args.top_k}, "
          f"index {index}, torch threads {torch.get_num_threads()}", flush=True)
    exact_s, (_, exact_ids) = timed(lambda: search_slice(q, d, ids, args.top_k), args.repeats)
    build_s, built = timed(lambda: build_index(d_np, index, nprobe=1), 1)  # k-means: one timed build
    rows = [("exact", "-", 0.0, exact_s, 1.0)]
    for nprobe in (int(x) for x in args.nprobe.split(",")):
        set_nprobe(built, nprobe)
        sec, (_, got) = timed(lambda: search_index(built, q, d, ids, args.top_k), args.repeats)
        rows.append((index, str(nprobe), build_s, sec, recall_at_k(got.numpy(), exact_ids.numpy())))
    print(f"\n| search | nprobe | index build s | search s | queries/s | search speed vs exact | "
          f"recall@{args.top_k} |")
    print("|---|---|---|---|---|---|---|")
    for name, nprobe, build, sec, recall in rows:
        print(f"| {name} | {nprobe} | {build:.2f} | {sec:.2f} | {q.shape[0] / sec:,.0f} | {exact_s / sec:.1f}x | "
              f"{recall:.4f} |")
    print(f"(searches: medians of {args.repeats} runs; index build: one run, paid once per rank by a mining run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
