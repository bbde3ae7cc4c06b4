"""Run metrics: what a logged step records, and the writer (rank 0: ``metrics.jsonl``, TensorBoard scalars and,
with ``train.report_to: [wandb]``, Weights & Biases)."""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from pipeline.logs import is_rank0

if TYPE_CHECKING:
    from pipeline.training.gradcache import StepStats

WANDB_PROJECT = "embedding-pipeline"  # when WANDB_PROJECT is not set
WANDB_RUN_ID = "wandb_run_id"  # RUN/wandb_run_id: the W&B run a resumed training continues


def report_to_problem(report_to: Sequence[str]) -> str | None:
    """Why ``train.report_to`` cannot work here (one line, without the key), or None."""
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        return "wandb is not installed (pip install -e '.[wandb]')"
    return None


class MetricsWriter:
    """Writes scalars to ``metrics.jsonl`` and the `report_to` backends (``tensorboard``: RUN/tensorboard;
    ``wandb``: a Weights & Biases run named after the run directory, in project ``$WANDB_PROJECT`` (default
    embedding-pipeline), resumed by a resumed training; ``WANDB_MODE=offline`` keeps it local). Scalars are tagged
    ``<split>/<key>`` in both. A no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, report_to: Sequence[str] = ("tensorboard",),
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = is_rank0()
        self._tb = None
        self._jsonl = None
        self._wandb = None
        if self.enabled:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            if "wandb" in report_to:
                self._wandb = _start_wandb(run_dir, config or {})
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def write(self, step: int, values: dict[str, Any], split: str = "train") -> None:
        """One record of `values` after optimizer step `step`: numbers go everywhere (as ``<split>/<key>``
        scalars), strings to ``metrics.jsonl`` only (e.g. a :class:`pipeline.fallbacks.Fallback`, split
        ``fallback``)."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3)}
        scalars = {}
        for key, value in values.items():
            if isinstance(value, (int, float)):
                scalars[f"{split}/{key}"] = value
                record[key] = value
            elif isinstance(value, str):
                record[key] = value
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        self._jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._jsonl is not None:
            self._jsonl.close()


def _start_wandb(run_dir: Path, config: dict[str, Any]) -> Any:
    """A W&B run for `run_dir`: the id kept in RUN/wandb_run_id, so that ``--resume`` continues the same run."""
    import wandb

    id_file = run_dir / WANDB_RUN_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, name=run_dir.name, id=run_id,
                      resume="allow", dir=str(run_dir), config=config)


# Dense (no sparsity) bf16 tensor-core peak per GPU in FLOP/s, by torch.cuda.get_device_name(): the first entry all
# of whose words occur in the name (case-insensitive) applies, so form factors come before the plain model name.
# NVIDIA's datasheets quote bf16 "with sparsity", twice the dense rate: H100 SXM 1,979, H100 PCIe 1,513, H100 NVL
# 1,671 TFLOPS (https://www.nvidia.com/en-us/data-center/h100/); H200 SXM 1,979, H200 NVL 1,671
# (https://www.nvidia.com/en-us/data-center/h200/); GH200 1,979
# (https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/); L40S 733
# (https://www.nvidia.com/en-us/data-center/l40s/). A100 (SXM and PCIe): 312 dense
# (https://www.nvidia.com/en-us/data-center/a100/). Device names: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB".
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.5e12),
    (("H100", "NVL"), 835.5e12),
    (("H200", "NVL"), 835.5e12),
    (("H100",), 989.4e12),  # SXM5
    (("H200",), 989.4e12),  # SXM, and GH200's Hopper GPU
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("A10G",), 70e12),
)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU named `device_name` (:data:`PEAK_BF16_FLOPS`); None when unknown (no MFU)."""
    name = device_name.upper()
    for words, value in PEAK_BF16_FLOPS:
        if all(word in name for word in words):
            return value
    return None


def model_flops_per_token(n_params_non_embedding: int, n_layers: int, hidden: int, mean_seq_len: float) -> float:
    """Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 N + 12 L d s, where N excludes the
    embedding table, d is the attention width (:func:`attention_width`) and s is the mean attended length (sequences are attended separately when packed). GradCache's
    extra no-grad forward is overhead and not counted, so MFU measures useful work."""
    return 6.0 * n_params_non_embedding + 12.0 * n_layers * hidden * mean_seq_len


def attention_width(config: Any) -> int:
    """Width of the attention scores' inner products: heads x head_dim (Qwen3-0.6B: 16 x 128 = 2048, not its
    hidden size 1024); the hidden size for models that do not say."""
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    return int(heads * head_dim) if heads and head_dim else int(config.hidden_size)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int) -> float | None:
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)


def step_values(
    stats: "StepStats",
    seconds: float,
    *,
    dataset: str,
    lr: float,
    grad_norm: float,
    samples: int,
    device: torch.device,
    hf_config: Any,
    params_non_embedding: int,
    world_size: int,
) -> dict[str, Any]:
    """The record of one logged training step: loss (overall, per dataset, per part - means over all ranks' queries;
    the distillation parts also per dataset), the step's queries, lr, gradient norm,
    throughput, padding efficiency, chunks, GradCache's replay difference (0 when exact); on CUDA the peak memory
    and the MFU, on CPU the peak RSS."""
    values: dict[str, Any] = {
        "loss": stats.loss,
        f"loss/{dataset}": stats.loss,
        **stats.parts,
        "queries": stats.queries,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": stats.real_tokens / seconds,
        "samples_per_s": samples / seconds,
        "padding_efficiency": stats.padding_efficiency,
        "chunks": stats.chunks_run,
        "gradcache_replay_max_diff": stats.replay_max_diff,
    }
    for part in ("distill", "score_distill"):
        if part in stats.parts:
            values[f"{part}/{dataset}"] = stats.parts[part]
    if device.type == "cuda":
        values["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        mean_len = stats.real_tokens / max(stats.sequences, 1)
        per_token = model_flops_per_token(
            params_non_embedding, hf_config.num_hidden_layers, attention_width(hf_config), mean_len
        )
        value = mfu(stats.real_tokens / seconds, per_token, peak_flops(torch.cuda.get_device_name(device)), world_size)
        if value is not None:
            values["mfu"] = value
    else:
        values["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return values
