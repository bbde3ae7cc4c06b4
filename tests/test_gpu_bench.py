"""bench/gpu_bench.py's CPU dry run: the GPU benchmark's whole code path (varlen check, seed step, ours, fit) on a
tiny Qwen3, so the script is known to run before a GPU is at hand; the 4B section's sizing arithmetic and the GPUs'
peak FLOP/s, which need no GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QWEN3_4B_PARAMS = 4_022_468_096  # bench/gpu_bench.py's QWEN3_4B shape, embedding table included
BUCKET = int(5e8 * 4)  # ds_configs/zero3.json's reduce_bucket_size, fp32


def dry_run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "dry.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py", "--dry-run", *args, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_memory_release(result: dict) -> None:
    """Every engine released: the ZeRO-2 ones (seed, ours) collected once the benchmark dropped its references; one
    that DeepSpeed keeps referenced (ZeRO-3) emptied instead."""
    releases = result["memory_release"]
    assert set(releases) == {"seed", "ours", "ours_zero3", "big_model"}
    assert releases["seed"]["engine_collected"] and releases["ours"]["engine_collected"]
    for name, release in releases.items():
        assert release["engine_collected"] or release["bytes_emptied"] > 0, name
        assert release["memory_allocated_gib"] is None  # CPU: nothing to measure
    sections = list(result)
    # kernels none before the first liger-patched model (liger's RoPE is process-wide with eager layers)
    assert sections.index("seed") < sections.index("bf16_gradcheck") < sections.index("ours")


def test_gpu_bench_dry_run_compiled(tmp_path):
    """Every section with ours compiled, except the global-batch-4096 step (fit), whose compiled CPU run alone takes
    minutes; fit runs eagerly in the next test. The 4B section runs its smallest setting (no coalescing, gradient
    checkpointing), compiled."""
    result = dry_run(tmp_path, "--compile", "true", "--skip-fit", "--big-setting", "no-coalescing-checkpointing")
    check = result["varlen_check"]
    assert check["ok"] and check["attn_implementation"] == "varlen" and check["weight_matrices_compared"] >= 10
    seed, ours = result["seed"], result["ours"]
    nogc, zero3, big = result["ours_without_gradcache"], result["ours_zero3"], result["big_model"]
    assert "fit" not in result
    assert seed["sequences_per_step"] == 4 * 9 and ours["sequences_per_step"] == 16 * 9
    assert seed["computed_tokens_per_step"] > seed["real_tokens_per_step"]  # one right-padded tensor
    for r in (ours, nogc, zero3):
        # packed, compiled with a dynamic token dimension: nothing is padded
        assert r["status"] == "ok" and r["computed_tokens_per_step"] == r["real_tokens_per_step"]
        assert r["chunks_per_step"] > 1 and r["recompiles"] == 0
    assert ours["extra_forward"] and not nogc["extra_forward"]
    for r in (seed, ours, nogc, zero3, big["result"]):
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and len(r["step_seconds"]) >= 1
    assert big["largest_global_batch"] == 32 and big["tried"] == {"32": "ok"}
    assert big["sizing"]["setting"] == "no-coalescing-checkpointing" and big["sizing"]["chunk_tokens"] == 1024
    assert big["sizing"]["checkpointing"] and not big["sizing"]["coalesce"]
    assert big["result"]["chunks_per_step"] > 1
    check_memory_release(result)
    assert result["bf16_gradcheck"]["exit_code"] == 0
    assert result["bf16_gradcheck"]["result"].startswith("bf16 relative gradient error: cached ")
    for key in ("ratio_samples_per_s", "gradcache_time_per_sample_ratio", "zero3_vs_zero2_samples_per_s"):
        assert result[key] > 0


def test_gpu_bench_dry_run_eager_with_fit(tmp_path):
    """The eager path of every section, the global-batch-4096 step included: packed chunks, no padding."""
    result = dry_run(tmp_path, "--compile", "false")
    for name in ("ours", "fit", "ours_without_gradcache", "ours_zero3"):
        r = result[name]
        assert r["status"] == "ok" and r["computed_tokens_per_step"] == r["real_tokens_per_step"], name
        assert r["chunks_per_step"] > 1 and r["recompiles"] is None and r["samples_per_s"] > 0
    assert result["fit"]["chunks_per_step"] > result["ours"]["chunks_per_step"]
    assert result["bf16_gradcheck"]["exit_code"] == 0
    sizing = result["big_model"]["sizing"]
    assert sizing["setting"] == "defaults" and sizing["reason"] == "not sized: no GPU memory on cpu"
    check_memory_release(result)


def test_gpu_bench_refuses_to_run_without_a_gpu_unless_dry():
    import torch

    if torch.cuda.is_available():  # this check is about CPU machines; on a GPU the full run is the test
        return
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "use --dry-run" in proc.stderr



def per_token(no_checkpointing: float, checkpointing: float):
    """An activation measurement: bytes per chunk token without and with gradient checkpointing."""
    return lambda ckpt, tokens: int(tokens * (checkpointing if ckpt else no_checkpointing))


CHUNKS = [16384, 8192, 4096, 2048, 1024]


def test_big_model_sizing_h100_h200_and_too_small():
    """The 4B model: 24 bytes per parameter with the trainer's defaults (97 GB: no H100 batch fits), 18 without
    coalesced reduction; on an H100 (80 GB, 90% usable) only coalescing off with gradient checkpointing leaves room
    for a chunk, on an H200 the defaults fit with a smaller chunk, on a 40 GB GPU nothing does (skipped, reasons
    recorded)."""
    from bench.gpu_bench import fixed_bytes, size_big_model

    assert fixed_bytes(QWEN3_4B_PARAMS, coalesce=True, bucket_bytes=0) == 24 * QWEN3_4B_PARAMS
    assert fixed_bytes(QWEN3_4B_PARAMS, coalesce=False, bucket_bytes=BUCKET) == 18 * QWEN3_4B_PARAMS + BUCKET
    measure = per_token(4.8e6, 0.3e6)
    h100 = size_big_model(QWEN3_4B_PARAMS, int(85_520_809_984 * 0.9), measure, CHUNKS, bucket_bytes=BUCKET)
    assert (h100.setting, h100.coalesce, h100.checkpointing, h100.chunk_tokens) == (
        "no-coalescing-checkpointing", False, True, 8192)
    assert "defaults: weights, optimizer and gradients alone take 91.8 GiB" in h100.reason
    assert "no-coalescing: no chunk of >= 1024 tokens fits" in h100.reason
    h200 = size_big_model(QWEN3_4B_PARAMS, int(150_109_880_320 * 0.9), measure, CHUNKS, bucket_bytes=BUCKET)
    assert (h200.setting, h200.chunk_tokens) == ("defaults", 4096)
    assert h200.fixed_gib + h200.activations_gib <= h200.usable_gib
    small = size_big_model(QWEN3_4B_PARAMS, int(42_298_834_944 * 0.9), measure, CHUNKS, bucket_bytes=BUCKET)
    assert small.setting is None and small.chunk_tokens is None
    assert small.reason.startswith("does not fit in 35.5 GiB usable: defaults: ")
    assert small.reason.count("alone take") == 3


def test_big_model_sizing_skips_chunks_that_ran_out_of_memory():
    from bench.gpu_bench import size_big_model

    def measure(ckpt: bool, tokens: int) -> int | None:
        return None if tokens > 2048 else tokens * 1000  # a measurement that ran out of memory is None

    sizing = size_big_model(10**9, 10**12, measure, CHUNKS, bucket_bytes=0)
    assert (sizing.setting, sizing.chunk_tokens) == ("defaults", 2048)


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
])
def test_peak_flops_by_device_name(name, tflops):
    """Dense bf16 peak by torch.cuda.get_device_name(): the H100's PCIe and NVL forms are slower than its SXM form."""
    from pipeline.training.metrics import peak_flops

    assert peak_flops(name) == pytest.approx(tflops * 1e12)
    assert peak_flops("NVIDIA GeForce RTX 3090") is None

