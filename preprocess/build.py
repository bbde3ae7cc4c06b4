"""`preprocess build`: raw datasets -> memory-mapped token shards (layout in :mod:`pipeline.data.shard_format`).

Per dataset: read and validate rows (bad rows skipped and counted by reason), optionally subsample to
``max_rows`` (seeded), deduplicate positives and negatives into one corpus with dense integer ids, tokenize queries
(instruction template applied) and corpus in worker processes, write the two Arrow tables into a temporary
directory, checksum them, write ``dataset.json`` last and rename the directory into place. ``manifest.json`` is
written atomically once every dataset is done. A re-run skips every dataset whose ``dataset.json`` matches the
requested build and whose files still match their checksums, so an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.logs import log
from pipeline.data.shard_format import (
    CORPUS_FILE,
    DATASET_META,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    QUERIES_FILE,
    ShardError,
    corpus_schema,
    queries_schema,
    sha256_file,
    tokenizer_fingerprint,
    write_json_atomic,
)
from pipeline.data.raw import RawRow, RawStats, discover, group_rows, read_rows
from pipeline.data.registry import DatasetSpec, Registry, load_registry
from pipeline.data.tokenization import MIN_MAX_LEN, encode_spec, load_tokenizer
from preprocess.tokenization import TokenSink, Tokenizer, token_list_array, write_backend


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


def _write_table(path: Path, schema: pa.Schema, columns: list[pa.Array]) -> None:
    batch = pa.RecordBatch.from_arrays(columns, schema=schema)
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)


def _subsample(rows: list[RawRow], limit: int | None, seed: int, name: str) -> list[RawRow]:
    """Keep `limit` rows chosen uniformly with a RNG seeded by (seed, dataset name); original order kept."""
    if limit is None or len(rows) <= limit:
        return rows
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    keep = np.sort(rng.choice(len(rows), size=limit, replace=False))
    return [rows[i] for i in keep]


def _tokenize_into(
    texts: list[str], tokenizer: Tokenizer, sink: TokenSink, bar: tqdm, started: float, tokens_before: int
) -> tuple[np.ndarray, np.ndarray]:
    for values, lengths in tokenizer.encode(texts):
        sink.add(values, lengths)
        bar.update(len(lengths))
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(tok_s=f"{(tokens_before + sink.tokens) / elapsed:,.0f}", refresh=False)
    return sink.finish()


class ShardBuilder:
    """Builds one shard directory; see the module docstring for the steps and guarantees."""

    def __init__(self, options: BuildOptions) -> None:
        self.opts = options
        if options.max_len < MIN_MAX_LEN:
            raise BuildError(f"--max-len: must be at least {MIN_MAX_LEN}, got {options.max_len}")
        if options.max_rows_per_dataset is not None and options.max_rows_per_dataset < 1:
            raise BuildError(f"--max-rows-per-dataset: must be positive, got {options.max_rows_per_dataset}")
        self.out = Path(options.out)
        self.sources = discover(options.raw)
        self.registry: Registry = load_registry(options.registry)
        self.specs: list[DatasetSpec] = self.registry.resolve(
            list(self.sources), options.default_type, options.registry or "registry (none given)"
        )
        try:
            self.tokenizer = load_tokenizer(options.tokenizer)
        except (OSError, ValueError) as exc:
            raise BuildError(f"--tokenizer {options.tokenizer}: cannot load tokenizer ({exc})") from None
        self.fingerprint = tokenizer_fingerprint(self.tokenizer, options.tokenizer)
        self.spec = encode_spec(options.tokenizer, options.max_len)  # EOS, whether the tokenizer appends it, dtype
        self.eos_id = self.spec.eos_id
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.token_dtype = np.dtype(self.spec.dtype)

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
    def _build_one(self, spec: DatasetSpec, source: Path, key: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
        stats = RawStats()
        rows = list(read_rows(source, stats))
        valid = len(rows)
        rows = _subsample(rows, self.opts.max_rows_per_dataset, self.opts.seed, spec.name)
        if not rows:
            raise BuildError(
                f"{source}: no usable rows ({stats.raw_rows} read, skipped: "
                f"{dict(stats.skipped) or 'none'})"
            )
        grouped = group_rows(rows)
        del rows
        docs, positives, negatives = grouped.docs, grouped.row_positive, grouped.row_negatives
        formatted = [self.registry.format_query(spec, q) for q in grouped.queries]
        queries = [formatted[q] for q in grouped.row_query]

        tmp = self.out / f".tmp-{spec.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        metadata = {"dataset": spec.name, "format_version": str(FORMAT_VERSION)}
        started = time.perf_counter()
        with tqdm(total=len(queries) + len(docs), unit="seq", desc=f"{spec.name}", dynamic_ncols=True) as bar:
            q_values, q_offsets = _tokenize_into(
                queries, tokenizer, TokenSink(tmp / "queries.tokens.tmp", self.token_dtype.name), bar, started, 0
            )
            q_tokens = int(q_offsets[-1])
            d_values, d_offsets = _tokenize_into(
                docs, tokenizer, TokenSink(tmp / "corpus.tokens.tmp", self.token_dtype.name), bar, started, q_tokens
            )
        _write_table(
            tmp / CORPUS_FILE, corpus_schema(self.token_dtype, metadata), [token_list_array(d_values, d_offsets)]
        )
        width = negatives.shape[1]
        padded = negatives if width else np.full((len(queries), 1), -1, dtype=np.int64)
        neg_array = pa.FixedSizeListArray.from_arrays(pa.array(padded.reshape(-1)), max(width, 1))
        _write_table(
            tmp / QUERIES_FILE,
            queries_schema(self.token_dtype, width, metadata),
            [token_list_array(q_values, q_offsets), pa.array(positives), neg_array],
        )
        del d_values, q_values
        for scratch in tmp.glob("*.tokens.tmp"):
            scratch.unlink()
        q_len, d_len = np.diff(q_offsets), np.diff(d_offsets)
        meta = {
            "name": spec.name,
            "type": spec.type,
            "instruction": spec.instruction,
            "source": str(source),
            "num_negatives": int(width),
            "counts": {
                "raw_rows": stats.raw_rows,
                "valid_rows": valid,
                "queries": len(queries),
                "subsampled_out": valid - len(queries),
                "corpus_docs": len(docs),
                "query_tokens": q_tokens,
                "corpus_tokens": int(d_offsets[-1]),
                "queries_at_max_len": int((q_len >= self.opts.max_len).sum()),
                "docs_at_max_len": int((d_len >= self.opts.max_len).sum()),
                "skipped": dict(sorted(stats.skipped.items())),
            },
            "files": {name: _file_entry(tmp / name) for name in (CORPUS_FILE, QUERIES_FILE)},
            "tokenizer": self.fingerprint,
            "max_len": self.opts.max_len,
            "build_key": key,
        }
        write_json_atomic(tmp / DATASET_META, meta)
        final = self.out / spec.name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return meta

    def _build_all(self, tokenizer: Tokenizer) -> list[DatasetResult]:
        results: list[DatasetResult] = []
        for spec in self.specs:
            source = self.sources[spec.name]
            key = self._build_key(spec, source)
            started = time.perf_counter()
            meta = None if self.opts.overwrite else self._reusable(spec, key)
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
        results: list[DatasetResult] = []
        with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=self.out) as scratch:
            backend = write_backend(self.tokenizer, self.opts.max_len, self.spec.appends_eos,
                                    Path(scratch) / "tokenizer.json")
            spec = dataclasses.replace(self.spec, backend_file=str(backend), tokenizer=None)
            with Tokenizer(spec, self.opts.workers) as tokenizer:
                results = self._build_all(tokenizer)
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
