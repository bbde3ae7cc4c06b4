"""The training loop: composes data, model, GradCache step, DeepSpeed engine, checkpoints, metrics and export.

One optimizer step per global batch, read top to bottom in :meth:`Trainer.fit`:

    batch  = this rank's slice of the step's single-dataset global batch        (pipeline.data)
    stats  = cached_step(engine, batch)  # exact full-batch gradient, chunked    (pipeline.gradcache)
    engine.step()                         # ZeRO-3 optimizer step, clipping, lr  (DeepSpeed)
    every log_every: metrics; every eval_every: validation loss; every save_every: checkpoint
    non-finite loss/gradient on any rank: no engine.step(), step skipped; SIGTERM/SIGINT: checkpoint and stop
    end of each epoch and of the run: consolidated export                       (pipeline.export)

Every rank runs the same steps (the schedule is global), the same chunk count per step (GradCache pads it) and
the same saves and exports, and the run ends with destroy_process_group().
"""
from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import fault_injection
from pipeline.checkpoint import CheckpointManager, TrainerState
from pipeline.config import Config
from pipeline.data import TrainData, check_data, seed_everything
from pipeline.distributed import init_distributed, teardown
from pipeline.ds_config import load_ds_config
from pipeline.export import export_model
from pipeline.errors import TrainingAborted
from pipeline.gradcache import StepStats, base_module, batch_loss, discard_gradients, local_grads_finite, train_step
from pipeline.logs import is_rank0, log
from pipeline.lr_schedule import warmup_cosine
from pipeline.metrics import MetricsWriter, attention_width, mfu, model_flops_per_token, peak_flops
from pipeline.model import EmbeddingModel
from pipeline.preemption import REASONS, StopRequest, agree
from pipeline.rank_health import RankHealth


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer or cfg.model.name_or_path
    if path is None:
        raise ValueError("model.tokenizer: required when the model is built from_config")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.tokenizer: cannot load {path!r} ({exc})") from None


def _versions() -> dict[str, str]:
    import deepspeed
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(sys.argv),
    }


