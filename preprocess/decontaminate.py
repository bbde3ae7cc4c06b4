"""Decontamination against evaluation sets: ``python -m preprocess decontaminate`` (a report, nothing built) and
``python -m preprocess build ... --decontaminate EVAL [EVAL ...]`` (the matching rows are dropped).

A score on MTEB or BEIR says little when the test queries or their relevant documents were trained on. This module
finds the training rows whose **query** or **positive** matches an **evaluation query** or **relevant document**.

The rule
--------
Texts are compared after :func:`normalise`: Unicode NFKC, case-folded (``str.casefold``), every punctuation
character (Unicode category P*) removed, whitespace runs collapsed to one space; words are the space-separated
pieces. A training text matches an evaluation text when

* both are equal after normalisation (reasons ``contaminated_query_exact``, ``contaminated_passage_exact``), or
* both have at least 13 words and share a window of 13 consecutive words (``contaminated_query_13gram``,
  ``contaminated_passage_13gram``); a text of fewer than 13 words only matches exactly.

This is GPT-3's rule (Brown et al. 2020, "Language Models are Few-Shot Learners", Appendix C: an example is dirty
when it has a 13-gram overlap with the training data, or, when shorter than 13 words, overlaps it as a whole). Llama
2 (Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Appendix A.6) measures contamination
on token n-grams instead (a token counts as contaminated when it lies in an n-gram of more than 10 tokens found in
both the sample and the training data; a sample with most of its tokens contaminated is "dirty") and shows how
contamination moves benchmark scores; the word-window rule is used here because its unit does not depend on a
tokenizer and one shared window is enough to drop a row (the stricter choice for training data). Rows are
dropped whole (query, positive and negatives); negatives are not checked (a negative is not a training target).
Each dropped row is counted under the first reason that applies, in the order of :data:`REASONS`. The positive is
named ``passage`` in the reasons, as in the raw readers' own (``empty_passage``, ...).

Evaluation sets (``EVAL``)
--------------------------
* a BEIR directory (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``, read and checked by
  :func:`read_beir` as :func:`pipeline.evaluation.eval_sets.load_beir` does): the evaluation queries are the
  queries of the qrels of ``split`` (default ``test``), the relevant documents those judged > 0 there (a document
  judged 0 does not count); a document is matched as BEIR embeds it (``title + " " + text``,
  :func:`beir_document`) and, exactly, also as its text alone;
* raw pairs, a ``.jsonl`` (FlagEmbedding ``query``/``pos``/``neg``) or ``.parquet`` (F2LLM ``query``/``passage``/
  ``negative_k``) file or a directory of them, read by :func:`pipeline.data.raw.read_rows` as
  :func:`pipeline.evaluation.eval_sets.load_raw_eval_set` reads an evaluation file: every query and every
  positive (negatives are not relevant documents);
* ``mteb:TASK`` (an MTEB retrieval or reranking task): its data is loaded by ``mteb`` in a child process with
  ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` - from the local Hugging Face cache only (where an earlier
  ``python -m pipeline.evaluate --mteb TASK`` left it), never downloaded - and exported as a BEIR directory
  (judged queries and judged documents of the split, one per subset) that is then read as above. Without the
  cached data this is a one-line error; pass the task's BEIR-format export (a BEIR directory) instead.

How (four streaming passes)
---------------------------
1. **Index** the evaluation side as 64-bit hashes: per text, a hash of its normalised word sequence (*exact*) and
   one per window of 13 consecutive words (*windows*). Exact hashes: a sorted ``uint64`` array in memory
   (8 bytes per evaluation text form). Window hashes: streamed to 256 bucket files by their top byte, then each
   bucket sorted and deduplicated into one sorted ``uint64`` file, **memory-mapped** for lookups (searched with
   ``np.searchsorted``), with an in-memory bitmap filter (2^k bits, ~16 per window, at most 2^31 bits = 256 MiB)
   in front, so that only the training windows whose filter bit is set touch the file.
2. **Scan** each training file in batches of rows: the query's and the positive's exact hash and window hashes
   are looked up; a row with a hit keeps (row, field, kind, first hit hash) as a candidate.
3. **Resolve**: one more pass over the evaluation sets finds, for each hit hash, the first evaluation text that
   has it (stopping once every hit hash is found).
4. **Verify**: each candidate row is read again and checked on the text itself - exact: the two normalised texts
   are equal; window: the two texts share 13 consecutive normalised words (the window is reported). Both kinds
   are verified, so a hash collision never drops a row.

Hashes: words are hashed from their UTF-8 bytes (a polynomial prefix hash mod 2^64, then the splitmix64
finaliser); a window folds its 13 word hashes with a multiply-xorshift step per word and the finaliser; the exact
hash mixes each word hash with its position, sums them and mixes in the word count. Treating the hashes as uniform
64-bit values, the expected number of false candidates is ``lookups x distinct evaluation hashes / 2^64``: at the
bound below, 2 x 10^7 training texts against 2 x 10^6 exact hashes gives 2 x 10^-6, and 2 x 10^9 training windows
(10^7 rows, ~200 words per positive) against 2 x 10^8 evaluation windows gives 0.02 - for the whole job, and each
one is caught by pass 4 (it costs one verification). A collision could hide a true match only if it occupied the
one hash kept per (row, field, kind) or the one evaluation text kept per hash (probability ~10^-9 per contaminated
row at that bound).

Memory (bound: 10M training rows, 1M evaluation texts of ~200 words = 2 x 10^8 windows): evaluation side 8 bytes
per exact hash in memory (16 MiB), 8 bytes per distinct window on disk (1.6 GB in the scratch directory,
memory-mapped: the pages lookups touch count in RSS as file-backed page cache, which the OS can drop, not as
process memory) and the bitmap filter in memory (256 MiB, ~11 bits per window there, so ~9 % of the training
windows go on to the file); while indexing, a 32 MiB write buffer and one bucket (1/256 of the windows) at a time.
Training side: one batch of rows and its hashes (``batch_rows`` rows, ~40 bytes per word), the candidates (17 bytes
per hash hit), the evaluation texts that matched (only those) and the dropped rows (9 bytes each). Nothing is held
per training row, so memory does not grow with the training data; with the evaluation side it grows by 8 bytes per
text (exact hashes) and 2 bytes per window (the filter, at most 256 MiB).

Measured (``python tests/test_decontaminate.py --scale``; synthetic: 100,000 BEIR documents of 200 words and 20,000
queries against 1,000,000 training rows of a 10-word query and a 100-word positive, 1,000 of them holding 20 words
of an evaluation document; 2 CPU cores shared with other jobs): index 13-16 s (120,000 texts, 18.8M distinct
windows: a 143 MiB file and a 64 MiB filter), scan 63-84 s (12-16k rows/s), resolve 3-4 s, verify 14-18 s; the
1,000 planted rows found and no other; wall 98-129 s, peak RSS 655-675 MiB, of which ~250 MiB file-backed (the
mapped index, libraries) and ~140 MiB the parquet reader's (reading the file alone peaks at 234 MiB). At the bound
this extrapolates to ~2.5 min indexing and ~12 min scanning per 10M rows, with ~190 MiB more filter.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pipeline.data.beir import (BEIR_CORPUS, BEIR_QRELS, BEIR_QUERIES, beir_document, corpus_documents, corpus_index,
                                is_beir_dir, read_judged)
from pipeline.data.raw import RAW_SUFFIXES, RawDataError, RawRow, RawStats, discover, read_rows
from pipeline.logs import log
from preprocess.spill import BucketSpill
from preprocess.streams import batched, progress


WINDOW = 13
RULE = "nfkc-casefold-nopunct-ws/exact+13-word-window/v1"  # part of the build key: a change rebuilds
REASONS = ("contaminated_query_exact", "contaminated_query_13gram",
           "contaminated_passage_exact", "contaminated_passage_13gram")  # priority order; index = candidate code
REPORT_FILE = "decontamination.jsonl"
CLIP = 200  # characters of each text in the report

_U64 = np.uint64
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_GOLD = _U64(0x9E3779B97F4A7C15)
_BASE = 0x100000001B3  # odd: invertible mod 2^64
_CHUNK_CHARS = 1 << 18  # texts hashed together (bounds the power tables: 16 bytes per byte of a chunk)


class DecontaminationError(ValueError):
    """Bad evaluation set or option; the message names the file or option."""


# ----------------------------------------------------------------------------------------------------------------
# normalisation and hashing
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _table() -> dict[int, str | None]:
    """str.translate table: punctuation (Unicode category P*) removed, every other whitespace character -> ' '."""
    table: dict[int, str | None] = {}
    for code in range(0x20000):  # no punctuation or whitespace above (Unicode 15: planes 2+ hold none)
        ch = chr(code)
        if unicodedata.category(ch)[0] == "P":
            table[code] = None
        elif ch.isspace() and ch != " ":
            table[code] = " "
    return table


def _prepare(text: str) -> str:
    """NFKC, case-folded, punctuation removed, whitespace as single ' ' characters (runs not yet collapsed)."""
    return unicodedata.normalize("NFKC", text).casefold().translate(_table())


def normalise(text: str) -> str:
    """The text as the rule compares it: NFKC, case-folded, punctuation removed, whitespace collapsed, stripped."""
    return " ".join(_prepare(text).split())


def _fmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place."""
    x ^= x >> _U64(30)
    x *= _M1
    x ^= x >> _U64(27)
    x *= _M2
    x ^= x >> _U64(31)
    return x


