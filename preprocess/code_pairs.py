"""`preprocess code-pairs`: docstring -> code retrieval pairs from any Python source tree.

For every function and method (nested ones included) that has a docstring:

* query   = the docstring's first paragraph (``inspect.cleandoc``, up to the first blank line), whitespace collapsed
  to single spaces; pairs whose query is shorter than ``min_doc_chars`` are dropped;
* passage = the function's source (signature and body, decorators only with ``decorators=True``) with the
  docstring removed, dedented. When the docstring fills whole lines those lines go, together with the blank lines
  that directly follow it; a docstring sharing a line with code (``def f(): "doc"; return 1``) is cut out of the line.
  Only the function's own docstring goes: nested functions and classes stay as they are, docstrings included.

Skipped, and counted: files in test directories / test files (``test``, ``tests``, ``idle_test`` directories,
``test_*.py``, ``*_test.py``, ``conftest.py``) and in ``site-packages``/``dist-packages``/hidden/``__pycache__``
directories (walking the standard library must not walk the installed packages); files that fail to decode or parse
(not fatal); functions whose body without the docstring is empty or only ``pass`` / ``...``; short queries; and
passages identical to an earlier one (files walked in sorted path order, functions in source order; the first
one is kept).

Split: pairs are grouped by module (one ``.py`` file); modules are shuffled with ``seed`` and assigned to held-out
until it holds ``heldout_fraction`` of the pairs; the rest is train. No module is on both sides, and since identical
passages are removed first, no passage is either. ``max_pairs`` subsamples (seeded) before the split.

Output (the raw JSONL format of :mod:`pipeline.data.raw`)::

    OUT/train/code_search.jsonl     {"query", "pos": [passage], "neg": [], "module", "function", "path", "line"}
    OUT/heldout/code_search.jsonl
    OUT/datasets.yaml               code_search: retrieval, with a docstring -> code instruction (``instruction``;
                                    "" writes none: base all-MiniLM-L6-v2 scores lower with one)
    OUT/summary.json                the counts printed at the end

The extra keys (module, function, path, line) are ignored by the raw readers.
"""
from __future__ import annotations

import ast
import inspect
import io
import json
import os
import random
import re
import textwrap
import time
import tokenize
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from tqdm import tqdm

DATASET_NAME = "code_search"
INSTRUCTION = "Given a docstring, retrieve the Python code that implements it"
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class CodePairsError(ValueError):
    """Bad options or an unusable source tree; the message names the path or option."""


@dataclass
class CodePair:
    query: str
    passage: str
    module: str
    function: str
    path: str
    line: int

    def record(self) -> dict[str, Any]:
        return {"query": self.query, "pos": [self.passage], "neg": [], "module": self.module,
                "function": self.function, "path": self.path, "line": self.line}


@dataclass
class CodePairsOptions:
    src: str
    out: str
    heldout_fraction: float = 0.2
    seed: int = 0
    min_doc_chars: int = 20
    max_pairs: int | None = None
    decorators: bool = False
    exclude_dirs: tuple[str, ...] = ()
    instruction: str = INSTRUCTION  # registry instruction of the dataset; "" = none


@dataclass
class CodePairsSummary:
    files_found: int = 0
    files_parsed: int = 0
    files_failed: int = 0
    failed_examples: list[str] = field(default_factory=list)
    skipped_test_files: int = 0
    functions: int = 0
    with_docstring: int = 0
    skipped: Counter = field(default_factory=Counter)
    pairs: int = 0
    split_pairs: dict[str, int] = field(default_factory=dict)
    split_modules: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_found": self.files_found,
            "files_parsed": self.files_parsed,
            "files_failed": self.files_failed,
            "failed_examples": self.failed_examples,
            "skipped_test_files": self.skipped_test_files,
            "functions": self.functions,
            "with_docstring": self.with_docstring,
            "skipped": dict(sorted(self.skipped.items())),
            "pairs": self.pairs,
            "split_pairs": self.split_pairs,
            "split_modules": self.split_modules,
            "seconds": round(self.seconds, 2),
        }


