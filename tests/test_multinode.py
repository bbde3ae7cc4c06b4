"""Launch scripts: --help and input errors, Slurm hostfile generation, a one-node run, and a real two-"node" run.

The two-node run goes through launch/multinode.sh -> pipeline.preflight -> `deepspeed --hostfile` -> pdsh -> ssh
into a private sshd on loopback (tests/sshd_cluster.py), where node0 and node1 are two aliases of this machine with
one slot each. The workload is a parameter of the `multinode_run` fixture: launch/train.py on the tiny CPU recipe and the example
shards (the product's main path), and tests/dist_check.py (all-reduce + per-rank report of the alias it ran on).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from sshd_cluster import free_port, sshd_cluster  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("train.sh", "multinode.sh", "slurm.sbatch")
RUN_TIMEOUT = 240  # seconds for one two-node run (gradcheck takes ~15-50 s on 2 busy cores)


# --------------------------------------------------------------------------------------------------------------
# Script basics (no processes launched)
# --------------------------------------------------------------------------------------------------------------
def _script(name: str, *args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH / name), *args], capture_output=True, text=True, cwd=cwd, timeout=60,
                          env=env)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_0(name):
    r = _script(name, "--help")
    assert r.returncode == 0 and r.stdout.startswith("Usage:"), r.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_strict_mode_and_executable(name):
    path = LAUNCH / name
    assert os.access(path, os.X_OK), f"{path} is not executable"
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("name, args, message", [
    ("train.sh", [], "train.sh: error: --config is required"),
    ("train.sh", ["--config", "absent.yaml"], "train.sh: error: config not found:"),
    ("train.sh", ["--config", "configs/tiny-cpu.yaml", "--bogus"], "train.sh: error: unknown option --bogus"),
    ("train.sh", ["--config", "configs/tiny-cpu.yaml", "stray"], "train.sh: error: unexpected argument 'stray'"),
    ("multinode.sh", ["--config", "x.yaml"], "multinode.sh: error: --hostfile is required"),
    ("multinode.sh", ["--hostfile", "absent", "--config", "x.yaml"], "multinode.sh: error: hostfile not found: absent"),
    ("multinode.sh", ["--hostfile", "launch/hostfile.example", "--config", "configs/tiny-cpu.yaml",
                      "--master-port", "http"],
     "multinode.sh: error: --master-port must be a port number"),
    ("multinode.sh", ["--hostfile"], "multinode.sh: error: --hostfile needs a value"),
    ("slurm.sbatch", ["--config", "x.yaml"], "slurm.sbatch: error: SLURM_JOB_NODELIST is not set"),
])
def test_bad_input_one_line_error(name, args, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = _script(name, *args, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr


def _fake_bin(tmp_path: Path, **tools: str) -> dict[str, str]:
    """PATH with fake commands (name -> shell body) in front."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_train_sh_dry_run_cpu_and_gpu(tmp_path):
    env = _fake_bin(tmp_path, **{"nvidia-smi": "exit 9"})  # nvidia-smi present but no GPU answers -> CPU
    env.update(NPROC="2", DRY_RUN="1")
    env.pop("OMP_NUM_THREADS", None)
    r = _script("train.sh", "--config", "configs/tiny-cpu.yaml", "train.lr=1e-5", "--", "--resume", "auto", env=env)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip().splitlines()[-1]
    assert "# cpu: 2 rank(s)" in r.stdout and "GLOO_SOCKET_IFNAME=lo" in r.stdout
    assert "-m deepspeed.launcher.runner --num_gpus 2 --master_port 29500" in cmd
    assert cmd.endswith(f"{REPO}/launch/train.py --config {REPO}/configs/tiny-cpu.yaml train.lr=1e-5 --resume auto")

    env = _fake_bin(tmp_path, **{"nvidia-smi": "printf '0\\n1\\n2\\n3\\n'"})
    env.update(DRY_RUN="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = _script("train.sh", "--config", "configs/tiny-cpu.yaml", env=env)
    assert r.returncode == 0 and "# gpu: 4 rank(s)" in r.stdout and "--num_gpus 4" in r.stdout, r.stdout + r.stderr
    r = _script("train.sh", "--config", "configs/tiny-cpu.yaml", env=dict(env, CUDA_VISIBLE_DEVICES="2,3"))
    assert "# gpu: 2 rank(s)" in r.stdout and "--include localhost:2,3" in r.stdout, r.stdout + r.stderr
    r = _script("train.sh", "--config", "configs/tiny-cpu.yaml", env=dict(env, NUM_GPUS="8"))
    assert r.returncode == 2 and "NUM_GPUS=8 but nvidia-smi lists 4 GPU(s)" in r.stderr


def test_slurm_writes_hostfile_and_calls_multinode(tmp_path):
    env = _fake_bin(tmp_path, scontrol='[ "$1 $2" = "show hostnames" ] && printf "gpu-a01\\ngpu-a02\\ngpu-b07\\n"')
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "MASTER_", "GPUS_PER_NODE"))}
    env.update(SLURM_JOB_NODELIST="gpu-a[01-02],gpu-b07", SLURM_JOB_ID="123456", SLURM_GPUS_PER_NODE="h100:8",
               SLURM_SUBMIT_DIR=str(REPO), HOSTFILE_DIR=str(tmp_path / "hf"), DRY_RUN="1")
    r = _script("slurm.sbatch", "--config", "configs/tiny-cpu.yaml", "train.lr=2e-5", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    hostfile = tmp_path / "hf" / "hostfile.123456"
    assert hostfile.read_text() == "gpu-a01 slots=8\ngpu-a02 slots=8\ngpu-b07 slots=8\n"
    launch = r.stdout.strip().splitlines()[-1]
    assert f"--hostfile {hostfile} --master_addr gpu-a01 --master_port 29956" in launch  # 29500 + 123456 % 1000
    assert launch.endswith(f"launch/train.py --config {REPO}/configs/tiny-cpu.yaml train.lr=2e-5")
    preflight = r.stdout.strip().splitlines()[-2]
    assert f"-m pipeline.preflight --hostfile {hostfile}" in preflight and preflight.endswith("train.lr=2e-5")
    assert "NCCL_SOCKET_IFNAME=^lo,docker0" in r.stdout


# --------------------------------------------------------------------------------------------------------------
# Real launches
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launch_dir(tmp_path_factory) -> Path:
    """A snapshot of the code the ranks run: the shared working tree may change under concurrent edits, and
    preflight (rightly) refuses a host whose code differs from the launcher's."""
    root = tmp_path_factory.mktemp("launch_dir")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipeline", "launch", "configs", "ds_configs"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, root / name, ignore=ignore)
    (root / "tests").mkdir()
    shutil.copy2(REPO / "tests" / "dist_check.py", root / "tests" / "dist_check.py")
    return root


@dataclass
class Workload:
    name: str
    entry: list[str]                     # multinode.sh / train.sh entry options
    config: Callable[[Path, Path], Path]  # (launch_dir, tmp_path) -> config path
    args: list[str] = field(default_factory=list)  # after --; "{out}" is replaced by the output dir
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE before --; "{out}", "{shards}" replaced


def _data_config(launch_dir: Path, tmp_path: Path) -> Path:
    """A config whose data path exists (so preflight's data check runs for real)."""
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "manifest.json").write_text('{"format": "dist-check"}\n')
    cfg = tmp_path / "dist_check.yaml"
    cfg.write_text(f"data:\n  shards: {shards}\ndeepspeed: {launch_dir / 'ds_configs' / 'zero3.json'}\n")
    return cfg