class _Powers:
    """BASE^i and BASE^-i mod 2^64 for i < n (grown by doubling; tables over 4M entries are not kept)."""

    def __init__(self) -> None:
        self.pow = np.ones(1, dtype=np.uint64)
        self.inv = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pow) >= n:
            return self.pow, self.inv
        size = 1 << max(16, (n - 1).bit_length())
        p = np.empty(size, dtype=np.uint64)
        q = np.empty(size, dtype=np.uint64)
        k = len(self.pow)
        p[:k], q[:k] = self.pow, self.inv
        inv_base = pow(_BASE, -1, 1 << 64)
        while k < size:
            p[k: 2 * k] = p[:k] * _U64(pow(_BASE, k, 1 << 64))
            q[k: 2 * k] = q[:k] * _U64(pow(inv_base, k, 1 << 64))
            k *= 2
        if size <= 1 << 22:
            self.pow, self.inv = p, q
        return p, q


_POWERS = _Powers()


@dataclass
class TextHashes:
    """Hashes of a list of texts: `exact[i]` (valid where `words[i]` > 0) and every 13-word window of every text
    (`windows`, with `owner`: the index of its text), windows of one text in order."""

    exact: np.ndarray
    words: np.ndarray
    windows: np.ndarray
    owner: np.ndarray