class Trainer:
    def __init__(self, cfg: Config, *, resume: str | None = None) -> None:
        self.cfg = cfg
        # SIGTERM/SIGINT/launcher exit -> stop at the next step boundary with a checkpoint (pipeline.preemption).
        self.stop = StopRequest()
        self.stop.install()
        self.preempted = False
        self._bar: tqdm | None = None
        self._saved: tuple[tuple[int, int, int], Path] | None = None  # (state key, path) of the last checkpoint
        # Input checks before any process group or model exists (one-line errors): shard directory, manifest,
        # datasets, file sizes, tokenizer, then checksums (pipeline.data.check_data).
        self.tokenizer = _load_tokenizer(cfg)
        check_data(cfg.data, self.tokenizer)
        self.dist = init_distributed(use_deepspeed=True, timeout_s=cfg.train.collective_timeout_s)
        self.device = _device(self.dist.local_rank)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.data = TrainData(
            cfg.data, cfg.loss, seed=cfg.train.seed, per_device_batch=cfg.train.per_device_batch_size,
            world_size=self.dist.world_size, rank=self.dist.rank, verify=False,
        )
        for name in self.data.schedule.skipped:
            log(f"dataset {name}: fewer training queries than one global batch; not trained on")
        self.total_steps = self._total_steps()
        model = EmbeddingModel.from_config(cfg.model, self.device)
        vocab = model.backbone.get_input_embeddings().num_embeddings
        if vocab < len(self.tokenizer):
            raise ValueError(f"model vocabulary ({vocab}) is smaller than the tokenizer's ({len(self.tokenizer)})")
        embedding = model.backbone.get_input_embeddings().weight
        self._params_non_embedding = sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p is not embedding
        )
        self.engine = self._engine(model)
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last)
        self.state = TrainerState(config=cfg.to_dict())
        if resume:
            tag = self.ckpt.latest() if resume == "auto" else resume
            if tag is not None:
                self.state = self.ckpt.load(self.engine, tag)
                self._saved = (self._state_key(), self.ckpt.root / tag)
                log(f"resumed from {self.ckpt.root / tag}: step {self.state.global_step}, epoch {self.state.epoch}")
            else:
                log(f"--resume {resume}: no complete checkpoint in {self.ckpt.root}; starting fresh")
        self.metrics = MetricsWriter(self.run_dir)
        # From here on a rank that dies or hangs is named and ends the run within train.collective_timeout_s
        # (pipeline.rank_health); before, a failed rank surfaces as a collective timeout.
        self.health = RankHealth.start(timeout_s=cfg.train.collective_timeout_s,
                                       progress=lambda: self.state.global_step)
        if self.health is not None:
            self.health.before_exit.append(self.metrics.close)
        if is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            (self.run_dir / "versions.json").write_text(json.dumps(_versions(), indent=2))
        log(
            f"plan: world {self.dist.world_size}, batch {cfg.train.per_device_batch_size}/rank "
            f"({cfg.train.per_device_batch_size * self.dist.world_size} global), {self.data.steps_per_epoch} "
            f"steps/epoch, {self.total_steps} steps, datasets {', '.join(self.data.schedule.datasets)}"
        )

    def _total_steps(self) -> int:
        if self.cfg.train.max_steps is not None:
            return self.cfg.train.max_steps
        return max(1, math.ceil(self.cfg.train.epochs * self.data.steps_per_epoch))

    def _engine(self, model: EmbeddingModel) -> Any:
        import deepspeed

        t = self.cfg.train
        ds_cfg = load_ds_config(
            self.cfg.deepspeed, micro_batch=t.per_device_batch_size, world_size=self.dist.world_size,
            use_bf16=self.device.type == "cuda" and self.cfg.model.dtype in ("auto", "bfloat16"),
        )
        ds_cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
        ds_cfg["optimizer"].setdefault("params", {}).update(
            {"lr": t.lr, "betas": list(t.betas), "weight_decay": t.weight_decay}
        )
        ds_cfg["gradient_clipping"] = t.grad_clip
        ds_cfg.pop("scheduler", None)  # ours below, so that it matches the config exactly
        total = self.total_steps

        def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return warmup_cosine(optimizer, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=total)

        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_cfg,
            lr_scheduler=scheduler,
        )
        return engine

    # ---------------------------------------------------------------------------------------------------------
    def _log_step(self, dataset: str, stats: StepStats, seconds: float) -> None:
        lr = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        values: dict[str, Any] = {
            "loss": stats.loss,
            f"loss/{dataset}": stats.loss,
            **{f"{k}": v for k, v in stats.parts.items()},
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": stats.real_tokens / seconds,
            "samples_per_s": self.cfg.train.per_device_batch_size * self.dist.world_size / seconds,
            "padding_efficiency": stats.padding_efficiency,
            "chunks": stats.chunks_run,
            "epoch": self.state.epoch,
            "skipped_steps": self.state.skipped_steps,
        }
        if self.device.type == "cuda":
            values["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            base = base_module(self.engine)
            config = base.backbone.config
            mean_len = stats.real_tokens / max(stats.sequences, 1)
            per_token = model_flops_per_token(
                self._params_non_embedding, config.num_hidden_layers, attention_width(config), mean_len
            )
            value = mfu(stats.real_tokens / seconds, per_token, peak_flops(torch.cuda.get_device_name(self.device)),
                        self.dist.world_size)
            if value is not None:
                values["mfu"] = value
        else:
            import resource

            values["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.metrics.write(self.state.global_step, values)

    def validate(self) -> float | None:
        self.engine.eval()
        losses = [
            batch_loss(self.engine, batch, self.cfg.loss, self.cfg.gradcache) for batch in self.data.validation_batches()
        ]
        self.engine.train()
        if not losses:
            return None
        value = float(np.mean(losses))
        self.metrics.write(self.state.global_step, {"loss": value, "batches": len(losses)}, split="validation")
        log(f"step {self.state.global_step}: validation loss {value:.4f} over {len(losses)} batches")
        return value

    def export(self, name: str) -> Path:
        reader = self.data.reader
        return export_model(
            self.engine, self.tokenizer, self.run_dir / "export" / name,
            eos_id=reader.eos_id, max_seq_length=reader.max_len,
            instructions={n: ds.instruction for n, ds in reader.datasets.items()},
            query_template=reader.manifest.get("query_template", "{query}"),
        )

    def fit(self) -> TrainerState:
        t = self.cfg.train
        self.engine.train()
        if t.eval_every and self.state.global_step == 0:
            self.validate()  # the untrained model's validation loss, the baseline of the curve
        bar = self._bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc="train", unit="step",
                               disable=not is_rank0(), dynamic_ncols=True)
        while self.state.global_step < self.total_steps:
            loader = self.data.loader(self.state.epoch, self.state.step_in_epoch)
            for dataset, batch in loader:
                started = time.perf_counter()
                fault_injection.set_attempt(self.state.global_step + self.state.skipped_steps + 1)
                stats = train_step(self.engine, batch, self.cfg.loss, self.cfg.gradcache)
                # The step boundary: one MAX all-reduce tells every rank whether any rank must stop (signal,
                # launcher gone) and whether the step is bad (loss or any gradient partition non-finite).
                stop, bad = agree(
                    [self.stop.local_code(), int(not math.isfinite(stats.loss) or not local_grads_finite(self.engine))],
                    self.device,
                )
                self.state.step_in_epoch += 1  # the batch is consumed, whether the step updates or is skipped
                if bad:
                    self._skip_step(stats)
                    fault_injection.step_delay()
                    if stop:
                        self._preempted(stop)
                        break
                    continue
                self.engine.step()
                seconds = time.perf_counter() - started
                self.state.global_step += 1
                self.state.consecutive_skips = 0
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{self.engine.get_lr()[0]:.2e}",
                                tok_s=f"{stats.real_tokens / seconds:,.0f}", refresh=False)
                if t.log_every and (self.state.global_step % t.log_every == 0 or self.state.global_step == 1):
                    self._log_step(dataset, stats, seconds)
                if t.eval_every and self.state.global_step % t.eval_every == 0:
                    self.validate()
                if t.save_every and self.state.global_step % t.save_every == 0:
                    self._checkpoint()
                fault_injection.step_delay()
                if stop:
                    self._preempted(stop)
                    break
                if self.state.global_step >= self.total_steps:
                    break
            else:
                log(f"epoch {self.state.epoch} done at step {self.state.global_step}")
                self.export(f"epoch_{self.state.epoch}")
                self.state.epoch += 1
                self.state.step_in_epoch = 0
            if self.preempted:
                break
        bar.close()
        if self.preempted:
            return self.state  # checkpoint written; no export of a half-trained model
        self._checkpoint()
        self.export("final")
        return self.state

    # ---------------------------------------------------------------------------------------------------------
    # Preemption, non-finite steps
    # ---------------------------------------------------------------------------------------------------------
    def _state_key(self) -> tuple[int, int, int]:
        return self.state.global_step, self.state.epoch, self.state.step_in_epoch

    def _checkpoint(self) -> Path:
        """Checkpoint the current state, unless it is the one saved (or resumed from) last.

        Tag ``step_<global_step>``; after skipped steps ``step_<global_step>+<consecutive skips>``: the weights are
        those of step <global_step>, the data position is past the skipped batches (the tag of the last update
        may already hold a checkpoint with the earlier data position, which is kept)."""
        if self._saved is not None and self._saved[0] == self._state_key():
            return self._saved[1]
        tag = self.ckpt.tag_for(self.state.global_step)
        if self.state.consecutive_skips:
            tag += f"+{self.state.consecutive_skips}"
        path = self.ckpt.save(self.engine, self.state, tag=tag)
        self._saved = (self._state_key(), path)
        return path

    def _preempted(self, code: int) -> None:
        """All ranks agreed to stop (signal or launcher exit on some rank): checkpoint, then leave the loop."""
        path = self._checkpoint()
        self.preempted = True
        log(f"preempted ({REASONS[code]}) after step {self.state.global_step}: checkpoint {path}; final export "
            f"skipped; continue with --resume auto", level=logging.WARNING)

    def _skip_step(self, stats: StepStats) -> None:
        """A step with a non-finite loss or gradient (agreed on all ranks): no update, counted, logged; the run
        stops (with a checkpoint of the unchanged weights) at the ``train.max_consecutive_skips``-th in a row."""
        discard_gradients(self.engine)
        s = self.state
        s.skipped_steps += 1
        s.consecutive_skips += 1
        what = "loss" if not math.isfinite(stats.loss) else "gradient"
        log(f"step {s.global_step + 1} (attempt {s.global_step + s.skipped_steps}): non-finite {what} (loss "
            f"{stats.loss}); skipped without an update, batch {s.step_in_epoch - 1} of epoch {s.epoch} consumed "
            f"({s.consecutive_skips} in a row, {s.skipped_steps} in all)", level=logging.WARNING)
        self.metrics.write(s.global_step + 1, {
            "loss": stats.loss, "skipped_steps": s.skipped_steps, "consecutive_skips": s.consecutive_skips,
            "epoch": s.epoch, "batch": s.step_in_epoch - 1, "nonfinite_loss": int(what == "loss"),
        }, split="skipped")
        limit = max(1, self.cfg.train.max_consecutive_skips)
        if s.consecutive_skips >= limit:
            path = self._checkpoint()
            raise TrainingAborted(
                f"{s.consecutive_skips} consecutive step{'s' if s.consecutive_skips > 1 else ''} with a non-finite loss or "
                f"gradient (train.max_consecutive_skips "
                f"{limit}): stopped; the weights of the last good step ({s.global_step}) are in {path}"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()  # also when fit() raised: an error line then starts on a line of its own
        self.metrics.close()
        if self.health is not None:
            self.health.stop()  # before the final barrier: past it, ranks exit one by one
        teardown()


def run(cfg: Config, *, resume: str | None = None) -> TrainerState:
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    except Exception as exc:
        if trainer.health is not None:
            trainer.health.on_error(exc)  # a peer died or hung: names it and exits (code 3); else returns
        raise
    finally:
        trainer.close()


__all__ = ["Trainer", "TrainerState", "run"]
