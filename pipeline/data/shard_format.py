"""The on-disk shard format, shared by the writer (`preprocess build`) and the reader (`pipeline.data.shards`).

Layout of a shard directory (format version 2)::

    OUT/manifest.json                 format version, tokenizer identity, max_len, per-dataset entries
    OUT/<dataset>/dataset.json        that dataset's entry (written last: its presence marks a finished dataset)
    OUT/<dataset>/corpus-00000.arrow  deduplicated documents (positives and negatives), one row per corpus id,
    OUT/<dataset>/corpus-00001.arrow  ... continued in further files, each at most `--max-file-gb`
    OUT/<dataset>/queries-00000.arrow one row per (query, positive) pair, likewise split

All tables are Arrow IPC files, uncompressed. A file holds one or more record batches; every column of a batch is
one contiguous buffer that the reader memory-maps without copying. The files of one table, in name order, and
their batches, in file order, are concatenated: global row r of the corpus is row ``r - start[b]`` of batch b where
``start`` is the cumulative row count of the batches (found by bisection, O(log batches)). Corpus ids and query
rows are global over all files. Schemas (the same in every file of a table)::

    corpus-*.arrow   tokens     large_list<uintX>    token ids (values buffer) + int64 offsets
    queries-*.arrow  tokens     large_list<uintX>    query token ids, instruction template applied
                     positive   int64                corpus id of the positive document
                     negatives  fixed_size_list<int64>[max(K, 1)]   corpus ids of hard negatives, padded with -1

uintX is uint16 when every token id fits (vocabulary <= 65536), else uint32. K, the widest negative list of the
dataset, is in the schema metadata (`num_negatives`), since Arrow has no fixed-size list of size 0.
Every sequence is truncated to `max_len` tokens and ends with the EOS id, also when truncated.

Format version 1 (still read) had exactly one ``corpus.arrow`` and one ``queries.arrow`` per dataset, each one
record batch. Which files make up a table is read from the dataset's ``files`` entry (:func:`table_files`).

Teacher scores (optional, written by `preprocess score` into a built directory; score distillation reads them):

    OUT/<dataset>/scores.arrow        scores  fixed_size_list<float32>[1 + K]   one row per query row

Row i holds the teacher's score of (query i, its positive) in column 0 and of (query i, negative slot j) in column
1 + j, NaN where slot j is empty (-1). The file is listed in the dataset's ``files`` like the two tables (size and
sha256, so the reader's checks cover it), and the dataset entry (``dataset.json`` and the manifest) gains
``scores``: the teacher's identity (``name_or_path``, ``kind`` biencoder/crossencoder, ``sha256`` over its files),
how it read the texts (``input``), ``max_len``, and ``key``, what the scores depend on (teacher hash, kind, max_len,
:func:`tables_sha256` of the queries and corpus files). A rebuilt dataset has a new directory and so no stale scores.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_NAME = "embedding-pipeline-shards"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # the reader opens these; the writer writes FORMAT_VERSION
MANIFEST = "manifest.json"
DATASET_META = "dataset.json"
CORPUS = "corpus"  # table kinds: file names are f"{kind}-{index:05d}.arrow" (version 2) or f"{kind}.arrow" (1)
QUERIES = "queries"
CORPUS_FILE = "corpus.arrow"  # version-1 names (one file per table)
QUERIES_FILE = "queries.arrow"
SCORES_FILE = "scores.arrow"
DATASET_TYPES = ("retrieval", "classification", "clustering")
DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {query}"


class ShardError(ValueError):
    """A shard directory is missing, corrupt or does not fit the model; the message names the file and problem."""


def table_file(kind: str, index: int) -> str:
    """Name of the `index`-th file of table `kind` (``corpus`` or ``queries``): ``corpus-00000.arrow``, ..."""
    return f"{kind}-{index:05d}.arrow"


_TABLE_FILE = re.compile(r"^(corpus|queries)(?:-(\d{5}))?\.arrow$")


def table_files(files: dict[str, Any] | list[str], kind: str) -> list[str]:
    """The files of table `kind` among a dataset's file names, in table order (``corpus.arrow`` of version 1, or
    ``corpus-00000.arrow``, ``corpus-00001.arrow``, ...)."""
    names = [n for n in files if (m := _TABLE_FILE.match(n)) and m.group(1) == kind]
    return sorted(names)


def tables_sha256(files: dict[str, Any], kind: str) -> str:
    """One digest of all files of table `kind` from a dataset's ``files`` entry: the file's own sha256 when the
    table is one file (so keys recorded over version-1 shards stay valid), else the sha256 of the lines
    ``name sha256`` of its files in order."""
    names = table_files(files, kind)
    if len(names) == 1:
        return str(files[names[0]]["sha256"])
    text = "".join(f"{n} {files[n]['sha256']}\n" for n in names)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def corpus_schema(token_dtype: np.dtype, metadata: dict[str, str]) -> pa.Schema:
    return pa.schema([("tokens", pa.large_list(pa.from_numpy_dtype(token_dtype)))], metadata=metadata)


def queries_schema(token_dtype: np.dtype, num_negatives: int, metadata: dict[str, str]) -> pa.Schema:
    return pa.schema(
        [
            ("tokens", pa.large_list(pa.from_numpy_dtype(token_dtype))),
            ("positive", pa.int64()),
            ("negatives", pa.list_(pa.int64(), max(num_negatives, 1))),
        ],
        metadata={**metadata, "num_negatives": str(num_negatives)},
    )


def scores_schema(num_negatives: int, metadata: dict[str, str]) -> pa.Schema:
    """Teacher scores of a dataset with K = `num_negatives` pool slots: one float32 row of 1 + K per query row."""
    return pa.schema(
        [("scores", pa.list_(pa.float32(), 1 + num_negatives))],
        metadata={**metadata, "num_negatives": str(num_negatives)},
    )


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def model_dir_sha256(model_dir: str | Path) -> tuple[str, int]:
    """(sha256, number of files) of a model directory: a sha256 over the relative path and sha256 of every file,
    hidden and Markdown files left out, so the same weights anywhere (a moved or copied directory) hash the same.
    The identity of a teacher, for ``preprocess score`` and the run identity. ValueError naming the directory when
    it holds no such file."""
    root = Path(model_dir)
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix != ".md" and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"{model_dir}: no model files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode("utf-8"))
    return digest.hexdigest(), len(files)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON to a temporary name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def tokenizer_fingerprint(tokenizer: Any, name_or_path: str | None = None) -> dict[str, Any]:
    """Identity of a tokenizer: its name/path, class, vocabulary size and a sha256 of the vocabulary.

    The hash covers every (token, id) pair of `get_vocab()` (added tokens included), so two tokenizers that map
    any string to different ids hash differently, wherever they were loaded from.
    """
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode("utf-8")).hexdigest()
    return {
        "name_or_path": str(name_or_path or getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(vocab),
        "vocab_sha256": digest,
    }


def resolve_eos(tokenizer: Any) -> tuple[int, bool]:
    """The id every sequence must end with, and whether the tokenizer's own special tokens already append it.

    EOS is `eos_token_id`, or `sep_token_id` for BERT-style tokenizers that have no EOS ([SEP] closes their input).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = tokenizer.sep_token_id
    if eos is None:
        raise ShardError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')}: has neither an eos_token nor a sep_token; "
            "set one in its tokenizer_config.json"
        )
    probe = tokenizer("a b", add_special_tokens=True)["input_ids"]
    return int(eos), bool(probe) and probe[-1] == eos
