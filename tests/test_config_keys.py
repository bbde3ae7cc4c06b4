"""Every key a recipe accepts must have an effect: each field of the config dataclasses is read by some code."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_config_field_is_read():
    from pipeline import config

    sections = [obj for obj in vars(config).values()
                if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == config.__name__]
    assert {c.__name__ for c in sections} >= {"ModelConfig", "LossConfig", "DistillConfig", "GradCacheConfig",
                                              "DataConfig", "TrainConfig", "Config"}
    code = {path: path.read_text() for folder in ("pipeline", "launch") for path in (REPO / folder).rglob("*.py")}
    unread = []
    for section in sections:
        for field in dataclasses.fields(section):
            read = re.compile(rf"\.{field.name}\b(?!\s*[:=][^=])|getattr\([^)]*[\"']{field.name}[\"']")
            readers = [p for p, text in code.items()
                       if any(read.search(line) for line in text.splitlines()
                              if not re.match(rf"\s*{field.name}\s*:", line))]
            if not readers:
                unread.append(f"{section.__name__}.{field.name}")
    assert not unread, f"config fields no code reads (a key that changes nothing): {unread}"
