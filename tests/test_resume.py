"""Resume guards and resume on another world size.

Unit tests: the run identity (world size free at equal global batch), the one-line list of changes, and
``resume_point``'s decisions (refused, forced, checkpoint without identity, incomplete tag).

End to end, 2-rank and 1-rank CPU launches (ZeRO-3, dropout off so that runs on different world sizes compute the
same numbers): an uninterrupted run on each world size (global batch 16: 2 x 8 and 1 x 16), then each one's step-2
checkpoint resumed on the other world size - losses, validation loss and final weights must match the uninterrupted
run on the new world size within 1e-5 relative - and a changed recipe refused with one line before training.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.training.checkpoint import CheckpointManager
from pipeline.training.resume import ResumeRefused, resume_point
from pipeline.training.run_identity import identity_changes, run_identity
from train_helpers import REPO, TINY, env, export_weights, run_training, train_command, web_search_overrides

STEPS = 5
RESUME_AT = 2
SHA = {"corpus.arrow": "a" * 64, "queries.arrow": "b" * 64}
MANIFEST = {"datasets": {"web_search": {"files": {k: {"size": 1, "sha256": v} for k, v in SHA.items()}},
                         "topics": {"files": {k: {"size": 1, "sha256": v} for k, v in SHA.items()}}}}


def identity(world_size: int = 1, *overrides: str) -> dict:
    return run_identity(load_config(TINY, list(overrides)), MANIFEST, world_size)


def test_identity_depends_on_the_global_batch_not_the_world_size():
    assert identity_changes(identity(2, "train.per_device_batch_size=8"),
                            identity(1, "train.per_device_batch_size=16")) == []
    # Not compared: lr, run length, logging, chunking, DataLoader workers, output directory.
    assert identity_changes(identity(1), identity(1, "train.lr=1e-5", "train.max_steps=99", "train.log_every=5",
                                                  "gradcache.chunk_tokens=64", "train.output_dir=elsewhere",
                                                  "data.num_workers=0")) == []


def test_changes_name_every_key_with_both_values():
    changed = identity(2, "train.seed=7", "train.per_device_batch_size=16", "data.datasets=[web_search]",
                       "data.validation_fraction=0.2", "data.sampling_temperature=2.0", "data.drop_last=true",
                       "loss.hard_negatives={retrieval: 5, clustering: 3, classification: 1}",
                       "loss.distill={teacher: /models/t}", "model.pooling=mean", "model.dtype=bfloat16",
                       "model.from_config.hidden_size=128")
    assert identity_changes(identity(1), changed) == [
        "train.seed 42 -> 7",
        "global batch 8 -> 32",
        'data.datasets ["topics", "web_search"] -> ["web_search"]',
        'data.sha256.topics {"corpus.arrow": "aaaaaaaaaaaa", "queries.arrow": "bbbbbbbbbbbb"} -> unset',
        "data.validation_fraction 0.05 -> 0.2",
        "data.sampling_temperature 1.0 -> 2.0",
        "data.drop_last false -> true",
        "loss.hard_negatives.retrieval 3 -> 5",
        'loss.distill null -> {"teacher": "/models/t", "weight": 1.0, "dtype": "auto", "kind": "embedding_mse"}',
        "model.from_config.hidden_size 64 -> 128",
        "model.pooling last_token -> mean",
        "model.dtype auto -> bfloat16",
    ]
    rebuilt = json.loads(json.dumps(identity(1)))
    rebuilt["data"]["sha256"]["web_search"]["corpus.arrow"] = "c" * 64
    assert identity_changes(rebuilt, identity(1)) == [
        "data.sha256.web_search.corpus.arrow cccccccccccc -> aaaaaaaaaaaa"]


def _checkpoint(root: Path, tag: str, record: dict, ranks: int = 0) -> None:
    (root / tag).mkdir(parents=True)
    (root / tag / "COMPLETE").write_text(json.dumps(record))
    for r in range(ranks):
        (root / tag / f"rng_rank{r}.pt").write_bytes(b"")


def test_resume_point_refuses_forces_and_warns(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert resume_point(manager, None, identity(), 1) is None
    assert resume_point(manager, "auto", identity(), 1) is None  # nothing to resume: a fresh start
    with pytest.raises(ResumeRefused, match=rf"^--resume: {tmp_path / 'step_00000003'} is not a complete checkpoint$"):
        resume_point(manager, "step_00000003", identity(), 1)

    # A checkpoint of 2 ranks x 8; this run: 2 ranks x 16, another seed.
    _checkpoint(tmp_path, "step_00000004", {"global_step": 4, "world_size": 2,
                                             "identity": identity(2, "train.per_device_batch_size=8")})
    current = identity(2, "train.per_device_batch_size=16", "train.seed=7")
    with pytest.raises(ResumeRefused) as refused:
        resume_point(manager, "auto", current, 2)
    assert str(refused.value) == (f"--resume {tmp_path / 'step_00000004'}: the run changed: train.seed 42 -> 7; "
                                  "global batch 16 -> 32 (pass --resume-force to continue anyway)")
    forced = resume_point(manager, "auto", current, 2, force=True)
    assert forced.changes == ("train.seed 42 -> 7", "global batch 16 -> 32") and not forced.world_size_changed
    assert forced.warnings == (f"--resume {tmp_path / 'step_00000004'}: the run changed: train.seed 42 -> 7; "
                               "global batch 16 -> 32; continuing anyway (--resume-force)",)
    # Same global batch on one rank: accepted, the world-size change detected.
    point = resume_point(manager, "step_00000004", identity(1, "train.per_device_batch_size=16"), 1)
    assert point.world_size_changed and point.saved_world_size == 2 and point.step == 4 and not point.warnings

    # Written before identities (and world sizes) were recorded: unknown, a warning; world size from rng files.
    _checkpoint(tmp_path, "step_00000006", {"global_step": 6, "time": 0.0}, ranks=4)
    old = resume_point(manager, "auto", current, 2)
    assert old.tag == "step_00000006" and old.saved_world_size == 4 and old.world_size_changed
    assert old.warnings == (f"--resume {tmp_path / 'step_00000006'}: the checkpoint records no run identity (written "
                            "by an older version): cannot check that the recipe is unchanged",)


LORA = "model.lora={r: 8, alpha: 16, dropout: 0.1, target_modules: [q_proj, v_proj]}"


def test_identity_includes_lora_and_attention_mask_and_remote_code():
    """peft keeps r and alpha as plain attributes, not in the checkpoint: every LoRA field is compared, and so is the
    attention mask the model trains with (resolved: auto on the tiny causal decoder is causal)."""
    lora = identity(1, LORA)
    assert identity_changes(identity(1), lora) == [
        'model.lora null -> {"r": 8, "alpha": 16.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}']
    assert identity_changes(lora, identity(1, LORA, "model.lora.alpha=32", "model.lora.r=4", "model.lora.dropout=0",
                                           "model.lora.target_modules=all-linear")) == [
        "model.lora.r 8 -> 4", "model.lora.alpha 16.0 -> 32.0", "model.lora.dropout 0.1 -> 0.0",
        'model.lora.target_modules ["q_proj", "v_proj"] -> all-linear']
    # The order of the module names means nothing.
    assert identity_changes(lora, identity(1, LORA, "model.lora.target_modules=[v_proj, q_proj]")) == []
    assert identity_changes(identity(1), identity(1, "model.attention_mask=bidirectional")) == [
        "model.attention_mask causal -> bidirectional"]
    assert identity_changes(identity(1), identity(1, "model.attention_mask=causal")) == []  # auto resolves to it
    assert identity_changes(identity(1), identity(1, "model.trust_remote_code=true")) == [
        "model.trust_remote_code false -> true"]


def _teacher(path: Path, weights: bytes = b"weights") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "bert"}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "README.md").write_text("not hashed")
    return path


def test_teacher_is_compared_by_its_files_not_its_path(tmp_path):
    teacher = _teacher(tmp_path / "teacher")
    saved = identity(1, f"loss.distill={{teacher: {teacher}}}")
    moved = tmp_path / "elsewhere" / "teacher-copy"
    shutil.copytree(teacher, moved)
    (moved / "README.md").write_text("edited")
    assert identity_changes(saved, identity(1, f"loss.distill={{teacher: {moved}}}")) == []

    retrained = _teacher(tmp_path / "retrained", b"other weights")
    current = identity(1, f"loss.distill={{teacher: {retrained}}}")
    changes = identity_changes(saved, current)
    assert len(changes) == 1 and changes[0].startswith("loss.distill.teacher.sha256 "), changes
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    _checkpoint(manager.root, "step_00000004", {"global_step": 4, "world_size": 1, "identity": saved})
    with pytest.raises(ResumeRefused, match=r"the run changed: loss\.distill\.teacher\.sha256 [0-9a-f]{12} -> "
                                            r"[0-9a-f]{12} \(pass --resume-force"):
        resume_point(manager, "auto", current, 1)
    assert resume_point(manager, "auto", identity(1, f"loss.distill={{teacher: {moved}}}"), 1).changes == ()


def test_identity_of_an_older_version_is_compared_on_what_it_recorded(tmp_path):
    """A checkpoint written before model.lora, model.attention_mask, model.trust_remote_code and the teacher's hash
    were recorded (no "version"): those keys are not compared, a warning says so; the rest still is."""
    from pipeline.training.run_identity import unrecorded_keys

    teacher = _teacher(tmp_path / "teacher")
    current = identity(1, f"loss.distill={{teacher: {teacher}}}")
    old = json.loads(json.dumps(current))
    old.pop("version", None)
    for key in ("attention_mask", "lora", "trust_remote_code"):
        old["model"].pop(key, None)
    old["loss"]["distill"]["teacher"] = "/old/path/of/the/teacher"
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    _checkpoint(manager.root, "step_00000004", {"global_step": 4, "world_size": 1, "identity": old})
    point = resume_point(manager, "auto", current, 1)
    assert point.changes == () and point.warnings == (
        f"--resume {manager.root / 'step_00000004'}: the checkpoint's run identity does not record "
        "model.attention_mask, model.lora, model.trust_remote_code, loss.distill.teacher (written by an older "
        "version): not compared",)
    old["train"]["seed"] = 7
    assert identity_changes(old, current) == ["train.seed 7 -> 42"]
    without_teacher = json.loads(json.dumps(old))
    without_teacher["loss"]["distill"] = None
    assert unrecorded_keys(without_teacher, identity(1)) == [
        "model.attention_mask", "model.lora", "model.trust_remote_code"]


class _Engine:
    """DeepSpeed's checkpoint calls, without DeepSpeed: the trainer state goes through its client state."""

    def __init__(self) -> None:
        self.client: dict = {}

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> bool:
        self.client = client_state
        return True

    def load_checkpoint(self, root: str, tag: str) -> tuple[str, dict]:
        return str(Path(root) / tag), self.client