def _hash_chunk(prepared: list[str]) -> TextHashes:
    n_texts = len(prepared)
    buf = "\n".join(prepared).encode("utf-8", "surrogatepass")
    raw = np.frombuffer(buf, dtype=np.uint8)
    n = len(raw)
    is_nl = raw == 10
    sep = np.flatnonzero(is_nl | (raw == 32))
    starts = np.empty(len(sep) + 1, dtype=np.int64)
    starts[0], starts[1:] = 0, sep + 1
    ends = np.empty(len(sep) + 1, dtype=np.int64)
    ends[:-1], ends[-1] = sep, n
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    owner = np.searchsorted(np.flatnonzero(is_nl), starts)  # texts are separated by '\n', words by ' '
    counts = np.bincount(owner, minlength=n_texts).astype(np.int64)
    exact = np.zeros(n_texts, dtype=np.uint64)
    if not len(starts):
        return TextHashes(exact, counts, np.zeros(0, np.uint64), np.zeros(0, np.int64))
    pw, inv = _POWERS.get(n + 1)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(raw * pw[:n], out=prefix[1:])
    words = (prefix[ends] - prefix[starts]) * inv[starts]  # polynomial hash of each word's bytes
    words ^= (ends - starts).astype(np.uint64) * _M2
    _fmix(words)
    first = np.zeros(n_texts + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    keyed = words + (np.arange(len(words), dtype=np.int64) - first[owner]).astype(np.uint64) * _GOLD
    _fmix(keyed)
    nonempty = counts > 0
    exact[nonempty] = np.add.reduceat(keyed, first[:-1][nonempty])
    exact ^= counts.astype(np.uint64) * _M1
    _fmix(exact)
    m = len(words) - WINDOW + 1
    if m <= 0:
        return TextHashes(exact, counts, np.zeros(0, np.uint64), np.zeros(0, np.int64))
    h = words[:m].copy()
    tmp = np.empty(m, dtype=np.uint64)
    for j in range(1, WINDOW):
        np.multiply(h, _M1, out=h)
        np.bitwise_xor(h, words[j: j + m], out=h)
        np.right_shift(h, _U64(29), out=tmp)
        np.bitwise_xor(h, tmp, out=h)
    _fmix(h)
    valid = owner[WINDOW - 1:] == owner[:m]  # the 13 words lie in one text
    return TextHashes(exact, counts, h[valid], owner[:m][valid])


def hash_texts(texts: Sequence[str]) -> TextHashes:
    """Exact and 13-word-window hashes of `texts` (normalised here), in chunks of about 256k characters."""
    parts: list[TextHashes] = []
    offsets: list[int] = []
    chunk: list[str] = []
    size = 0
    done = 0
    for text in texts:
        prepared = _prepare(text)
        if chunk and size + len(prepared) > _CHUNK_CHARS:
            parts.append(_hash_chunk(chunk))
            offsets.append(done)
            done += len(chunk)
            chunk, size = [], 0
        chunk.append(prepared)
        size += len(prepared) + 1
    if chunk or not parts:
        parts.append(_hash_chunk(chunk))
        offsets.append(done)
    if len(parts) == 1:
        return parts[0]
    return TextHashes(
        np.concatenate([p.exact for p in parts]),
        np.concatenate([p.words for p in parts]),
        np.concatenate([p.windows for p in parts]),
        np.concatenate([p.owner + off for p, off in zip(parts, offsets)]),
    )


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values[i] in sorted_set (a sorted, duplicate-free array), as a bool mask."""
    if not len(sorted_set) or not len(values):
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_set, values)
    np.minimum(pos, len(sorted_set) - 1, out=pos)
    return sorted_set[pos] == values


# ----------------------------------------------------------------------------------------------------------------
# evaluation sets
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EvalText:
    source: str  # the EVAL argument (mteb:TASK[/subset] for MTEB)
    kind: str  # "query" or "document"
    id: str  # BEIR _id; raw files: "row N" (index among the file's usable rows)
    text: str


@dataclass
class EvalSource:
    """One evaluation set: ``beir`` (directory), ``raw`` (one .jsonl/.parquet file) or ``mteb`` (a task name, turned
    into ``beir`` sources by :meth:`Decontaminator.run`)."""

    label: str
    kind: str
    path: Path | None
    split: str = "test"
    task: str | None = None
    queries: int = 0  # counted while indexing
    documents: int = 0

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this set's content in a build key: the files' paths, sizes and mtimes (MTEB: the task)."""
        if self.kind == "mteb":
            return {"mteb": self.task, "split": self.split}
        assert self.path is not None
        files = ([self.path / BEIR_CORPUS, self.path / BEIR_QUERIES, self.path / BEIR_QRELS / f"{self.split}.tsv"]
                 if self.kind == "beir" else [self.path])
        out: dict[str, Any] = {"kind": self.kind, "path": str(self.path.resolve())}
        if self.kind == "beir":
            out["split"] = self.split
        out["files"] = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else [p.name, None]
                        for p in files]
        return out

    def texts(self) -> Iterator[EvalText]:
        """The evaluation queries, then the relevant documents (see the module docstring)."""
        if self.kind == "raw":
            yield from self._raw_texts()
        elif self.kind == "beir":
            yield from self._beir_texts()
        else:
            raise DecontaminationError(f"{self.label}: not exported yet (internal)")

    def _raw_texts(self) -> Iterator[EvalText]:
        assert self.path is not None
        stats = RawStats()
        for i, row in enumerate(read_rows(self.path, stats)):
            yield EvalText(self.label, "query", f"row {i}", row.query)
            yield EvalText(self.label, "document", f"row {i}", row.positive)
        if stats.rows == 0:
            raise DecontaminationError(
                f"{self.path}: no usable evaluation rows ({stats.raw_rows} read, skipped: "
                f"{dict(stats.skipped) or 'none'}); a BEIR set is passed as its directory")
        self.queries = self.documents = stats.rows  # one query and one positive per row

    def _beir_texts(self) -> Iterator[EvalText]:
        assert self.path is not None
        query_ids, queries, relevant = read_beir(self.path, self.split)
        for qid, text in zip(query_ids, queries):
            yield EvalText(self.label, "query", qid, text)
        documents = 0
        for _, doc in corpus_documents(self.path, error=DecontaminationError):
            if doc["_id"] not in relevant:
                continue
            documents += 1
            full = beir_document(doc.get("title"), doc["text"])
            yield EvalText(self.label, "document", doc["_id"], full)
            if full != doc["text"]:  # titled: the text alone also matches exactly
                yield EvalText(self.label, "document", doc["_id"], doc["text"])
        self.queries, self.documents = len(queries), documents


