"""`preprocess merge`: join the parts of a build (``preprocess build --num-parts N --part I``) into one shard directory.

Every part read the whole input and kept the rows whose query hashes to it (:func:`preprocess.build.part_of`); it
recorded each kept row's index in the input (``part-rows.i64``) and each of its documents' 128-bit text hash
(``part-doc-keys.u64``). The merge visits the rows of all parts in input order (a k-way order by that index),
numbers documents by first appearance of their text hash with :class:`preprocess.dedup.ExternalDedup` exactly as a
single build does, copies each document's tokens at its first appearance and each query row with its ids
re-mapped. The result - tables, ids, counts, build key - is that of a single build of the same input with the same
``--max-file-gb`` (the files are byte-identical); only ``created_unix`` differs.

Decontamination (``build --decontaminate``) ran over the whole input in every part, so each part holds the same
per-dataset report (``decontamination.jsonl``, checked equal by checksum): the merge keeps it, with the dataset's
``decontamination`` entry, and joins the datasets' reports into ``OUT/decontamination.jsonl`` as a single build does.

Refused with one line: parts of another tokenizer, max_len, input or build options; a missing, repeated or
foreign part; rows not covered exactly once. Memory: the row index of all parts (16 bytes per row) besides the
build's bounded buffers.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.data.shard_format import (
    CORPUS,
    DATASET_META,
    FORMAT_VERSION,
    MANIFEST,
    QUERIES,
    sha256_file,
    write_json_atomic,
)
from pipeline.data.shards import ShardDataset, ShardReader, read_manifest
from preprocess.build import GIB, PART_DOC_KEYS, PART_ROWS, BuildError, DatasetResult
from preprocess.decontaminate import REPORT_FILE, concat_reports
from preprocess.dedup import ExternalDedup
from preprocess.shard_writer import TableWriter

SAME_COUNTS = ("raw_rows", "valid_rows", "skipped")  # every part read the whole input: these must agree


@dataclass
class MergeOptions:
    parts: list[str]
    out: str
    max_file_gb: float = 4.0
    overwrite: bool = False
    batch_rows: int = 8192


def _part_manifests(parts: list[str]) -> list[tuple[Path, dict[str, Any]]]:
    """The parts' manifests in part order, checked to be the N parts of one build."""
    loaded = [(Path(p), read_manifest(p)) for p in parts]
    for path, manifest in loaded:
        if not isinstance(manifest.get("part"), dict):
            raise BuildError(f"{path / MANIFEST}: not a part (built without --num-parts)")
    count = loaded[0][1]["part"]["count"]
    indices = sorted(m["part"]["index"] for _, m in loaded)
    if any(m["part"]["count"] != count for _, m in loaded) or indices != list(range(count)):
        have = ", ".join(f"{p}: part {m['part']['index']} of {m['part']['count']}" for p, m in loaded)
        raise BuildError(f"merge: need each of the {count} parts exactly once (have {have})")
    first_path, first = loaded[0]
    for path, manifest in loaded[1:]:
        for what, a, b in (("tokenizer", first["tokenizer"]["vocab_sha256"], manifest["tokenizer"]["vocab_sha256"]),
                           ("max_len", first["max_len"], manifest["max_len"]),
                           ("query_template", first.get("query_template"), manifest.get("query_template")),
                           ("datasets", sorted(first["datasets"]), sorted(manifest["datasets"]))):
            if a != b:
                shown = (a[:12], b[:12]) if what == "tokenizer" else (a, b)
                raise BuildError(f"{first_path}, {path}: parts built with different {what} ({shown[0]} vs {shown[1]}); "
                                 "rebuild them with the same options")
    return sorted(loaded, key=lambda item: item[1]["part"]["index"])


def _unparted_key(key: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in key.items() if k != "part"}


