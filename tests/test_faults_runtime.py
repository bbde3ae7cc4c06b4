"""Faults during a real run: 2-process DeepSpeed ZeRO-3 on CPU (gloo) through the deepspeed launcher.

* SIGTERM to the launcher, to the whole process group (Slurm) or to one rank: every rank stops after the same step
  with a checkpoint, no export, and a log line saying so; resume continues exactly (same losses, same weights).
* Non-finite loss (injected, ``PIPELINE_INJECT_NONFINITE_STEPS``): the step is skipped without touching optimizer,
  lr schedule or step counters; ``train.max_consecutive_skips`` in a row stop the run with a checkpoint, exit 1.
* Disk full while writing a checkpoint (injected on one rank, ``PIPELINE_INJECT_ENOSPC``) and an unwritable export
  directory (a file where the directory should be: works as root too): one-line errors, exit 1, the previous
  checkpoint stays the latest and resumes exactly.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import torch

from train_helpers import (
    REPO, env, kill_group, run_training, train_command, train_losses, wait_for, web_search_overrides,
)

STEPS = 8
SAVE_EVERY = 3
TIMEOUT = 420


def overrides(shards: Path, out: Path, **extra: str) -> list[str]:
    # one DataLoader worker process per rank: signals must not kill it
    return web_search_overrides(shards, out, steps=STEPS, save_every=SAVE_EVERY, eval_every=0, **extra)


def launch(args: list[str], log: Path, *, resume: bool = False, **inject: str) -> subprocess.Popen:
    """Start the launcher in its own process group; `inject` adds PIPELINE_INJECT_* variables."""
    e = env()
    e.update({f"PIPELINE_INJECT_{k.upper()}": v for k, v in inject.items()})
    return subprocess.Popen(train_command(args, resume=resume), cwd=REPO, env=e, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def run(args: list[str], log: Path, *, resume: bool = False, **inject: str) -> tuple[int, str]:
    """Run to the end; (exit code, output)."""
    proc = launch(args, log, resume=resume, **inject)
    try:
        code = proc.wait(timeout=TIMEOUT)
    finally:
        kill_group(proc)
    return code, log.read_text()


def ranks_of(runner: subprocess.Popen) -> tuple[psutil.Process, list[psutil.Process]]:
    """The deepspeed.launcher.launch process under the runner and its rank processes (by local rank)."""
    proc = psutil.Process(runner.pid)
    launcher = next(c for c in proc.children() if "deepspeed.launcher.launch" in " ".join(c.cmdline()))
    ranks = sorted(launcher.children(), key=lambda p: next(a for a in p.cmdline() if a.startswith("--local_rank")))
    assert len(ranks) == 2, ranks
    return launcher, ranks


def signal_after_step(args: list[str], out: Path, log: Path, target: str, step: int = 2) -> tuple[int, str]:
    """Start a run (0.5 s pause per step: a window for the signal), SIGTERM `target` ("launcher": the runner
    process, "group": its process group, "rank1": rank 1) once `step` steps are logged, wait until every process
    of the job is gone; (runner exit code, output)."""
    proc = launch(args, log, step_delay="0.5")
    try:
        wait_for(lambda: max(train_losses(out), default=0) >= step, TIMEOUT, f"step {step}", proc)
        launcher, ranks = ranks_of(proc)
        job = [launcher, *ranks, *(c for r in ranks for c in r.children(recursive=True))]
        if target == "launcher":
            os.kill(proc.pid, signal.SIGTERM)
        elif target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            ranks[1].send_signal(signal.SIGTERM)
        code = proc.wait(timeout=TIMEOUT)
        _, alive = psutil.wait_procs(job, timeout=120)
        assert not alive, f"still running after the stop: {alive}"
    finally:
        kill_group(proc)
    return code, log.read_text()


def preempted_at(output: str, out: Path, reason: str) -> int:
    """The step the run stopped after; checks the log line, the checkpoint pointer and that nothing was exported."""
    match = re.search(rf"preempted \({re.escape(reason)}\) after step (\d+): checkpoint (\S+); final export skipped",
                      output)
    assert match, output[-4000:]
    step = int(match.group(1))
    ckpts = out / "checkpoints"
    assert match.group(2) == str(ckpts / f"step_{step:08d}")
    assert (ckpts / "latest_complete").read_text() == f"step_{step:08d}"
    assert (ckpts / f"step_{step:08d}" / "COMPLETE").is_file()
    assert 2 <= step < STEPS, step
    assert sorted(train_losses(out)) == list(range(1, step + 1))
    assert not (out / "export" / "final").exists()
    return step


def resume_and_compare(args: list[str], out: Path, log: Path, reference: Path, first: int) -> None:
    """Resume with --resume auto; its losses from step `first` on and its final weights must equal the reference's."""
    before = len((out / "metrics.jsonl").read_text().splitlines())
    run_training(args, resume=True, log=log, timeout=TIMEOUT)
    lines = (out / "metrics.jsonl").read_text().splitlines()[before:]
    resumed = {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}
    expected = train_losses(reference)
    assert sorted(resumed) == list(range(first, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), (step, loss, expected[step])
    assert_same_weights(out / "checkpoints" / f"step_{STEPS:08d}", reference / "checkpoints" / f"step_{STEPS:08d}")


def assert_same_weights(ours: Path, theirs: Path) -> None:
    """fp32 master weights of two checkpoints (every rank's ZeRO partition) equal up to fp32 rounding."""
    for rank in range(2):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        a = torch.load(ours / name, weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"]
        b = torch.load(theirs / name, weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"]
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.shape == y.shape
            assert float((x - y).detach().norm() / y.detach().norm()) <= 1e-6


@pytest.fixture(scope="module")
def reference_run(example_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults_reference") / "run"
    run_training(overrides(example_shards, out), log=out.parent / "log.txt", timeout=TIMEOUT)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------------
def test_sigterm_to_launcher_checkpoints_and_resume_is_exact(reference_run, example_shards, tmp_path):
    """SIGTERM to `python -m deepspeed.launcher.runner` kills it at once (it installs no handler for local runs);
    the ranks notice their launcher is gone, stop after the same step with a checkpoint and exit 0."""
    out = tmp_path / "run"
    args = overrides(example_shards, out)
    code, output = signal_after_step(args, out, tmp_path / "log.txt", "launcher")
    assert code == -signal.SIGTERM
    step = preempted_at(output, out, "the launcher exited")
    assert len(re.findall(r"Process \d+ exits successfully", output)) == 2, output[-3000:]  # both ranks: exit 0
    resume_and_compare(args, out, tmp_path / "resume.txt", reference_run, step + 1)


def test_sigterm_to_process_group_stops_cleanly(example_shards, tmp_path):
    """SIGTERM to every process of the job at once (Slurm, Ctrl-C style), DataLoader workers included."""
    out = tmp_path / "run"
    code, output = signal_after_step(overrides(example_shards, out), out, tmp_path / "log.txt", "group")
    preempted_at(output, out, "SIGTERM")
    assert "Traceback" not in output and "killed by signal" not in output, output[-4000:]
    assert code == -signal.SIGTERM  # the runner itself dies of the signal; the ranks exit after the checkpoint


def test_sigterm_to_one_rank_stops_every_rank(example_shards, tmp_path):
    out = tmp_path / "run"
    code, output = signal_after_step(overrides(example_shards, out), out, tmp_path / "log.txt", "rank1")
    assert code == 0, output[-4000:]
    assert "[rank 1] SIGTERM: stopping after this step" in output
    assert "[rank 0] SIGTERM" not in output
    preempted_at(output, out, "SIGTERM")


# ---------------------------------------------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------------------------------------------
def test_nonfinite_steps_are_skipped_then_stop_the_run(reference_run, example_shards, tmp_path):
    """Attempt 2 has NaN gradients (finite loss), 4, 5, 6 a NaN loss: 2 is skipped and training goes on; 4-6 are 3
    in a row, which with max_consecutive_skips 3 stops the run (exit 1) with a checkpoint of the weights of update 2."""
    out = tmp_path / "run"
    code, output = run(overrides(example_shards, out, **{"train.max_consecutive_skips": "3"}), tmp_path / "log.txt",
                       nonfinite_grads="2", nonfinite_steps="4,5,6")
    assert code == 1, output[-4000:]
    tag = "step_00000002+3"
    ckpt = out / "checkpoints" / tag
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"error: 3 consecutive steps with a non-finite loss or gradient (train.max_consecutive_skips 3): stopped; "
        f"the weights of the last good step (2) are in {ckpt}"), errors
    assert re.search(r"step 2 \(attempt 2\): non-finite gradient \(loss \d+\.\d+\); skipped without an update", output)
    assert "step 3 (attempt 6): non-finite loss (loss nan); skipped without an update" in output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [(r["step"], r["consecutive_skips"], r["batch"], r["nonfinite_loss"])
               for r in records if r["split"] == "skipped"]
    assert skipped == [(2, 1, 1, 0), (3, 1, 3, 1), (3, 2, 4, 1), (3, 3, 5, 1)]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert sorted(train) == [1, 2]
    reference = {r["step"]: r for r in map(json.loads, (reference_run / "metrics.jsonl").read_text().splitlines())
                 if r["split"] == "train"}
    assert train[1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-6)  # same first step
    assert train[2]["lr"] == reference[2]["lr"]  # the skipped attempt did not advance the lr schedule
    assert train[2]["loss"] != pytest.approx(reference[2]["loss"], rel=1e-3)  # its batch was consumed

    # The checkpoint: complete and the latest, 2 updates everywhere (trainer, DeepSpeed engine, lr scheduler, Adam).
    assert (out / "checkpoints" / "latest_complete").read_text() == tag and (ckpt / "COMPLETE").is_file()
    model_states = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    trainer = model_states["trainer"]
    assert (trainer["global_step"], trainer["epoch"], trainer["step_in_epoch"]) == (2, 0, 6)
    assert (trainer["skipped_steps"], trainer["consecutive_skips"]) == (4, 3)
    assert model_states["global_steps"] == 2 and model_states["skipped_steps"] == 0
    assert model_states["lr_scheduler"]["last_epoch"] == 2
    for rank in range(2):
        optim = torch.load(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        optim = optim["optimizer_state_dict"]
        assert [s["step"] for s in optim["optimizer_state_dict"]["state"].values()] == [2]
        assert all(torch.isfinite(t).all() for t in optim["fp32_flat_groups"])
    assert not (out / "export" / "final").exists()


# ---------------------------------------------------------------------------------------------------------------
# Write errors
# ---------------------------------------------------------------------------------------------------------------
def test_disk_full_at_checkpoint_keeps_previous_and_export_failure_keeps_checkpoints(
    reference_run, example_shards, tmp_path
):
    """1. ENOSPC on rank 1 only while the step-6 checkpoint is written: every rank stops with the same one-line error,
    the partial step_6 is not taken (removed), step_3 stays the latest.
    2. Resume from step_3 with the export directory replaced by a file (unwritable for root too): training to the
    end matches the reference exactly, the step-8 checkpoint is complete and the latest, the export fails with a
    one-line error naming the directory."""
    out = tmp_path / "run"
    args = overrides(example_shards, out)
    code, output = run(args, tmp_path / "log.txt", enospc="checkpoint@6:1")
    assert code == 1, output[-4000:]
    ckpts = out / "checkpoints"
    errors = [line[line.index("error:"):] for line in output.splitlines() if "error:" in line]
    assert errors == [
        f"error: checkpoint {ckpts / 'step_00000006'}: save failed on rank 1 (OSError: [Errno 28] No space left on "
        f"device (injected by PIPELINE_INJECT_ENOSPC): '{ckpts / 'step_00000006' / 'rng_rank1.pt'}'); "
        f"{ckpts / 'step_00000003'} stays the latest"
    ], errors
    assert (ckpts / "latest_complete").read_text() == "step_00000003"
    assert not (ckpts / "step_00000006" / "COMPLETE").exists()
    assert sorted(train_losses(out)) == list(range(1, 7))

    (out / "export").write_text("not a directory\n")
    before = len((out / "metrics.jsonl").read_text().splitlines())
    code, output = run(args, tmp_path / "resume.txt", resume=True)
    assert code == 1, output[-4000:]
    assert f"resumed from {ckpts / 'step_00000003'}: step 3" in output
    errors = [line[line.index("error:"):] for line in output.splitlines() if "error:" in line]
    assert errors == [
        f"error: export to {out / 'export' / 'final'} failed (Not a directory: {out / 'export' / '.final.tmp'}); "
        "nothing was replaced"
    ], errors
    lines = (out / "metrics.jsonl").read_text().splitlines()[before:]
    resumed = {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}
    expected = train_losses(reference_run)
    assert sorted(resumed) == list(range(4, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), (step, loss, expected[step])
    assert (ckpts / "latest_complete").read_text() == f"step_{STEPS:08d}"
    assert (ckpts / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    assert_same_weights(ckpts / f"step_{STEPS:08d}", reference_run / "checkpoints" / f"step_{STEPS:08d}")
    assert (out / "export").read_text() == "not a directory\n"


# ---------------------------------------------------------------------------------------------------------------
# The same mechanisms in one process (no launcher): fast checks of the pieces
# ---------------------------------------------------------------------------------------------------------------
class _FakeCheckpointEngine:
    """DeepSpeed's checkpoint_engine interface (save, makedirs); `fail` makes save raise ENOSPC."""

    def __init__(self) -> None:
        self.fail = False

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state: dict, path: str) -> None:
        if self.fail:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device", path)
        torch.save(state, path)


class _FakeEngine:
    """Writes two files through its checkpoint engine, like DeepSpeed; records whether it got to its end (where
    DeepSpeed has its final barrier)."""

    def __init__(self) -> None:
        self.checkpoint_engine = _FakeCheckpointEngine()
        self.finished = False

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> bool:
        self.finished = False
        self.checkpoint_engine.makedirs(os.path.join(root, tag), exist_ok=True)
        self.checkpoint_engine.save({"client": client_state}, os.path.join(root, tag, "model_states.pt"))
        self.checkpoint_engine.save({"w": torch.zeros(2)}, os.path.join(root, tag, "optim_states.pt"))
        self._copy_recovery_script(root)
        self.finished = True
        return True

    def _copy_recovery_script(self, root: str) -> None:  # DeepSpeed's rank 0 copies zero_to_fp32.py next to the tags
        Path(root, "zero_to_fp32.py").write_text("# recovery script\n")


@pytest.fixture
def injection(monkeypatch):
    """Set PIPELINE_INJECT_* variables for this test; returns the FaultInjector read from them."""
    from pipeline.resilience.faults import FaultInjector

    def set_(**values: str) -> FaultInjector:
        for key, value in values.items():
            monkeypatch.setenv(f"PIPELINE_INJECT_{key.upper()}", value)
        return FaultInjector.from_env()

    yield set_
    for key in ("NONFINITE_STEPS", "NONFINITE_GRADS", "ENOSPC", "STEP_DELAY"):
        monkeypatch.delenv(f"PIPELINE_INJECT_{key}", raising=False)


def test_checkpoint_write_errors_in_one_process(tmp_path, injection):
    from pipeline.training.checkpoint import CheckpointError, CheckpointManager, TrainerState

    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    engine = _FakeEngine()
    manager.save(engine, TrainerState(global_step=3))
    assert manager.latest() == "step_00000003"

    # A write error inside the engine's save is recorded, not raised: the engine runs to its end (its barriers).
    engine.checkpoint_engine.fail = True
    with pytest.raises(CheckpointError) as info:
        manager.save(engine, TrainerState(global_step=6))
    assert engine.finished
    step6 = tmp_path / "checkpoints" / "step_00000006"
    assert str(info.value) == (
        f"checkpoint {step6}: save failed on rank 0 (OSError: [Errno 28] No space left on device: "
        f"'{step6 / 'model_states.pt'}'); {tmp_path / 'checkpoints' / 'step_00000003'} stays the latest")
    assert not step6.exists() and manager.latest() == "step_00000003"
    engine.checkpoint_engine.fail = False

    # Injected ENOSPC after the engine's files (a partial directory), then a file where the directory must go.
    injected = CheckpointManager(tmp_path / "checkpoints", keep_last=3, faults=injection(enospc="checkpoint@6"))
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt'\); .*step_00000003 stays the latest$"):
        injected.save(engine, TrainerState(global_step=6))
    assert not step6.exists() and manager.latest() == "step_00000003"
    (tmp_path / "checkpoints" / "zero_to_fp32.py").unlink()
    (tmp_path / "checkpoints" / "zero_to_fp32.py").mkdir()  # DeepSpeed's copy of its script fails (not through
    with pytest.raises(CheckpointError, match=r"\(IsADirectoryError: .*zero_to_fp32\.py'\); "):  # its engine)
        manager.save(engine, TrainerState(global_step=6))
    assert engine.finished and not step6.exists() and manager.latest() == "step_00000003"
    (tmp_path / "checkpoints" / "zero_to_fp32.py").rmdir()
    blocked = CheckpointManager(tmp_path / "file", keep_last=3)
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path / 'file' / 'step_00000001'}: save failed on "
                                              r"rank 0 \(FileExistsError: .*\); no checkpoint stays the latest$"):
        blocked.save(engine, TrainerState(global_step=1))
    assert manager.save(engine, TrainerState(global_step=6)) == step6 and manager.latest() == "step_00000006"


def test_fault_injection_is_off_by_default_and_parses_strictly(injection):
    loss = torch.tensor(1.5)
    faults = injection()
    assert faults.loss_hook(3) is None and faults.describe() == []
    faults.check_write("checkpoint", 3, "/nowhere")  # no variable: no error
    faults = injection(nonfinite_steps="3,4", nonfinite_grads="5", enospc="export@final:1")
    assert torch.isnan(faults.loss_hook(3)(loss))
    x = torch.tensor(2.0, requires_grad=True)
    y = faults.loss_hook(5)(x * 3)
    y.backward()
    assert float(y.detach()) == 6.0 and torch.isnan(x.grad)
    assert faults.loss_hook(6) is None
    faults.check_write("export", "final", "/x")  # rank 1 only; this is rank 0
    faults = injection(enospc="export@final")
    with pytest.raises(OSError, match="No space left on device"):
        faults.check_write("export", "final", "/x")
    with pytest.raises(ValueError, match="PIPELINE_INJECT_ENOSPC='disk@6': expected KIND@WHERE"):
        injection(enospc="disk@6")
    with pytest.raises(ValueError, match="PIPELINE_INJECT_NONFINITE_STEPS='three'"):
        injection(enospc="", nonfinite_steps="three")