def read_beir(root: Path, split: str) -> tuple[list[str], list[str], set[str]]:
    """A BEIR directory's evaluation side for `split`, read and checked by :mod:`pipeline.data.beir` as
    :func:`pipeline.evaluation.eval_sets.load_beir` reads it (without torch): the queries of ``qrels/<split>.tsv``
    (ids and texts, in order of first appearance there) and the ids of the documents judged > 0 (a repeated pair
    keeps its last grade). Memory: the qrels and the judged queries' texts."""
    root = Path(root)
    judged = read_judged(root, split, error=DecontaminationError)
    index, _ = corpus_index(root, judged.documents(), error=DecontaminationError)
    judged.check_documents(index, root / BEIR_CORPUS, error=DecontaminationError)
    relevant = {d for docs in judged.grades.values() for d, g in docs.items() if g > 0}
    return list(judged.grades), [judged.queries[q] for q in judged.grades], relevant


def parse_eval_specs(specs: Sequence[str], split: str = "test", option: str = "--against") -> list[EvalSource]:
    """EVAL arguments -> sources (cheap: paths are checked, nothing is read). One-line errors name the argument."""
    if not specs:
        raise DecontaminationError(f"{option}: no evaluation set given")
    out: list[EvalSource] = []
    for spec in specs:
        if spec.startswith("mteb:"):
            task = spec[len("mteb:"):].strip()
            if not task:
                raise DecontaminationError(f"{option} {spec}: expected mteb:TASK (an MTEB task name)")
            out.append(EvalSource(spec, "mteb", None, split, task=task))
            continue
        path = Path(spec)
        if path.is_dir() and is_beir_dir(path):
            out.append(EvalSource(spec, "beir", path, split))
        elif path.is_dir():
            try:
                files = discover(path)
            except RawDataError:
                raise DecontaminationError(
                    f"{option} {spec}: neither a BEIR directory ({BEIR_CORPUS}, {BEIR_QUERIES}, {BEIR_QRELS}/) nor "
                    "a directory of raw .jsonl/.parquet files") from None
            out.extend(EvalSource(str(p), "raw", p, split) for p in files.values())
        elif path.is_file():
            if path.suffix not in RAW_SUFFIXES:
                raise DecontaminationError(f"{option} {spec}: unsupported file (expected .jsonl or .parquet raw "
                                           "pairs, a BEIR directory or mteb:TASK)")
            out.append(EvalSource(spec, "raw", path, split))
        else:
            raise DecontaminationError(f"{option} {spec}: no such file or directory (expected a BEIR directory, "
                                       "raw .jsonl/.parquet pairs or a directory of them, or mteb:TASK)")
    return out