def _draws() -> tuple:
    import random

    import numpy as np
    import torch

    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            torch.rand(3).tolist(), torch.randn(3).tolist())


def test_rng_files_load_weights_only_and_resume_exactly(tmp_path):
    import random

    import numpy as np
    import torch

    from pipeline.training.checkpoint import TrainerState

    random.gauss(0, 1), np.random.randn()  # cached second normals (python's gauss, numpy's has_gauss) saved too
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(_Engine(), TrainerState(global_step=2))
    rng_file = tmp_path / "step_00000002" / "rng_rank0.pt"
    torch.load(rng_file, weights_only=True)  # plain data: no numpy arrays, nothing to allow
    expected = _draws()
    engine = _Engine()
    engine.client = {"trainer": {"global_step": 2}}
    assert manager.load(engine, "step_00000002").global_step == 2
    assert _draws() == expected


def test_rng_files_of_older_versions_load_and_code_is_refused(tmp_path):
    import os
    import random

    import numpy as np
    import torch

    from pipeline.training.checkpoint import load_rng_file, set_rng_state

    legacy = tmp_path / "legacy.pt"  # numpy's state as its legacy tuple holding an ndarray
    np.random.randn()
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, legacy)
    expected = _draws()
    set_rng_state(load_rng_file(legacy))
    assert _draws() == expected

    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)

    evil = tmp_path / "rng_rank0.pt"
    torch.save({"python": Payload()}, evil)
    with pytest.raises(RuntimeError, match=rf"^{evil}: not an RNG state file of this pipeline \(refused by "
                                           r"torch\.load\(weights_only=True\): .*GLOBAL.*system"):
        load_rng_file(evil)
    assert not (tmp_path / "pwned").exists()


