"""Memory-mapped reader of token shards (see :mod:`pipeline.data.shard_format` for the layout).

Opening a shard directory reads `manifest.json` and the Arrow IPC footers only: token buffers stay on disk and are
paged in on access, so start-up time does not depend on the corpus size. Any query or document is a numpy view
``values[offsets[i]:offsets[i+1]]`` into the mapped file: O(1) when the table is one record batch, else one
bisection over the batches' cumulative row counts first (O(log batches)); no per-document Python object is built.
The positive and negative id columns are zero-copy views when the queries table is one record batch, else one
concatenated in-memory copy (8 x (1 + K) bytes per query row).
"""
from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.shard_format import (
    CORPUS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    QUERIES,
    READABLE_VERSIONS,
    SCORES_FILE,
    ShardError,
    sha256_file,
    table_files,
    tokenizer_fingerprint,
)


@dataclass
class TokenTable:
    """A memory-mapped `large_list<uint>` column: row i is ``values[offsets[i]:offsets[i+1]]``."""

    values: np.ndarray
    offsets: np.ndarray
    source: Path | None = None  # the file it was read from (error messages)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.values[self.offsets[index] : self.offsets[index + 1]]

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def parts(self) -> list["TokenTable"]:
        return [self]


class ChunkedTokenTable:
    """Several :class:`TokenTable` parts (record batches of one or more files) presented as one table.

    ``starts[b]`` is the global index of part b's first row (cumulative row counts, ``starts[-1]`` = total); global
    row r is row ``r - starts[b]`` of the part b with ``starts[b] <= r < starts[b + 1]``, found by bisection."""

    def __init__(self, parts: list[TokenTable]) -> None:
        self.parts = parts
        starts = [0]
        for part in parts:
            starts.append(starts[-1] + len(part))
        self._starts = starts
        self.starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < self._starts[-1]:
            raise IndexError(f"row {index} outside [0, {self._starts[-1]})")
        b = bisect_right(self._starts, index) - 1
        return self.parts[b][index - self._starts[b]]

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths for p in self.parts]) if self.parts else np.zeros(0, dtype=np.int64)


_HASH_BASE = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime: an odd multiplier, so powers never vanish mod 2^64
_HASH_BLOCK_TOKENS = 1 << 23  # tokens hashed per numpy pass (bounded temporary memory on large tables)


