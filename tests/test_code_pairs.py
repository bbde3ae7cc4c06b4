"""`preprocess code-pairs`: docstring -> code pairs from a small synthetic source tree."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from preprocess.code_pairs import (
    CodePairsError,
    CodePairsOptions,
    build_code_pairs,
    first_paragraph,
    split_by_module,
)
from pipeline.data.raw import RawStats, read_rows
from pipeline.data.registry import load_registry

REPO = Path(__file__).resolve().parents[1]

MODULE_A = '''\
"""Module docstring: not a function, no pair."""
import functools


def parse_header(line, strict=False):
    """Parse one header line into a name and a value.

    The second paragraph explains details
    that must not be part of the query.
    """
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


class Reader:
    """Class docstring: no pair."""

    @functools.lru_cache(maxsize=None)
    def read_block(self, size):
        """Read a block of bytes from the underlying stream."""

        data = self.stream.read(size)
        return data

    def abstract(self):
        """Subclasses must implement this method properly."""
        pass

    def ellipsis(self):
        """Subclasses must implement this one as well."""
        ...

    def short(self):
        """Too short."""
        return 1

    def no_docstring(self):
        return 2


def one_liner(x): "Return the argument doubled, on one line."; return 2 * x


def outer(values):
    """Sum the squares of the given values with a helper."""
    def square(v):
        """Square one value using plain multiplication."""
        return v * v
    return sum(square(v) for v in values)
'''


def _module(i: int) -> str:
    return textwrap.dedent(f'''\
        def function_{i}(a, b):
            """Combine the two arguments into result number {i}."""
            return (a, b, {i})


        def helper_{i}(x):
            """Compute the helper value for module number {i} here."""
            return x + {i}
        ''')


@pytest.fixture()
def source_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "a.py").write_text(MODULE_A)
    for i in range(10):
        (src / "pkg" / f"m{i}.py").write_text(_module(i))
    # the same function as in pkg/a.py: a duplicate passage, kept once
    (src / "pkg" / "dup.py").write_text(
        'def parse_header(line, strict=False):\n    """Parse a header line (other docstring, same code)."""\n'
        '    name, _, value = line.partition(":")\n    return name.strip(), value.strip()\n'
    )
    (src / "broken.py").write_text("def broken(:\n    '''Never parsed because of the syntax error.'''\n")
    (src / "latin1.py").write_bytes(
        b"# -*- coding: latin-1 -*-\ndef caf\xe9():\n    'Return the name of the caf\xe9 on the corner.'\n"
        b"    return 'caf\xe9'\n"
    )
    # excluded: test directories and test files, site-packages
    for skipped in ("tests/test_x.py", "pkg/test_y.py", "pkg/z_test.py", "site-packages/lib.py"):
        (src / skipped).parent.mkdir(parents=True, exist_ok=True)
        (src / skipped).write_text('def f(x):\n    """A function in a file that must be skipped."""\n    return x\n')
    return src


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_first_paragraph():
    assert first_paragraph("Summary line.\n\n    Details.") == "Summary line."
    assert first_paragraph("\n    Spans two\n    lines here.\n\n    More.\n    ") == "Spans two lines here."
    assert first_paragraph("One   line\twith  spaces") == "One line with spaces"


def test_pairs_from_synthetic_tree(source_tree: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = build_code_pairs(CodePairsOptions(src=str(source_tree), out=str(out), heldout_fraction=0.3, seed=1),
                               progress=False)
    assert summary.files_failed == 1 and "broken.py" in summary.failed_examples[0]
    assert summary.files_parsed == 14  # __init__, a, m0..m9, dup, latin1
    assert summary.skipped_test_files == 3  # tests/test_x.py, pkg/test_y.py, pkg/z_test.py
    assert summary.skipped["trivial_body"] == 2 and summary.skipped["short_docstring"] == 1
    assert summary.skipped["duplicate_passage"] == 1

    records = _records(out / "train" / "code_search.jsonl") + _records(out / "heldout" / "code_search.jsonl")
    by_function = {r["function"]: r for r in records}
    assert len(records) == summary.pairs == 5 + 20 + 1
    assert "f" not in by_function and "Reader.short" not in by_function and "Reader.abstract" not in by_function

    parse = by_function["parse_header"]
    assert parse["module"] == "pkg.a" and parse["pos"] and parse["neg"] == []
    assert parse["query"] == "Parse one header line into a name and a value."
    assert parse["pos"][0] == (
        'def parse_header(line, strict=False):\n    name, _, value = line.partition(":")\n'
        "    return name.strip(), value.strip()"
    )
    # method: dedented, decorator off by default, docstring and the blank line after it removed
    assert by_function["Reader.read_block"]["pos"][0] == (
        "def read_block(self, size):\n    data = self.stream.read(size)\n    return data"
    )
    assert by_function["one_liner"]["pos"][0] == "def one_liner(x): return 2 * x"
    outer = by_function["outer"]["pos"][0]
    assert "Sum the squares" not in outer and "def square(v):" in outer
    assert '"""Square one value' in outer  # only the function's own docstring goes; nested code stays as is
    assert by_function["outer.<locals>.square"]["pos"][0] == "def square(v):\n    return v * v"
    assert by_function["café"]["query"] == "Return the name of the café on the corner."
    for r in records:
        assert r["query"] not in r["pos"][0]

    # split by module: no module on both sides, every pair somewhere, held-out near the fraction
    train = _records(out / "train" / "code_search.jsonl")
    heldout = _records(out / "heldout" / "code_search.jsonl")
    assert not {r["module"] for r in train} & {r["module"] for r in heldout}
    assert 0.3 * len(records) <= len(heldout) <= 0.3 * len(records) + 6
    # outputs readable by the raw reader and the registry loader
    stats = RawStats()
    assert len(list(read_rows(out / "train" / "code_search.jsonl", stats))) == len(train) and not stats.skipped
    registry = load_registry(out / "datasets.yaml")
    assert registry.datasets["code_search"].type == "retrieval" and registry.datasets["code_search"].instruction
    assert json.loads((out / "summary.json").read_text())["split_pairs"] == {"train": len(train),
                                                                            "heldout": len(heldout)}


