"""Bounded-memory build: streamed input, on-disk dedup by text hash, tables split over several files, old layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_helpers import minilm_dir
from pipeline.data.raw import RawStats, group_rows, read_rows
from pipeline.data.shard_format import CORPUS, DATASET_META, MANIFEST, QUERIES, ShardError, table_files
from pipeline.data.shards import ChunkedTokenTable, ShardReader, identical_rows
from preprocess.build import BuildOptions, ShardBuilder
from preprocess.dedup import ExternalDedup
from preprocess.report import show_example
from preprocess.validate import validate_shards


def _build(raw: Path, out: Path, **kw) -> Path:
    ShardBuilder(BuildOptions(raw=str(raw), tokenizer=minilm_dir(), out=str(out), registry=str(raw / "datasets.yaml"),
                              max_len=64, workers=1, **kw)).run()
    return out


def _tables(root: Path) -> dict[str, tuple[list, list, np.ndarray, np.ndarray]]:
    reader = ShardReader(root)
    return {
        name: ([ds.corpus[i].tolist() for i in range(ds.num_docs)], [ds.queries[i].tolist() for i in range(ds.num_queries)],
               np.asarray(ds.positives), np.asarray(ds.negatives))
        for name, ds in reader.datasets.items()
    }


@pytest.fixture(scope="module")
def one_file(example_raw, tmp_path_factory) -> Path:
    return _build(example_raw, tmp_path_factory.mktemp("one_file"))


def test_ids_equal_a_dict_of_texts(example_raw, one_file):
    """The on-disk dedup numbers documents exactly as the in-memory dict of texts (group_rows) does."""
    reader = ShardReader(one_file)
    for name, ds in reader.datasets.items():
        source = next(example_raw.glob(f"{name}.*"))
        grouped = group_rows(read_rows(source, RawStats()))
        assert ds.num_docs == len(grouped.docs)
        assert ds.positives.tolist() == grouped.row_positive.tolist()
        assert ds.negatives.tolist() == grouped.row_negatives.tolist()


def test_split_files_same_content_bounded_size(example_raw, one_file, tmp_path):
    limit = 40_000 / 2**30
    split = _build(example_raw, tmp_path / "split", max_file_gb=limit, batch_rows=50)
    assert _tables(split).keys() == _tables(one_file).keys()
    for name, (corpus, queries, pos, neg) in _tables(split).items():
        ref = _tables(one_file)[name]
        assert corpus == ref[0] and queries == ref[1]
        assert np.array_equal(pos, ref[2]) and np.array_equal(neg, ref[3])
    reader = ShardReader(split)
    web = reader["web_search"]
    files = web.meta["files"]
    assert len(table_files(files, CORPUS)) > 2 and len(table_files(files, QUERIES)) > 1
    for name in files:
        assert (web.root / name).stat().st_size <= 40_000, name
    assert isinstance(web.corpus, ChunkedTokenTable)
    assert identical_rows(web.queries).tolist() == identical_rows(ShardReader(one_file)["web_search"].queries).tolist()
    assert validate_shards(split) == validate_shards(one_file)
    last = web.num_queries - 1
    assert show_example(split, "web_search", last) == show_example(one_file, "web_search", last)
    with pytest.raises(IndexError):
        web.corpus[web.num_docs]


def test_version_1_layout_still_opens(one_file, tmp_path):
    """Shards of format version 1 (one corpus.arrow and one queries.arrow per dataset) open and validate."""
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(one_file, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format_version"] = 1
    for name, entry in manifest["datasets"].items():
        renamed = {}
        for filename, value in entry["files"].items():
            target = filename.replace("-00000", "")
            (old / name / filename).rename(old / name / target)
            renamed[target] = value
        entry["files"] = renamed
        meta = json.loads((old / name / DATASET_META).read_text())
        meta["files"] = renamed
        (old / name / DATASET_META).write_text(json.dumps(meta))
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert sorted(p.name for p in (old / "web_search").iterdir()) == ["corpus.arrow", "dataset.json", "queries.arrow"]
    assert _tables(old).keys() == _tables(one_file).keys()
    for name, (corpus, queries, pos, neg) in _tables(old).items():
        ref = _tables(one_file)[name]
        assert corpus == ref[0] and queries == ref[1] and np.array_equal(pos, ref[2]) and np.array_equal(neg, ref[3])
    validate_shards(old)
    manifest["format_version"] = 99
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"format version 99 .*rebuild the shards"):
        ShardReader(old)


def test_external_dedup_small_ranges(tmp_path):
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, size=(3000, 2), dtype=np.uint64)
    stream = rng.integers(0, len(pool), size=20_000)
    dedup = ExternalDedup(tmp_path / "d", range_size=700, flush_every=1500)
    for i in range(0, len(stream), 999):
        dedup.add(pool[stream[i : i + 999]])
    seen: dict[int, int] = {}
    expected = [seen.setdefault(v, len(seen)) for v in stream.tolist()]
    assert dedup.finish() == len(seen)
    ids, new = zip(*(dedup.take(min(333, len(stream) - i)) for i in range(0, len(stream), 333)))
    ids, new = np.concatenate(ids), np.concatenate(new)
    assert ids.tolist() == expected
    first = np.zeros(len(stream), dtype=bool)
    first[np.unique(stream, return_index=True)[1]] = True
    assert new.tolist() == first.tolist()


# ------------------------------------------------------------------------------------------------ parts and merge
def test_parts_merge_to_the_single_build(example_raw, one_file, tmp_path):
    """3 parts (rows split by query hash) merged = the single build: same files byte for byte, same `show`."""
    from preprocess.merge import MergeOptions, PartMerger, load_part_rows

    parts = [_build(example_raw, tmp_path / f"part{i}", num_parts=3, part=i) for i in range(3)]
    kept = [load_part_rows(p, "web_search") for p in parts]
    assert all(len(k) for k in kept) and sorted(np.concatenate(kept).tolist()) == list(range(300))
    merged = tmp_path / "merged"
    PartMerger(MergeOptions(parts=[str(p) for p in reversed(parts)], out=str(merged))).run()
    single, joined = json.loads((one_file / MANIFEST).read_text()), json.loads((merged / MANIFEST).read_text())
    assert joined["datasets"] == single["datasets"]  # counts, build keys and every file's sha256
    from pipeline.data.tokenization import load_tokenizer

    tok = load_tokenizer(minilm_dir())
    for name in single["datasets"]:
        ds = ShardReader(merged)[name]
        for i in range(0, ds.num_queries, 7):
            assert show_example(merged, name, i, tok) == show_example(one_file, name, i, tok)
    validate_shards(merged)


def test_merge_refuses_mismatched_parts(example_raw, tmp_path):
    from preprocess.build import BuildError
    from preprocess.merge import MergeOptions, PartMerger

    a = _build(example_raw, tmp_path / "a", num_parts=2, part=0)
    b = tmp_path / "b"
    ShardBuilder(BuildOptions(raw=str(example_raw), tokenizer=minilm_dir(), out=str(b), max_len=32, workers=1,
                              registry=str(example_raw / "datasets.yaml"), num_parts=2, part=1)).run()
    with pytest.raises(BuildError, match=r"parts built with different max_len \(64 vs 32\)"):
        PartMerger(MergeOptions(parts=[str(a), str(b)], out=str(tmp_path / "m")))
    with pytest.raises(BuildError, match=r"need each of the 2 parts exactly once"):
        PartMerger(MergeOptions(parts=[str(a), str(a)], out=str(tmp_path / "m")))
    with pytest.raises(BuildError, match=r"not a part"):
        PartMerger(MergeOptions(parts=[str(a), str(_build(example_raw, tmp_path / "whole"))], out=str(tmp_path / "m")))


def test_preprocess_sbatch_runs_one_part_per_array_task(tmp_path):
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "launch" / "preprocess.sbatch"
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
           "SLURM_CPUS_PER_TASK": "4", "PYTHON": "echo", "REPO_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(script), "--raw", "RAW", "--tokenizer", "TOK", "--parts-dir", str(tmp_path / "p"),
                           "--max-len", "512"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["-m", "preprocess", "build", "--raw", "RAW", "--tokenizer", "TOK", "--out",
                                   f"{tmp_path / 'p'}/part-1", "--num-parts", "3", "--part", "1", "--workers", "4",
                                   "--max-len", "512"]
    bad = subprocess.run(["bash", str(script), "--raw", "RAW", "--tokenizer", "TOK", "--parts-dir", "p"],
                         capture_output=True, text=True, env={k: v for k, v in env.items() if "ARRAY" not in k})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not an array task" in bad.stderr
    assert subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True).returncode == 0
