"""pipeline.mapping_file.read_mapping: the one reader of YAML / JSON mapping files, one-line errors naming the file."""
from __future__ import annotations

import pytest

from pipeline.mapping_file import read_mapping


class Custom(ValueError):
    pass


def test_reads_a_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("datasets:\n  web: {type: retrieval}\n")
    (tmp_path / "a.json").write_text('{"stage": 3}')
    assert read_mapping(tmp_path / "a.yaml", "registry", syntax="yaml") == {"datasets": {"web": {"type": "retrieval"}}}
    assert read_mapping(tmp_path / "a.json", "DeepSpeed config", syntax="json") == {"stage": 3}


@pytest.mark.parametrize("syntax, content, expected", [
    ("yaml", None, "{path}: cannot read DeepSpeed config (No such file or directory; key deepspeed)"),
    ("yaml", b"datasets: [unclosed", "{path}: invalid YAML (while parsing a flow sequence"),
    ("yaml", b"- a\n- b\n", "{path}: expected a mapping at the top level"),
    ("yaml", b"", "{path}: expected a mapping at the top level"),
    ("json", b'{"a": 1,}', "{path}: invalid JSON (Expecting property name enclosed in double quotes at line 1)"),
    ("json", b"[1]", "{path}: expected a JSON object at the top level"),
    ("json", b"\xff\xfe{}",
     "{path}: cannot read DeepSpeed config (not UTF-8 text: invalid start byte at byte 0; key deepspeed)"),
])
def test_errors_are_one_line_naming_the_file(tmp_path, syntax, content, expected):
    path = tmp_path / f"f.{syntax}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(Custom) as err:
        read_mapping(path, "DeepSpeed config", syntax=syntax, error=Custom, key="deepspeed")
    message = str(err.value)
    assert "\n" not in message and message.startswith(expected.format(path=path)), message


def test_the_name_replaces_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"^--compare x.json: cannot read evaluation result \(No such file"):
        read_mapping(tmp_path / "x.json", "evaluation result", syntax="json", name="--compare x.json")
