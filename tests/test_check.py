"""`launch/train.py --check`: validates config, DeepSpeed JSON, data, tokenizer and hostfile; prints the plan.

The valid case runs the real entry point as a subprocess and checks the plan's numbers against values computed
here independently (world size from the hostfile's slots, steps from the manifest's counts, chunks from
GradCache's own chunk planner); the invalid cases call ``main()`` in-process (fast) and check exit status 2 and
the named problem, and one runs as a subprocess to check that several problems come out one per line.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_helpers import make_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-cpu.yaml"
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("launch_train_entry", REPO / "launch" / "train.py")
train_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_entry)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        env.pop(key, None)
    return env


def run_check(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY), "--check", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def check_main(capsys, *args: str) -> tuple[int, str, str]:
    code = train_entry.main(["--config", str(TINY), "--check", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def expected_steps_per_epoch(shards: Path, global_batch: int, fraction: float = 0.05) -> int:
    """Global batches per epoch from the manifest's query counts (the split holds out round(f * n) of the example's
    distinct queries, at least 1; the last batch of a dataset may be smaller: ceil)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    total = 0
    for entry in manifest["datasets"].values():
        n = entry["counts"]["queries"]
        n_val = max(int(round(fraction * n)), 1 if n > 1 else 0)
        total += -(-(n - n_val) // global_batch)
    return total


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    return make_word_tokenizer(tmp_path_factory.mktemp("word_tok"))


def test_valid_check_prints_the_plan(example_shards, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode0 slots=2\n\nnode1 slots=1\n")
    out = tmp_path / "run"
    proc = run_check("--hostfile", str(hosts), f"data.shards={example_shards}", f"train.output_dir={out}",
                     "train.max_steps=null", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not errors(proc.stderr) and "Traceback" not in proc.stderr
    text = proc.stdout
    steps = expected_steps_per_epoch(example_shards, global_batch=8 * 3)
    assert re.search(r"world size\s+3\s", text), text
    assert "8 queries per rank, 24 global" in text
    assert f"{steps} per epoch; {2 * steps} in total (2 epochs)" in text
    assert re.search(r"ZeRO stage 3, no offload", text)
    assert "sha256 verified" in text and "fresh start (no complete checkpoint)" in text
    for name in ("paper_topics", "product_reviews", "web_search"):
        assert name in text
    assert text.rstrip().endswith("check: OK")
    assert not out.exists()  # a dry run writes nothing


def test_plan_numbers_match_the_trainer_code(example_shards):
    """Chunks and tokens per step equal what GradCache's planner gives for the trainer's own batches."""
    from pipeline.config import load_config
    from pipeline.data.loader import StepBatches, TrainData
    from pipeline.training.gradcache import _plan
    from pipeline.training.plan import check_run, format_plan

    world, steps = 3, 4
    report = check_run(TINY, [f"data.shards={example_shards}", "train.merge_window=10", "train.merge_every=4"],
                       world_size=world, sample_steps=steps)
    assert report.ok, report.problems
    plan = report.plan
    assert plan.world.size == world and plan.global_batch == 24 and plan.total_steps == 30
    assert plan.merge_steps == [24, 28]  # multiples of 4 after step 30 - 10
    assert ("merge exports      after steps 24, 28: export/merge_step_00000024 to merge_step_00000028 (for python -m "
            "pipeline.merge)") in format_plan(plan)  # the trainer's names (pipeline.training.export.merge_export_name)
    assert plan.steps_per_epoch == expected_steps_per_epoch(example_shards, 24)
    assert sum(d.steps_epoch0 for d in plan.datasets) == plan.steps_per_epoch
    cfg = load_config(TINY, [f"data.shards={example_shards}"])
    model = SimpleNamespace(packed=True)
    data = TrainData(cfg.data, cfg.loss, seed=cfg.train.seed, per_device_batch=8, world_size=world, rank=0,
                     verify=False)
    chunks, tokens = [], []
    for step in range(steps):
        per_rank, real = [], 0
        for rank in range(world):
            _, batch = StepBatches(data.plan, data.schedule, 0, rank)[step]
            per_rank.append(len(_plan(model, batch, cfg.gradcache, "cpu").chunks))
            real += batch.real_tokens()
        chunks.append(max(per_rank))
        tokens.append(real)
    assert plan.sample.chunks_run == chunks
    assert plan.sample.real_tokens == tokens
    assert plan.model.parameters is not None and plan.model.parameters > 1_000_000  # 30522 x 64 embedding alone


def test_num_nodes_limits_the_hostfile(example_shards, tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=4\nb slots=4\n")
    code, out, err = check_main(capsys, "--hostfile", str(hosts), "--num_nodes", "1", "--num_gpus", "2",
                                f"data.shards={example_shards}", f"train.output_dir={tmp_path / 'run'}")
    assert code == 0, err
    assert re.search(r"world size\s+2\s", out) and "16 global" in out


def _ds_json(**changes) -> str:
    """ds_configs/zero3.json with `changes` (``stage``: zero_optimization.stage; other keys at the top level)."""
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    for key, value in changes.items():
        if key == "stage":
            cfg["zero_optimization"]["stage"] = value
        else:
            cfg[key] = value
    return json.dumps(cfg)


def invalid_case(case: str, shards: Path, tmp_path: Path, word_tokenizer: str) -> tuple[list[str], str]:
    """The extra arguments of an invalid input `case` and the start of the one error line it must give; the file
    the case names is written."""
    ds, bad, hosts, nope = (tmp_path / name for name in ("ds.json", "bad.json", "hosts", "nope.json"))
    files = {
        "ds_invalid": (bad, '{"zero_optimization": {"stage": 3,}}'),
        "ds_accumulation": (ds, _ds_json(gradient_accumulation_steps=4)),
        "ds_stage": (ds, _ds_json(stage=7)),
        "hostfile": (hosts, "node0 slots=2\nnode1 slots=two\n"),
    }
    if case in files:
        files[case][0].write_text(files[case][1])
    cases = {
        "config_key": (["train.bogus=1"], f"error: {TINY}: train.bogus: unknown key"),
        "config_value": (["train.per_device_batch_size=0"], "error: train.per_device_batch_size: must be >= 1, got 0"),
        "timeout_value": (["train.collective_timeout_s=0"], "error: train.collective_timeout_s: must be > 0, got 0"),
        "merge_value": (["train.merge_every=-1"], "error: train.merge_every: must be >= 0, got -1"),
        "ds_missing": ([f"deepspeed={nope}"], f"error: {nope}: cannot read DeepSpeed config"),
        "ds_invalid": ([f"deepspeed={bad}"], f"error: {bad}: invalid JSON"),
        "ds_accumulation": ([f"deepspeed={ds}"],
                            f"error: {ds}: gradient_accumulation_steps: is 4, expected \"auto\" or 1"),
        "ds_stage": ([f"deepspeed={ds}"], f"error: {ds}: zero_optimization.stage:"),
        "hostfile": (["--hostfile", str(hosts)], f"error: {hosts}:2: expected 'HOSTNAME slots=N'"),
        "dataset": (["data.datasets=[web_search, nope]"], "error: data.datasets: nope not in the shards"),
        "tokenizer": ([f"model.tokenizer={word_tokenizer}"],
                      f"error: {shards / 'manifest.json'}: shards were tokenized with"),
        "in_batch_type": (["loss.in_batch_types=[retrieval, qa]"],
                          "error: loss.in_batch_types[1]: unknown dataset type 'qa' (expected one of retrieval, "),
        "hard_negative_type": (["loss.hard_negatives={retreival: 7, classification: 1, clustering: 9}"],
                               "error: loss.hard_negatives.retreival: unknown dataset type 'retreival'"),
        "too_few_queries": (["data.drop_last=true", "--world-size", "64"],
                            "error: data: no dataset has a full global batch of 512 (data.drop_last) training queries"),
    }
    return cases[case]


@pytest.mark.parametrize("case", [
    "config_key", "config_value", "timeout_value", "merge_value", "ds_missing", "ds_invalid", "ds_accumulation", "ds_stage", "hostfile",
    "dataset", "tokenizer", "too_few_queries", "in_batch_type", "hard_negative_type",
])
def test_invalid_input_is_named(case, example_shards, tmp_path, capsys, word_tokenizer):
    extra, expected = invalid_case(case, example_shards, tmp_path, word_tokenizer)
    args = [f"data.shards={example_shards}", f"train.output_dir={tmp_path / 'run'}", *extra]
    code, out, err = check_main(capsys, *args)
    assert code == 2, err
    assert len(errors(err)) == 1, err
    assert errors(err)[0].startswith(expected), errors(err)
    assert "check: OK" not in out and not (tmp_path / "run").exists()


def test_unknown_loss_type_stops_the_start(example_shards, tmp_path, capsys):
    """The trainer's start runs the same check as --check (pipeline.training.losses.loss_type_problems)."""
    code = train_entry.main(["--config", str(TINY), f"data.shards={example_shards}",
                             f"train.output_dir={tmp_path / 'run'}", "loss.hard_negatives={retrieval: 3, qa: 1}"])
    err = capsys.readouterr().err
    assert code == 2 and errors(err) == ["error: loss.hard_negatives.qa: unknown dataset type 'qa' (expected one of "
                                         "retrieval, classification, clustering)"], err
    assert not (tmp_path / "run").exists()


def test_every_problem_is_listed_one_per_line(example_shards, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node0 slots=2 # inline comment\n")
    proc = run_check("--hostfile", str(hosts), f"data.shards={example_shards}", "train.lr=-1",
                     "data.validation_fraction=1.5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = errors(proc.stderr)
    assert len(lines) == 3, proc.stderr
    assert lines[0].startswith(f"error: {hosts}:1: expected 'HOSTNAME slots=N'")
    assert "error: train.lr: must be > 0, got -1.0" in lines
    assert "error: data.validation_fraction: must be in [0, 1), got 1.5" in lines


def test_world_options_need_check():
    with pytest.raises(SystemExit) as exc:
        train_entry.main(["--config", str(TINY), "--world-size", "4"])
    assert exc.value.code == 2


def test_launch_scripts_forward_check(tmp_path):
    """train.sh --check runs the check for its NPROC ranks, multinode.sh --check for the hostfile (no launcher)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=2\nb slots=2\n")
    env = {**_env(), "NPROC": "3", "PATH": os.environ["PATH"]}
    env.pop("NUM_GPUS", None)
    one = subprocess.run(["bash", "launch/train.sh", "--config", str(TINY), "--check", "--dry-run", "train.lr=1e-4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert one.returncode == 0, one.stderr
    if "--device cuda" not in one.stdout:  # a machine without GPUs: NPROC ranks
        assert "launch/train.py --config" in one.stdout
        assert "--check --world-size 3 --device cpu train.lr=1e-4" in one.stdout
    assert "deepspeed" not in one.stdout
    many = subprocess.run(["bash", "launch/multinode.sh", "--hostfile", str(hosts), "--config", str(TINY), "--check",
                           "--dry-run", "train.lr=1e-4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert many.returncode == 0, many.stderr
    assert f"--check --hostfile {hosts} train.lr=1e-4" in many.stdout and "deepspeed" not in many.stdout


def test_resume_target_is_reported(example_shards, tmp_path, capsys):
    """--resume TAG must name a complete checkpoint; --resume auto reports the one it would load."""
    out = tmp_path / "run"
    args = [f"data.shards={example_shards}", f"train.output_dir={out}"]
    code, _, err = check_main(capsys, "--resume", "step_00000010", *args)
    assert code == 2 and errors(err) == [f"error: --resume: {out / 'checkpoints' / 'step_00000010'} is not a "
                                         "complete checkpoint"], err
    tag = out / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text(json.dumps({"global_step": 10}))
    code, text, err = check_main(capsys, "--resume", "auto", *args)
    assert code == 0, err
    assert f"resumes from {tag} (step 10)" in text
    assert "records no run identity" in err  # written before identities: unknown, a warning

    # The trainer's refusal of a changed recipe (pipeline.training.resume.resume_point), and --resume-force.
    from pipeline.config import load_config
    from pipeline.data.shards import read_manifest
    from pipeline.training.run_identity import run_identity

    saved = run_identity(load_config(TINY, args + ["train.per_device_batch_size=4"]), read_manifest(example_shards), 2)
    (tag / "COMPLETE").write_text(json.dumps({"global_step": 10, "world_size": 2, "identity": saved}))
    code, _, err = check_main(capsys, "--resume", "auto", "--world-size", "1", *args, "train.seed=7")
    assert code == 2 and errors(err) == [f"error: --resume {tag}: the run changed: train.seed 42 -> 7 (pass "
                                         "--resume-force to continue anyway)"], err  # 2 x 4 = 1 x 8: same batch
    code, text, err = check_main(capsys, "--resume", "auto", "--resume-force", "--world-size", "1", *args,
                                 "train.seed=7")
    assert code == 0 and f"warning: --resume {tag}: the run changed: train.seed 42 -> 7; continuing anyway" in err
    assert f"resumes from {tag} (step 10), written by 2 ranks" in text
