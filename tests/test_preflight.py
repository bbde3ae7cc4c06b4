"""pipeline.preflight: hostfile parsing, fingerprint comparison, and real checks over ssh (tests/sshd_cluster.py)."""
from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import preflight
from pipeline.preflight import PreflightError, compare, parse_hostfile
from sshd_cluster import sshd_cluster  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# Hostfile
# --------------------------------------------------------------------------------------------------------------
def test_parse_hostfile_keeps_order_and_skips_comments(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster\n\nworker-b slots=8\n  worker-a slots=4  \n#worker-c slots=8\n")
    assert list(parse_hostfile(f).items()) == [("worker-b", 8), ("worker-a", 4)]


@pytest.mark.parametrize("bad", ["node1", "node1 slots=0", "node1 slots=x", "node1 gpus=2",
                                 "node1 slots=2 # inline comment", "node1 slots = 2"])
def test_parse_hostfile_bad_line_names_file_and_line(tmp_path, bad):
    f = tmp_path / "hosts"
    f.write_text(f"node0 slots=1\n{bad}\n")
    with pytest.raises(PreflightError) as err:
        parse_hostfile(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}:2: expected 'HOSTNAME slots=N'") and "\n" not in msg


def test_hostfile_example_parses_like_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    example = REPO / "launch" / "hostfile.example"
    assert parse_hostfile(example) == dict(fetch_hostfile(str(example))) == {"worker-0": 8, "worker-1": 8}


def test_parse_hostfile_duplicate_empty_missing(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("node0 slots=1\nnode0 slots=2\n")
    with pytest.raises(PreflightError, match=r":2: host 'node0' is listed twice"):
        parse_hostfile(f)
    f.write_text("# nothing\n")
    with pytest.raises(PreflightError, match="no hosts"):
        parse_hostfile(f)
    with pytest.raises(PreflightError, match="cannot read hostfile"):
        parse_hostfile(tmp_path / "absent")


# --------------------------------------------------------------------------------------------------------------
# Comparison logic, with fake remote fingerprints
# --------------------------------------------------------------------------------------------------------------
def _fingerprint() -> dict:
    return {
        "hostname": "h", "cwd": "/repo", "python": "3.11.7", "executable": "/usr/bin/python3",
        "packages": {"torch": "2.13.0", "deepspeed": "0.19.8", "transformers": "5.24.0"},
        "code": {"sha256": "c" * 64, "files": {"pipeline/a.py": "1" * 64, "pipeline/b.py": "2" * 64}},
        "files": {"config": {"path": "/repo/configs/x.yaml", "sha256": "a" * 64},
                  "deepspeed config": {"path": "/repo/ds_configs/zero3.json", "sha256": "d" * 64}},
        "data": {"path": "/data/shards", "exists": True, "manifest": {"sha256": "m" * 64}},
    }


def test_compare_identical_is_empty():
    assert compare(_fingerprint(), _fingerprint(), "node1") == []


def test_compare_names_each_difference():
    ref, rem = _fingerprint(), _fingerprint()
    rem["files"]["config"]["sha256"] = "b" * 64
    rem["code"] = {"sha256": "e" * 64, "files": {"pipeline/a.py": "9" * 64, "pipeline/new.py": "3" * 64}}
    rem["data"]["manifest"]["sha256"] = "n" * 64
    rem["packages"]["deepspeed"] = "0.18.0"
    problems = compare(ref, rem, "node7")
    text = "\n".join(problems)
    assert "config /repo/configs/x.yaml differs (sha256 aaaaaaaaaaaa here, bbbbbbbbbbbb on node7)" in text
    assert "1 changed (pipeline/a.py)" in text and "missing on node7 (pipeline/b.py)" in text
    assert "only on node7 (pipeline/new.py)" in text
    assert "data: /data/shards/manifest.json differs" in text
    assert "deepspeed 0.19.8 here, 0.18.0 on node7" in text
    assert len(problems) == 4


def test_compare_missing_files_and_data():
    ref = _fingerprint()
    rem = copy.deepcopy(ref)
    rem["files"]["deepspeed config"] = {"path": "/repo/ds_configs/zero3.json", "error": "No such file or directory"}
    rem["data"] = {"path": "/data/shards", "exists": False}
    text = "\n".join(compare(ref, rem, "node2"))
    assert "deepspeed config /repo/ds_configs/zero3.json: No such file or directory on node2" in text
    assert "data: shard directory /data/shards not found on node2" in text
    rem["data"] = {"path": "/data/shards", "exists": True, "manifest": {"error": "No such file or directory"}}
    assert "manifest.json: No such file or directory on node2" in "\n".join(compare(ref, rem, "node2"))


def test_fingerprint_snippet_runs_with_stdlib_only(tmp_path):
    """The snippet sent to the hosts, run here in a bare interpreter (-I -S: no site-packages, no cwd on path)."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "x.py").write_text("x = 1\n")
    (tmp_path / "cfg.yaml").write_text("a: 1\n")
    src = preflight.snippet_source({"code_dirs": ["pipeline"], "suffixes": [".py"], "files": {"config": "cfg.yaml"},
                                    "shards": "nope", "manifest": "manifest.json", "packages": ["surely-not-a-pkg"]})
    out = subprocess.run([sys.executable, "-I", "-S", "-"], input=src, capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout
    fp = json.loads(out)
    assert list(fp["code"]["files"]) == ["pipeline/x.py"]
    assert fp["files"]["config"]["sha256"] and fp["data"]["exists"] is False
    assert fp["packages"] == {"surely-not-a-pkg": None}


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def _run_cli(*args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.preflight", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def recipe(tmp_path) -> Path:
    """A valid config whose data and DeepSpeed JSON live in tmp_path."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"format": "test", "datasets": {}}\n')
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}\n')
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f"data:\n  shards: {shards}\ndeepspeed: {tmp_path / 'ds.json'}\ntrain:\n  max_steps: 1\n")
    return cfg


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A small, stable launch directory (the shared working tree changes under concurrent edits)."""
    root = tmp_path / "repo"
    for rel in ("pipeline/__init__.py", "pipeline/logs.py", "launch/multinode.sh", "setup.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    return root


def test_cli_help():
    r = _run_cli("--help")
    assert r.returncode == 0 and "--hostfile" in r.stdout and "--ssh-config" in r.stdout


def test_cli_bad_input_is_one_line_exit_2(tmp_path, recipe):
    hosts = tmp_path / "hosts"
    hosts.write_text("node0 slots=1\nnode1\n")
    r = _run_cli("--hostfile", str(hosts), "--config", str(recipe))
    assert r.returncode == 2
    assert r.stderr.strip() == f"preflight: error: {hosts}:2: expected 'HOSTNAME slots=N' (N >= 1), got 'node1'"
    hosts.write_text("node0 slots=1\n")
    r = _run_cli("--hostfile", str(hosts), "--config", str(recipe), "train.nonsense=1")
    assert r.returncode == 2 and "train.nonsense: unknown key" in r.stderr and r.stderr.count("\n") == 1


def test_cli_local_problem_is_reported_before_ssh(tmp_path, recipe):
    hosts = tmp_path / "hosts"
    hosts.write_text("unreachable.invalid slots=1\n")
    r = _run_cli("--hostfile", str(hosts), "--config", str(recipe), f"data.shards={tmp_path / 'absent'}")
    assert r.returncode == 1
    assert f"data: shard directory {tmp_path / 'absent'} not found" in r.stdout
    assert "FAIL on this machine" in r.stdout


# --------------------------------------------------------------------------------------------------------------
# Over ssh (a private sshd on loopback; node0/node1 are two aliases of this machine)
# --------------------------------------------------------------------------------------------------------------
def _hostfile(tmp_path: Path, *hosts: str) -> Path:
    f = tmp_path / "hosts"
    f.write_text("".join(f"{h} slots=1\n" for h in hosts))
    return f


def _host_lines(stdout: str) -> dict[str, str]:
    lines = {}
    for line in stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[1] in ("OK", "FAIL"):
            lines[parts[0]] = line
    return lines


def test_ssh_all_hosts_ok(sshd_cluster, tmp_path, recipe, workdir):
    r = _run_cli("--hostfile", str(_hostfile(tmp_path, "node0", "node1")), "--config", str(recipe),
                 "--ssh-config", str(sshd_cluster.ssh_config), "--workdir", str(workdir), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _host_lines(r.stdout)
    assert lines["node0"].split()[1] == "OK" and lines["node1"].split()[1] == "OK"
    summary = json.loads(r.stdout.strip().splitlines()[-2])
    assert summary == {"ok": True, "failed": [], "hosts": {"node0": {"ok": True, "problems": []},
                                                           "node1": {"ok": True, "problems": []}}}


def test_ssh_closed_port_is_named(sshd_cluster, tmp_path, recipe, workdir):
    r = _run_cli("--hostfile", str(_hostfile(tmp_path, "node0", "deadnode")), "--config", str(recipe),
                 "--ssh-config", str(sshd_cluster.ssh_config), "--workdir", str(workdir))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = _host_lines(r.stdout)
    assert lines["node0"].split()[1] == "OK", r.stdout
    assert "FAIL  ssh failed:" in lines["deadnode"] and "Connection refused" in lines["deadnode"]
    assert r.stdout.strip().splitlines()[-1] == "preflight: FAIL on 1 of 2 host(s): deadnode"


def test_ssh_hung_host_times_out_in_parallel(sshd_cluster, tmp_path, recipe, workdir):
    """A host that accepts TCP but never speaks: bounded by ConnectTimeout, and the other hosts still answer."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        sshd_cluster.add_alias("hungnode", silent.getsockname()[1])
        start = time.monotonic()
        r = _run_cli("--hostfile", str(_hostfile(tmp_path, "hungnode", "node0", "node1")), "--config", str(recipe),
                     "--ssh-config", str(sshd_cluster.ssh_config), "--workdir", str(workdir),
                     "--connect-timeout", "2", "--timeout", "6")
        elapsed = time.monotonic() - start
    assert r.returncode == 1, r.stdout + r.stderr
    lines = _host_lines(r.stdout)
    assert "FAIL" in lines["hungnode"] and "timed out" in lines["hungnode"], r.stdout
    assert lines["node0"].split()[1] == "OK" and lines["node1"].split()[1] == "OK", r.stdout
    assert elapsed < 15, f"preflight took {elapsed:.1f}s with a hung host"


