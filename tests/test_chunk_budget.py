"""gradcache.chunk_tokens on a GPU, checked on CPU: the reserve of the optimizer and gradients (trainable parameters,
ZeRO stage, offload), auto's probe with its fallback and errors (memory query and chunk peaks injected), an explicit
number checked at start, and the distillation teacher loaded before the probe."""
from __future__ import annotations

import logging

import pytest
import torch

from helpers_model import REPO, one_torch_thread, tiny_model

GIB = 2**30
QWEN3_4B = 4_022_468_096  # Qwen3-4B's parameters
# LoRA r 16 on every linear layer of Qwen3-4B's 36 layers (hidden 2560, q 32 x 128, k/v 8 x 128, MLP 9728):
# r x (in + out) each
LORA_R16 = 36 * 16 * (2 * (2560 + 4096) + 2 * (2560 + 1024) + 3 * (2560 + 9728))
ZERO2, ZERO3_OFFLOAD = (str(REPO / "ds_configs" / f"{name}.json") for name in ("zero2", "zero3_offload"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def _run_ds_config(deepspeed: str, world: int = 1) -> dict:
    """The DeepSpeed config a bf16 GPU run of the tiny recipe with `deepspeed` gets (the trainer's)."""
    from pipeline.config import load_config
    from pipeline.training.ds_config import training_ds_config

    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [f"deepspeed={deepspeed}"])
    return training_ds_config(cfg, world_size=world, device_type="cuda")


def _residency(stage: int, *, offload: dict | None = None, coalesce: bool = True):
    from pipeline.training.chunk_budget import optimizer_residency

    zero = {"stage": stage, **({"offload_optimizer": offload} if offload else {})}
    return optimizer_residency({"zero_optimization": zero, "bf16": {"enabled": True},
                                "data_types": {"grad_accum_dtype": "fp32"}}, coalesce=coalesce)


def _reserve(trainable: int, world: int, residency) -> int:
    """bf16 parameters, fp32 sums where the gradients stay on the parameters (as resolve_chunk_tokens decides)."""
    from pipeline.training.chunk_budget import optimizer_reserve_bytes

    return optimizer_reserve_bytes(trainable, world, residency, param_bytes=2, fp32_sums=residency.coalesced)


def test_lora_qwen3_4b_reserve_fits_on_one_80gb_gpu():
    from pipeline.training.chunk_budget import HEADROOM, optimizer_residency

    assert LORA_R16 == 33_030_144
    zero2 = optimizer_residency(_run_ds_config(ZERO2), coalesce=True)
    assert (zero2.stage, zero2.on_gpu, zero2.coalesced) == (2, 1.0, True)
    reserve = _reserve(LORA_R16, 1, zero2)
    assert reserve == LORA_R16 * 22 < 0.75e9  # 12 Adam + 4 fp32 gradient + 2 bf16 gradient + 4 fp32 sums
    assert (80e9 - reserve) * (1 - HEADROOM) > 71e9
    assert _reserve(QWEN3_4B, 1, zero2) > 88e9  # every parameter counted (before): more than the GPU


def test_offloaded_optimizer_has_no_gpu_reserve():
    from pipeline.training.chunk_budget import optimizer_residency

    offload = optimizer_residency(_run_ds_config(ZERO3_OFFLOAD, world=8), coalesce=True)
    assert (offload.stage, offload.on_gpu, offload.coalesced) == (3, 0.0, True)
    assert _reserve(QWEN3_4B, 8, offload) == QWEN3_4B * (2 + 4)  # the step's bf16 gradients and their fp32 sums
    reduced = optimizer_residency(_run_ds_config(ZERO3_OFFLOAD, world=8), coalesce=False)
    assert _reserve(QWEN3_4B, 8, reduced) == QWEN3_4B * 2 // 8  # each backward reduced into the partition
    assert _reserve(8_000_000, 8, _residency(1, offload={"device": "cpu"})) == 8_000_000 * (2 + 4)
    nvme = {"device": "nvme", "nvme_path": "/tmp"}
    assert _reserve(8_000_000, 8, _residency(3, offload=nvme)) == 8_000_000 * (2 + 4)
    partial = _residency(3, offload={"device": "cpu", "ratio": 0.25})  # 3/4 of the optimizer stays on the GPU
    assert partial.on_gpu == 0.75
    assert _reserve(8_000_000, 8, partial) == 8_000_000 * (0.75 * (12 + 4) / 8 + 2 + 4)


@pytest.mark.parametrize("stage, world, per_param", [
    (0, 1, 12 + 4 + 2), (0, 8, 12 + 4 + 2),  # no ZeRO: nothing partitioned, no coalesced reduction
    (1, 1, 12 + 4 + 2), (1, 8, 12 / 8 + 4 + 2),  # BF16_Optimizer: optimizer states partitioned, fp32 gradient whole
    (2, 1, 12 + 4 + 2 + 4), (2, 8, (12 + 4) / 8 + 2 + 4),  # fp32 gradient partitioned; coalesced bf16 grads + sums
    (3, 1, 12 + 4 + 2 + 4), (3, 8, (12 + 4) / 8 + 2 + 4),
])
def test_reserve_by_zero_stage_and_world_size(stage, world, per_param):
    trainable = 8_000_000
    assert _reserve(trainable, world, _residency(stage)) == int(trainable * per_param)
    if stage >= 2:  # not coalesced: each backward's gradients reduced into the rank's partition
        assert _reserve(trainable, world, _residency(stage, coalesce=False)) == int(trainable * 18 / world)


def test_plain_module_reserve_is_its_gradients():
    from pipeline.training.chunk_budget import OptimizerResidency, optimizer_reserve_bytes

    plain = OptimizerResidency.plain()
    assert optimizer_reserve_bytes(1000, 4, plain, param_bytes=2, fp32_sums=True) == 1000 * (2 + 4)
    assert optimizer_reserve_bytes(1000, 4, plain, param_bytes=4, fp32_sums=False) == 1000 * 4


# --- the probe, on a fake GPU: free memory and each chunk's peak injected ------------------------------------------
CUDA = torch.device("cuda", 0)  # only the code path: every GPU query is injected


def _oom(tokens: int) -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {tokens} KiB.\nGPU 0 has a total "
                                       "capacity of 1 GiB")