# --------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------
def first_paragraph(docstring: str) -> str:
    """The first paragraph of a docstring (up to the first blank line), whitespace collapsed to single spaces."""
    text = inspect.cleandoc(docstring).strip()
    return " ".join(_PARAGRAPH_BREAK.split(text, maxsplit=1)[0].split())


def _char_col(line: str, byte_col: int) -> int:
    """ast column offsets count UTF-8 bytes; convert one to a character index into `line`."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def _docstring_node(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def is_trivial_body(body: list[ast.stmt]) -> bool:
    """True when `body` (docstring already removed) is empty or only ``pass`` / ``...`` statements."""
    return all(
        isinstance(s, ast.Pass)
        or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and s.value.value is Ellipsis)
        for s in body
    )


def function_passage(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef, *, decorators: bool) -> str:
    """Source of `node` without its docstring, dedented. `lines` are the file's lines (no line ends)."""
    first = node.decorator_list[0] if (decorators and node.decorator_list) else node
    start_line = first.lineno
    seg = lines[start_line - 1 : node.end_lineno]
    # blank out whatever precedes the definition on its first line ("class A: def f(): ...")
    col = _char_col(lines[start_line - 1], first.col_offset)
    if first is not node:
        col = max(lines[start_line - 1].rfind("@", 0, col + 1), 0)
    seg[0] = " " * col + seg[0][col:]
    seg[-1] = seg[-1][: _char_col(lines[node.end_lineno - 1], node.end_col_offset)]  # type: ignore[arg-type]

    doc = _docstring_node(node)
    if doc is not None:
        d0, d1 = doc.lineno - start_line, doc.end_lineno - start_line  # type: ignore[operator]
        c0 = _char_col(lines[doc.lineno - 1], doc.col_offset)
        c1 = _char_col(lines[doc.end_lineno - 1], doc.end_col_offset)  # type: ignore[arg-type,index]
        before, after = seg[d0][:c0], seg[d1][c1:]
        if not before.strip() and not after.strip():  # the docstring fills whole lines: drop them (+ blank lines)
            end = d1 + 1
            while end < len(seg) and not seg[end].strip():
                end += 1
            seg = seg[:d0] + seg[end:]
        else:  # shares a line with code: cut it (and a following ';') out of the line
            rest = re.sub(r"^\s*;\s*", "", after)
            joined = f"{before.rstrip()} {rest}" if before.strip() else before + rest
            seg = seg[:d0] + [joined] + seg[d1 + 1 :]
    return textwrap.dedent("\n".join(line.rstrip() for line in seg)).strip("\n")


def _qualified_functions(tree: ast.AST) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function/method in source order, nested ones included."""
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, Any]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts and parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def is_test_file(name: str) -> bool:
    return name.startswith("test_") or name.endswith("_test.py") or name in ("conftest.py", "tests.py")


def source_files(src: Path, exclude_dirs: frozenset[str], summary: CodePairsSummary) -> list[Path]:
    """Sorted .py files under `src`, without test dirs/files and excluded/hidden directories."""
    files: list[Path] = []
    for root, dirs, names in os.walk(src):
        kept = []
        for d in sorted(dirs):
            if d in TEST_DIRS:
                summary.skipped_test_files += sum(
                    1 for _, _, fs in os.walk(os.path.join(root, d)) for f in fs if f.endswith(".py")
                )
            elif d not in exclude_dirs and not d.startswith("."):
                kept.append(d)
        dirs[:] = kept
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            if is_test_file(name):
                summary.skipped_test_files += 1
                continue
            files.append(Path(root) / name)
    return sorted(files)


def read_source(path: Path) -> str:
    """Decode a Python file by its coding cookie / BOM (PEP 263)."""
    data = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    return data.decode(encoding)


def pairs_from_source(
    text: str, *, module: str, path: str, min_doc_chars: int, decorators: bool, skipped: Counter
) -> tuple[list[CodePair], int, int]:
    """Pairs of one parsed file; returns (pairs, functions seen, functions with a docstring).

    Raises SyntaxError/ValueError when the file does not parse.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences etc. in old code
        tree = ast.parse(text, filename=path)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # ast's line breaks only (not \f)
    pairs: list[CodePair] = []
    n_functions = n_doc = 0
    for qualname, node in _qualified_functions(tree):
        n_functions += 1
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            continue
        n_doc += 1
        query = first_paragraph(doc)
        if len(query) < min_doc_chars:
            skipped["short_docstring"] += 1
            continue
        if is_trivial_body(node.body[1:]):
            skipped["trivial_body"] += 1
            continue
        passage = function_passage(lines, node, decorators=decorators)
        pairs.append(CodePair(query, passage, module, qualname, path, node.lineno))
    return pairs, n_functions, n_doc


