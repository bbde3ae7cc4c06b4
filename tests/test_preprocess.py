"""Preprocessing: raw parquet/JSONL -> token shards -> reader, with the failure modes users hit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_helpers import make_word_tokenizer, minilm_dir, write_jsonl, write_parquet, write_registry
from pipeline.data.shard_format import MANIFEST, ShardError
from pipeline.data.shards import ShardReader
from preprocess.build import BuildError, BuildOptions, ShardBuilder
from pipeline.data.registry import RegistryError
from pipeline.data.tokenization import load_tokenizer
from preprocess.validate import validate_shards

REPO = Path(__file__).resolve().parents[1]


def build(raw: Path, tok: str, out: Path, **kw) -> list:
    return ShardBuilder(BuildOptions(raw=str(raw), tokenizer=tok, out=str(out), **kw)).run()


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory) -> str:
    return make_word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def small_raw(tmp_path) -> tuple[Path, Path]:
    raw = tmp_path / "raw"
    write_parquet(
        raw / "web.parquet",
        [
            {"query": "w1 w2", "passage": "w10 w11 w12", "negative_1": "w20", "negative_2": "w21 w22"},
            # "w20" is a negative above and the positive here: one corpus entry for both.
            {"query": "w3", "passage": "w20", "negative_1": "w10 w11 w12", "negative_2": "w30"},
            {"query": "w4 w5 w6", "passage": "w40", "negative_1": "w41", "negative_2": "w42"},
        ],
    )
    write_jsonl(
        raw / "labels.jsonl",
        [
            {"query": "w7 w8", "pos": ["w50", "w51"], "neg": ["w52"]},  # two positives -> two rows
            {"query": "w9", "pos": "w52", "neg": []},
        ],
    )
    registry = write_registry(
        tmp_path / "datasets.yaml",
        {"web": {"type": "retrieval", "instruction": "w99"}, "labels": {"type": "classification"}},
        template="{instruction} w98 {query}",
    )
    return raw, registry


def test_round_trip_dedup_and_negative_ids(small_raw, word_tok, tmp_path):
    raw, registry = small_raw
    out = tmp_path / "shards"
    build(raw, word_tok, out, registry=str(registry), max_len=16)
    reader = ShardReader(out)
    tok = load_tokenizer(word_tok)
    eos = tok.eos_token_id
    web = reader["web"]
    assert web.type == "retrieval" and web.num_queries == 3
    # Query carries the instruction template; tokens = tokenizer output + EOS.
    assert web.queries[0].tolist() == tok("w99 w98 w1 w2")["input_ids"] + [eos]
    assert web.queries[0].dtype == np.uint16
    # Dedup: 3 + 3 + 3 texts with w20 and "w10 w11 w12" shared -> 7 unique docs.
    assert web.num_docs == 7
    assert web.positives[1] == web.negatives[0, 0]  # "w20"
    assert web.negatives[1, 0] == web.positives[0]  # "w10 w11 w12"
    decode = lambda ids: tok.decode(ids[:-1].tolist())  # noqa: E731
    assert [decode(web.corpus[j]) for j in web.negatives[2]] == ["w41", "w42"]
    # JSONL: two positives -> two rows with the same query and negatives; missing negatives padded with -1.
    labels = reader["labels"]
    assert labels.num_queries == 3 and labels.num_negatives == 1
    assert labels.queries[0].tolist() == labels.queries[1].tolist() == tok("w7 w8")["input_ids"] + [eos]
    assert [decode(labels.corpus[p]) for p in labels.positives] == ["w50", "w51", "w52"]
    assert labels.negatives[:, 0].tolist()[:2] == [labels.negatives[0, 0]] * 2 and labels.negatives[2, 0] == -1
    # no instruction for a dataset without one; documents never get one
    assert decode(labels.corpus[labels.positives[0]]) == "w50"
    # the reader maps the file: views, not copies
    assert not web.corpus.values.flags.owndata


def test_truncation_keeps_eos_both_tokenizer_kinds(tmp_path, word_tok):
    long_text = " ".join(f"w{i % 150}" for i in range(300))
    raw = write_parquet(tmp_path / "raw" / "d.parquet", [{"query": long_text, "passage": long_text}])
    for name, tok_dir in (("word", word_tok), ("minilm", minilm_dir())):
        out = tmp_path / name
        build(raw.parent, tok_dir, out, default_type="retrieval", max_len=12)
        reader = ShardReader(out)
        tok = load_tokenizer(tok_dir)
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        for seq in (reader["d"].queries[0], reader["d"].corpus[0]):
            assert len(seq) == 12 and seq[-1] == eos
        full = tok(long_text)["input_ids"]
        if name == "minilm":  # [CLS] + first 10 wordpieces + [SEP]
            assert reader["d"].corpus[0].tolist() == full[:11] + [eos]
        else:
            assert reader["d"].corpus[0].tolist() == full[:11] + [eos]
        validate_shards(out)


def test_minilm_round_trip_matches_tokenizer(tmp_path):
    texts = ["How do I sort a list in Python?", "Use sorted(xs) or xs.sort().", "Lists are mutable sequences."]
    raw = write_parquet(
        tmp_path / "raw" / "qa.parquet", [{"query": texts[0], "passage": texts[1], "negative_1": texts[2]}]
    )
    out = tmp_path / "out"
    build(raw.parent, minilm_dir(), out, default_type="retrieval", max_len=64)
    tok = load_tokenizer(minilm_dir())
    ds = ShardReader(out)["qa"]
    assert ds.queries[0].tolist() == tok(texts[0])["input_ids"]  # BERT closes with [SEP] = our EOS
    assert ds.corpus[ds.positives[0]].tolist() == tok(texts[1])["input_ids"]
    assert ds.corpus[ds.negatives[0, 0]].tolist() == tok(texts[2])["input_ids"]
    ShardReader(out).check_tokenizer(tok)


def test_uint16_and_uint32_token_buffers(tmp_path):
    small = make_word_tokenizer(tmp_path / "small", n_words=100)
    large = make_word_tokenizer(tmp_path / "large", n_words=70_000)
    raw = write_parquet(tmp_path / "raw" / "d.parquet", [{"query": "w1 w69999", "passage": "w5"}])
    build(raw.parent, small, tmp_path / "s", default_type="retrieval")
    build(raw.parent, large, tmp_path / "l", default_type="retrieval")
    assert ShardReader(tmp_path / "s")["d"].queries[0].dtype == np.uint16
    q = ShardReader(tmp_path / "l")["d"].queries[0]
    assert q.dtype == np.uint32 and q.tolist() == [4, 70_002, 2]


def test_every_bad_row_kind_is_counted(tmp_path, word_tok):
    raw = tmp_path / "raw"
    write_parquet(
        raw / "p.parquet",
        [
            {"query": "w1", "passage": "w2", "negative_1": "w3"},
            {"query": None, "passage": "w2", "negative_1": "w3"},
            {"query": "  ", "passage": "w2", "negative_1": "w3"},
            {"query": "w1", "passage": None, "negative_1": "w3"},
            {"query": "w1", "passage": "", "negative_1": "w3"},
            {"query": "w1", "passage": "w2", "negative_1": None},
        ],
    )
    write_jsonl(
        raw / "j.jsonl",
        [
            {"query": "w1", "pos": ["w2"], "neg": ["w3"]},
            {"query": 5, "pos": ["w2"]},
            {"query": "w1", "pos": [7]},
            {"query": "w1", "pos": ["w2"], "neg": [3]},
            {"query": "w1", "pos": ["w2"], "neg": [""]},
            {"pos": ["w2"]},
            "{not json",
            '["a", "list"]',
            '{"query": "\\ud800 w1", "pos": ["w2"]}',
        ],
    )
    with open(raw / "j.jsonl", "ab") as handle:
        handle.write(b'{"query": "\xff\xfe", "pos": ["w2"]}\n')
    out = tmp_path / "out"
    build(raw, word_tok, out, default_type="retrieval")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["datasets"]["p"]["counts"]["skipped"] == {
        "empty_passage": 1,
        "empty_query": 1,
        "missing_passage": 1,
        "missing_query": 1,
        "null_negative": 1,
    }
    assert manifest["datasets"]["j"]["counts"]["skipped"] == {
        "empty_negative": 1,
        "invalid_json": 2,
        "invalid_utf8": 1,
        "missing_query": 1,
        "non_string_negative": 1,
        "non_string_passage": 1,
        "non_string_query": 1,
        "unencodable_text": 1,
    }
    assert manifest["datasets"]["p"]["counts"]["queries"] == 1
    assert manifest["datasets"]["j"]["counts"]["queries"] == 1


def test_registry_errors(tmp_path, word_tok, small_raw):
    raw, _ = small_raw
    registry = write_registry(tmp_path / "r.yaml", {"web": {"type": "retrieval"}})
    with pytest.raises(RegistryError, match="labels"):
        build(raw, word_tok, tmp_path / "o1", registry=str(registry))
    # a default type fills the gap
    build(raw, word_tok, tmp_path / "o2", registry=str(registry), default_type="clustering")
    assert ShardReader(tmp_path / "o2")["labels"].type == "clustering"
    bad_type = write_registry(tmp_path / "b.yaml", {"web": {"type": "ranking"}})
    with pytest.raises(RegistryError, match=r"datasets\.web\.type"):
        build(raw, word_tok, tmp_path / "o3", registry=str(bad_type))
    (tmp_path / "c.yaml").write_text("datasets: [unclosed")
    with pytest.raises(RegistryError, match="c.yaml: invalid YAML"):
        build(raw, word_tok, tmp_path / "o4", registry=str(tmp_path / "c.yaml"))
    with pytest.raises(RegistryError, match="cannot read"):
        build(raw, word_tok, tmp_path / "o5", registry=str(tmp_path / "missing.yaml"))


def test_unusable_files_are_one_line_errors(tmp_path, word_tok):
    raw = write_parquet(tmp_path / "raw" / "d.parquet", [{"text": "w1", "label": "w2"}])
    proc = subprocess.run(
        [sys.executable, "-m", "preprocess", "build", "--raw", str(raw.parent), "--tokenizer", word_tok,
         "--out", str(tmp_path / "o"), "--default-type", "retrieval", "--workers", "1"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0
    assert "d.parquet: no usable columns: missing query, passage" in proc.stderr
    (tmp_path / "raw2").mkdir()
    (tmp_path / "raw2" / "x.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(Exception, match="x.parquet: cannot read parquet"):
        build(tmp_path / "raw2", word_tok, tmp_path / "o2", default_type="retrieval")
    with pytest.raises(Exception, match="nope: no such file"):
        build(tmp_path / "nope", word_tok, tmp_path / "o3", default_type="retrieval")


def test_validate_catches_flipped_byte_and_truncation(small_raw, word_tok, tmp_path):
    raw, registry = small_raw
    out = tmp_path / "out"
    build(raw, word_tok, out, registry=str(registry))
    assert validate_shards(out) == {"labels": 3, "web": 3}
    corpus = out / "web" / "corpus-00000.arrow"
    pristine = corpus.read_bytes()
    flipped = bytearray(pristine)
    flipped[len(flipped) // 2] ^= 0x01
    corpus.write_bytes(bytes(flipped))
    with pytest.raises(ShardError, match=r"web/corpus-00000.arrow: sha256 checksum mismatch"):
        validate_shards(out)
    corpus.write_bytes(pristine[:-10])
    with pytest.raises(ShardError, match=r"web/corpus-00000.arrow: size \d+ differs"):
        validate_shards(out)
    proc = subprocess.run([sys.executable, "-m", "preprocess", "validate", str(out)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode != 0 and "web/corpus-00000.arrow" in proc.stderr
    corpus.write_bytes(pristine)
    proc = subprocess.run([sys.executable, "-m", "preprocess", "validate", str(out)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_interrupted_build_resumes(small_raw, word_tok, tmp_path, monkeypatch):
    raw, registry = small_raw
    out = tmp_path / "out"
    original = ShardBuilder._build_one
    calls: list[str] = []

    def crash_on_second(self, spec, *args):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-build")
        return original(self, spec, *args)

    monkeypatch.setattr(ShardBuilder, "_build_one", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build(raw, word_tok, out, registry=str(registry))
    assert not (out / MANIFEST).exists()  # no manifest until every dataset is done
    monkeypatch.setattr(ShardBuilder, "_build_one", original)
    results = build(raw, word_tok, out, registry=str(registry))
    assert {r.name: r.reused for r in results} == {"labels": True, "web": False}
    validate_shards(out)
    # a corrupted finished dataset is rebuilt, the intact one reused
    (out / "labels" / "queries-00000.arrow").write_bytes(b"garbage")
    results = build(raw, word_tok, out, registry=str(registry))
    assert {r.name: r.reused for r in results} == {"labels": False, "web": True}
    validate_shards(out)


def test_other_tokenizer_or_max_len_refused_without_overwrite(small_raw, word_tok, tmp_path):
    raw, registry = small_raw
    out = tmp_path / "out"
    build(raw, word_tok, out, registry=str(registry), max_len=32)
    with pytest.raises(BuildError, match="another tokenizer or max_len"):
        build(raw, word_tok, out, registry=str(registry), max_len=64)
    other = make_word_tokenizer(tmp_path / "other", n_words=300)
    with pytest.raises(BuildError, match="--overwrite"):
        build(raw, other, out, registry=str(registry), max_len=32)
    build(raw, other, out, registry=str(registry), max_len=64, overwrite=True)
    assert ShardReader(out).max_len == 64


def test_reader_refuses_other_tokenizer_and_version(small_raw, word_tok, tmp_path):
    raw, registry = small_raw
    out = tmp_path / "out"
    build(raw, word_tok, out, registry=str(registry))
    with pytest.raises(ShardError, match="tokenized with"):
        ShardReader(out).check_tokenizer(load_tokenizer(minilm_dir()))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 999
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="format version 999 is not supported"):
        ShardReader(out)
    with pytest.raises(ShardError, match="missing"):
        ShardReader(tmp_path)


def test_subsampling_is_seeded(tmp_path, word_tok):
    rows = [{"query": f"w{i}", "passage": f"w{i + 100}"} for i in range(50)]
    raw = write_parquet(tmp_path / "raw" / "d.parquet", rows)
    build(raw.parent, word_tok, tmp_path / "a", default_type="retrieval", max_rows_per_dataset=10, seed=3)
    build(raw.parent, word_tok, tmp_path / "b", default_type="retrieval", max_rows_per_dataset=10, seed=3)
    build(raw.parent, word_tok, tmp_path / "c", default_type="retrieval", max_rows_per_dataset=10, seed=4)
    q = lambda d: [ShardReader(d)["d"].queries[i].tolist() for i in range(10)]  # noqa: E731
    assert q(tmp_path / "a") == q(tmp_path / "b") != q(tmp_path / "c")
    counts = ShardReader(tmp_path / "a")["d"].meta["counts"]
    assert counts["queries"] == 10 and counts["subsampled_out"] == 40


def test_cli_workers_stats_show_and_help(tmp_path):
    raw = tmp_path / "raw"
    subprocess.run([sys.executable, "-m", "preprocess", "example", "--out", str(raw), "--passages", "400"],
                   check=True, cwd=REPO, capture_output=True)
    out = tmp_path / "shards"
    proc = subprocess.run(
        [sys.executable, "-m", "preprocess", "build", "--raw", str(raw), "--registry", str(raw / "datasets.yaml"),
         "--tokenizer", minilm_dir(), "--out", str(out), "--workers", "2", "--max-len", "128"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "web_search" in proc.stdout and "tok/s" in proc.stdout
    stats = json.loads(subprocess.run([sys.executable, "-m", "preprocess", "stats", str(out), "--json"],
                                      capture_output=True, text=True, cwd=REPO, check=True).stdout)
    assert stats["web_search"]["queries"]["count"] == 100 and stats["web_search"]["negatives_per_query"] == 7.0
    assert stats["web_search"]["docs"]["max"] <= 128
    shown = json.loads(subprocess.run(
        [sys.executable, "-m", "preprocess", "show", str(out), "--dataset", "web_search", "--index", "2"],
        capture_output=True, text=True, cwd=REPO, check=True).stdout)
    assert shown["query"].startswith("[CLS] instruct : given a web search query")
    assert len(shown["negatives"]) == 7 and shown["positive"].endswith("[SEP]")
    for cmd in ([], ["build"], ["merge"], ["validate"], ["stats"], ["show"], ["example"]):
        helped = subprocess.run([sys.executable, "-m", "preprocess", *cmd, "--help"], capture_output=True, text=True,
                                cwd=REPO)
        assert helped.returncode == 0 and "usage" in helped.stdout
