"""`preprocess build`: raw datasets -> memory-mapped token shards (layout in :mod:`pipeline.data.shard_format`).

Per dataset, streaming the input (parquet row batches, JSONL lines) so that memory does not grow with its size:

0. only with ``max_rows``: one pass counts the usable rows, then ``max_rows`` of them are chosen uniformly with a
   RNG seeded by (seed, dataset name) (original order kept);
1. a pass reads and validates every row (bad rows skipped and counted by reason) and feeds the 128-bit
   ``blake2b(text, digest_size=16)`` of each row's positive and negatives, in order, to
   :class:`preprocess.dedup.ExternalDedup`, which numbers distinct documents by first appearance on disk;
2. a second pass tokenizes (worker processes) each query (instruction template applied) and each document at its
   first appearance, and streams both tables into Arrow files of bounded size
   (:class:`preprocess.shard_writer.TableWriter`: ``corpus-00000.arrow``, ..., ``queries-00000.arrow``, ...).

The result is identical to numbering documents with a dict of their texts (two different texts sharing a 128-bit
hash, probability ~n^2 / 2^129, would share a corpus id). The files are checksummed, ``dataset.json`` is written
last and the directory renamed into place. ``manifest.json`` is written atomically once every dataset is done. A
re-run skips every dataset whose ``dataset.json`` matches the requested build and whose files still match their
checksums, so an interrupted build resumes where it stopped.

Parts (``num_parts`` N > 1, ``part`` I): the build keeps only the rows whose query text hashes to I
(:func:`part_of`) after subsampling, and also writes, per dataset, ``part-rows.i64`` (each kept row's index in the
whole input, int64) and ``part-doc-keys.u64`` (each corpus document's 128-bit text hash, 2 x uint64), from which
:mod:`preprocess.merge` rebuilds exactly the single build's order and ids.

Memory: one batch of rows and texts (``batch_rows``), one table buffer per table (64 MiB), the dedup bitmap (2 bits
per document occurrence) and one dedup bucket; nothing per row or per document is held.

Decontamination (``decontaminate``: evaluation sets, ``--decontaminate EVAL [EVAL ...]``): before step 0, every
dataset to (re)build is checked by :class:`preprocess.decontaminate.Decontaminator` (the rule, the evaluation sets
and the memory bound are in that module's docstring); each row whose query or positive matches an evaluation query
or relevant document is then skipped in every pass like a bad row, counted in ``counts.skipped`` under
``contaminated_{query,passage}_{exact,13gram}`` (so ``valid_rows`` and subsampling count only clean rows). The
dataset's ``decontamination.jsonl`` (one line per dropped row: file, row, reason, the evaluation set, id and text it
matched) is one of its checksummed files, and ``OUT/decontamination.jsonl`` (next to the manifest) joins them. The
rule and the evaluation sets' paths, sizes and mtimes are part of the build key. With parts, every part checks the
whole input (its counts and report are those of the whole input, as its other skipped counts).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from pipeline.logs import log
from pipeline.data.shard_format import (
    CORPUS,
    DATASET_META,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    QUERIES,
    ShardError,
    sha256_file,
    tokenizer_fingerprint,
    write_json_atomic,
)
from pipeline.data.raw import RawRow, RawStats, discover, read_rows
from pipeline.data.registry import DatasetSpec, Registry, load_registry
from pipeline.data.tokenization import MIN_MAX_LEN, encode_spec, load_tokenizer
from preprocess.decontaminate import REPORT_FILE, DatasetContamination, Decontaminator, concat_reports
from preprocess.dedup import ExternalDedup
from preprocess.shard_writer import TableWriter
from preprocess.streams import batched, progress
from preprocess.tokenization import Tokenizer, write_backend

PART_ROWS = "part-rows.i64"
PART_DOC_KEYS = "part-doc-keys.u64"
DECONTAMINATE_TMP = ".decontaminate-scratch"  # scratch of --decontaminate (index, reports waiting for their dataset)
GIB = 1 << 30


class BuildError(ValueError):
    """A build that cannot proceed; the message names the file or option at fault."""


@dataclass
class BuildOptions:
    raw: str
    tokenizer: str
    out: str
    registry: str | None = None
    max_len: int = 1024
    workers: int = 1
    max_rows_per_dataset: int | None = None
    seed: int = 0
    overwrite: bool = False
    default_type: str | None = None
    max_file_gb: float = 4.0
    num_parts: int = 1
    part: int = 0
    batch_rows: int = 8192
    trust_remote_code: bool = False  # run the code the tokenizer directory ships (transformers' auto_map)
    decontaminate: list[str] | None = None  # evaluation sets (preprocess.decontaminate); their matches are dropped
    eval_split: str = "test"  # the BEIR / MTEB split of `decontaminate`


@dataclass
class DatasetResult:
    name: str
    meta: dict[str, Any]
    seconds: float
    reused: bool


def _file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _files_match(root: Path, files: dict[str, Any]) -> bool:
    for filename, expected in files.items():
        path = root / filename
        if not path.is_file() or path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
            return False
    return True


def text_keys(texts: list[str]) -> np.ndarray:
    """[n, 2] uint64: the 128-bit blake2b hash of each text's UTF-8 bytes (the dedup key of documents)."""
    if not texts:
        return np.zeros((0, 2), dtype=np.uint64)
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts)
    return np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)