def test_failed_conversion_is_one_line_and_leaves_nothing(tmp_path):
    from pipeline.training.errors import TrainingAborted
    from pipeline.training.resume import universal_copy

    tag = tmp_path / "step_00000002"
    _checkpoint(tmp_path, tag.name, {"global_step": 2, "world_size": 2})  # no DeepSpeed files in it
    with pytest.raises(TrainingAborted) as failed:  # launch/train.py: one "error:" line, exit 1
        universal_copy(tag)
    message = str(failed.value)
    assert message.startswith(f"checkpoint {tag}: conversion to a universal checkpoint (another world size) failed "
                              "on rank 0: RuntimeError: ds_to_universal exited with 1: ") and "\n" not in message
    assert sorted(p.name for p in tag.iterdir()) == ["COMPLETE"]


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------
def overrides(shards: Path, out: Path, nproc: int) -> list[str]:
    return web_search_overrides(shards, out, steps=STEPS, save_every=RESUME_AT, eval_every=STEPS, **{
        "train.per_device_batch_size": str(16 // nproc), "model.from_config.attention_dropout": "0.0"})


@pytest.fixture(scope="module")
def uninterrupted(example_shards, tmp_path_factory) -> dict[int, Path]:
    """world size -> an uninterrupted run of STEPS steps at global batch 16, checkpoints every RESUME_AT steps."""
    runs = {}
    for nproc in (2, 1):
        out = tmp_path_factory.mktemp(f"world{nproc}") / "run"
        run_training(overrides(example_shards, out, nproc), nproc=nproc, log=out.parent / "log.txt")
        runs[nproc] = out
    return runs


def records(run: Path, split: str) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == split}


def close(ours: dict[int, float], theirs: dict[int, float], rel: float = 1e-5) -> None:
    assert ours, "no records"
    for step, loss in ours.items():
        assert loss == pytest.approx(theirs[step], rel=rel), (step, loss, theirs[step])


def copy_checkpoint(run: Path, out: Path, tag: str) -> None:
    """`run`'s checkpoint `tag` as the only one of a new run directory `out`."""
    shutil.copytree(run / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest_complete").write_text(tag)


def resume_on(nproc: int, source: Path, out: Path, shards: Path, *extra: str) -> str:
    """Resume `source`'s step-RESUME_AT checkpoint with `nproc` ranks at global batch 16; returns the log."""
    tag = f"step_{RESUME_AT:08d}"
    copy_checkpoint(source, out, tag)
    log = out.parent / f"resume{nproc}.txt"
    run_training([*extra, *overrides(shards, out, nproc)], nproc=nproc, resume=True, log=log)
    assert (out / "checkpoints" / tag / "universal" / "zero").is_dir()  # DeepSpeed's universal copy
    text = log.read_text()
    written = "2 ranks" if nproc == 1 else "1 rank"
    assert f"resume on another world size: {out / 'checkpoints' / tag} was written by {written}, this run has {nproc}" \
        in text
    return text


def matches_uninterrupted(out: Path, reference: Path) -> None:
    """Resumed steps RESUME_AT+1..STEPS, the final validation loss and the final weights equal the reference's."""
    resumed = records(out, "train")
    assert sorted(resumed) == list(range(RESUME_AT + 1, STEPS + 1))
    close(resumed, records(reference, "train"))
    close(records(out, "validation"), records(reference, "validation"))
    ours, theirs = export_weights(out / "export" / "final"), export_weights(reference / "export" / "final")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert float((ours[name] - theirs[name]).norm() / theirs[name].norm()) <= 1e-5, name


def test_uninterrupted_runs_agree_across_world_sizes(uninterrupted):
    """The premise: at equal global batch, 2 x 8 and 1 x 16 compute the same losses; checkpoints record their
    world size and identity."""
    close(records(uninterrupted[1], "train"), records(uninterrupted[2], "train"))
    assert sorted(records(uninterrupted[1], "train")) == list(range(1, STEPS + 1))
    for nproc, run in uninterrupted.items():
        record = json.loads((run / "checkpoints" / f"step_{RESUME_AT:08d}" / "COMPLETE").read_text())
        assert record["world_size"] == nproc and record["identity"]["global batch"] == 16


def test_resume_from_two_ranks_on_one_with_force(uninterrupted, example_shards, tmp_path):
    """2 ranks -> 1 rank. Also --resume-force: data.sampling_temperature changes the identity, but with a single
    dataset every step still draws from it in the same order, so the losses must still match."""
    out = tmp_path / "run"
    text = resume_on(1, uninterrupted[2], out, example_shards, "--resume-force", "data.sampling_temperature=2.0")
    warning = [line for line in text.splitlines() if "the run changed" in line]
    assert len(warning) == 1 and warning[0].split(" ", 1)[1] == (
        f"WARNING --resume {out / 'checkpoints' / 'step_00000002'}: the run changed: data.sampling_temperature "
        "1.0 -> 2.0; continuing anyway (--resume-force)")
    matches_uninterrupted(out, uninterrupted[1])


def test_resume_from_one_rank_on_two(uninterrupted, example_shards, tmp_path):
    out = tmp_path / "run"
    resume_on(2, uninterrupted[1], out, example_shards)
    matches_uninterrupted(out, uninterrupted[2])


def test_changed_recipe_is_refused_before_training(uninterrupted, example_shards, tmp_path):
    out = tmp_path / "run"
    copy_checkpoint(uninterrupted[2], out, "step_00000004")
    args = overrides(example_shards, out, 1) + ["train.seed=7"]  # 2 ranks x 16: global batch 32
    proc = subprocess.run(train_command(args, nproc=2, resume=True), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error")]
    assert lines == [f"error: --resume {out / 'checkpoints' / 'step_00000004'}: the run changed: train.seed 42 "
                     "-> 7; global batch 16 -> 32 (pass --resume-force to continue anyway)"], lines
    assert not (out / "metrics.jsonl").exists() and "distributed: world size" not in proc.stderr