WORKLOADS = {
    "train": Workload("train", [], lambda d, t: d / "configs" / "tiny-cpu.yaml",
                      overrides=["data.shards={shards}", "train.output_dir={out}", "train.max_steps=3",
                                 "train.save_every=0", "train.eval_every=0", "data.datasets=[web_search]"]),
    "dist_check": Workload("dist_check", ["--script", "tests/dist_check.py"], _data_config, ["--out", "{out}"]),
}
MULTINODE_WORKLOADS = ["train", "dist_check"]


@dataclass
class RunResult:
    workload: Workload
    returncode: int
    output: str
    elapsed: float
    out_dir: Path
    leftover: list[str]  # processes still running in ssh sessions after the launcher exited

    def ranks(self) -> dict[int, dict]:
        return {r["rank"]: r for r in (json.loads(p.read_text()) for p in self.out_dir.glob("rank*.json"))}


def _run_group(cmd: list[str], *, cwd: Path, env: dict, timeout: float) -> tuple[int, str, float]:
    """Run in a new process group; on timeout SIGKILL the whole group (not SIGTERM: DeepSpeed's handler would
    `pdsh pkill -f deepspeed.launcher.launch` on every host, i.e. on this shared machine)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, out + f"\n[test] killed after {timeout}s", time.monotonic() - start


@pytest.fixture(params=MULTINODE_WORKLOADS)
def multinode_run(request, sshd_cluster, launch_dir, tmp_path) -> RunResult:  # noqa: F811
    """launch/multinode.sh over node0 + node1 (slots=1 each) with the parametrised workload."""
    wl = WORKLOADS[request.param]
    out = tmp_path / "out"
    hostfile = sshd_cluster.write_hostfile(tmp_path / "hosts")
    cmd = [str(launch_dir / "launch" / "multinode.sh"), "--hostfile", str(hostfile),
           "--config", str(wl.config(launch_dir, tmp_path)), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--ssh-config", str(sshd_cluster.ssh_config), *wl.entry]
    shards = str(request.getfixturevalue("example_shards")) if wl.name == "train" else ""
    cmd += [o.replace("{out}", str(out)).replace("{shards}", shards) for o in wl.overrides]
    if wl.args:
        cmd += ["--", *[a.replace("{out}", str(out)) for a in wl.args]]
    env = dict(sshd_cluster.env(), PYTHON=sys.executable)
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    try:
        rc, output, elapsed = _run_group(cmd, cwd=launch_dir, env=env, timeout=RUN_TIMEOUT)
        deadline = time.monotonic() + 5
        left = sshd_cluster.sessions()
        while left and time.monotonic() < deadline:  # server-side session processes end within moments
            time.sleep(0.1)
            left = sshd_cluster.sessions()
        leftover = [" ".join(p.cmdline()) for p in left]
    finally:
        sshd_cluster.kill_sessions()  # nothing of a failed run may linger
    return RunResult(wl, rc, output, elapsed, out, leftover)


def test_multinode_both_nodes_contribute(multinode_run):
    r = multinode_run
    tail = r.output[-6000:]
    assert r.returncode == 0, f"{r.workload.name}: exit {r.returncode} after {r.elapsed:.0f}s\n{tail}"
    assert "preflight: OK, 2 host(s) agree" in r.output, tail
    assert not r.leftover, f"processes left in ssh sessions after the run: {r.leftover}"
    # pdsh labels each line with the host alias it came from: both nodes ran their rank to a clean exit
    for node in ("node0", "node1"):
        assert f"{node}: " in r.output and any(
            line.startswith(f"{node}: ") and "exits successfully" in line for line in r.output.splitlines()
        ), f"no successful rank exit reported by {node}\n{tail}"
    assert "nnodes=2, num_local_procs=1, node_rank=0" in r.output and "node_rank=1" in r.output
    if r.workload.name == "train":
        steps = [json.loads(line)["step"] for line in (r.out_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3], tail
        assert "plan: world 2" in r.output and (r.out_dir / "export" / "final" / "model.safetensors").is_file()
    if r.workload.name == "dist_check":
        ranks = r.ranks()
        assert sorted(ranks) == [0, 1], tail
        for rank, alias in ((0, "node0"), (1, "node1")):
            rec = ranks[rank]
            assert rec["node_alias"] == alias and rec["node_rank"] == rank, rec
            assert rec["ssh_session"] and rec["all_reduce_ok"] and rec["world_size"] == 2, rec
            assert rec["omp_num_threads"] == "1" and rec["gloo_socket_ifname"] == "lo", rec  # forwarded env
        assert ranks[0]["aliases_seen"] == ["node0", "node1"]


def test_multinode_preflight_failure_stops_the_launch(sshd_cluster, launch_dir, tmp_path):  # noqa: F811
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=1\ndeadnode slots=1\n")
    out = tmp_path / "out"
    rc, output, _ = _run_group(
        [str(launch_dir / "launch" / "multinode.sh"), "--hostfile", str(hostfile),
         "--config", str(_data_config(launch_dir, tmp_path)), "--master-addr", "127.0.0.1",
         "--ssh-config", str(sshd_cluster.ssh_config), "--script", "tests/dist_check.py", "--", "--out", str(out)],
        cwd=launch_dir, env=dict(sshd_cluster.env(), PYTHON=sys.executable), timeout=60)
    assert rc == 1, output
    assert "deadnode  FAIL  ssh failed:" in output and "preflight: FAIL on 1 of 2 host(s): deadnode" in output
    assert "multinode.sh: preflight failed (exit 1); not launching" in output
    assert not out.exists() and "deepspeed.launcher" not in output


def test_train_sh_runs_two_cpu_ranks(launch_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, NPROC="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("GLOO_SOCKET_IFNAME", None)
    rc, output, _ = _run_group(
        [str(launch_dir / "launch" / "train.sh"), "--config", str(_data_config(launch_dir, tmp_path)),
         "--script", "tests/dist_check.py", "--", "--out", str(out)],
        cwd=launch_dir, env=env, timeout=RUN_TIMEOUT)
    assert rc == 0, output[-4000:]
    ranks = {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in out.glob("rank*.json")}
    assert sorted(ranks) == [0, 1]
    assert all(r["all_reduce_ok"] and not r["ssh_session"] and r["gloo_socket_ifname"] == "lo" for r in ranks.values())


def test_missing_tools_fail_under_ci_and_skip_elsewhere(monkeypatch):
    import sshd_cluster as helper

    real_which = shutil.which
    monkeypatch.setattr(helper.shutil, "which", lambda name: None if name == "pdsh" else real_which(name))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true: multi-node tests need pdsh \(Debian packages"):
        helper.require_tools("ssh", "pdsh")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="multi-node tests need pdsh"):
        helper.require_tools("ssh", "pdsh")