def part_of(query: str, num_parts: int) -> int:
    """The part a row belongs to: its query text's 64-bit blake2b hash modulo `num_parts` (stable everywhere)."""
    digest = hashlib.blake2b(query.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_parts


def _subsample_keep(valid: int, limit: int | None, seed: int, name: str) -> np.ndarray | None:
    """Sorted indices (among the usable rows) of the `limit` rows kept, chosen uniformly with a RNG seeded by
    (seed, dataset name); None when all are kept."""
    if limit is None or valid <= limit:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    return np.sort(rng.choice(valid, size=limit, replace=False))


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` concatenated, and their lengths."""
    values: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for v, n in tokenizer.encode(texts):
        values.append(v.astype(dtype, copy=False))
        lengths.append(n.astype(np.int64))
    if not values:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    return np.concatenate(values), np.concatenate(lengths)


class ShardBuilder:
    """Builds one shard directory; see the module docstring for the steps and guarantees."""

    def __init__(self, options: BuildOptions) -> None:
        self.opts = options
        if options.max_len < MIN_MAX_LEN:
            raise BuildError(f"--max-len: must be at least {MIN_MAX_LEN}, got {options.max_len}")
        if options.max_rows_per_dataset is not None and options.max_rows_per_dataset < 1:
            raise BuildError(f"--max-rows-per-dataset: must be positive, got {options.max_rows_per_dataset}")
        if not options.max_file_gb > 0:
            raise BuildError(f"--max-file-gb: must be positive, got {options.max_file_gb}")
        if options.num_parts < 1 or not 0 <= options.part < options.num_parts:
            raise BuildError(f"--part {options.part} --num-parts {options.num_parts}: need 0 <= part < num-parts")
        self.out = Path(options.out)
        self.sources = discover(options.raw)
        self.registry: Registry = load_registry(options.registry)
        self.specs: list[DatasetSpec] = self.registry.resolve(
            list(self.sources), options.default_type, options.registry or "registry (none given)"
        )
        try:
            self.tokenizer = load_tokenizer(options.tokenizer, options.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise BuildError(f"--tokenizer {options.tokenizer}: cannot load tokenizer ({exc})") from None
        self.fingerprint = tokenizer_fingerprint(self.tokenizer, options.tokenizer)
        # EOS, whether the tokenizer appends it, dtype
        self.spec = encode_spec(options.tokenizer, options.max_len, trust_remote_code=options.trust_remote_code)
        self.eos_id = self.spec.eos_id
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.token_dtype = np.dtype(self.spec.dtype)
        self.decontaminator = (Decontaminator(options.decontaminate, options.eval_split, options.batch_rows,
                                              option="--decontaminate") if options.decontaminate else None)
        self.decontaminate_key = self.decontaminator.fingerprint() if self.decontaminator else None
        self.contamination: dict[str, DatasetContamination] = {}  # by str(source): the rows to drop

    # ---------------------------------------------------------------------------------------------------------
    def _check_existing_output(self) -> None:
        """Refuse an output built with another tokenizer or max_len (or wipe it, with --overwrite)."""
        if not self.out.exists():
            return
        metas = [self.out / MANIFEST] + sorted(self.out.glob(f"*/{DATASET_META}"))
        for path in metas:
            if not path.is_file():
                continue
            try:
                meta = json.loads(path.read_text())
            except ValueError:
                continue
            built_tok = (meta.get("tokenizer") or {}).get("vocab_sha256")
            built_len = meta.get("max_len")
            if built_tok == self.fingerprint["vocab_sha256"] and built_len == self.opts.max_len and not self.opts.overwrite:
                continue
            if not self.opts.overwrite:
                raise BuildError(
                    f"{path}: output was built with another tokenizer or max_len "
                    f"({meta.get('tokenizer', {}).get('name_or_path')!r}, max_len {built_len}); "
                    "pass --overwrite to replace it"
                )
        if self.opts.overwrite:
            (self.out / MANIFEST).unlink(missing_ok=True)
            for meta_path in self.out.glob(f"*/{DATASET_META}"):
                shutil.rmtree(meta_path.parent)
            for tmp in self.out.glob(".tmp-*"):
                shutil.rmtree(tmp)

    def _build_key(self, spec: DatasetSpec, source: Path) -> dict[str, Any]:
        stat = source.stat()
        return {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": self.fingerprint["vocab_sha256"],
            "max_len": self.opts.max_len,
            "query_template": self.registry.query_template if spec.instruction else None,
            "type": spec.type,
            "instruction": spec.instruction,
            "source": {"path": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "max_rows": self.opts.max_rows_per_dataset,
            "seed": self.opts.seed,
            **({"part": [self.opts.part, self.opts.num_parts]} if self.opts.num_parts > 1 else {}),
            **({"decontaminate": self.decontaminate_key} if self.decontaminate_key is not None else {}),
        }

    def _reusable(self, spec: DatasetSpec, key: dict[str, Any]) -> dict[str, Any] | None:
        meta_path = self.out / spec.name / DATASET_META
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            return None
        if meta.get("build_key") != key or not _files_match(meta_path.parent, meta.get("files", {})):
            return None
        return meta

    # ---------------------------------------------------------------------------------------------------------
    def _read(self, source: Path, stats: RawStats) -> Iterator[RawRow]:
        """The usable rows of `source`, without those decontamination drops (counted in `stats.skipped`)."""
        rows = read_rows(source, stats)
        found = self.contamination.get(str(source))
        return rows if found is None or not found.dropped else found.filter(rows, stats)

    def _rows(self, source: Path, stats: RawStats, keep: np.ndarray | None) -> Iterator[tuple[int, RawRow]]:
        """(index among the kept rows, row) of the rows this build keeps: decontaminated, subsampled, then this
        part's only."""
        parts, part = self.opts.num_parts, self.opts.part
        j = 0
        for i, row in enumerate(self._read(source, stats)):
            if keep is not None:
                if j >= len(keep) or keep[j] != i:
                    continue
            index = j
            j += 1
            if parts > 1 and part_of(row.query, parts) != part:
                continue
            yield index, row

    def _build_one(self, spec: DatasetSpec, source: Path, key: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
        keep = None
        if self.opts.max_rows_per_dataset is not None:
            counted = RawStats()
            for _ in progress(batched(enumerate(self._read(source, counted)), self.opts.batch_rows),
                              f"{spec.name} (count)", "row", count=len):
                pass
            keep = _subsample_keep(counted.rows, self.opts.max_rows_per_dataset, self.opts.seed, spec.name)

        tmp = self.out / f".tmp-{spec.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        dedup = ExternalDedup(tmp / "dedup")
        stats = RawStats()
        width = 0
        n_rows = 0
        batches = batched(self._rows(source, stats, keep), self.opts.batch_rows)
        for batch in progress(batches, f"{spec.name} (hash)", "row", count=len):
            texts = [t for _, row in batch for t in (row.positive, *row.negatives)]
            dedup.add(text_keys(texts))
            width = max(width, max(len(row.negatives) for _, row in batch))
            n_rows += len(batch)
        valid = stats.rows
        kept = valid if keep is None else len(keep)
        if valid == 0 or (n_rows == 0 and self.opts.num_parts == 1):
            shutil.rmtree(tmp)
            raise BuildError(
                f"{source}: no usable rows ({stats.raw_rows} read, skipped: {dict(stats.skipped) or 'none'})"
            )
        n_docs = dedup.finish()

        metadata = {"dataset": spec.name, "format_version": str(FORMAT_VERSION)}
        limit = max(int(self.opts.max_file_gb * GIB), 1)
        corpus = TableWriter(tmp, CORPUS, self.token_dtype, metadata, max_file_bytes=limit)
        queries = TableWriter(tmp, QUERIES, self.token_dtype, metadata, max_file_bytes=limit, num_negatives=width)
        parted = self.opts.num_parts > 1
        part_rows = open(tmp / PART_ROWS, "wb") if parted else None
        part_keys = open(tmp / PART_DOC_KEYS, "wb") if parted else None
        at_max = {"queries": 0, "docs": 0}
        started = time.perf_counter()
        with tqdm(total=n_rows + n_docs, unit="seq", desc=f"{spec.name}", dynamic_ncols=True) as bar:
            for batch in batched(self._rows(source, RawStats(), keep), self.opts.batch_rows):
                rows = [row for _, row in batch]
                counts = np.fromiter((1 + len(r.negatives) for r in rows), dtype=np.int64, count=len(rows))
                ids, new = dedup.take(int(counts.sum()))
                texts = [t for r in rows for t in (r.positive, *r.negatives)]
                fresh = [t for t, is_new in zip(texts, new.tolist()) if is_new]
                d_values, d_lengths = _encode(tokenizer, fresh, self.token_dtype)
                corpus.add(d_values, d_lengths)
                if part_keys is not None:
                    part_keys.write(text_keys(fresh).tobytes())
                starts = np.zeros(len(rows), dtype=np.int64)
                np.cumsum(counts[:-1], out=starts[1:])
                negatives = np.full((len(rows), width), -1, dtype=np.int64)
                for i, (s0, k) in enumerate(zip(starts.tolist(), counts.tolist())):
                    negatives[i, : k - 1] = ids[s0 + 1 : s0 + k]
                q_values, q_lengths = _encode(
                    tokenizer, [self.registry.format_query(spec, r.query) for r in rows], self.token_dtype
                )
                queries.add(q_values, q_lengths, ids[starts], negatives)
                if part_rows is not None:
                    part_rows.write(np.fromiter((i for i, _ in batch), dtype=np.int64, count=len(batch)).tobytes())
                at_max["queries"] += int((q_lengths >= self.opts.max_len).sum())
                at_max["docs"] += int((d_lengths >= self.opts.max_len).sum())
                bar.update(len(rows) + len(fresh))
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(tok_s=f"{(corpus.tokens + queries.tokens) / elapsed:,.0f}", refresh=False)
        names = corpus.close() + queries.close()
        for handle in (part_rows, part_keys):
            if handle is not None:
                handle.close()
                names.append(Path(handle.name).name)
        shutil.rmtree(tmp / "dedup")
        found = self.contamination.get(str(source))
        if found is not None and found.report is not None:
            shutil.move(str(found.report), tmp / REPORT_FILE)
            names.append(REPORT_FILE)
        meta = {
            "name": spec.name,
            "type": spec.type,
            "instruction": spec.instruction,
            "source": str(source),
            "num_negatives": int(width),
            "counts": {
                "raw_rows": stats.raw_rows,
                "valid_rows": valid,
                "queries": queries.rows,
                "subsampled_out": valid - kept,
                "corpus_docs": corpus.rows,
                "query_tokens": queries.tokens,
                "corpus_tokens": corpus.tokens,
                "queries_at_max_len": at_max["queries"],
                "docs_at_max_len": at_max["docs"],
                "skipped": dict(sorted(stats.skipped.items())),
            },
            "files": {name: _file_entry(tmp / name) for name in names},
            "tokenizer": self.fingerprint,
            "max_len": self.opts.max_len,
            "build_key": key,
        }
        if found is not None:
            meta["decontamination"] = {"against": [s.label for s in self.decontaminator.sources],
                                       "split": self.opts.eval_split, "dropped": found.dropped,
                                       "report": REPORT_FILE}
        write_json_atomic(tmp / DATASET_META, meta)
        final = self.out / spec.name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return meta

    def _decontaminate(self, todo: list[tuple[DatasetSpec, Path]]) -> None:
        """Find the rows to drop in the datasets to build (see the module docstring); reports wait in the scratch
        directory until their dataset is written."""
        if self.decontaminator is None or not todo:
            return
        found = self.decontaminator.run([(spec.name, source) for spec, source in todo], self.out / DECONTAMINATE_TMP)
        for spec, source in todo:
            result = found[spec.name]
            self.contamination[str(source)] = result
            reasons = ", ".join(f"{k} {v:,}" for k, v in result.counts.items()) or "none"
            log(f"{spec.name}: {result.dropped:,} of {result.rows:,} rows match an evaluation set ({reasons})")

    def _build_all(self, tokenizer: Tokenizer) -> list[DatasetResult]:
        results: list[DatasetResult] = []
        plan = []
        for spec in self.specs:
            source = self.sources[spec.name]
            key = self._build_key(spec, source)
            plan.append((spec, source, key, None if self.opts.overwrite else self._reusable(spec, key)))
        self._decontaminate([(spec, source) for spec, source, _, meta in plan if meta is None])
        for spec, source, key, meta in plan:
            started = time.perf_counter()
            if meta is not None:
                log(f"{spec.name}: up to date, reused ({self.out / spec.name})")
                results.append(DatasetResult(spec.name, meta, 0.0, True))
                continue
            meta = self._build_one(spec, source, key, tokenizer)
            results.append(DatasetResult(spec.name, meta, time.perf_counter() - started, False))
        return results

    def run(self) -> list[DatasetResult]:
        self._check_existing_output()
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.out / DECONTAMINATE_TMP, ignore_errors=True)
        results: list[DatasetResult] = []
        with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=self.out) as scratch:
            backend = write_backend(self.tokenizer, self.opts.max_len, self.spec.appends_eos,
                                    Path(scratch) / "tokenizer.json")
            spec = dataclasses.replace(self.spec, backend_file=str(backend), tokenizer=None)
            with Tokenizer(spec, self.opts.workers) as tokenizer:
                results = self._build_all(tokenizer)
        shutil.rmtree(self.out / DECONTAMINATE_TMP, ignore_errors=True)
        if self.decontaminator is not None:
            concat_reports([self.out / r.name / REPORT_FILE for r in results], self.out / REPORT_FILE)
        else:
            (self.out / REPORT_FILE).unlink(missing_ok=True)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_unix": int(time.time()),
            "tokenizer": self.fingerprint,
            "max_len": self.opts.max_len,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "token_dtype": self.token_dtype.name,
            "query_template": self.registry.query_template,
            **({"part": {"index": self.opts.part, "count": self.opts.num_parts}} if self.opts.num_parts > 1 else {}),
            "datasets": {
                r.name: {k: v for k, v in r.meta.items() if k not in ("tokenizer", "max_len")} for r in results
            },
        }
        write_json_atomic(self.out / MANIFEST, manifest)
        return results


def summary_table(results: list[DatasetResult]) -> str:
    """One fixed-width table: per dataset type, counts, tokens, skipped rows, time and tokens/s."""
    header = f"{'dataset':<24} {'type':<14} {'queries':>9} {'docs':>9} {'tokens':>12} {'skipped':>8} {'sec':>7} {'tok/s':>10}"
    lines = [header, "-" * len(header)]
    totals = [0, 0, 0, 0, 0.0]
    for r in results:
        c = r.meta["counts"]
        tokens = c["query_tokens"] + c["corpus_tokens"]
        skipped = sum(c["skipped"].values())
        rate = "reused" if r.reused else f"{tokens / max(r.seconds, 1e-9):,.0f}"
        lines.append(
            f"{r.name:<24} {r.meta['type']:<14} {c['queries']:>9,} {c['corpus_docs']:>9,} {tokens:>12,} "
            f"{skipped:>8,} {r.seconds:>7.1f} {rate:>10}"
        )
        totals = [totals[0] + c["queries"], totals[1] + c["corpus_docs"], totals[2] + tokens, totals[3] + skipped,
                  totals[4] + r.seconds]
    lines.append("-" * len(header))
    rate = f"{totals[2] / totals[4]:,.0f}" if totals[4] > 0 else "-"
    lines.append(
        f"{'total':<24} {'':<14} {totals[0]:>9,} {totals[1]:>9,} {totals[2]:>12,} {totals[3]:>8,} "
        f"{totals[4]:>7.1f} {rate:>10}"
    )
    return "\n".join(lines)


__all__ = ["BuildError", "BuildOptions", "ShardBuilder", "ShardError", "summary_table"]
