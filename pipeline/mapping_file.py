"""Read a YAML or JSON file that holds a mapping: the one reader of the pipeline's structured input files.

Every failure is one line naming the file (or the option that named it) and what is wrong:

    <name>: cannot read <what> (<OS error>[; key <the config key naming the file>])
    <name>: invalid YAML (<the parser's first line>)          / invalid JSON (<message> at line <n>)
    <name>: expected a mapping at the top level               / expected a JSON object at the top level

raised as the caller's error type (a ValueError subclass), so that each command reports it as its own. Used for the
dataset registry (:mod:`pipeline.data.registry`), the DeepSpeed JSON (:mod:`pipeline.training.ds_config`),
``pipeline.evaluate`` results (``--compare``, :mod:`pipeline.demo_report`) and the demo's stage timings.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml

Syntax = Literal["yaml", "json"]


def _parse(text: str, syntax: Syntax) -> Any:
    """The document in `text`; ValueError with the parser's reason (one line) when it is not valid `syntax`."""
    if syntax == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"invalid YAML ({str(exc).splitlines()[0]})") from None


def read_mapping(path: str | Path, what: str, *, syntax: Syntax, error: type[ValueError] = ValueError,
                 name: str | None = None, key: str | None = None, empty_ok: bool = False) -> dict[str, Any]:
    """The mapping at the top level of the `syntax` file `path` (`what` it is, e.g. ``"registry"``, says what could
    not be read; `key`, the config key that named the file, is added to that message). Raises `error` with a
    one-line message starting with `name` (default: the path) when the file cannot be read, is not UTF-8, does not
    parse or holds something else than a mapping at the top level (an empty document is ``{}`` with `empty_ok`)."""
    where = str(path) if name is None else name
    named = "" if key is None else f"; key {key}"
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise error(f"{where}: cannot read {what} ({exc.strerror}{named})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{where}: cannot read {what} (not UTF-8 text: {exc.reason} at byte {exc.start}{named})") from None
    try:
        data = _parse(text, syntax)
    except ValueError as exc:
        raise error(f"{where}: {exc}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        top = "a JSON object" if syntax == "json" else "a mapping"
        raise error(f"{where}: expected {top} at the top level")
    return data