def test_ssh_host_with_different_files_is_named(sshd_cluster, tmp_path, recipe, workdir):
    """node1x: this machine seen through a private mount namespace where the config, the data manifest and one
    code file have other content at the same paths - a host that honestly disagrees."""
    manifest = tmp_path / "shards" / "manifest.json"
    code_file = workdir / "pipeline" / "logs.py"
    sshd_cluster.diverged_node("node1x", {
        recipe: recipe.read_text() + "# edited on node1x only\n",
        manifest: '{"format": "test", "datasets": {"other": {}}}\n',
        code_file: code_file.read_text() + "# local patch\n",
    })
    r = _run_cli("--hostfile", str(_hostfile(tmp_path, "node0", "node1x")), "--config", str(recipe),
                 "--ssh-config", str(sshd_cluster.ssh_config), "--workdir", str(workdir))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = _host_lines(r.stdout)
    assert lines["node0"].split()[1] == "OK", r.stdout
    bad = lines["node1x"]
    assert f"config {recipe} differs" in bad
    assert f"data: {manifest} differs" in bad
    assert "code differs" in bad and "pipeline/logs.py" in bad
    assert r.stdout.strip().splitlines()[-1] == "preflight: FAIL on 1 of 2 host(s): node1x"
    # and the files on this machine are untouched
    assert "# local patch" not in code_file.read_text() and "node1x" not in recipe.read_text()