def split_by_module(pairs: list[CodePair], heldout_fraction: float, seed: int) -> tuple[list[CodePair], list[CodePair]]:
    """Shuffle modules (seeded); held-out takes whole modules until it has >= fraction * len(pairs) pairs."""
    by_module: dict[str, list[CodePair]] = {}
    for p in pairs:
        by_module.setdefault(p.module, []).append(p)
    modules = sorted(by_module)
    random.Random(seed).shuffle(modules)
    target = heldout_fraction * len(pairs)
    heldout_modules: set[str] = set()
    count = 0
    for m in modules:
        if count >= target:
            break
        heldout_modules.add(m)
        count += len(by_module[m])
    train = [p for p in pairs if p.module not in heldout_modules]
    heldout = [p for p in pairs if p.module in heldout_modules]
    return train, heldout


def _write_jsonl(path: Path, pairs: list[CodePair]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for p in pairs:
            handle.write(json.dumps(p.record(), ensure_ascii=False))
            handle.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------
def build_code_pairs(opts: CodePairsOptions, *, progress: bool = True) -> CodePairsSummary:
    src = Path(opts.src)
    if not src.is_dir():
        raise CodePairsError(f"{src}: not a directory")
    if not 0.0 <= opts.heldout_fraction < 1.0:
        raise CodePairsError(f"--heldout-fraction: must be in [0, 1), got {opts.heldout_fraction}")
    if opts.min_doc_chars < 1:
        raise CodePairsError(f"--min-doc-chars: must be positive, got {opts.min_doc_chars}")
    if opts.max_pairs is not None and opts.max_pairs < 1:
        raise CodePairsError(f"--max-pairs: must be positive, got {opts.max_pairs}")
    started = time.perf_counter()
    summary = CodePairsSummary()
    files = source_files(src, EXCLUDED_DIRS | frozenset(opts.exclude_dirs), summary)
    summary.files_found = len(files)
    if not files:
        raise CodePairsError(f"{src}: no Python files found (test directories and files excluded)")

    pairs: list[CodePair] = []
    seen_passages: set[str] = set()
    for path in tqdm(files, desc="code-pairs: parse", unit="file", dynamic_ncols=True, disable=not progress):
        rel = path.relative_to(src)
        try:
            text = read_source(path)
            found, n_fn, n_doc = pairs_from_source(
                text, module=module_name(rel), path=str(rel), min_doc_chars=opts.min_doc_chars,
                decorators=opts.decorators, skipped=summary.skipped,
            )
        except (SyntaxError, ValueError, UnicodeDecodeError, LookupError, OSError, RecursionError) as exc:
            summary.files_failed += 1
            if len(summary.failed_examples) < 10:
                detail = str(exc).splitlines()[0] if str(exc) else ""
                summary.failed_examples.append(f"{rel}: {type(exc).__name__}: {detail}")
            continue
        summary.files_parsed += 1
        summary.functions += n_fn
        summary.with_docstring += n_doc
        for pair in found:
            if pair.passage in seen_passages:
                summary.skipped["duplicate_passage"] += 1
                continue
            seen_passages.add(pair.passage)
            pairs.append(pair)

    if opts.max_pairs is not None and len(pairs) > opts.max_pairs:
        keep = sorted(random.Random(opts.seed).sample(range(len(pairs)), opts.max_pairs))
        summary.skipped["max_pairs"] += len(pairs) - opts.max_pairs
        pairs = [pairs[i] for i in keep]
    if not pairs:
        raise CodePairsError(
            f"{src}: no pairs found ({summary.files_parsed} files parsed, {summary.files_failed} failed, "
            f"skipped: {dict(summary.skipped) or 'none'})"
        )
    summary.pairs = len(pairs)
    train, heldout = split_by_module(pairs, opts.heldout_fraction, opts.seed)

    out = Path(opts.out)
    _write_jsonl(out / "train" / f"{DATASET_NAME}.jsonl", train)
    _write_jsonl(out / "heldout" / f"{DATASET_NAME}.jsonl", heldout)
    entry = {"type": "retrieval", **({"instruction": opts.instruction} if opts.instruction.strip() else {})}
    (out / "datasets.yaml").write_text(yaml.safe_dump({"datasets": {DATASET_NAME: entry}}, sort_keys=False))
    summary.split_pairs = {"train": len(train), "heldout": len(heldout)}
    summary.split_modules = {"train": len({p.module for p in train}), "heldout": len({p.module for p in heldout})}
    summary.seconds = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return summary


def summary_text(summary: CodePairsSummary, out: str) -> str:
    s = summary
    lines = [
        f"files: {s.files_found:,} found, {s.files_parsed:,} parsed, {s.files_failed:,} failed to parse, "
        f"{s.skipped_test_files:,} test files skipped",
    ]
    lines += [f"  parse failure: {e}" for e in s.failed_examples[:5]]
    lines += [
        f"functions: {s.functions:,}, with a docstring: {s.with_docstring:,}; skipped: "
        + (", ".join(f"{k} {v:,}" for k, v in sorted(s.skipped.items())) or "none"),
        f"pairs: {s.pairs:,} -> train {s.split_pairs['train']:,} ({s.split_modules['train']:,} modules), "
        f"heldout {s.split_pairs['heldout']:,} ({s.split_modules['heldout']:,} modules)",
        f"written: {out}/train/{DATASET_NAME}.jsonl, {out}/heldout/{DATASET_NAME}.jsonl, {out}/datasets.yaml "
        f"({s.seconds:.1f} s)",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line (registered by preprocess/__main__.py)
# --------------------------------------------------------------------------------------------------------------
def add_arguments(p: Any) -> None:
    p.add_argument("src", help="root of a Python source tree (e.g. the standard library: "
                   "python -c \"import sysconfig; print(sysconfig.get_paths()['stdlib'])\")")
    p.add_argument("--out", required=True, help="output directory (train/, heldout/, datasets.yaml)")
    p.add_argument("--heldout-fraction", type=float, default=0.2,
                   help="share of the pairs held out, whole modules at a time (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the module split and of --max-pairs (default 0)")
    p.add_argument("--min-doc-chars", type=int, default=20,
                   help="minimum length of the docstring's first paragraph (default 20)")
    p.add_argument("--max-pairs", type=int, help="subsample to at most N pairs (seeded) before the split")
    p.add_argument("--decorators", action="store_true", help="keep the functions' decorators in the passages")
    p.add_argument("--instruction", default=INSTRUCTION,
                   help=f"query instruction written to datasets.yaml ('' = none; default {INSTRUCTION!r})")
    p.add_argument("--exclude-dir", action="append", default=[], metavar="NAME",
                   help="also skip directories with this name (repeatable; test dirs, site-packages, "
                        "dist-packages, hidden dirs and __pycache__ are always skipped)")


def run_cli(args: Any) -> int:
    summary = build_code_pairs(
        CodePairsOptions(
            src=args.src, out=args.out, heldout_fraction=args.heldout_fraction, seed=args.seed,
            min_doc_chars=args.min_doc_chars, max_pairs=args.max_pairs, decorators=args.decorators,
            exclude_dirs=tuple(args.exclude_dir), instruction=args.instruction,
        )
    )
    print(summary_text(summary, args.out))
    return 0
