"""docs/config.md is the config reference generated from the dataclasses of pipeline/config.py.

Every key's type, default and one line of meaning live next to the field (``doc_field(default, "meaning")``);
``python -m pipeline.config --reference`` prints the reference. These tests fail when docs/config.md is stale (with the
command that regenerates it) or when a field has no line of meaning.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import REFERENCE_COMMAND, Config, config_keys, doc_field, reference_markdown, undocumented_keys

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "config.md"


def test_docs_config_md_is_the_generated_reference():
    assert REFERENCE.read_text() == reference_markdown(), \
        f"docs/config.md is stale: regenerate it with `{REFERENCE_COMMAND}` (from the repository root)"


def test_every_config_field_has_one_line_of_meaning():
    missing = undocumented_keys()
    assert not missing, f"config keys without a doc line (declare them with doc_field(default, \"meaning\") in " \
                        f"pipeline/config.py, then run `{REFERENCE_COMMAND}`): {missing}"


def test_reference_lists_every_key_of_every_section_with_type_and_default():
    rows = {row.key: row for row in config_keys()}
    sections = [obj for obj in vars(config).values()
                if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == config.__name__]
    reachable = {row.section for row in rows.values() if row.section} | {Config}
    assert set(sections) == reachable, "a config dataclass that the recipe does not reach, or one it reaches " \
                                       "outside pipeline/config.py"
    text = reference_markdown()
    for key, row in rows.items():
        assert f"| `{key}` | " in text
    assert (rows["train.lr"].type, rows["train.lr"].default) == ("float", "8e-6")
    assert (rows["model.compile"].type, rows["model.compile"].default) == ("bool / auto", "auto")
    chunk_tokens = rows["gradcache.chunk_tokens"]
    assert (chunk_tokens.type, chunk_tokens.default) == ("int / auto / null", "8192")
    assert rows["loss.distill.teacher"].default == "required"
    assert rows["loss.hard_negatives"].default == "{retrieval: 7, clustering: 9, classification: 1}"
    assert rows["model.lora"].section is config.LoraConfig and "model.lora.r" in rows


def test_defaults_and_validation_are_unchanged_by_the_doc_fields():
    """doc_field is dataclasses.field with metadata: the same defaults, fresh lists per config, required keys."""
    a, b = Config(), Config()
    assert a.train.betas == [0.9, 0.98] and a.train.betas is not b.train.betas
    assert a.loss.hard_negatives is not b.loss.hard_negatives and a.model is not b.model
    assert a.deepspeed == "ds_configs/zero3.json" and a.model.lora is None
    with pytest.raises(config.ConfigError, match=r"loss\.distill\.teacher: required value is missing"):
        config.config_from_dict({"loss": {"distill": {"weight": 1.0}}})


@dataclasses.dataclass
class _Section:
    documented: int = doc_field(1, "has its line")
    bare: int = 2
    blank: str = doc_field("x", "  ")


@dataclasses.dataclass
class _Root:
    section: _Section = doc_field(_Section, "a section")
    nested: _Section | None = None


def test_a_field_without_a_doc_line_is_found():
    assert undocumented_keys(_Root) == ["section.bare", "section.blank", "nested", "nested.bare", "nested.blank"]


def test_cli_prints_the_reference_and_help():
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-m", "pipeline.config", "--reference"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out == REFERENCE.read_text()
    help_text = subprocess.run([sys.executable, "-m", "pipeline.config", "--help"], cwd=REPO, env=env,
                               capture_output=True, text=True, check=True).stdout
    assert "--reference" in help_text and REFERENCE_COMMAND in help_text