class FakeGpu:
    """Chunk peaks of `bytes_per_token` per token; out of memory above `oom_above` tokens. Records the sizes run."""

    def __init__(self, bytes_per_token: int = 1000, oom_above: int | None = None) -> None:
        self.bytes_per_token, self.oom_above, self.runs = bytes_per_token, oom_above, []

    def __call__(self, tokens: int) -> int:
        self.runs.append(tokens)
        if self.oom_above is not None and tokens > self.oom_above:
            raise _oom(tokens)
        return tokens * self.bytes_per_token


@pytest.fixture(scope="module")
def frozen_model():
    """The tiny model with nothing trainable: no reserve, so the budget is 90% of the free memory."""
    model = tiny_model()
    model.requires_grad_(False)
    return model


def _resolve(model, gc, gpu, free: int, **kwargs):
    from pipeline.training.chunk_budget import resolve_chunk_tokens

    return resolve_chunk_tokens(gc, model, CUDA, max_len=64, world_size=1, free_memory=lambda: free, peak=gpu,
                                **kwargs)


def test_auto_takes_the_largest_chunk_that_fits(frozen_model, pipeline_log):
    from pipeline.config import GradCacheConfig

    gpu = FakeGpu(oom_above=20_000)
    choice = _resolve(frozen_model, GradCacheConfig(chunk_tokens="auto"), gpu, free=10_000_000)  # budget 9.0 MB
    assert choice.gradcache.chunk_tokens == 8192 and choice.fallback is None
    assert gpu.runs == [131072, 65536, 32768, 16384, 8192]
    assert not [r for r in pipeline_log.records if r.levelno >= logging.WARNING]
    assert "gradcache.chunk_tokens auto: 8192 (the largest power of two" in pipeline_log.text
    gpu = FakeGpu()
    assert _resolve(frozen_model, GradCacheConfig(chunk_tokens="auto"), gpu, free=10_000_000,
                    work_tokens=3000).gradcache.chunk_tokens == 4096  # the ceiling: the work per step
    assert gpu.runs == [4096]


