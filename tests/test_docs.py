"""README.md and docs/ stay true to the tree.

* every relative link and anchor resolves (anchors as GitHub makes them from headings);
* every file named there (`launch/...`, `configs/*.yaml`, `ds_configs/*.json`, `bench/...`, `tests/...::test`,
  `pipeline/...`, `preprocess/...`) and every `python -m` module of this repository exists;
* every `--flag` named for a command - in a code block line or a code span after `python -m X`, `launch/X.sh`,
  `python bench/X.py`, ... - is in that command's `--help` (each command's help is produced once, all the Python
  ones in a single subprocess, so the test costs about one import of torch);
* docs/architecture.md's tree names every module of pipeline/ and preprocess/, every launch/ file and every bench/
  script, and names nothing that is not there;
* README stays a front page: at most 200 lines, the two set-up commands on top.

The checker functions take the text and a help lookup, so the last tests feed them broken documents and made-up flags.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_LINES = 200
SETUP_COMMANDS = (  # README's two set-up commands (CI runs the second)
    "pip install torch==2.13.0 && pip install -e '.[test]' && bash launch/demo.sh",
    "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -x -q -n 2 --dist loadfile tests",
)
OUR_PACKAGES = ("pipeline", "preprocess")
PATH_ROOTS = ("launch", "configs", "ds_configs", "bench", "tests", "pipeline", "preprocess", "docs")
# After a bare `--`, the arguments go to another command.
PASS_THROUGH = {"launch/train.sh": "launch/train.py", "launch/multinode.sh": "launch/train.py",
                "launch/slurm.sbatch": "launch/train.py", "launch/demo.sh": "launch/train.sh"}
# Commands that forward the options they do not know to another one (their --help says so).
FORWARDS = {"launch/slurm.sbatch": ("launch/multinode.sh",), "launch/preprocess.sbatch": ("preprocess build",)}
NO_COMMANDS_IN = ("yaml", "yml", "json", "python", "py", "toml", "text")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------
def split_markdown(text: str) -> tuple[list[tuple[str, list[str]]], str]:
    """(fenced code blocks as (language, lines), the prose with every block blanked out)."""
    blocks, prose, lang, body = [], [], None, []
    for line in text.splitlines():
        fence = re.match(r"\s*```(\S*)", line)
        if fence and lang is None:
            lang, body = fence.group(1).lower(), []
            prose.append("")
        elif fence:
            blocks.append((lang, body))
            lang = None
            prose.append("")
        elif lang is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def code_spans(prose: str) -> list[str]:
    return [" ".join(m.group(2).split()) for m in CODE_SPAN.finditer(prose)]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as rendered, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = text.replace("`", "").replace("**", "")
    return "".join(c for c in text.strip().lower() if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(text: str) -> set[str]:
    _, prose = split_markdown(text)
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", prose))
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def link_problems(path: Path, text: str) -> list[str]:
    """Relative links whose file is missing, or whose #anchor is not a heading of the target."""
    _, prose = split_markdown(text)
    prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), prose)
    problems = []
    for m in LINK.finditer(prose):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{_rel(path)}: link ({target})"
        if not dest.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{where}: no heading #{anchor} in {_rel(dest)}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Commands and the flags named for them
# ----------------------------------------------------------------------------------------------------------------
def command_lines(text: str) -> Iterator[str]:
    """Shell command lines: each logical line of a code block (backslash continuations joined), each code span, and
    per paragraph or list item whose code spans name exactly one command, that command followed by the spans that
    start with a flag (`python -m pipeline.gradcheck --config C` ... (`--tolerance`) ...)."""
    blocks, prose = split_markdown(text)
    for lang, body in blocks:
        if lang in NO_COMMANDS_IN:
            continue
        yield from re.sub(r"\\\n\s*", " ", "\n".join(body)).splitlines()
    for paragraph in paragraphs(prose):
        spans = code_spans(paragraph)
        yield from spans
        if paragraph.startswith("|"):  # table rows quote error messages that name other commands
            continue
        named = {name for span in spans for name, _ in commands_and_flags(span)}
        flag_spans = [span for span in spans if span.startswith("--") and span != "--"]
        if len(named) == 1 and flag_spans and help_argv(next(iter(named))):
            command = next(iter(named))
            head = f"python -m {command}" if " " in command or "/" not in command else command
            yield " ".join([head, *flag_spans])


