"""The training loop: composes data, model, GradCache step, DeepSpeed engine, checkpoints, metrics and export.

One optimizer step per global batch. Read top to bottom, :meth:`Trainer.fit` is

    for each epoch, from the resumed position:
        for each batch (this rank's slice of the step's single-dataset global batch;  pipeline.data.loader):
            result = self._step(batch)
                stats = train_step(engine, batch)   # exact full-batch gradient, chunked (pipeline.training.gradcache)
                agree with every rank: stop (signal, launcher gone)? non-finite loss or gradient?
                finite: engine.step()               # ZeRO optimizer step, clipping, lr (DeepSpeed)
                else:   the step is skipped, its gradients discarded          (pipeline.training.backward)
            after an update, each periodic action asked whether it is due: log, validate, retrieval metrics
                (and the best export, train.keep_best), checkpoint, merge export
            stop agreed: checkpoint, no export, leave
        end of the epoch: export epoch_<e>
    end of the run: checkpoint, export final                                  (pipeline.training.export)

Every rank runs the same steps (the schedule is global), the same chunk count per step (GradCache pads it) and
the same saves and exports, and the run ends with destroy_process_group(). Fault injection (tests only) is one
:class:`pipeline.resilience.faults.FaultInjector` the trainer is given and hands to the step, the checkpoints and
the export.
"""
from __future__ import annotations

import enum
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from pipeline.config import Config, ConfigError
from pipeline.data.batch import ContrastiveBatch
from pipeline.data.loader import TrainData, check_data, seed_everything
from pipeline.fallbacks import Fallback, save_fallbacks
from pipeline.logs import is_rank0, log
from pipeline.model.compiled import CompileWatch
from pipeline.model.embedding import EmbeddingModel, check_vocabulary, load_tokenizer_for
from pipeline.resilience.faults import NO_FAULTS, FaultInjector
from pipeline.resilience.preemption import REASONS, StopRequest, agree
from pipeline.resilience.rank_health import RankHealth
from pipeline.training.backward import backward_for
from pipeline.training.chunk_budget import WORK_SAMPLE_STEPS, optimizer_residency, resolve_chunk_tokens
from pipeline.training.checkpoint import CheckpointManager, TrainerState
from pipeline.training.distributed import broadcast_from_rank0, init_distributed, launched_world_size, teardown
from pipeline.training.ds_config import training_ds_config
from pipeline.training.errors import TrainingAborted
from pipeline.training.export import TrainedDataset, export_model, merge_export_name
from pipeline.training.gradcache import StepStats, train_step
from pipeline.training.keep_best import KeepBest, keep_best_problem
from pipeline.training.losses import loss_type_problems
from pipeline.training.lr_schedule import warmup_cosine
from pipeline.training.metrics import MetricsWriter, report_to_problem, step_values
from pipeline.training.resume import load as load_checkpoint, resume_point, with_resume
from pipeline.training.retrieval_eval import RetrievalEvaluator
from pipeline.training.run_identity import run_identity
from pipeline.training.teacher import check_teacher_tokenizer, load_teacher
from pipeline.training.validation import validation_values


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


@dataclass(frozen=True)
class Every:
    """Whether an action is due after optimizer step `step`: every `steps` steps (never when 0), and after step 1
    too when `also_first`."""

    steps: int
    also_first: bool = False

    def due(self, step: int) -> bool:
        return self.steps > 0 and (step % self.steps == 0 or (self.also_first and step == 1))