def identical_rows(table: TokenTable | ChunkedTokenTable) -> np.ndarray:
    """Group id of every row: rows with identical token sequences share one; ids are dense, numbered by first
    appearance (rows all distinct -> 0, 1, 2, ...).

    Vectorised, in blocks of rows: each row is keyed by its length and the polynomial hash
    sum_j (t_j + 1) * base^j mod 2^64. Identical rows always share a key; two different rows could in principle
    collide and would then be grouped together (harmless where groups only say what must stay together)."""
    if len(table) == 0:
        return np.zeros(0, dtype=np.int64)
    keys = np.concatenate([_row_keys(part) for part in table.parts])
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _row_keys(table: TokenTable) -> np.ndarray:
    """uint64 key of every row of one part: length and polynomial hash (see :func:`identical_rows`)."""
    n = len(table)
    offsets = table.offsets.astype(np.int64)
    lengths = np.diff(offsets)
    powers = np.full(max(int(lengths.max()), 1), _HASH_BASE, dtype=np.uint64)
    powers[0] = 1
    powers = np.cumprod(powers)  # base^j mod 2^64 (uint64 products wrap)
    keys = np.zeros(n, dtype=np.uint64)
    start = 0
    while start < n:
        stop = int(np.searchsorted(offsets, offsets[start] + _HASH_BLOCK_TOKENS, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        lo, hi = int(offsets[start]), int(offsets[stop])
        rows = lengths[start:stop]
        if hi > lo:
            first = offsets[start:stop] - lo
            position = np.arange(hi - lo, dtype=np.int64) - np.repeat(first, rows)
            terms = (table.values[lo:hi].astype(np.uint64) + np.uint64(1)) * powers[position]
            filled = rows > 0  # reduceat needs strictly increasing starts: empty rows keep key 0
            keys[start:stop][filled] = np.add.reduceat(terms, first[filled])
        start = stop
    return keys * _HASH_BASE + lengths.astype(np.uint64)


def _numpy_view(array: pa.Array, path: Path) -> np.ndarray:
    """Zero-copy numpy view of a primitive Arrow array without nulls (``Array.to_numpy`` imports pandas on first
    use, which costs ~0.5 s and ~45 MiB at every open)."""
    if array.null_count:
        raise ShardError(f"{path}: unexpected null values in a token or id column")
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _token_part(chunk: pa.Array, path: Path) -> TokenTable:
    if chunk.offset != 0:
        raise ShardError(f"{path}: sliced token column is not supported")
    return TokenTable(values=_numpy_view(chunk.values, path), offsets=_numpy_view(chunk.offsets, path), source=path)


def token_table(parts: list[TokenTable]) -> TokenTable | ChunkedTokenTable:
    """One part as itself (plain zero-copy views), several as a :class:`ChunkedTokenTable`."""
    return parts[0] if len(parts) == 1 else ChunkedTokenTable(parts)


def _open_arrow(path: Path) -> pa.Table:
    if not path.is_file():
        raise ShardError(f"{path}: file is missing")
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: not a readable Arrow IPC file ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and structurally check ``root/manifest.json``; ShardError (one line, naming the path) otherwise.

    Checked: the directory and the manifest exist, the manifest is a JSON object of this format and version, and
    every dataset entry has a type and a ``files`` map of ``{size, sha256}`` entries.
    """
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"{root}: shard directory does not exist")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ShardError(f"{manifest_path}: missing (is {root} a shard directory built by `preprocess build`?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{manifest_path}: not valid JSON ({_one_line(exc)})") from None
    except OSError as exc:
        raise ShardError(f"{manifest_path}: cannot read ({exc.strerror})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ShardError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ShardError(
            f"{manifest_path}: format version {version} is not supported by this reader (reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; writes {FORMAT_VERSION}); rebuild the shards with this "
            "version's `preprocess build --overwrite`"
        )
    entries = manifest.get("datasets")
    if not isinstance(entries, dict):
        raise ShardError(f"{manifest_path}: 'datasets' is not a mapping")
    for key in ("tokenizer", "max_len", "eos_id", "pad_id"):
        if key not in manifest:
            raise ShardError(f"{manifest_path}: no {key!r} entry")
    for name, entry in entries.items():
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict) or not all(
            isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
            for f in files.values()
        ) or "type" not in entry:
            raise ShardError(f"{manifest_path}: dataset {name!r}: entry lacks its type or files (size, sha256)")
    return manifest


@dataclass
class ShardDataset:
    """One dataset of a shard directory: its corpus, its queries and their positive / negative corpus ids."""

    name: str
    root: Path
    meta: dict[str, Any]
    corpus: TokenTable | ChunkedTokenTable = field(init=False)
    queries: TokenTable | ChunkedTokenTable = field(init=False)
    positives: np.ndarray = field(init=False)
    negatives: np.ndarray = field(init=False)  # [n_queries, K] int64, -1 = no negative in that slot

    def __post_init__(self) -> None:
        try:
            self._open()
        except (KeyError, ValueError, IndexError, pa.ArrowException) as exc:
            if isinstance(exc, ShardError):
                raise
            raise ShardError(f"{self.root}: unexpected table layout ({type(exc).__name__}: {_one_line(exc)})") from None

    def table_paths(self, kind: str) -> list[Path]:
        """The files of table `kind` (``corpus`` / ``queries``) in order, as listed in the dataset's ``files``."""
        return [self.root / name for name in table_files(self.meta.get("files", {}), kind)]

    def _open(self) -> None:
        corpus_paths, queries_paths = self.table_paths(CORPUS), self.table_paths(QUERIES)
        if not corpus_paths or not queries_paths:
            raise ShardError(f"{self.root}: the dataset entry lists no corpus or no queries files")
        corpus_parts = [
            _token_part(chunk, path) for path in corpus_paths for chunk in _open_arrow(path).column("tokens").chunks
        ]
        query_parts: list[TokenTable] = []
        positives: list[np.ndarray] = []
        negatives: list[np.ndarray] = []
        k: int | None = None
        for path in queries_paths:
            table = _open_arrow(path)
            width = table.schema.field("negatives").type.list_size
            k_file = int((table.schema.metadata or {}).get(b"num_negatives", width))
            if k is not None and k_file != k:
                raise ShardError(f"{path}: num_negatives {k_file} differs from {k} in {queries_paths[0]}")
            k = k_file
            for tokens, positive, negs in zip(*(table.column(c).chunks for c in ("tokens", "positive", "negatives"))):
                query_parts.append(_token_part(tokens, path))
                positives.append(_numpy_view(positive, path))
                negatives.append(_numpy_view(negs.values, path).reshape(len(negs), width)[:, :k])
        if not corpus_parts or not query_parts:
            raise ShardError(f"{self.root}: no record batch in the corpus or the queries files")
        self.corpus = token_table(corpus_parts)
        self.queries = token_table(query_parts)
        self.positives = positives[0] if len(positives) == 1 else np.concatenate(positives)
        self.negatives = negatives[0] if len(negatives) == 1 else np.concatenate(negatives)

    @property
    def has_scores(self) -> bool:
        """Whether `preprocess score` recorded teacher scores for this dataset (manifest entry and file)."""
        return isinstance(self.meta.get("scores"), dict) and SCORES_FILE in self.meta["files"]

    @cached_property
    def scores(self) -> np.ndarray:
        """[n_queries, 1 + K] float32 teacher scores, memory-mapped: column 0 the positive, 1 + j negative slot j,
        NaN for an empty slot (:mod:`pipeline.data.shard_format`). ShardError when there are none or the table does
        not fit the queries."""
        path = self.root / SCORES_FILE
        if not self.has_scores:
            raise ShardError(f"{self.root}: no teacher scores (run `python -m preprocess score {self.root.parent} "
                             f"--teacher MODEL`)")
        table = _open_arrow(path)
        try:
            column = table.column("scores")
        except KeyError:
            raise ShardError(f"{path}: no 'scores' column") from None
        if column.num_chunks != 1:
            raise ShardError(f"{path}: expected one record batch, found {column.num_chunks}")
        chunk = column.chunk(0)
        width = 1 + self.num_negatives
        if not pa.types.is_fixed_size_list(chunk.type) or chunk.type.list_size != width or \
                chunk.type.value_type != pa.float32() or len(chunk) != self.num_queries:
            raise ShardError(f"{path}: expected {self.num_queries} rows of {width} float32 scores (1 + K negative "
                             f"slots), found {len(chunk)} of {chunk.type}")
        return _numpy_view(chunk.values, path).reshape(len(chunk), width)

    @property
    def type(self) -> str:
        return self.meta["type"]

    @property
    def instruction(self) -> str | None:
        return self.meta.get("instruction")

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    @property
    def num_docs(self) -> int:
        return len(self.corpus)

    @property
    def num_negatives(self) -> int:
        return self.negatives.shape[1]

    def example(self, index: int) -> dict[str, Any]:
        """Token ids of one training example: query, positive and its (unpadded) hard negatives."""
        negs = self.negatives[index]
        return {
            "query": self.queries[index],
            "positive": self.corpus[int(self.positives[index])],
            "negatives": [self.corpus[int(j)] for j in negs[negs >= 0]],
        }


class ShardReader:
    """Opens a shard directory by memory map and checks its manifest.

    ``ShardReader(path)`` checks the manifest (format, version, entries) and, by ``stat`` only, that every file of
    the selected datasets exists with the manifest's size (a truncated or replaced file is refused at once);
    ``verify=True`` also checks every file's sha256 (reads every byte, ~1 GiB/s per core);
    ``check_tokenizer(tok)`` refuses a tokenizer whose vocabulary differs from the one the shards were built with.
    """

    def __init__(self, root: str | Path, *, datasets: list[str] | None = None, verify: bool = False) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        self.manifest: dict[str, Any] = read_manifest(self.root)
        entries: dict[str, Any] = self.manifest["datasets"]
        names = list(entries) if datasets is None else list(datasets)
        missing = [n for n in names if n not in entries]
        if missing:
            raise ShardError(
                f"{manifest_path}: dataset(s) {', '.join(missing)} not in the shards (have: {', '.join(entries)})"
            )
        self.check_sizes(names)
        if verify:
            self.verify_checksums(names)
        self.datasets: dict[str, ShardDataset] = {
            name: ShardDataset(name=name, root=self.root / name, meta=entries[name]) for name in names
        }

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest["pad_id"])

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    def __getitem__(self, name: str) -> ShardDataset:
        return self.datasets[name]

    def files(self, names: list[str] | None = None) -> list[tuple[Path, dict[str, Any]]]:
        """(path, manifest entry {size, sha256}) of every file of `names` (default: all datasets), sorted."""
        entries = self.manifest["datasets"]
        out = [
            (self.root / name / filename, expected)
            for name in (names if names is not None else list(entries))
            for filename, expected in entries[name]["files"].items()
        ]
        return sorted(out, key=lambda item: str(item[0]))

    def check_sizes(self, names: list[str] | None = None) -> None:
        """Every file exists with the manifest's size (``stat`` only: cheap at any corpus size)."""
        for path, expected in self.files(names):
            if not path.is_file():
                raise ShardError(f"{path}: file is missing")
            size = path.stat().st_size
            if size != expected["size"]:
                raise ShardError(
                    f"{path}: size {size} differs from the manifest's {expected['size']} bytes (truncated or replaced)"
                )

    def verify_checksums(self, names: list[str] | None = None, *, part: int = 0, parts: int = 1) -> None:
        """Sizes, then the sha256 of every file against the manifest. ``part``/``parts`` hash only the files
        i with ``i % parts == part`` (the ranks of a node share the work; sizes are always checked in full)."""
        self.check_sizes(names)
        for i, (path, expected) in enumerate(self.files(names)):
            if i % parts != part:
                continue
            if sha256_file(path) != expected["sha256"]:
                raise ShardError(f"{path}: sha256 checksum mismatch (file corrupt or modified since the build)")

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ShardError when `tokenizer` is not the one the shards were built with."""
        built = self.manifest["tokenizer"]
        given = tokenizer_fingerprint(tokenizer)
        if given["vocab_sha256"] != built["vocab_sha256"]:
            raise ShardError(
                f"{self.root / MANIFEST}: shards were tokenized with {built['name_or_path']!r} "
                f"(vocab {built['vocab_size']}, sha256 {built['vocab_sha256'][:12]}) but the model's tokenizer "
                f"{given['name_or_path']!r} differs (vocab {given['vocab_size']}, sha256 {given['vocab_sha256'][:12]}); "
                "rebuild the shards with the model's tokenizer"
            )