def paragraphs(prose: str) -> list[str]:
    """Blank-line separated paragraphs, with each list item and table row on its own."""
    out: list[list[str]] = []
    for line in prose.splitlines():
        if not line.strip():
            out.append([])
        elif line.startswith(("|", "* ", "- ")) or re.match(r"\d+\. |#", line) or not out:
            out.append([line])
        else:
            out[-1].append(line)
    return ["\n".join(p) for p in out if p]


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: plain words
        return line.split("#")[0].split()


def _script(token: str) -> str | None:
    m = re.fullmatch(r"(?:\./)?((?:launch|bench|tests)/[\w.-]+\.(?:sh|py|sbatch))", token.strip("()[]\"'"))
    return m.group(1) if m else None


def commands_and_flags(line: str) -> list[tuple[str, list[str]]]:
    """[(command, [--flags named for it])] in one command line. A command is `python -m MOD [SUBCOMMAND]` (any
    launcher's `-m` / `--module` too) or a script path (launch/, bench/, tests/); flags before any command belong to
    other programs (deepspeed, torchrun, sbatch) and are skipped."""
    found: list[tuple[str, list[str]]] = []
    current: list | None = None
    depth = 0
    tokens = _tokens(line)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if " " in tok:  # a quoted command: sbatch --wrap "python -m preprocess merge ..."
            found += commands_and_flags(tok)
        elif tok in ("-m", "--module") and i + 1 < len(tokens) and \
                tokens[i + 1].split(".")[0] in OUR_PACKAGES + ("pytest",):
            if current is not None and tok == "--module":
                current[1].append(tok)
            module = tokens[i + 1]
            name = module
            if module == "preprocess" and i + 2 < len(tokens) and re.fullmatch(r"[a-z][a-z-]*", tokens[i + 2]):
                name, i = f"preprocess {tokens[i + 2]}", i + 1
            current = [name, []]
            found.append(current)
            i += 1
        elif _script(tok):
            current = [_script(tok), []]
            found.append(current)
        elif tok.lstrip("[(") == "--" and current is not None:  # `-- --resume auto`, `[-- --resume auto]`
            current = [PASS_THROUGH[current[0]], []] if current[0] in PASS_THROUGH else None
            if current is not None:
                found.append(current)
        elif tok in ("|", "||", "&&", ";") and depth == 0:
            current = None
        elif current is not None:
            m = re.match(r"[\[(]*(--[A-Za-z][\w-]*)", tok)
            if m:
                current[1].append(m.group(1))
        depth += tok.count("(") + tok.count("[") - tok.count(")") - tok.count("]")
        i += 1
    return [(name, flags) for name, flags in found]


def module_exists(module: str) -> bool:
    base = REPO / module.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def help_argv(command: str) -> list[str] | None:
    """How to ask `command` for its --help (None: not a command of this repository)."""
    if command.split()[0].split(".")[0] in OUR_PACKAGES:
        return ["-m", *command.split(), "--help"]
    if command.startswith(("launch/", "bench/")) and command.endswith(".py"):
        return [command, "--help"]
    if command.startswith("launch/"):
        return ["bash", command, "--help"]
    return None  # tests/*.py run as scripts take no --help; pytest is not ours


HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback
jobs, results, dest = json.load(sys.stdin), [], sys.argv[1]
argv0, path0 = list(sys.argv), list(sys.path)
for argv in jobs:
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            if argv[0] == "-m":  # as `python -m MOD ARGS` runs it
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:  # as `python SCRIPT ARGS` runs it: the script's directory first on sys.path
                sys.argv = list(argv)
                sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *path0]
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            code = 1
            out.write(traceback.format_exc())
        finally:
            sys.argv, sys.path[:] = argv0, path0
    results.append({"out": out.getvalue(), "code": code})
with open(dest, "w") as f:
    json.dump(results, f)