def test_auto_counts_trainable_parameters_only():
    """All of the tiny model's 2.0M parameters would reserve ~41 MB (more than the 20 MB free); its trainable final
    norm reserves nothing to speak of, so 16384 tokens (16.4 MB) fit."""
    from pipeline.config import GradCacheConfig
    from pipeline.training.chunk_budget import optimizer_reserve_bytes, OptimizerResidency

    model = tiny_model()
    everything = sum(p.numel() for p in model.parameters())
    assert optimizer_reserve_bytes(everything, 1, OptimizerResidency(), param_bytes=4, fp32_sums=False) > 20_000_000
    model.requires_grad_(False)
    model.backbone.norm.requires_grad_(True)
    choice = _resolve(model, GradCacheConfig(chunk_tokens="auto"), FakeGpu(), free=20_000_000)
    assert choice.gradcache.chunk_tokens == 16384 and choice.fallback is None


def test_auto_falls_back_to_the_smallest_candidate_that_ran(frozen_model, pipeline_log):
    from pipeline.config import GradCacheConfig

    gpu = FakeGpu(oom_above=4096)
    choice = _resolve(frozen_model, GradCacheConfig(chunk_tokens="auto"), gpu, free=1_000_000)  # budget 0.9 MB
    assert choice.gradcache.chunk_tokens == 1024 and gpu.runs[-1] == 1024
    fallback = choice.fallback
    assert fallback.setting == "gradcache.chunk_tokens"
    assert fallback.fallback == ("chunk_tokens 1024, the smallest candidate, which ran without running out of memory "
                                 "but peaked above the estimated budget")
    assert fallback.error.startswith("ValueError: no candidate chunk peaked within the estimated budget of 0.00 GiB")
    assert "the smallest, 1024 tokens, peaked at 0.00 GiB" in fallback.error and "x 0.90" in fallback.error
    warnings = [r for r in pipeline_log.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [fallback.describe()]
    assert "gradcache.chunk_tokens: auto failed (ValueError: no candidate chunk" in warnings[0].getMessage()


def test_auto_stops_when_even_the_smallest_runs_out_of_memory(frozen_model):
    from pipeline.config import GradCacheConfig

    with pytest.raises(ValueError) as err:
        _resolve(frozen_model, GradCacheConfig(chunk_tokens="auto"), FakeGpu(oom_above=512), free=10_000_000)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("gradcache.chunk_tokens: auto found no chunk that fits: even the smallest candidate, "
                              "1024 tokens, ran out of GPU memory (OutOfMemoryError: CUDA out of memory. Tried to "
                              "allocate 1024 KiB. GPU 0 has")
    assert message.endswith("use model.gradient_checkpointing, DeepSpeed offload (deepspeed: "
                            "ds_configs/zero3_offload.json) or model.lora")


def test_explicit_chunk_tokens_checked_on_the_gpu(frozen_model, pipeline_log):
    from pipeline.config import GradCacheConfig

    gc = GradCacheConfig(chunk_tokens=16384)
    gpu = FakeGpu()
    assert _resolve(frozen_model, gc, gpu, free=1).gradcache is gc  # peaks above a budget: it ran, so it stays
    assert gpu.runs == [16384]
    assert "gradcache.chunk_tokens 16384: one forward + backward of a chunk of 16384 tokens ran" in pipeline_log.text
    with pytest.raises(ValueError) as err:
        _resolve(frozen_model, gc, FakeGpu(oom_above=8192), free=10**12)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("gradcache.chunk_tokens: 16384 failed (OutOfMemoryError: CUDA out of memory.")
    assert message.endswith("; set it to auto (the largest chunk that fits) or smaller")


def test_no_gpu_nothing_is_probed(frozen_model):
    from pipeline.config import GradCacheConfig
    from pipeline.training.chunk_budget import resolve_chunk_tokens

    def peak(tokens: int) -> int:
        raise AssertionError("no chunk is run without a GPU")

    gc = GradCacheConfig(chunk_tokens=65536)
    cpu = torch.device("cpu")
    assert resolve_chunk_tokens(gc, frozen_model, cpu, max_len=64, world_size=1, peak=peak).gradcache is gc
    auto = resolve_chunk_tokens(GradCacheConfig(chunk_tokens="auto"), frozen_model, cpu, max_len=64, world_size=1,
                                peak=peak)
    assert auto.gradcache.chunk_tokens == 8192 and auto.fallback is None


def test_ranks_agree_in_one_collective(frozen_model, pipeline_log):
    """Another rank's outcome (what the element-wise maximum brings in): its smaller chunk, its fallback or its
    out-of-memory error is every rank's; each path makes exactly one collective."""
    from pipeline.config import GradCacheConfig

    auto = GradCacheConfig(chunk_tokens="auto")

    def other_rank(values: list[int]):
        calls: list[list[int]] = []

        def agree(mine: list[int]) -> list[int]:
            calls.append(mine)
            return [max(a, b) for a, b in zip(mine, values)]
        return agree, calls

    agree, calls = other_rank([-2048, 0, 0])  # fits 2048 there
    choice = _resolve(frozen_model, auto, FakeGpu(), free=10_000_000, agree=agree)
    assert choice.gradcache.chunk_tokens == 2048 and choice.fallback is None and calls == [[-8192, 0, 0]]
    agree, calls = other_rank([-1024, 1, 0])  # fell back there
    choice = _resolve(frozen_model, auto, FakeGpu(), free=10_000_000, agree=agree)
    assert choice.gradcache.chunk_tokens == 1024 and len(calls) == 1
    assert choice.fallback.error.startswith("ValueError: another rank found no candidate chunk within its estimated")
    agree, calls = other_rank([-1024, 0, 1])  # out of memory there
    with pytest.raises(ValueError, match=r"^gradcache.chunk_tokens: auto found no chunk that fits: even the smallest "
                                         r"candidate, 1024 tokens, ran out of GPU memory on another rank; use "):
        _resolve(frozen_model, auto, FakeGpu(), free=10_000_000, agree=agree)
    assert len(calls) == 1
    agree, calls = other_rank([1])  # an explicit number ran out of memory there
    with pytest.raises(ValueError, match=r"^gradcache.chunk_tokens: 4096 failed \(RuntimeError: a chunk of 4096 "
                                         r"tokens ran out of GPU memory on another rank\); set it to auto"):
        _resolve(frozen_model, GradCacheConfig(chunk_tokens=4096), FakeGpu(), free=1, agree=agree)
    assert calls == [[0]]


# --- the trainer: the teacher is loaded before the probe -----------------------------------------------------------
def test_trainer_loads_the_teacher_before_the_memory_probe(example_shards, tmp_path, monkeypatch):
    """Trainer.__init__ in this process (no process group) up to the probe: the teacher (stubbed) is loaded first,
    with the ZeRO stage of the run's DeepSpeed config, and the probe gets that config's residency."""
    import pipeline.training.trainer as trainer
    from pipeline.config import load_config
    from pipeline.training.distributed import DistInfo

    class AtTheProbe(Exception):
        pass

    calls: list[tuple[str, int]] = []

    def load_teacher(cfg, device, *, zero_stage, **kwargs):
        calls.append(("teacher", zero_stage))
        return torch.nn.Identity()

    def resolve_chunk_tokens(gc, model, device, *, residency, **kwargs):
        calls.append(("probe", residency.stage))
        raise AtTheProbe

    monkeypatch.setattr(trainer.StopRequest, "install", lambda self: None)  # no signal handlers in pytest
    monkeypatch.setattr(trainer, "check_teacher_tokenizer", lambda *args, **kwargs: None)
    monkeypatch.setattr(trainer, "init_distributed", lambda **kwargs: DistInfo(0, 1, 0, None))
    monkeypatch.setattr(trainer, "load_teacher", load_teacher)
    monkeypatch.setattr(trainer, "resolve_chunk_tokens", resolve_chunk_tokens)
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [
        f"data.shards={example_shards}", f"train.output_dir={tmp_path / 'run'}", f"deepspeed={ZERO2}",
        f"loss.distill.teacher={tmp_path / 'teacher'}"])
    with pytest.raises(AtTheProbe):
        trainer.Trainer(cfg)
    assert calls == [("teacher", 2), ("probe", 2)]