# ---- MTEB: exported in a child process that cannot download --------------------------------------------------
def _flat_text(value: Any) -> str:
    """An MTEB text field as one string: a string as is, a conversation (list of {role, content}) joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_flat_text(v.get("content", "") if isinstance(v, dict) else v) for v in value)
    return "" if value is None else str(value)


def export_mteb_split(dataset: dict[str, Any], split: str, out: Path) -> list[str]:
    """Write `split` of an MTEB 2 retrieval task's loaded data (``task.dataset[subset][split]`` with ``queries``:
    rows of ``id``/``text``, ``corpus``: rows of ``id``/``text``/``title``, ``relevant_docs``: {query id: {doc id:
    score}}) as one BEIR directory per subset, ``out/<subset>``, holding the judged queries and judged documents.
    Returns the subsets written."""
    written: list[str] = []
    for subset, splits in dataset.items():
        if split not in splits:
            continue
        data = splits[split]
        qrels: dict[str, dict[str, Any]] = {str(q): {str(d): s for d, s in docs.items()}
                                            for q, docs in data["relevant_docs"].items()}
        judged = {d for docs in qrels.values() for d in docs}
        root = out / str(subset)
        (root / BEIR_QRELS).mkdir(parents=True, exist_ok=True)
        with open(root / BEIR_QRELS / f"{split}.tsv", "w", encoding="utf-8") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for qid, docs in qrels.items():
                for did, score in docs.items():
                    handle.write(f"{qid}\t{did}\t{int(score)}\n")
        with open(root / BEIR_QUERIES, "w", encoding="utf-8") as handle:
            for row in data["queries"]:
                if str(row["id"]) in qrels:
                    handle.write(json.dumps({"_id": str(row["id"]), "text": _flat_text(row.get("text"))}) + "\n")
        with open(root / BEIR_CORPUS, "w", encoding="utf-8") as handle:
            for row in data["corpus"]:
                if str(row["id"]) in judged:
                    handle.write(json.dumps({"_id": str(row["id"]), "title": _flat_text(row.get("title")),
                                             "text": _flat_text(row.get("text"))}) + "\n")
        written.append(str(subset))
    return written


def _mteb_export_main(argv: list[str] | None = None) -> int:
    """Child process of :func:`export_mteb_task` (run with the Hugging Face offline switches set)."""
    p = argparse.ArgumentParser(prog="python -m preprocess.decontaminate",
                                description="export an MTEB retrieval task's split, from the local Hugging Face "
                                            "cache only, as BEIR directories OUT/<subset> (used by mteb:TASK)")
    p.add_argument("--export-mteb", required=True, metavar="TASK")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    name = args.export_mteb

    def fail(message: str) -> int:
        print(f"error: mteb:{name}: {message}", file=sys.stderr)
        return 2

    try:
        import mteb
        from mteb.abstasks.retrieval import AbsTaskRetrieval
    except ImportError:
        return fail("the mteb package is not installed (pip install -e '.[mteb]')")
    try:
        task = mteb.get_task(name)
    except KeyError as exc:
        return fail(f"not an MTEB task ({' '.join(str(exc).strip(chr(34)).split())[:200]})")
    if not isinstance(task, AbsTaskRetrieval):
        return fail(f"a {task.metadata.type} task; only retrieval and reranking tasks (queries, corpus, qrels) "
                    "can be checked")
    if args.split not in task.metadata.eval_splits:
        return fail(f"no split {args.split!r} (has: {', '.join(task.metadata.eval_splits)})")
    try:
        task.load_data()
    except Exception as exc:  # noqa: BLE001 - hub, cache and dataset errors alike mean "not available offline"
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:240]
        return fail(f"its data is not in the local Hugging Face cache ({reason}); nothing is downloaded here - "
                    f"run `python -m pipeline.evaluate --mteb {name}` once with network access to cache it, or pass "
                    "the task's BEIR-format export (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) as a directory")
    written = export_mteb_split(task.dataset, args.split, Path(args.out))
    if not written:
        return fail(f"no data for split {args.split!r}")
    return 0


def export_mteb_task(source: EvalSource, workdir: Path) -> list[EvalSource]:
    """The BEIR sources of an ``mteb:TASK`` source (one per subset), exported by a child process that has the
    Hugging Face offline switches set before anything is imported, so nothing can be downloaded."""
    out = workdir / "mteb" / (source.task or "task").replace("/", "_")
    if out.exists():
        shutil.rmtree(out)
    root = str(Path(__file__).resolve().parents[1])  # this checkout, importable in the child wherever it runs
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "preprocess.decontaminate", "--export-mteb", str(source.task),
                           "--split", source.split, "--out", str(out)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error: ")]
        message = (errors[-1] if errors else (lines[-1] if lines else f"exit status {proc.returncode}"))
        raise DecontaminationError(message.removeprefix("error: "))
    subsets = sorted(p.name for p in out.iterdir() if p.is_dir())
    return [EvalSource(source.label if s == "default" else f"{source.label}/{s}", "beir", out / s, source.split)
            for s in subsets]


# ----------------------------------------------------------------------------------------------------------------
# pass 1: the evaluation index
# ----------------------------------------------------------------------------------------------------------------
class EvalIndex:
    """Exact hashes (sorted, in memory) and window hashes (sorted file, memory-mapped, behind a bitmap filter)."""

    def __init__(self, exact: np.ndarray, windows: np.ndarray, bitmap: np.ndarray, bits: int) -> None:
        self.exact = exact
        self.windows = windows
        self.bitmap = bitmap
        self.shift = _U64(64 - bits)

    def has_exact(self, hashes: np.ndarray) -> np.ndarray:
        return _in_sorted(hashes, self.exact)

    def has_windows(self, hashes: np.ndarray) -> np.ndarray:
        out = np.zeros(len(hashes), dtype=bool)
        if not len(self.windows) or not len(hashes):
            return out
        key = (hashes >> self.shift).astype(np.int64)
        maybe = np.flatnonzero((self.bitmap[key >> 3] >> (key & 7).astype(np.uint8)) & 1)
        if len(maybe):
            order = np.argsort(hashes[maybe])  # sorted needles: neighbouring probes of the mapped file
            picked = maybe[order]
            out[picked] = _in_sorted(hashes[picked], self.windows)
        return out


class _IndexBuilder:
    """Pass 1: exact hashes in memory; window hashes spilled to 256 bucket files by top byte, then each bucket
    sorted and deduplicated in turn into ``windows.u64``."""

    def __init__(self, workdir: Path, flush_every: int = 1 << 22) -> None:
        self.dir = workdir
        self.exact: list[np.ndarray] = []
        self.windows = BucketSpill(workdir, width=1, flush_every=flush_every)

    def add(self, hashes: TextHashes) -> None:
        self.exact.append(hashes.exact[hashes.words > 0])
        self.windows.add(hashes.windows)

    def finish(self) -> EvalIndex:
        self.windows.flush()
        exact = np.unique(np.concatenate(self.exact)) if self.exact else np.zeros(0, np.uint64)
        bits = int(min(31, max(16, int(np.ceil(np.log2(max(self.windows.count, 1) * 16))))))
        bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
        shift = _U64(64 - bits)
        path = self.dir / "windows.u64"
        n = 0
        with open(path, "wb") as out:
            for bucket, values in self.windows.buckets():
                bucket.unlink()
                values = values.reshape(-1)
                values.sort()
                keep = np.ones(len(values), dtype=bool)
                keep[1:] = values[1:] != values[:-1]
                values = values[keep]
                out.write(values.tobytes())
                n += len(values)
                key = (values >> shift).astype(np.int64)
                byte = key >> 3
                bit = (np.uint8(1) << (key & 7).astype(np.uint8)).astype(np.uint8)
                heads = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
                bitmap[byte[heads]] |= np.bitwise_or.reduceat(bit, heads)
        windows = np.memmap(path, dtype=np.uint64, mode="r") if n else np.zeros(0, np.uint64)
        return EvalIndex(exact, windows, bitmap, bits)


# ----------------------------------------------------------------------------------------------------------------
# passes 2-4 and the result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Candidates:
    rows: list[np.ndarray] = field(default_factory=list)
    codes: list[np.ndarray] = field(default_factory=list)
    hashes: list[np.ndarray] = field(default_factory=list)

    def add(self, rows: np.ndarray, code: int, hashes: np.ndarray) -> None:
        self.rows.append(rows.astype(np.int64))
        self.codes.append(np.full(len(rows), code, dtype=np.int8))
        self.hashes.append(hashes.astype(np.uint64))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, codes, hashes) sorted by row, then reason priority."""
        if not self.rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.uint64)
        rows, codes, hashes = (np.concatenate(x) for x in (self.rows, self.codes, self.hashes))
        order = np.lexsort((codes, rows))
        return rows[order], codes[order], hashes[order]