"""


def run_helps(commands: list[str]) -> dict[str, tuple[int, str]]:
    """{command: (exit code, --help output)}: the Python commands in one subprocess, shell scripts one each."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false")
    helps = {}
    python = [c for c in commands if help_argv(c)[0] != "bash"]
    if python:
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp) / "helps.json"
            proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, str(dest)], cwd=REPO, env=env, text=True,
                                  input=json.dumps([help_argv(c) for c in python]), capture_output=True, timeout=600)
            assert proc.returncode == 0 and dest.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
            results = json.loads(dest.read_text())
        for command, result in zip(python, results):
            helps[command] = (result["code"], result["out"])
    for command in commands:
        if help_argv(command)[0] == "bash":
            proc = subprocess.run(help_argv(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            helps[command] = (proc.returncode, proc.stdout + proc.stderr)
    return helps


def named_commands(files: list[Path]) -> dict[str, dict[str, list[str]]]:
    """{command: {flag: [where named]}} over the documents."""
    named: dict[str, dict[str, list[str]]] = {}
    for path in files:
        for line in command_lines(path.read_text()):
            for command, flags in commands_and_flags(line):
                entry = named.setdefault(command, {})
                for flag in flags:
                    entry.setdefault(flag, []).append(f"{path.relative_to(REPO)}: `{line[:100]}`")
    return named


def flag_problems(named: dict[str, dict[str, list[str]]],
                  help_of: Callable[[str], tuple[int, str]]) -> list[str]:
    problems = []
    for command, flags in sorted(named.items()):
        if command.split()[0].split(".")[0] in OUR_PACKAGES and "<" not in command:  # python -m pipeline.<name>
            module = command.split()[0]
            if not module_exists(module):
                problems.append(f"python -m {module}: no such module in the repository (named in "
                                f"{next(iter(flags.values()), ['docs'])[0]})")
                continue
        if help_argv(command) is None or not flags:
            continue
        code, text = help_of(command)
        if code != 0:
            problems.append(f"{command} --help failed (exit {code}): {text[-300:]}")
            continue
        for extra in FORWARDS.get(command, ()):
            text += help_of(extra)[1]
        for flag, where in sorted(flags.items()):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{command}: {flag} is not in `{command} --help` (named in {where[0]})")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Paths named in the documents
# ----------------------------------------------------------------------------------------------------------------
PATH = re.compile(rf"(?<![\w./$-])((?:{'|'.join(PATH_ROOTS)})/(?:\{{[^{{}}\s]*\}}|[^\s`'\"),;|\]{{])*)")


def _expand_braces(name: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", name)
    if not m:
        return [name]
    return [x for part in m.group(1).split(",") for x in _expand_braces(name[:m.start()] + part + name[m.end():])]


def path_problems(path: Path, text: str) -> list[str]:
    """Repository paths named anywhere in the text (code or prose) that do not exist; `tests/x.py::name` also needs
    the test function; names with placeholders (`<recipe>`, `$I`) are skipped, globs need one match."""
    problems = []
    for raw in sorted(set(PATH.findall(text))):
        name = raw.split("#")[0].rstrip(".:")  # an anchor is the link check's
        if not name or "<" in name or "$" in name or name.endswith("/"):
            continue
        file_part, _, test = name.partition("::")
        for candidate in _expand_braces(file_part):
            matches = glob.glob(str(REPO / candidate))
            where = f"{_rel(path)}: {raw}"
            if not matches:
                problems.append(f"{where}: {candidate} does not exist")
            elif test and not re.search(rf"^def {re.escape(test.split('[')[0])}\(", Path(matches[0]).read_text(), re.M):
                problems.append(f"{where}: {candidate} has no test {test}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Architecture: the tree in docs/architecture.md
# ----------------------------------------------------------------------------------------------------------------
def tree_names(block: list[str]) -> tuple[set[str], list[str]]:
    """(repository paths a tree names, the names of its name column that do not exist). A line is `NAME[, NAME]
    description`, indented two spaces per folder level; file names in the description count as named when they
    exist in that folder; deeper indented lines continue a description."""
    named, missing, folders = set(), [], {}
    for line in block:
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent % 2 or indent > 8:
            continue
        level = indent // 2
        parent = "".join(folders[k] for k in range(level)) if all(k in folders for k in range(level)) else None
        if parent is None:
            continue
        column, _, description = line.strip().partition("  ")
        for name in [n.strip() for n in column.split(",") if n.strip()]:
            if name.endswith("/"):
                folders[level] = name
                for deeper in [k for k in folders if k > level]:
                    del folders[deeper]
            full = parent + name
            named.add(full.rstrip("/"))
            if not (REPO / full).exists():
                missing.append(full)
        folder = parent + (folders[level] if column.endswith("/") else "")
        for word in re.findall(r"[\w.-]+\.(?:py|sh|sbatch|json|yaml|example)\b", description):
            if (REPO / folder / word).exists():
                named.add(folder + word)
    return named, missing


def architecture_problems(text: str, required: list[str]) -> list[str]:
    blocks, _ = split_markdown(text)
    named, missing = set(), []
    for lang, body in blocks:
        if lang == "":
            n, m = tree_names(body)
            named |= n
            missing += m
    problems = [f"docs/architecture.md names {m}, which does not exist" for m in missing]
    problems += [f"{r} is not in docs/architecture.md's tree" for r in required if r not in named]
    return problems


def files_the_tree_must_name() -> list[str]:
    files = [p for folder in OUR_PACKAGES for p in (REPO / folder).rglob("*.py")
             if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts]
    files += [p for p in (REPO / "launch").iterdir() if p.is_file()]
    files += list((REPO / "bench").glob("*.py"))
    return sorted(str(p.relative_to(REPO)) for p in files)


# ----------------------------------------------------------------------------------------------------------------
# The documents as they are
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _named() -> dict[str, dict[str, list[str]]]:
    return named_commands(doc_files())


def test_readme_is_a_front_page_with_the_two_setup_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES, f"README.md has {len(text.splitlines())} lines (front page: " \
                                                   f"at most {README_LINES}; move the detail into docs/)"
    first_block = split_markdown(text)[0][0][1]
    commands = [line for line in first_block if line and not line.startswith("#")]
    assert tuple(commands) == SETUP_COMMANDS


def test_every_relative_link_and_anchor_resolves():
    problems = [p for path in doc_files() for p in link_problems(path, path.read_text())]
    assert not problems, "\n".join(problems)


def test_every_named_file_and_module_exists():
    problems = [p for path in doc_files() for p in path_problems(path, path.read_text())]
    problems += [p for p in flag_problems({c: {} for c in _named()}, lambda c: (0, "")) if "no such module" in p]
    assert not problems, "\n".join(problems)


def test_every_flag_named_for_a_command_is_in_its_help():
    named = _named()
    wanted = sorted({c for c, flags in named.items() if flags and help_argv(c)} |
                    {f for c, flags in named.items() if flags for f in FORWARDS.get(c, ())})
    wanted = [c for c in wanted if not (c.split()[0].split(".")[0] in OUR_PACKAGES
                                        and not module_exists(c.split()[0]))]
    helps = run_helps(wanted)
    problems = flag_problems(named, lambda c: helps[c])
    assert not problems, "\n".join(problems)


def test_architecture_tree_matches_the_source_tree():
    problems = architecture_problems((REPO / "docs" / "architecture.md").read_text(), files_the_tree_must_name())
    assert not problems, "\n".join(problems)


def test_readme_architecture_map_names_only_what_exists():
    blocks, _ = split_markdown((REPO / "README.md").read_text())
    maps = [body for lang, body in blocks if lang == "" and body and body[0].startswith("pipeline/")]
    assert maps, "README.md has no architecture map (a plain code block starting with pipeline/)"
    _, missing = tree_names(maps[0])
    assert not missing, f"README.md's architecture map names what does not exist: {missing}"


# ----------------------------------------------------------------------------------------------------------------
# The checker catches what it is for
# ----------------------------------------------------------------------------------------------------------------
BROKEN = """# Title

## A section
See [the section](#a-section), [data](data.md#raw-data), [gone](nowhere.md), [bad anchor](data.md#no-such-heading)
and [here](#not-here); `[not a link](nowhere.md)` is code.

```bash
python -m preprocess build --raw RAW --out SHARDS --made-up-flag 3   # a comment --not-a-flag
launch/train.sh --config configs/tiny-cpu.yaml -- --resume auto --resume-typo
python -m pipeline.no_such_module --x
```
`python -m pipeline.evaluate --model M (--data D | --beir B) [--invented]` and configs/no-such.yaml,
`configs/f2llm-v{1,2}-0.6b.yaml`, `configs/<recipe>.yaml`, tests/test_docs.py::test_no_such_test.
"""


def test_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "data.md").write_text("# Data\n\n## Raw data\n")
    page = tmp_path / "page.md"
    page.write_text(BROKEN)
    problems = [p.split(": ", 1)[1] for p in link_problems(page, page.read_text())]
    assert problems == ["link (nowhere.md): nowhere.md does not exist",
                        "link (data.md#no-such-heading): no heading #no-such-heading in data.md",
                        "link (#not-here): no heading #not-here in page.md"]


def test_checker_finds_missing_files_modules_and_tests():
    page = REPO / "docs" / "page.md"  # not written: the text is passed in
    problems = path_problems(page, BROKEN)
    assert any("configs/no-such.yaml does not exist" in p for p in problems), problems
    assert any("has no test test_no_such_test" in p for p in problems), problems
    assert not any("f2llm" in p or "recipe" in p for p in problems), problems  # braces expanded, placeholders skipped
    named = named_commands_of(BROKEN)
    assert any("pipeline.no_such_module: no such module" in p for p in flag_problems(named, lambda c: (0, ""))), named


def named_commands_of(text: str) -> dict[str, dict[str, list[str]]]:
    named: dict[str, dict[str, list[str]]] = {}
    for line in command_lines(text):
        for command, flags in commands_and_flags(line):
            for flag in flags:
                named.setdefault(command, {}).setdefault(flag, []).append(line)
            named.setdefault(command, {})
    return named


def test_checker_attributes_flags_to_their_command_and_finds_made_up_ones():
    named = named_commands_of(BROKEN)
    assert set(named["preprocess build"]) == {"--raw", "--out", "--made-up-flag"}  # not the comment's
    assert set(named["launch/train.sh"]) == {"--config"}
    assert set(named["launch/train.py"]) == {"--resume", "--resume-typo"}  # after `--`: the trainer's
    assert set(named["pipeline.evaluate"]) == {"--model", "--data", "--beir", "--invented"}
    helps = {"preprocess build": "usage: ... --raw RAW --out OUT [--max-len N]",
             "launch/train.sh": "Usage: launch/train.sh --config CONFIG",
             "launch/train.py": "usage: train.py [--resume RESUME] [--resume-force]",
             "pipeline.evaluate": "usage: evaluate.py --model M [--data D] [--beir B ...]",
             "pipeline.no_such_module": ""}
    problems = flag_problems(named, lambda c: (0, helps[c]))
    flagged = sorted(re.findall(r": (--[\w-]+) is not in", "\n".join(problems)))
    assert flagged == ["--invented", "--made-up-flag", "--resume-typo"], problems
    assert flag_problems({"launch/train.sh": {"--config": ["x"]}}, lambda c: (2, "boom")) == \
        ["launch/train.sh --help failed (exit 2): boom"]


def test_checker_compares_the_tree_with_the_files():
    tree = ["pipeline/                  the library",
            "  config.py                the recipe (see logs.py)",
            "  data/                    shards",
            "    shards.py              reader",
            "                           continued description naming nothing.py",
            "  no_such.py               gone"]
    problems = architecture_problems("```\n" + "\n".join(tree) + "\n```\n",
                                     ["pipeline/config.py", "pipeline/logs.py", "pipeline/data/shards.py",
                                      "pipeline/merge.py"])
    assert problems == ["docs/architecture.md names pipeline/no_such.py, which does not exist",
                        "pipeline/merge.py is not in docs/architecture.md's tree"]