class PartMerger:
    """Merges the parts named in :class:`MergeOptions` into ``out`` (see the module docstring)."""

    def __init__(self, options: MergeOptions) -> None:
        if len(options.parts) < 1:
            raise BuildError("merge: no part directories given")
        if not options.max_file_gb > 0:
            raise BuildError(f"--max-file-gb: must be positive, got {options.max_file_gb}")
        self.opts = options
        self.out = Path(options.out)
        self.parts = _part_manifests(options.parts)

    def _dataset(self, name: str) -> DatasetResult:
        started = time.perf_counter()
        datasets: list[ShardDataset] = []
        metas = []
        for path, _ in self.parts:
            ds = ShardReader(path, datasets=[name])[name]
            datasets.append(ds)
            metas.append(ds.meta)
        first_path = self.parts[0][0]
        for (path, _), meta in zip(self.parts[1:], metas[1:]):
            if _unparted_key(meta["build_key"]) != _unparted_key(metas[0]["build_key"]) or any(
                    meta["counts"][k] != metas[0]["counts"][k] for k in SAME_COUNTS):
                raise BuildError(f"{first_path / name}, {path / name}: parts built from different input or options "
                                 "(build key or raw row counts differ)")
        rows = [np.fromfile(ds.root / PART_ROWS, dtype=np.int64) for ds in datasets]
        keys = [np.fromfile(ds.root / PART_DOC_KEYS, dtype=np.uint64).reshape(-1, 2) for ds in datasets]
        for ds, r, k in zip(datasets, rows, keys):
            if len(r) != ds.num_queries or len(k) != ds.num_docs:
                raise BuildError(f"{ds.root}: {PART_ROWS} / {PART_DOC_KEYS} do not match the tables")
        index = np.concatenate(rows)
        owner = np.concatenate([np.full(len(r), p, dtype=np.int32) for p, r in enumerate(rows)])
        local = np.concatenate([np.arange(len(r), dtype=np.int64) for r in rows])
        order = np.argsort(index, kind="stable")
        if not np.array_equal(index[order], np.arange(len(index))):
            raise BuildError(f"{first_path / name}: the parts do not hold every input row exactly once")
        owner, local = owner[order], local[order]
        del index, order
        width = max(ds.num_negatives for ds in datasets)

        def docs_of(start: int, stop: int) -> tuple[list[tuple[int, int]], np.ndarray]:
            """(part, local doc id) of every document occurrence of merged rows [start, stop), and counts per row."""
            occ: list[tuple[int, int]] = []
            counts = np.zeros(stop - start, dtype=np.int64)
            for i, (p, q) in enumerate(zip(owner[start:stop].tolist(), local[start:stop].tolist())):
                ds = datasets[p]
                negs = ds.negatives[q]
                ids = [int(ds.positives[q]), *(int(j) for j in negs[negs >= 0])]
                occ.extend((p, j) for j in ids)
                counts[i] = len(ids)
            return occ, counts

        tmp = self.out / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        dedup = ExternalDedup(tmp / "dedup")
        n_rows, step = len(owner), self.opts.batch_rows
        for start in range(0, n_rows, step):
            occ, _ = docs_of(start, min(start + step, n_rows))
            dedup.add(np.stack([keys[p][j] for p, j in occ]) if occ else np.zeros((0, 2), dtype=np.uint64))
        n_docs = dedup.finish()

        meta0 = metas[0]
        metadata = {"dataset": name, "format_version": str(FORMAT_VERSION)}
        limit = max(int(self.opts.max_file_gb * GIB), 1)
        corpus = TableWriter(tmp, CORPUS, np.dtype(self.parts[0][1]["token_dtype"]), metadata, max_file_bytes=limit)
        queries = TableWriter(tmp, QUERIES, corpus.dtype, metadata, max_file_bytes=limit, num_negatives=width)
        max_len = self.parts[0][1]["max_len"]
        at_max = {"queries": 0, "docs": 0}
        with tqdm(total=n_rows, unit="row", desc=f"{name} (merge)", dynamic_ncols=True) as bar:
            for start in range(0, n_rows, step):
                stop = min(start + step, n_rows)
                occ, counts = docs_of(start, stop)
                ids, new = dedup.take(len(occ))
                fresh = [datasets[p].corpus[j] for (p, j), is_new in zip(occ, new.tolist()) if is_new]
                d_lengths = np.array([len(t) for t in fresh], dtype=np.int64)
                corpus.add(np.concatenate(fresh) if fresh else np.zeros(0, dtype=corpus.dtype), d_lengths)
                seqs = [datasets[p].queries[q] for p, q in zip(owner[start:stop].tolist(), local[start:stop].tolist())]
                q_lengths = np.array([len(t) for t in seqs], dtype=np.int64)
                starts = np.zeros(stop - start, dtype=np.int64)
                np.cumsum(counts[:-1], out=starts[1:])
                negatives = np.full((stop - start, width), -1, dtype=np.int64)
                for i, (s0, k) in enumerate(zip(starts.tolist(), counts.tolist())):
                    negatives[i, : k - 1] = ids[s0 + 1 : s0 + k]
                queries.add(np.concatenate(seqs), q_lengths, ids[starts], negatives)
                at_max["queries"] += int((q_lengths >= max_len).sum())
                at_max["docs"] += int((d_lengths >= max_len).sum())
                bar.update(stop - start)
        names = corpus.close() + queries.close()
        shutil.rmtree(tmp / "dedup")
        if "decontamination" in meta0:
            names.append(self._decontamination_report(name, metas, tmp))
        counts0 = meta0["counts"]
        meta = {
            **{k: meta0[k] for k in ("name", "type", "instruction", "source")},
            "num_negatives": int(width),
            "counts": {
                "raw_rows": counts0["raw_rows"],
                "valid_rows": counts0["valid_rows"],
                "queries": queries.rows,
                "subsampled_out": counts0["valid_rows"] - queries.rows,
                "corpus_docs": corpus.rows,
                "query_tokens": queries.tokens,
                "corpus_tokens": corpus.tokens,
                "queries_at_max_len": at_max["queries"],
                "docs_at_max_len": at_max["docs"],
                "skipped": counts0["skipped"],
            },
            "files": {f: {"size": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in names},
            "tokenizer": self.parts[0][1]["tokenizer"],
            "max_len": max_len,
            "build_key": _unparted_key(meta0["build_key"]),
            **({"decontamination": meta0["decontamination"]} if "decontamination" in meta0 else {}),
        }
        write_json_atomic(tmp / DATASET_META, meta)
        final = self.out / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return DatasetResult(name, meta, time.perf_counter() - started, False)

    def _decontamination_report(self, name: str, metas: list[dict[str, Any]], tmp: Path) -> str:
        """Copy the parts' (identical) decontamination report of dataset `name` into `tmp`; its file name."""
        first_path = self.parts[0][0]
        for (path, _), meta in zip(self.parts[1:], metas[1:]):
            if (meta.get("decontamination") != metas[0]["decontamination"]
                    or meta["files"].get(REPORT_FILE) != metas[0]["files"].get(REPORT_FILE)):
                raise BuildError(f"{first_path / name / REPORT_FILE}, {path / name / REPORT_FILE}: the parts' "
                                 "decontamination reports differ (parts built against different evaluation sets?)")
        shutil.copyfile(first_path / name / REPORT_FILE, tmp / REPORT_FILE)
        return REPORT_FILE

    def run(self) -> list[DatasetResult]:
        if self.out.exists() and any(self.out.iterdir()):
            if not self.opts.overwrite:
                raise BuildError(f"{self.out}: output exists and is not empty; pass --overwrite to replace it")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        first = self.parts[0][1]
        results = [self._dataset(name) for name in first["datasets"]]
        if any("decontamination" in r.meta for r in results):
            concat_reports([self.out / r.name / REPORT_FILE for r in results if "decontamination" in r.meta],
                           self.out / REPORT_FILE)
        manifest = {k: v for k, v in first.items() if k not in ("part", "datasets")}
        manifest["created_unix"] = int(time.time())
        manifest["datasets"] = {
            r.name: {k: v for k, v in r.meta.items() if k not in ("tokenizer", "max_len")} for r in results
        }
        write_json_atomic(self.out / MANIFEST, manifest)
        return results


def load_part_rows(root: str | Path, name: str) -> np.ndarray:
    """The input row indices a part kept for dataset `name` (diagnostics and tests)."""
    return np.fromfile(Path(root) / name / PART_ROWS, dtype=np.int64)


__all__ = ["MergeOptions", "PartMerger", "load_part_rows"]

