"""Launch `launch/train.py` under the deepspeed launcher (2 CPU processes) from tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-cpu.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(overrides: list[str], *, nproc: int = 2, config: Path = TINY, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(free_port()), str(REPO / "launch" / "train.py"), "--config", str(config)]
    if resume:
        cmd += ["--resume", "auto"]
    return cmd + overrides


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}"
    return e


def run_training(overrides: list[str], *, timeout: int = 420, resume: bool = False, log: Path | None = None,
                 config: Path = TINY, nproc: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(overrides, nproc=nproc, resume=resume, config=config), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def start_training(overrides: list[str], *, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen(train_command(overrides), cwd=REPO, env=env(), stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def web_search_overrides(shards: Path, out: Path, *, steps: int, save_every: int, eval_every: int,
                         **extra: str) -> list[str]:
    """Overrides of the end-to-end trainer tests: tiny-cpu on the example shards' web_search dataset (33 held-out
    queries: 2 validation batches of 16), one DataLoader worker per rank, lr 1e-3 -> 1e-4, a metrics line per step."""
    values = {
        "data.shards": str(shards),
        "data.datasets": "[web_search]",
        "data.validation_fraction": "0.11",
        "data.num_workers": "1",
        "train.output_dir": str(out),
        "train.max_steps": str(steps),
        "train.lr": "1e-3",
        "train.min_lr": "1e-4",
        "train.warmup_steps": "1",
        "train.log_every": "1",
        "train.save_every": str(save_every),
        "train.eval_every": str(eval_every),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def export_weights(export_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(export_dir / "model.safetensors"))


def transformers_embeddings(export_dir: Path, texts: list[str], *, mean: bool = False, max_length: int = 64
                            ) -> list[tuple[list[int], Any]]:
    """Each of `texts` embedded on its own by plain transformers from an exported model directory, as a user
    without this library would: (its token ids, truncated to `max_length`; the L2-normalised last hidden state at
    its final (EOS) token, or with `mean` the mean over its tokens)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(export_dir))
    hf = AutoModel.from_pretrained(str(export_dir)).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
            h = hf(**ids).last_hidden_state[0]
            out.append((ids["input_ids"][0].tolist(), torch.nn.functional.normalize(h.mean(0) if mean else h[-1],
                                                                                    dim=-1)))
    return out


def resume_matches_reference(args: list[str], out: Path, reference_run: Path, *, resumed_from: int, steps: int,
                             log: Path) -> None:
    """Run `args` with --resume auto; its losses (steps resumed_from+1..steps) must equal the reference run's and
    its final export must equal the reference's up to fp32 rounding (relative L2 distance <= 1e-6 per tensor)."""
    import pytest

    before = len((out / "metrics.jsonl").read_text().splitlines())
    run_training(args, resume=True, log=log)
    lines = (out / "metrics.jsonl").read_text().splitlines()[before:]
    resumed = {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}
    reference = train_losses(reference_run)
    assert sorted(resumed) == list(range(resumed_from + 1, steps + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-6), (step, loss, reference[step])
    ours, theirs = export_weights(out / "export" / "final"), export_weights(reference_run / "export" / "final")
    assert ours.keys() == theirs.keys()
    for name in ours:
        rel = (ours[name] - theirs[name]).norm() / theirs[name].norm()
        assert rel <= 1e-6, (name, float(rel))


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (the last record of a step wins)."""
    out: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
        if rec.get("split") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
