"""The hostfile launch between hosts with their own addresses: a two-host run, a cut link, a dead host, a slow link.

Two hosts node0 (10.231.7.1) and node1 (10.231.7.2) are network + UTS namespaces joined by a veth pair, each with
its own sshd and hostname (tests/netns_hosts.py); the filesystem is shared. launch/multinode.sh runs on node0, as
an operator launches from the first node, with nothing set but the hostfile and an ssh config that maps the names
to the addresses: preflight over ssh, the master address from ``hostname -I`` on node0, the cluster defaults for
the interfaces (no loopback), then ``deepspeed --hostfile`` -> pdsh -> ssh -> one rank per host (ZeRO-3 with
GradCache on the tiny recipe, dropout off, global batch 16).

* two hosts train exactly like one: the losses equal a one-host 2-rank run's (launch/train.sh) within 1e-6, and
  the ranks' traffic crosses the link;
* a cut link (``ip link set DEV down`` on node1 during step CUT_AFTER's checkpoint): rank 0 names node1 and exits 3
  within train.collective_timeout_s (+ two heartbeats), rank 1 exits too, multinode.sh exits 3 with a last line
  saying so, only complete checkpoints count, and ``--resume auto`` on node0 alone (world size 2 -> 1, 1 x 16)
  continues with the losses of the uninterrupted run;
* a host that never answers (sshd stopped, or link down before the launch): preflight names it with the fix within
  seconds and deepspeed is not started;
* a slow link (50 ms added to every round trip: netem, or a user-space relay where the kernel has no netem): the
  run completes with the same losses; step times are recorded (``record_property``) against the unshaped link.

Measured values (detection and exit times, preflight time, step times) are attached with ``record_property``
(``pytest --junitxml``). Needs root, ``ip`` and the multi-node tools; under CI=true a missing one fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from netns_hosts import NetnsHosts, netns_hosts  # noqa: F401  (fixture)
from pipeline.resilience import silence_limit_s
from sshd_cluster import alive
from train_helpers import free_port, train_losses, web_search_overrides

STEPS = 6
SAVE_EVERY = 2
CUT_AFTER = 4          # the link is cut once step CUT_AFTER's checkpoint has begun
TIMEOUT = 20           # train.collective_timeout_s of these runs
SILENCE = silence_limit_s(TIMEOUT)      # 28 s: the longest a rank takes to name a silent peer; multinode.sh's ssh
                                        # sessions give up on a host silent for that long (ServerAliveInterval 6 s)
SLOW_STEPS = 2
DELAY_MS = 50
RUN_TIMEOUT = 240      # seconds for one launch
MASTER = "10.231.7.1"  # node0's address: what `hostname -I` on node0 gives


def overrides(shards: Path, out: Path, *, nproc: int = 2, steps: int = STEPS,
              save_every: int = SAVE_EVERY) -> list[str]:
    """The recipe of every run here: global batch 16 on any world size, dropout off (runs on different world sizes
    compute the same numbers), no validation."""
    return web_search_overrides(shards, out, steps=steps, save_every=save_every, eval_every=0, **{
        "train.collective_timeout_s": str(TIMEOUT), "train.per_device_batch_size": str(16 // nproc),
        "model.from_config.attention_dropout": "0.0"})


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """A snapshot of the code the ranks run (the shared working tree may change under concurrent edits, and
    preflight rightly refuses a host whose code differs from the launcher's)."""
    root = tmp_path_factory.mktemp("netns_code")
    repo = Path(__file__).resolve().parents[1]
    for name in ("pipeline", "launch", "configs", "ds_configs"):
        shutil.copytree(repo / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


# --------------------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    returncode: int
    output: str
    elapsed: float
    out: Path

    @property
    def last_line(self) -> str:
        lines = [ln for ln in self.output.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def start(hosts: NetnsHosts, code: Path, hostfile: Path, args: list[str], log: Path) -> subprocess.Popen:
    """launch/multinode.sh on node0, in a new process group, output to `log`."""
    cmd = hosts.on("node0", [str(code / "launch" / "multinode.sh"), "--hostfile", str(hostfile),
                             "--config", str(code / "configs" / "tiny-cpu.yaml"), "--ssh-config",
                             str(hosts.ssh_config), "--master-port", str(free_port()), *args])
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, cwd=code, env=dict(hosts.env(), PYTHON=sys.executable), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group. Never SIGTERM/SIGINT: DeepSpeed's runner would answer with
    `pdsh pkill -f deepspeed.launcher.launch` on every host, and these hosts share the machine's process table."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def finish(hosts: NetnsHosts, proc: subprocess.Popen, log: Path, out: Path, started: float) -> Run:
    try:
        proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop(proc)
        hosts.kill_sessions()  # nothing of a run may linger (a failed one especially)
    return Run(proc.returncode, log.read_text(errors="replace"), time.monotonic() - started, out)


def launch(hosts: NetnsHosts, code: Path, hostfile: Path, args: list[str], tmp: Path, name: str) -> Run:
    out = tmp / name
    log = tmp / f"{name}.log"
    started = time.monotonic()
    return finish(hosts, start(hosts, code, hostfile, [a.replace("{out}", str(out)) for a in args], log), log, out,
                  started)


def step_seconds(run_dir: Path, first: int = 2) -> list[float]:
    """Seconds of each logged training step from `first` on (step 1 carries the warm-up), from metrics.jsonl."""
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["queries"] / r["samples_per_s"] for r in recs if r["split"] == "train" and r["step"] >= first]


def assert_same_losses(ours: dict[int, float], theirs: dict[int, float], rel: float) -> None:
    assert ours, "no training records"
    for step, loss in ours.items():
        assert loss == pytest.approx(theirs[step], rel=rel), (step, loss, theirs[step])


def link_bytes(hosts: NetnsHosts, host: str) -> int:
    """Bytes received + sent on `host`'s end of the link."""
    proc = subprocess.run(["ip", "-n", hosts.ns[host], "-j", "-s", "link", "show", "dev", hosts.devs[host]],
                          capture_output=True, text=True, check=True)
    stats = json.loads(proc.stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def rank_processes(hosts: NetnsHosts) -> dict[int, psutil.Process]:
    """rank -> its training process (a child of deepspeed.launcher.launch in an ssh session on some host)."""
    ranks = {}
    for proc in hosts.sessions():
        try:
            parent = proc.parent()
            if parent is not None and "deepspeed.launcher.launch" in " ".join(parent.cmdline()) \
                    and "train.py" in " ".join(proc.cmdline()):
                ranks[int(proc.environ()["RANK"])] = proc
        except (psutil.Error, KeyError, ValueError):
            continue
    return ranks


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(poll)


# --------------------------------------------------------------------------------------------------------------
# Runs shared by the tests
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_host(code, example_shards, tmp_path_factory) -> Path:
    """The same recipe on one host, 2 ranks on loopback: launch/train.sh on this machine."""
    tmp = tmp_path_factory.mktemp("one_host")
    out = tmp / "run"
    env = dict(os.environ, NPROC="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("GLOO_SOCKET_IFNAME", None)
    proc = subprocess.run([str(code / "launch" / "train.sh"), "--config", str(code / "configs" / "tiny-cpu.yaml"),
                           *overrides(example_shards, out)], cwd=code, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out


@pytest.fixture(scope="module")
def two_hosts(netns_hosts, code, example_shards, tmp_path_factory) -> tuple[Run, int]:  # noqa: F811
    """The recipe over node0 + node1, one rank each: the run and the bytes that crossed node1's link."""
    tmp = tmp_path_factory.mktemp("two_hosts")
    before = link_bytes(netns_hosts, "node1")
    run = launch(netns_hosts, code, netns_hosts.write_hostfile(tmp / "hosts"),
                 overrides(example_shards, tmp / "run"), tmp, "run")
    return run, link_bytes(netns_hosts, "node1") - before


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------
def test_two_hosts_train_like_one_host(two_hosts, one_host, netns_hosts, record_property):  # noqa: F811
    run, crossed = two_hosts
    tail = run.output[-6000:]
    assert run.returncode == 0, f"exit {run.returncode} after {run.elapsed:.0f} s\n{tail}"
    # preflight ran against both hosts, before the launch
    assert re.search(r"^  node0  OK$", run.output, re.M) and re.search(r"^  node1  OK$", run.output, re.M), tail
    assert run.output.index("preflight: OK, 2 host(s) agree") < run.output.index("multinode.sh: launching")
    # a cluster's choices: master address from `hostname -I` on node0, no loopback anywhere
    assert f"multinode.sh: launching on 2 host(s), master {MASTER}:" in run.output, tail
    pdsh = next(ln for ln in run.output.splitlines() if "cmd = pdsh" in ln)
    assert f"--master_addr={MASTER}" in pdsh and 'export NCCL_SOCKET_IFNAME="^lo,docker0"' in pdsh, pdsh
    assert "GLOO_SOCKET_IFNAME" not in pdsh, pdsh  # unset: each rank picks its interface towards the master
    assert (f"distributed: GLOO_SOCKET_IFNAME={netns_hosts.devs['node0']} (this host's interface towards "
            f"MASTER_ADDR {MASTER}") in run.output, tail
    assert crossed > 1_000_000, f"only {crossed} bytes crossed node1's link"
    for node in ("node0", "node1"):
        assert re.search(rf"^{node}: .*exits successfully", run.output, re.M), f"{node} did not exit cleanly\n{tail}"
    assert run.last_line == "multinode.sh: finished: every rank on 2 host(s) exited 0", tail
    ours, theirs = train_losses(run.out), train_losses(one_host)
    assert sorted(ours) == list(range(1, STEPS + 1)) and sorted(theirs) == sorted(ours)
    assert_same_losses(ours, theirs, rel=1e-6)
    record_property("two_host_run_s", round(run.elapsed, 1))
    record_property("step_s_unshaped_median", round(statistics.median(step_seconds(run.out)), 3))


def run_and_cut(hosts: NetnsHosts, code: Path, shards: Path, tmp_path: Path) -> tuple[Run, dict[str, float], list]:
    """Launch the recipe over both hosts; once step CUT_AFTER's checkpoint has begun, cut node1's link. Returns the
    run and when (seconds after the cut) each rank and the launcher were gone, and any rank still alive."""
    out, log = tmp_path / "run", tmp_path / "cut.log"
    started = time.monotonic()
    proc = start(hosts, code, hosts.write_hostfile(tmp_path / "hosts"), overrides(shards, out), log)
    gone: dict[str, float] = {}
    try:
        checkpoint = out / "checkpoints" / f"step_{CUT_AFTER:08d}"
        wait_for(lambda: checkpoint.exists() or max(train_losses(out), default=0) > CUT_AFTER, RUN_TIMEOUT,
                 f"step {CUT_AFTER}'s checkpoint", proc, log)
        ranks = rank_processes(hosts)
        hosts.cut("node1")
        cut_at = time.monotonic()
        assert sorted(ranks) == [0, 1], ranks
        deadline = cut_at + 2 * SILENCE + 30
        while len(gone) < len(ranks) + 1 and time.monotonic() < deadline:
            now = time.monotonic() - cut_at
            for rank, p in ranks.items():
                if f"rank {rank}" not in gone and not alive(p):
                    gone[f"rank {rank}"] = now
            if "launcher" not in gone and proc.poll() is not None:
                gone["launcher"] = now
            time.sleep(0.05)
        left = [" ".join(p.cmdline()) for p in ranks.values() if alive(p)]
    finally:
        run = finish(hosts, proc, log, out, started)
    return run, gone, left


def test_cut_link_names_the_host_and_resume_on_one_host(  # noqa: F811
        netns_hosts, code, example_shards, one_host, tmp_path, record_property):
    hosts = netns_hosts
    try:
        run, gone, left = run_and_cut(hosts, code, example_shards, tmp_path)
        tail = run.output[-5000:]
        for what, seconds in gone.items():
            record_property(f"cut_{what.replace(' ', '')}_exit_s", round(seconds, 1))
        assert not left and "launcher" in gone, f"still running {2 * SILENCE + 30} s after the cut: {left}\n{tail}"
        # rank 0 names node1 once its heartbeat has not changed for the timeout: after the cut, the timeout less the
        # age of the last heartbeat seen (up to an interval), plus up to two intervals (reads, judge's tick)
        assert gone["rank 0"] <= SILENCE + 4, gone
        assert gone["rank 1"] <= SILENCE + 4, gone  # node1's rank gives up on the silent store too
        assert gone["launcher"] <= SILENCE + 12, gone  # pdsh's ssh to node1: five keepalives unanswered
        named = (rf"^node0: error: rank 1 on host node1 stopped answering after step (\d+) \(no heartbeat for (\d+) "
                 rf"s; train\.collective_timeout_s = {TIMEOUT} s\); seen from rank 0 on host node0$")
        match = re.search(named, run.output, re.M)
        assert match and int(match.group(1)) >= CUT_AFTER - 1 and int(match.group(2)) >= TIMEOUT, tail
        assert run.returncode == 3, f"exit {run.returncode}\n{tail}"
        assert run.last_line.startswith(
            "multinode.sh: failed (exit 3): rank 1 on host node1 stopped answering after step"), tail
        assert run.last_line.endswith(
            "seen from rank 0 on host node0; ssh to node1 failed or was lost (exit 255: host down or unreachable); "
            "continue from the last complete checkpoint with -- --resume auto (leave out or fix the failed host)"), tail

        # Only complete checkpoints count: the pointer names one with every rank's files, never an incomplete one.
        ckpts = run.out / "checkpoints"
        latest = (ckpts / "latest_complete").read_text().strip()
        every_rank = {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")}
        every_rank |= {"rng_rank0.pt", "rng_rank1.pt"}
        for tag in sorted(p.name for p in ckpts.glob("step_*")):
            files = {p.name for p in (ckpts / tag).iterdir()}
            if "COMPLETE" in files:
                assert every_rank <= files, (tag, files)
            else:
                assert tag != latest, f"{tag} is incomplete but latest_complete names it"
        assert (ckpts / latest / "COMPLETE").is_file() and int(latest.removeprefix("step_")) >= SAVE_EVERY
        record_property("cut_checkpoint_in_flight", not (ckpts / f"step_{CUT_AFTER:08d}" / "COMPLETE").is_file())

        # node1 stays cut off: continue on node0 alone, 1 rank x 16 (the same global batch, the same data stream).
        before = len((run.out / "metrics.jsonl").read_text().splitlines())
        resumed = launch(hosts, code, hosts.write_hostfile(tmp_path / "hosts0", ["node0"]),
                         [*overrides(example_shards, run.out, nproc=1), "--", "--resume", "auto"], tmp_path, "resume")
    finally:
        hosts.mend("node1")
    tail = resumed.output[-5000:]
    assert resumed.returncode == 0, tail
    assert f"resume on another world size: {ckpts / latest} was written by 2 ranks, this run has 1" in resumed.output
    assert resumed.last_line == "multinode.sh: finished: every rank on 1 host(s) exited 0", tail
    records = [json.loads(ln) for ln in (run.out / "metrics.jsonl").read_text().splitlines()[before:]]
    losses = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    first = int(latest.removeprefix("step_")) + 1
    assert sorted(losses) == list(range(first, STEPS + 1)), sorted(losses)
    assert_same_losses(losses, train_losses(one_host), rel=1e-5)  # another world size: 1 x 16 vs 2 x 8


@pytest.mark.parametrize("how", ["sshd stopped", "link down"])
def test_host_that_never_answers_stops_the_launch_at_preflight(  # noqa: F811
        netns_hosts, code, example_shards, tmp_path, how, record_property):
    hosts = netns_hosts
    if how == "sshd stopped":
        hosts.stop_sshd("node1")
    else:
        hosts.cut("node1")
    try:
        run = launch(hosts, code, hosts.write_hostfile(tmp_path / "hosts"),
                     overrides(example_shards, tmp_path / "run"), tmp_path, "run")
    finally:
        if how == "sshd stopped":
            hosts.start_sshd("node1")
        else:
            hosts.mend("node1")
    record_property("preflight_dead_host_s", round(run.elapsed, 1))
    tail = run.output[-4000:]
    assert run.returncode == 1, tail
    line = next((ln for ln in run.output.splitlines() if ln.startswith("  node1  FAIL  ")), "")
    if how == "sshd stopped":
        assert line == ("  node1  FAIL  ssh failed: ssh: connect to host 10.231.7.2 port 22: Connection refused; "
                        "nothing answers on node1's ssh port: start sshd there (or fix the port: --ssh-port, Port in "
                        "the ssh config)"), tail
    else:
        assert re.fullmatch(r"  node1  FAIL  ssh failed: ssh: connect to host 10\.231\.7\.2 port 22: "
                            r"(No route to host; node1 is unreachable: .*|"
                            r"Connection timed out; node1 does not answer: .*)", line), tail
    assert re.search(r"^  node0  OK$", run.output, re.M), tail
    assert "preflight: FAIL on 1 of 2 host(s): node1" in run.output
    assert run.last_line == "multinode.sh: preflight failed (exit 1); not launching", tail
    assert "deepspeed.launcher" not in run.output and not run.out.exists(), tail
    assert run.elapsed < 20, f"{run.elapsed:.1f} s to name a dead host"


def test_slow_link_completes(two_hosts, code, example_shards, one_host, tmp_path, record_property):
    run, _ = two_hosts
    with NetnsHosts(delay_ms=DELAY_MS, tag="s") as slow:
        probe = subprocess.run(slow.on("node0", [sys.executable, "-c", (
            "import socket, time; t = time.monotonic(); socket.create_connection(('10.231.7.2', 22), timeout=5)"
            ".close(); print(time.monotonic() - t)")]), capture_output=True, text=True, timeout=30)
        slowed = launch(slow, code, slow.write_hostfile(tmp_path / "hosts"),
                        overrides(example_shards, tmp_path / "run", steps=SLOW_STEPS, save_every=0), tmp_path, "run")
        link = slow.link
    record_property("slow_link", link)
    assert probe.returncode == 0 and float(probe.stdout) >= DELAY_MS / 1000, (probe.stdout, probe.stderr)  # 1 RTT
    tail = slowed.output[-4000:]
    assert slowed.returncode == 0, f"{link}: exit {slowed.returncode}\n{tail}"
    assert slowed.last_line == "multinode.sh: finished: every rank on 2 host(s) exited 0", tail
    assert_same_losses(train_losses(slowed.out), train_losses(one_host), rel=1e-6)
    slow_s, fast_s = statistics.median(step_seconds(slowed.out)), statistics.median(step_seconds(run.out))
    record_property("step_s_delayed_median", round(slow_s, 3))
    record_property("slow_run_s", round(slowed.elapsed, 1))
    assert slow_s > fast_s, (slow_s, fast_s)


# --------------------------------------------------------------------------------------------------------------
# Without namespaces
# --------------------------------------------------------------------------------------------------------------
def test_gloo_interface_is_the_route_to_the_master(monkeypatch):
    """GLOO_SOCKET_IFNAME, unset, becomes the interface towards MASTER_ADDR; loopback masters and a value set by
    the user are left alone; an address that does not resolve gives nothing."""
    from pipeline.training.distributed import choose_gloo_interface, interface_towards

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "restored-at-teardown")  # records the variable for undo, then unsets it
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert choose_gloo_interface() is None and "GLOO_SOCKET_IFNAME" not in os.environ
    assert interface_towards("127.0.0.1") is None and interface_towards("name.invalid") is None
    own = [(name, a.address) for name, addrs in psutil.net_if_addrs().items() if name != "lo"
           for a in addrs if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for name, address in own:  # an address of this machine: its own interface
        assert interface_towards(address) == name, (name, address)
    if own:
        monkeypatch.setenv("MASTER_ADDR", own[0][1])
        assert choose_gloo_interface() == own[0][0] == os.environ["GLOO_SOCKET_IFNAME"]
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
        assert choose_gloo_interface() is None and os.environ["GLOO_SOCKET_IFNAME"] == "ib0"


def test_missing_capability_fails_under_ci_and_skips_elsewhere(monkeypatch):
    import netns_hosts as helper

    monkeypatch.setattr(helper.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"^CI=true: hosts with their own addresses need root"):
        helper.require_capabilities()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"^hosts with their own addresses need root"):
        helper.require_capabilities()