@dataclass
class DatasetContamination:
    """One training file's result: its usable rows scanned, and the dropped ones (index among the file's usable
    rows, sorted, with the index of their reason in :data:`REASONS`)."""

    name: str
    source: Path
    rows: int
    drop_rows: np.ndarray
    drop_codes: np.ndarray
    report: Path | None = None

    @property
    def dropped(self) -> int:
        return int(len(self.drop_rows))

    @property
    def counts(self) -> dict[str, int]:
        """Dropped rows per reason (reasons with none left out, as the manifest's skipped counts)."""
        per = np.bincount(self.drop_codes.astype(np.int64), minlength=len(REASONS))
        return {REASONS[i]: int(per[i]) for i in range(len(REASONS)) if per[i]}

    def filter(self, rows: Iterable[RawRow], stats: RawStats) -> Iterator[RawRow]:
        """`rows` (a :func:`read_rows` stream of this file counting into `stats`) without the dropped ones, which
        are counted in `stats.skipped` under their reason instead of `stats.rows`."""
        drops, codes = self.drop_rows.tolist(), self.drop_codes.tolist()
        j = 0
        for i, row in enumerate(rows):
            if j < len(drops) and drops[j] == i:
                stats.rows -= 1
                stats.skipped[REASONS[codes[j]]] += 1
                j += 1
                continue
            yield row


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= CLIP else text[: CLIP - 1] + "\u2026"


def _windows_of(words: list[str]) -> Iterator[tuple[str, ...]]:
    for i in range(len(words) - WINDOW + 1):
        yield tuple(words[i: i + WINDOW])


