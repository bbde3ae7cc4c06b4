"""Run metrics on rank 0: TensorBoard scalars and one JSON line per logged step in ``metrics.jsonl``."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.logs import is_rank0


class MetricsWriter:
    """Writes scalars to TensorBoard and ``metrics.jsonl``; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path) -> None:
        self.enabled = is_rank0()
        self._tb = None
        self._jsonl = None
        if self.enabled:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def write(self, step: int, values: dict[str, Any], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3)}
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, step)
                record[key] = value
        self._jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