@dataclass(frozen=True)
class EveryInLast:
    """Whether an action is due after optimizer step `step`: at the multiples of `steps` within the last `window`
    steps of a `total`-step run (``total - window < step <= total``; never when `steps` or `window` is 0). F2LLM's
    "every 500 steps in the last 2500" extra saves for checkpoint merging (its ``utils.py``)."""

    steps: int
    window: int
    total: int

    def due(self, step: int) -> bool:
        in_window = self.total - self.window < step <= self.total
        return self.steps > 0 and self.window > 0 and step % self.steps == 0 and in_window

    def planned(self) -> list[int]:
        """Every step at which it is due, in order."""
        if self.steps <= 0 or self.window <= 0:
            return []
        first = (max(self.total - self.window, 0) // self.steps + 1) * self.steps
        return list(range(first, self.total + 1, self.steps))


class Outcome(enum.Enum):
    """How a pass over an epoch's batches ended."""

    EPOCH_DONE = "epoch done"
    RUN_DONE = "all steps done"
    STOPPED = "stop agreed"


@dataclass
class StepResult:
    """What one attempted step did: `updated` (an optimizer step) or skipped; `stop` > 0 when all ranks agreed to
    stop after it (a :data:`pipeline.resilience.preemption.REASONS` code)."""

    dataset: str
    stats: StepStats
    seconds: float
    updated: bool
    stop: int


class Trainer:
    def __init__(self, cfg: Config, *, resume: str | None = None, resume_force: bool = False,
                 faults: FaultInjector = NO_FAULTS) -> None:
        problems = loss_type_problems(cfg.loss)  # values the config's types cannot catch, as --check finds them
        if problems:
            raise ConfigError(problems[0])
        self.cfg = cfg
        self.faults = faults
        for line in faults.describe():
            log(line)
        # SIGTERM/SIGINT/launcher exit -> stop at the next step boundary with a checkpoint (pipeline.resilience).
        self.stop = StopRequest()
        self.stop.install()
        self._bar: tqdm | None = None
        self._saved: tuple[tuple[int, int, int], Path] | None = None  # (state key, path) of the last checkpoint
        # Input checks before any process group or model exists (one-line errors): shard directory, manifest,
        # datasets, file sizes, tokenizer, then checksums (pipeline.data.loader.check_data).
        self.tokenizer = load_tokenizer_for(cfg.model)
        shards = check_data(cfg.data, self.tokenizer, scores=cfg.loss.score_distill is not None)
        if cfg.loss.distill is not None:
            check_teacher_tokenizer(cfg.loss.distill, shards.manifest["tokenizer"],
                                    trust_remote_code=cfg.model.trust_remote_code)
        # The run identity (what fixes the data stream and the math) goes into every checkpoint; --resume from a
        # checkpoint of another identity is refused here, before the process group (pipeline.training.resume).
        self.run_dir = Path(cfg.train.output_dir)
        identity = run_identity(cfg, shards.manifest, launched_world_size())
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last, identity=identity,
                                      faults=faults)
        self.resume_from = resume_point(self.ckpt, resume, identity, launched_world_size(), force=resume_force)
        retrieval_sets = [n for n, ds in shards.datasets.items() if ds.type == "retrieval"]
        for key, problem in (("train.keep_best", keep_best_problem(cfg.train, retrieval_sets)),
                             ("train.report_to", report_to_problem(cfg.train.report_to))):
            if problem:
                raise ValueError(f"{key}: {problem}")
        self.dist = init_distributed(use_deepspeed=True, timeout_s=cfg.train.collective_timeout_s)
        self.device = _device(self.dist.local_rank)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.data = TrainData(
            cfg.data, cfg.loss, seed=cfg.train.seed, per_device_batch=cfg.train.per_device_batch_size,
            world_size=self.dist.world_size, rank=self.dist.rank, verify=False,
        )
        for name in self.data.schedule.skipped:
            log(f"dataset {name}: {self.data.schedule.skip_reason(name)}")
        self.retrieval_eval = None if not cfg.train.retrieval_eval_every else RetrievalEvaluator(
            self.data, max_docs=cfg.train.retrieval_eval_max_docs, seed=cfg.train.seed)
        if self.retrieval_eval is not None:
            log(f"retrieval metrics every {cfg.train.retrieval_eval_every} steps on "
                f"{self.retrieval_eval.describe() or 'nothing: no retrieval dataset holds out queries'}")
            problem = keep_best_problem(cfg.train, self.retrieval_eval.datasets)
            if problem:
                raise ValueError(f"train.keep_best: {problem} (data.validation_fraction)")
        self.best = KeepBest.parse(cfg.train.keep_best) if cfg.train.keep_best else None
        self.total_steps = cfg.train.total_steps(self.data.steps_per_epoch)
        model = EmbeddingModel.from_config(cfg.model, self.device)
        check_vocabulary(model.backbone.get_input_embeddings().num_embeddings, self.tokenizer)
        embedding = model.backbone.get_input_embeddings().weight
        self._params_non_embedding = sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p is not embedding
        )
        # The DeepSpeed config the engine is built with (self._engine) decides the ZeRO stage - the teacher's
        # partitioning - and what the optimizer and gradients will hold per rank (chunk_tokens auto's reserve).
        residency = optimizer_residency(
            training_ds_config(cfg, world_size=self.dist.world_size, device_type=self.device.type),
            coalesce=cfg.gradcache.coalesce_grad_reduction)
        # The distillation teacher before the memory probe, so that the GPU memory it holds is not counted as free
        # (under ZeRO-3 its inference engine partitions it now: the same collectives on every rank).
        self.teacher = None if cfg.loss.distill is None else load_teacher(
            cfg.loss.distill, self.device, student_hidden=model.hidden_size, zero_stage=residency.stage,
            world_size=self.dist.world_size, trust_remote_code=cfg.model.trust_remote_code,
        )
        # The GradCache settings of this run: chunk_tokens auto probed on the full model, before DeepSpeed
        # partitions it (no collective while probing), up to the most tokens a rank has in the first steps (max over
        # ranks), an explicit number checked to fit; then the layers compiled (a dynamic token dimension: no chunk is
        # padded). A fallback auto took is kept for the run's records (pipeline.fallbacks).
        work = None
        if cfg.gradcache.chunk_tokens == "auto":
            work = agree([self.data.most_step_tokens(WORK_SAMPLE_STEPS)], self.device)[0]
        choice = resolve_chunk_tokens(
            cfg.gradcache, model, self.device, max_len=self.data.reader.max_len, world_size=self.dist.world_size,
            residency=residency, agree=lambda values: agree(values, self.device), work_tokens=work,
        )
        self.gradcache = choice.gradcache
        self.gradcache_fallbacks: list[Fallback] = [] if choice.fallback is None else [choice.fallback]
        self.compile_watch = CompileWatch.start(model, self.gradcache, max_len=self.data.reader.max_len)
        self._replay_warned = False  # GradCache's replay check (StepStats.replay_max_diff) warns once per run
        self.engine = self._engine(model)
        self.backward = backward_for(self.engine)
        self.state = TrainerState(config=cfg.to_dict())
        if resume:
            self._resume(resume)
        self.metrics = MetricsWriter(self.run_dir, report_to=cfg.train.report_to, config=cfg.to_dict())
        self.fallbacks = self._record_fallbacks(model)
        t = cfg.train
        # The actions that happen every N optimizer steps, in this order; each is asked whether it is due.
        self.periodic: list[tuple[Every | EveryInLast, Callable[[StepResult], Any]]] = [
            (Every(t.log_every, also_first=True), self._log_step),
            (Every(t.eval_every), lambda result: self.validate()),
            (Every(t.retrieval_eval_every or 0), lambda result: self.evaluate_retrieval()),
            (Every(t.save_every), lambda result: self._checkpoint()),
            (EveryInLast(t.merge_every, t.merge_window, self.total_steps),
             lambda result: self.export(merge_export_name(self.state.global_step))),
        ]
        # From here on a rank that dies or hangs is named and ends the run within train.collective_timeout_s
        # (pipeline.resilience.rank_health); before, a failed rank surfaces as a collective timeout.
        self.health = RankHealth.start(timeout_s=t.collective_timeout_s, progress=lambda: self.state.global_step)
        if self.health is not None:
            self.health.before_exit.append(self.metrics.close)
        if is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            (self.run_dir / "versions.json").write_text(json.dumps(_versions(), indent=2))
        log(
            f"plan: world {self.dist.world_size}, batch {t.per_device_batch_size}/rank "
            f"({t.per_device_batch_size * self.dist.world_size} global), {self.data.steps_per_epoch} "
            f"steps/epoch, {self.total_steps} steps, datasets {', '.join(self.data.schedule.datasets)}"
        )

    def _record_fallbacks(self, model: EmbeddingModel) -> list[Fallback]:
        """The ``auto`` settings that failed at their first use and what runs instead (:mod:`pipeline.fallbacks`):
        written to ``metrics.jsonl`` (split ``fallback``) and ``RUN/fallbacks.json`` (empty when none fell back),
        which ``--check`` shows."""
        fallbacks = [*model.fallbacks, *self.gradcache_fallbacks, *filter(None, [self.compile_watch.fallback])]
        for fallback in fallbacks:
            self.metrics.write(self.state.global_step, fallback.values(), split="fallback")
        if is_rank0():
            save_fallbacks(self.run_dir, fallbacks)
        return fallbacks

    def _engine(self, model: EmbeddingModel) -> Any:
        import deepspeed

        t = self.cfg.train
        total = self.total_steps

        def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return warmup_cosine(optimizer, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=total)

        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=with_resume(training_ds_config(self.cfg, world_size=self.dist.world_size,
                                                  device_type=self.device.type), self.resume_from),
            lr_scheduler=scheduler,
        )
        return engine

    def _resume(self, resume: str) -> None:
        point = self.resume_from
        if point is None:
            log(f"--resume {resume}: no complete checkpoint in {self.ckpt.root}; starting fresh")
            return
        self.state = load_checkpoint(point, self.ckpt, self.engine, seed=self.cfg.train.seed)
        self._saved = (self._state_key(), point.path)
        log(f"resumed from {point.path}: step {self.state.global_step}, epoch {self.state.epoch}")

    # ---------------------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------------------
    def fit(self) -> TrainerState:
        self.engine.train()
        if self.cfg.train.eval_every and self.state.global_step == 0:
            self.validate()  # the untrained model's validation loss, the baseline of the curve
        if self.retrieval_eval is not None and self.state.global_step == 0:
            self.evaluate_retrieval()  # and its retrieval metrics
        self._bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc="train", unit="step",
                         disable=not is_rank0(), dynamic_ncols=True)
        while self.state.global_step < self.total_steps:
            if self._train_epoch() is Outcome.STOPPED:
                return self.state  # checkpoint written; no export of a half-trained model
        self._bar.close()
        self.compile_watch.report()
        self._checkpoint()
        self.export("final")
        return self.state

    def _train_epoch(self) -> Outcome:
        """Train on the current epoch's batches from the current position; export at its end."""
        for dataset, batch in self.data.loader(self.state.epoch, self.state.step_in_epoch):
            result = self._step(dataset, batch)
            if result.updated:
                self._after_update(result)
            self.faults.after_step()
            if result.stop:
                self._preempted(result.stop)
                return Outcome.STOPPED
            if self.state.global_step >= self.total_steps:
                return Outcome.RUN_DONE
        log(f"epoch {self.state.epoch} done at step {self.state.global_step}")
        self.export(f"epoch_{self.state.epoch}")
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        return Outcome.EPOCH_DONE

    def _step(self, dataset: str, batch: ContrastiveBatch) -> StepResult:
        """One attempted optimizer step on `batch`: the gradient, the agreement of all ranks, the update or skip."""
        started = time.perf_counter()
        attempt = self.state.global_step + self.state.skipped_steps + 1
        stats = train_step(self.engine, batch, self.cfg.loss, self.gradcache, loss_hook=self.faults.loss_hook(attempt),
                           teacher=self.teacher)
        self._check_replay(stats)
        # The step boundary: one MAX all-reduce tells every rank whether any rank must stop (signal, launcher
        # gone) and whether the step is bad (loss or any gradient partition non-finite).
        bad_here = not math.isfinite(stats.loss) or not self.backward.grads_finite()
        stop, bad = agree([self.stop.local_code(), int(bad_here)], self.device)
        self.state.step_in_epoch += 1  # the batch is consumed, whether the step updates or is skipped
        if bad:
            self._skip_step(stats)
        else:
            self.engine.step()
            self.state.global_step += 1
            self.state.consecutive_skips = 0
            self.compile_watch.after_step(self.state.global_step)
        return StepResult(dataset, stats, time.perf_counter() - started, updated=not bad, stop=stop)

    def _check_replay(self, stats: StepStats) -> None:
        """Warn once when GradCache's re-forward did not reproduce the cached embeddings (the step's gradient is then
        not the exact full-batch gradient; ``gradcache_replay_max_diff`` in the metrics has every step's value)."""
        if stats.replay_max_diff > 0.0 and not self._replay_warned:
            self._replay_warned = True
            log(f"GradCache replay: the backward pass re-computed embeddings up to {stats.replay_max_diff:.3e} away "
                "from the cached ones at step {}: the forward is not deterministic on this setup (a kernel, an RNG "
                "stream or a first-call initialisation), so the gradient is not exact; run python -m pipeline.gradcheck "
                "--repeat 30 with this config".format(self.state.global_step + 1), level=logging.WARNING)

    def _after_update(self, result: StepResult) -> None:
        assert self._bar is not None
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{result.stats.loss:.4f}", lr=f"{self.engine.get_lr()[0]:.2e}",
                              tok_s=f"{result.stats.real_tokens / result.seconds:,.0f}", refresh=False)
        for every, action in self.periodic:
            if every.due(self.state.global_step):
                action(result)

    # ---------------------------------------------------------------------------------------------------------
    # Periodic actions
    # ---------------------------------------------------------------------------------------------------------
    def _log_step(self, result: StepResult) -> None:
        grad_norm = self.engine.get_global_grad_norm()
        values = step_values(
            result.stats, result.seconds, dataset=result.dataset, lr=self.engine.get_lr()[0],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            samples=result.stats.queries, device=self.device,
            hf_config=self.backward.base.backbone.config, params_non_embedding=self._params_non_embedding,
            world_size=self.dist.world_size,
        )
        values.update(epoch=self.state.epoch, skipped_steps=self.state.skipped_steps, **self.compile_watch.values())
        self.metrics.write(self.state.global_step, values)

    def validate(self) -> float | None:
        """Validation loss over every held-out query, all ranks (pipeline.training.validation); logged per dataset
        and per part. Returns the overall loss (None when nothing is held out)."""
        self.engine.eval()
        values = validation_values(self.engine, self.data, self.cfg.loss, self.gradcache, self.device,
                                   teacher=self.teacher)
        self.engine.train()
        if values is None:
            return None
        self.metrics.write(self.state.global_step, values, split="validation")
        log(f"step {self.state.global_step}: validation loss {values['loss']:.4f} over {values['queries']} queries "
            f"({values['batches']} batches)")
        self._keep_best("validation", values)
        return values["loss"]

    def evaluate_retrieval(self) -> dict[str, float]:
        """Held-out retrieval metrics of the current weights (every rank; :mod:`pipeline.training.retrieval_eval`)."""
        assert self.retrieval_eval is not None
        self.engine.eval()
        values = self.retrieval_eval(self.engine, self.gradcache)
        self.engine.train()
        if values:
            self.metrics.write(self.state.global_step, values, split="retrieval")
            log(f"step {self.state.global_step}: retrieval MRR@10 {values['mrr@10']:.4f}, nDCG@10 "
                f"{values['ndcg@10']:.4f} ({values['queries']:,} held-out queries, {values['docs']:,} docs, "
                f"{values['seconds']:.1f} s)")
            self._keep_best("retrieval", values)
        return values

    def _keep_best(self, split: str, values: dict[str, float]) -> None:
        """train.keep_best: export to export/best when the metric beats its best so far (all ranks decide on rank
        0's value, so they export together)."""
        if self.best is None or self.best.split != split or self.best.key not in values:
            return
        value = float(broadcast_from_rank0(values[self.best.key]))  # type: ignore[arg-type]
        if not self.best.better(value, self.state.best_value):
            return
        previous = self.state.best_value
        self.state.best_value, self.state.best_step = value, self.state.global_step
        path = self.export("best")
        if is_rank0():
            (path / "keep_best.json").write_text(json.dumps(
                {"metric": self.best.metric, "value": value, "step": self.state.global_step}, indent=2) + "\n")
        was = "first value" if previous is None else f"previous best {previous:.4f}"
        log(f"step {self.state.global_step}: {self.best.metric} {value:.4f} ({was}): exported {path}")

    def export(self, name: str) -> Path:
        reader = self.data.reader
        return export_model(
            self.engine, self.tokenizer, self.run_dir / "export" / name,
            eos_id=reader.eos_id, max_seq_length=reader.max_len,
            datasets={n: TrainedDataset(ds.type, ds.instruction, ds.num_queries)
                      for n, ds in reader.datasets.items()},
            query_template=reader.manifest.get("query_template", "{query}"),
            step=self.state.global_step,
            faults=self.faults,
        )

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

    # ---------------------------------------------------------------------------------------------------------
    # Preemption, non-finite steps
    # ---------------------------------------------------------------------------------------------------------
    def _preempted(self, code: int) -> None:
        """All ranks agreed to stop (signal or launcher exit on some rank): checkpoint, then leave the loop."""
        path = self._checkpoint()
        log(f"preempted ({REASONS[code]}) after step {self.state.global_step}: checkpoint {path}; final export "
            f"skipped; continue with --resume auto", level=logging.WARNING)

    def _skip_step(self, stats: StepStats) -> None:
        """A step with a non-finite loss or gradient (agreed on all ranks): no update, counted, logged; the run
        stops (with a checkpoint of the unchanged weights) at the ``train.max_consecutive_skips``-th in a row."""
        self.backward.discard()
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


def run(cfg: Config, *, resume: str | None = None, resume_force: bool = False) -> TrainerState:
    """Train `cfg` (the fault injection the environment asks for, if any)."""
    trainer = Trainer(cfg, resume=resume, resume_force=resume_force, faults=FaultInjector.from_env())
    try:
        return trainer.fit()
    except Exception as exc:
        if trainer.health is not None:
            trainer.health.on_error(exc)  # a peer died or hung: names it and exits (code 3); else returns
        raise
    finally:
        trainer.close()


__all__ = ["Trainer", "TrainerState", "run"]