class Decontaminator:
    """Runs the four passes for training files against evaluation sets (see the module docstring)."""

    def __init__(self, against: Sequence[str], split: str = "test", batch_rows: int = 4096,
                 option: str = "--against") -> None:
        if batch_rows < 1:
            raise DecontaminationError(f"--batch-rows: must be positive, got {batch_rows}")
        self.sources = parse_eval_specs(against, split, option)
        self.split = split
        self.batch_rows = batch_rows
        self.expanded: list[EvalSource] = []

    def fingerprint(self) -> dict[str, Any]:
        """For the build key: the rule and every evaluation set's identity."""
        return {"rule": RULE, "against": [s.fingerprint() for s in self.sources]}

    # ---- pass 1 --------------------------------------------------------------------------------------------
    def _eval_texts(self) -> Iterator[EvalText]:
        for source in self.expanded:
            yield from source.texts()

    def _build_index(self, workdir: Path) -> EvalIndex:
        started = time.perf_counter()
        builder = _IndexBuilder(workdir)
        n = 0
        for batch in batched(progress(self._eval_texts(), "eval index", "text"), self.batch_rows):
            builder.add(hash_texts([t.text for t in batch]))
            n += len(batch)
        index = builder.finish()
        log(f"evaluation index: {n:,} texts, {len(index.exact):,} exact hashes, {len(index.windows):,} distinct "
            f"13-word windows ({8 * len(index.windows) / 2**20:,.0f} MiB mapped from disk), filter "
            f"{len(index.bitmap) / 2**20:,.0f} MiB, {time.perf_counter() - started:.0f} s")
        return index

    # ---- pass 2 --------------------------------------------------------------------------------------------
    def _scan(self, name: str, path: Path, index: EvalIndex) -> tuple[_Candidates, int]:
        candidates = _Candidates()
        stats = RawStats()
        row0 = 0
        for batch in batched(progress(read_rows(path, stats), f"{name} (decontaminate)", "row"), self.batch_rows):
            ids = np.arange(row0, row0 + len(batch), dtype=np.int64)
            row0 += len(batch)
            for f, texts in enumerate(([r.query for r in batch], [r.positive for r in batch])):
                h = hash_texts(texts)
                hit = (h.words > 0) & index.has_exact(h.exact)
                if hit.any():
                    candidates.add(ids[hit], 2 * f, h.exact[hit])
                whit = index.has_windows(h.windows)
                if whit.any():
                    owners, hashes = h.owner[whit], h.windows[whit]
                    first_owner, first = np.unique(owners, return_index=True)
                    candidates.add(ids[first_owner], 2 * f + 1, hashes[first])
        return candidates, stats.rows

    # ---- pass 3 --------------------------------------------------------------------------------------------
    def _resolve(self, exact_hits: np.ndarray, window_hits: np.ndarray
                 ) -> tuple[list[EvalText], dict[int, int], dict[int, int]]:
        entries: list[EvalText] = []
        exact: dict[int, int] = {}
        windows: dict[int, int] = {}
        if not len(exact_hits) and not len(window_hits):
            return entries, exact, windows
        for batch in batched(progress(self._eval_texts(), "eval (resolve matches)", "text"), self.batch_rows):
            h = hash_texts([t.text for t in batch])
            taken: dict[int, int] = {}

            def entry(i: int) -> int:
                if i not in taken:
                    taken[i] = len(entries)
                    entries.append(batch[i])
                return taken[i]

            for i in np.flatnonzero((h.words > 0) & _in_sorted(h.exact, exact_hits)).tolist():
                key = int(h.exact[i])
                if key not in exact:
                    exact[key] = entry(i)
            for j in np.flatnonzero(_in_sorted(h.windows, window_hits)).tolist():
                key = int(h.windows[j])
                if key not in windows:
                    windows[key] = entry(int(h.owner[j]))
            if len(exact) == len(exact_hits) and len(windows) == len(window_hits):
                break  # every hit found: the rest of the evaluation sets is not needed
        return entries, exact, windows

    # ---- pass 4 --------------------------------------------------------------------------------------------
    def _verify(self, name: str, path: Path, total: int, candidates: tuple[np.ndarray, np.ndarray, np.ndarray],
                entries: list[EvalText], exact: dict[int, int], windows: dict[int, int], report: Path
                ) -> DatasetContamination:
        rows, codes, hashes = candidates
        drop_rows: list[int] = []
        drop_codes: list[int] = []
        normalised: dict[int, str] = {}
        window_sets: dict[int, set[tuple[str, ...]]] = {}

        def eval_norm(e: int) -> str:
            if e not in normalised:
                normalised[e] = normalise(entries[e].text)
            return normalised[e]

        def eval_windows(e: int) -> set[tuple[str, ...]]:
            if e not in window_sets:
                if len(window_sets) > 4096:  # a bounded cache
                    window_sets.clear()
                window_sets[e] = set(_windows_of(eval_norm(e).split(" ")))
            return window_sets[e]

        def check(code: int, key: int, text: str) -> tuple[int, tuple[str, ...] | None] | None:
            """(evaluation entry, shared window or None for exact) when the text really matches, else None."""
            if code % 2 == 0:
                e = exact.get(key)
                return (e, None) if e is not None and normalise(text) == eval_norm(e) else None
            e = windows.get(key)
            if e is None:
                return None
            theirs = eval_windows(e)
            shared = next((w for w in _windows_of(normalise(text).split(" ")) if w in theirs), None)
            return (e, shared) if shared is not None else None

        report.parent.mkdir(parents=True, exist_ok=True)
        with open(report, "w", encoding="utf-8") as out:
            if not len(rows):
                return DatasetContamination(name, path, total, np.zeros(0, np.int64), np.zeros(0, np.int8), report)
            bounds = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]).tolist() + [len(rows)]
            heads = rows[bounds[:-1]].tolist()  # candidate rows, ascending; their candidates in priority order
            g = 0
            stats = RawStats()
            for i, row in enumerate(progress(read_rows(path, stats), f"{name} (verify)", "row", total=total)):
                if g == len(heads):
                    break
                if i != heads[g]:
                    continue
                for c in range(bounds[g], bounds[g + 1]):
                    code = int(codes[c])
                    text = row.query if code < 2 else row.positive
                    match = check(code, int(hashes[c]), text)
                    if match is None:
                        continue  # a hash collision: the next candidate of the row, if any
                    e, shared = match
                    drop_rows.append(i)
                    drop_codes.append(code)
                    hit = entries[e]
                    record = {"dataset": name, "file": str(path), "row": i, "raw_row": stats.raw_rows - 1,
                              "reason": REASONS[code], "field": "query" if code < 2 else "passage",
                              "text": _clip(text), "eval_source": hit.source, "eval_kind": hit.kind,
                              "eval_id": hit.id, "eval_text": _clip(hit.text)}
                    if shared is not None:
                        record["window"] = " ".join(shared)
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    break
                g += 1
        return DatasetContamination(name, path, total, np.asarray(drop_rows, dtype=np.int64),
                                    np.asarray(drop_codes, dtype=np.int8), report)

    # ---- all -----------------------------------------------------------------------------------------------
    def run(self, datasets: Sequence[tuple[str, Path]], workdir: Path) -> dict[str, DatasetContamination]:
        """Check every (name, raw file) of `datasets`; per-dataset reports go to ``workdir/reports/<name>.jsonl``
        (the caller moves them). `workdir` holds the index while it runs (8 bytes per evaluation window)."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.expanded = []
        for source in self.sources:
            self.expanded.extend(export_mteb_task(source, workdir) if source.kind == "mteb" else [source])
        index = self._build_index(workdir / "index")
        scanned: dict[str, tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]] = {}
        for name, path in datasets:
            started = time.perf_counter()
            candidates, rows = self._scan(name, Path(path), index)
            scanned[name] = (candidates.arrays(), rows)
            log(f"{name}: {rows:,} rows scanned, {len(np.unique(scanned[name][0][0])):,} with a hash hit, "
                f"{time.perf_counter() - started:.0f} s")
        del index
        shutil.rmtree(workdir / "index", ignore_errors=True)
        exact_hits = [c[2][c[1] % 2 == 0] for c, _ in scanned.values()]
        window_hits = [c[2][c[1] % 2 == 1] for c, _ in scanned.values()]
        started = time.perf_counter()
        entries, exact, windows = self._resolve(
            np.unique(np.concatenate(exact_hits)) if exact_hits else np.zeros(0, np.uint64),
            np.unique(np.concatenate(window_hits)) if window_hits else np.zeros(0, np.uint64))
        if exact or windows:
            log(f"matched hashes resolved to {len(entries):,} evaluation texts, {time.perf_counter() - started:.0f} s")
        out: dict[str, DatasetContamination] = {}
        for name, path in datasets:
            candidates, rows = scanned.pop(name)
            started = time.perf_counter()
            out[name] = self._verify(name, Path(path), rows, candidates, entries, exact, windows,
                                     workdir / "reports" / f"{name}.jsonl")
            if len(candidates[0]):
                log(f"{name}: {out[name].dropped:,} rows verified on their text, "
                    f"{time.perf_counter() - started:.0f} s")
        return out

    def eval_summary(self) -> str:
        """One line per evaluation set: queries and relevant documents indexed."""
        return "\n".join(f"  {s.label}: {s.queries:,} queries, {s.documents:,} relevant documents"
                         for s in self.expanded)


def summary_table(results: Sequence[DatasetContamination]) -> str:
    """Per dataset: usable rows scanned, dropped rows per reason, dropped in all and their share."""
    short = ("q_exact", "q_13gram", "p_exact", "p_13gram")
    header = (f"{'dataset':<24} {'rows':>10} " + " ".join(f"{s:>9}" for s in short) + f" {'dropped':>9} {'share':>8}")
    lines = [header, "-" * len(header)]
    total_rows = 0
    totals = np.zeros(len(REASONS), dtype=np.int64)
    for r in results:
        per = np.bincount(r.drop_codes.astype(np.int64), minlength=len(REASONS))
        totals += per
        total_rows += r.rows
        share = f"{100 * r.dropped / r.rows:.3f}%" if r.rows else "-"
        lines.append(f"{r.name:<24} {r.rows:>10,} " + " ".join(f"{int(v):>9,}" for v in per)
                     + f" {r.dropped:>9,} {share:>8}")
    lines.append("-" * len(header))
    dropped = int(totals.sum())
    share = f"{100 * dropped / total_rows:.3f}%" if total_rows else "-"
    lines.append(f"{'total':<24} {total_rows:>10,} " + " ".join(f"{int(v):>9,}" for v in totals)
                 + f" {dropped:>9,} {share:>8}")
    return "\n".join(lines)


def concat_reports(paths: Iterable[Path], out: Path) -> Path:
    """Join per-dataset JSONL reports into `out` (written atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as handle:
        for path in paths:
            with open(path, "rb") as part:
                shutil.copyfileobj(part, handle)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# `python -m preprocess decontaminate`
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(p: Any) -> None:
    p.add_argument("--raw", required=True, help="training data as `build` takes it: a directory of "
                   "<dataset>.parquet / <dataset>.jsonl files, or one file")
    p.add_argument("--registry", help="datasets.yaml, as for `build` (every dataset needs an entry unless "
                   "--default-type)")
    p.add_argument("--default-type", choices=["retrieval", "classification", "clustering"],
                   help="type for datasets missing from the registry, as for `build`")
    p.add_argument("--against", required=True, nargs="+", metavar="EVAL",
                   help="evaluation sets: BEIR directories (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), raw "
                        ".jsonl/.parquet pairs or directories of them, or mteb:TASK (MTEB retrieval task, from the "
                        "local Hugging Face cache only; nothing is downloaded)")
    p.add_argument("--split", default="test", help="BEIR / MTEB split whose qrels define the evaluation queries "
                   "and relevant documents (default test)")
    p.add_argument("--report", default=REPORT_FILE,
                   help=f"JSONL report, one line per matching row: dataset, file, row, reason, the evaluation set, "
                        f"id and text it matched (default ./{REPORT_FILE})")
    p.add_argument("--workdir", help="scratch directory for the evaluation index (8 bytes per 13-word window; "
                   "default: a temporary directory next to --report)")
    p.add_argument("--batch-rows", type=int, default=4096, help="rows / texts hashed per batch (default 4096)")


def run_cli(args: Any) -> int:
    from pipeline.data.registry import load_registry

    sources = discover(args.raw)
    specs = load_registry(args.registry).resolve(list(sources), args.default_type,
                                                 args.registry or "registry (none given)")
    checker = Decontaminator(args.against, args.split, args.batch_rows)
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".decontaminate-", dir=args.workdir or report.parent))
    try:
        results = checker.run([(s.name, sources[s.name]) for s in specs], scratch)
        concat_reports([r.report for r in results.values() if r.report is not None], report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("evaluation sets:")
    print(checker.eval_summary())
    print(summary_table(list(results.values())))
    for r in results.values():
        reasons = ", ".join(f"{k} {v:,}" for k, v in r.counts.items()) or "none"
        print(f"{r.name}: {r.dropped:,} of {r.rows:,} rows match ({reasons})")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(_mteb_export_main())