def test_decorators_max_pairs_and_seed(source_tree: Path, tmp_path: Path):
    out = tmp_path / "out"
    build_code_pairs(CodePairsOptions(src=str(source_tree), out=str(out), decorators=True, max_pairs=10, seed=3,
                                      heldout_fraction=0.0), progress=False)
    records = _records(out / "train" / "code_search.jsonl")
    assert len(records) == 10 and _records(out / "heldout" / "code_search.jsonl") == []
    build_code_pairs(CodePairsOptions(src=str(source_tree), out=str(out), decorators=True, instruction=""),
                     progress=False)
    assert load_registry(out / "datasets.yaml").datasets["code_search"].instruction is None
    every = {r["function"]: r for r in _records(out / "train" / "code_search.jsonl")
             + _records(out / "heldout" / "code_search.jsonl")}
    assert every["Reader.read_block"]["pos"][0].startswith("@functools.lru_cache(maxsize=None)\ndef read_block(")


def test_split_is_seeded_and_module_disjoint():
    from preprocess.code_pairs import CodePair

    pairs = [CodePair(f"q{i}", f"p{i}", f"mod{i % 7}", f"f{i}", "x.py", i) for i in range(70)]
    a = split_by_module(pairs, 0.25, seed=5)
    b = split_by_module(pairs, 0.25, seed=5)
    assert [p.query for p in a[1]] == [p.query for p in b[1]]
    assert not {p.module for p in a[0]} & {p.module for p in a[1]}
    assert len(a[0]) + len(a[1]) == 70 and len(a[1]) == 20  # 2 modules of 10 pairs reach 25% of 70 (17.5)


def test_errors(tmp_path: Path):
    with pytest.raises(CodePairsError, match="not a directory"):
        build_code_pairs(CodePairsOptions(src=str(tmp_path / "missing"), out=str(tmp_path / "o")), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodePairsError, match="no Python files"):
        build_code_pairs(CodePairsOptions(src=str(tmp_path / "empty"), out=str(tmp_path / "o")), progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "preprocess", "code-pairs", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
         "--heldout-fraction", "1.5"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --heldout-fraction: must be in [0, 1), got 1.5"]


def test_cli(source_tree: Path, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "preprocess", "code-pairs", str(source_tree), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 failed to parse" in proc.stdout and "train" in proc.stdout
