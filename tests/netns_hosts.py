"""Hosts with their own addresses on one machine, for multi-node launch tests: a network namespace per host.

Each host ``nodeI`` is a network namespace (own interfaces, own loopback, address ``10.231.7.(I+1)/24``) with an
sshd on port 22 started in a UTS namespace whose hostname is ``nodeI``, so everything started through ssh on that
host (pdsh sessions, DeepSpeed's launcher, the ranks) sees that hostname and only that host's interfaces, like a
real node; ``hostname -I`` there lists the host's 10.231.7.x address. The filesystem is shared (repository, Python
and data at the same paths on every host: a cluster with shared storage). The hostnames resolve nowhere (no DNS
entry, /etc/hosts untouched): the ssh client config maps ``nodeI`` to its address, as on a cluster whose launcher
reaches nodes through ``~/.ssh/config``.

The link between the hosts is a veth pair, whose host-1 end can be cut (:meth:`NetnsHosts.cut`, ``ip link set DEV
down``). A slow link (``delay_ms``) holds every packet that host 1 sends for ``delay_ms``, which adds ``delay_ms`` to
every round trip: ``tc qdisc add dev DEV root netem delay 50ms`` on host 1's end when the kernel has netem, else
(``CONFIG_NET_SCH_NETEM`` off) a pair of TUN devices instead of the veth pair, joined by a relay process that
delays what comes from host 1 (``python tests/netns_hosts.py relay``).

Commands run "on a host" through :meth:`NetnsHosts.on` (``ip netns exec NS unshare --uts`` with the host's name):
the launcher of a test runs on node0, as an operator launches from the first node.

Names are unique per test process (``nhtest<pid>h<i>``); namespaces that a killed test process left behind (its
pid gone) are removed at the next setup. :meth:`NetnsHosts.close` kills every process in the namespaces (ssh
sessions, ranks, sshds), stops the relay, deletes the namespaces (and so the links) and the temp dir; the
``netns_hosts`` fixture calls it on teardown, also after a failure.

Needs root, ``ip`` (iproute2), ``unshare`` (util-linux), sshd, ssh, ssh-keygen and pdsh. Under ``CI=true`` a
missing capability fails the test with a one-line reason; elsewhere the test skips with it.
"""
from __future__ import annotations

import argparse
import getpass
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from sshd_cluster import (
    alive,
    client_defaults,
    descendants,
    in_ci,
    kill_group,
    make_keys,
    require_tools,
    sshd_config_text,
    terminate,
)

SUBNET = "10.231.7"
PREFIX = "nhtest"
SSH_PORT = 22


def unavailable(reason: str) -> None:
    """Fail (CI=true) or skip (elsewhere) the calling test with a one-line reason."""
    if in_ci():
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([shutil.which("ip") or "/usr/sbin/ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def _netns_pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_netns(ns: str) -> None:
    """SIGKILL every process in namespace `ns` (all started by the test that owns it), then delete it."""
    for _ in range(3):
        pids = _netns_pids(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    _ip("netns", "del", ns, check=False)


def remove_stale_namespaces() -> None:
    """Delete this module's namespaces whose test process is gone (a run that was SIGKILLed)."""
    listing = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({PREFIX}(\d+)\S*)", listing, re.MULTILINE):
        ns, pid = name[0], int(name[1])
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            _kill_netns(ns)


def require_capabilities() -> None:
    """Root, ``ip`` and ``unshare`` that can make a UTS namespace; fails (CI=true) or skips naming what is missing."""
    if os.geteuid() != 0:
        unavailable("hosts with their own addresses need root (network namespaces); run the test as root")
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None and not os.access(f"/usr/sbin/{tool}", os.X_OK):
            unavailable(f"hosts with their own addresses need {tool} (Debian package {package}); not found")
    probe = subprocess.run([shutil.which("unshare") or "/usr/sbin/unshare", "--uts", "true"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        unavailable(f"cannot give a host its own hostname (unshare --uts: {probe.stderr.strip()})")


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (tried on the loopback of a throwaway namespace)."""
    if shutil.which("tc") is None:
        return False
    ns = f"{PREFIX}{os.getpid()}probe"
    if _ip("netns", "add", ns, check=False).returncode != 0:
        return False
    try:
        probe = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                                "delay", "1ms"], capture_output=True, text=True, timeout=30)
        return probe.returncode == 0
    finally:
        _ip("netns", "del", ns, check=False)


class NetnsHosts:
    """Two hosts node0 and node1 (network + UTS namespaces) on one link, each with its own address, hostname and
    sshd. `tag` tells apart two instances of one test process; `delay_ms` makes the link slow (module docstring)."""

    def __init__(self, *, delay_ms: float = 0.0, tag: str = "") -> None:
        require_capabilities()
        self.tools = require_tools("ip", "unshare", "sshd", "ssh", "ssh-keygen", "pdsh")
        self.delay_ms = float(delay_ms)
        self.hosts = ["node0", "node1"]
        self.addrs = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(self.hosts)}
        base = f"{PREFIX}{os.getpid()}{tag}"
        self.ns = {h: f"{base}h{i}" for i, h in enumerate(self.hosts)}
        self.devs = {h: f"{base}d{i}"[-15:] for i, h in enumerate(self.hosts)}  # interface names: 15 chars at most
        self.link = "veth"
        self.user = getpass.getuser()
        self.dir = Path(tempfile.mkdtemp(prefix="netns_hosts_"))
        self.ssh_config = self.dir / "ssh_config"
        self.known_hosts = self.dir / "known_hosts"
        self.ds_env_file = self.dir / "deepspeed_env"
        self.sshd: dict[str, subprocess.Popen] = {}
        self.relay: subprocess.Popen | None = None
        self._created: list[str] = []
        remove_stale_namespaces()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        self.dir.chmod(0o700)
        for h in self.hosts:
            probe = _ip("netns", "add", self.ns[h], check=False)
            if probe.returncode != 0:
                unavailable(f"cannot create a network namespace (ip netns add: {probe.stderr.strip()})")
            self._created.append(self.ns[h])
            _ip("-n", self.ns[h], "link", "set", "lo", "up")
        if self.delay_ms and not netem_available():
            self._relay_link()
        else:
            self._veth_link()
        make_keys(self.tools["ssh-keygen"], self.dir)
        self._write_client_config()
        self.ds_env_file.write_text("OMP_NUM_THREADS=1\n")
        for h in self.hosts:
            self.start_sshd(h)

    def _veth_link(self) -> None:
        """node0 <-> node1 over a veth pair, with netem on node1's end when a delay is asked for."""
        a, b = self.hosts
        _ip("link", "add", self.devs[a], "netns", self.ns[a], "type", "veth", "peer", "name", self.devs[b],
            "netns", self.ns[b])
        for h in self.hosts:
            _ip("-n", self.ns[h], "addr", "add", f"{self.addrs[h]}/24", "dev", self.devs[h])
            _ip("-n", self.ns[h], "link", "set", self.devs[h], "up")
        if self.delay_ms:
            self.netns_run(b, ["tc", "qdisc", "add", "dev", self.devs[b], "root", "netem", "delay",
                               f"{self.delay_ms:g}ms"])
        self.link = f"veth, netem delay {self.delay_ms:g} ms on {b}" if self.delay_ms else "veth"

    def _relay_link(self) -> None:
        """TUN devices, one per host, joined by a relay process that delays what host 1 sends (no netem here)."""
        if not os.path.exists("/dev/net/tun"):
            unavailable("a slow link needs netem (CONFIG_NET_SCH_NETEM) or TUN devices (/dev/net/tun): neither here")
        cmd = [sys.executable, str(Path(__file__).resolve()), "relay", "--delay-ms", f"{self.delay_ms:g}",
               *(self.devs[h] for h in self.hosts)]
        self.relay = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True)
        ready = self.relay.stdout.readline().strip()
        if ready != "ready":
            self.relay.kill()
            raise RuntimeError(f"delay relay did not start: {ready} {self.relay.stderr.read().strip()}")
        for h in self.hosts:
            _ip("link", "set", self.devs[h], "netns", self.ns[h])
            _ip("-n", self.ns[h], "addr", "add", f"{self.addrs[h]}/24", "dev", self.devs[h])
            _ip("-n", self.ns[h], "link", "set", self.devs[h], "mtu", "65000", "up")
        self.link = f"TUN pair + relay, {self.delay_ms:g} ms on what {self.hosts[1]} sends (this kernel has no netem)"

    def netns_run(self, host: str, argv: list[str]) -> None:
        """Run `argv` in `host`'s network namespace (network configuration: no hostname needed)."""
        proc = subprocess.run(["ip", "netns", "exec", self.ns[host], *argv], capture_output=True, text=True,
                              timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} on {host}: {proc.stderr.strip() or f'exit {proc.returncode}'}")

    def _write_client_config(self) -> None:
        lines = []
        for h in self.hosts:
            lines += [f"Host {h}", f"  HostName {self.addrs[h]}", f"  Port {SSH_PORT}"]
        self.ssh_config.write_text("\n".join(lines + client_defaults(self.dir, self.user, self.known_hosts)))
        key_type, key = (self.dir / "host_key.pub").read_text().split()[:2]
        self.known_hosts.write_text("".join(f"{self.addrs[h]} {key_type} {key}\n" for h in self.hosts))

    # ---------------------------------------------------------------------------------------------------------
    def on(self, host: str, argv: list[str]) -> list[str]:
        """`argv` wrapped to run on `host`: in its network namespace, with its hostname."""
        return ["ip", "netns", "exec", self.ns[host], self.tools["unshare"], "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', host, *argv]

    def start_sshd(self, host: str) -> None:
        cfg = self.dir / f"sshd_config.{host}"
        cfg.write_text(sshd_config_text(self.dir, host, port=SSH_PORT, listen="0.0.0.0"))
        pid_file = self.dir / f"sshd.{host}.pid"
        pid_file.unlink(missing_ok=True)
        log = self.dir / f"sshd.{host}.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(self.on(host, [self.tools["sshd"], "-D", "-e", "-f", str(cfg)]),
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.sshd[host] = proc
        deadline = time.monotonic() + 10
        while not pid_file.exists():  # sshd writes its pid file once it listens
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {host} did not start (exit {proc.poll()}): "
                                   f"{log.read_text(errors='replace').strip()}")
            time.sleep(0.05)

    def stop_sshd(self, host: str) -> None:
        """Stop `host`'s sshd and its sessions: the host is up but nothing answers on the ssh port."""
        proc = self.sshd.pop(host, None)
        if proc is not None:
            kill_group(proc)

    def cut(self, host: str) -> None:
        """Cut `host`'s link (``ip link set DEV down`` on that host): its connections stall, nothing is reset."""
        _ip("-n", self.ns[host], "link", "set", self.devs[host], "down")

    def mend(self, host: str, wait_s: float = 15.0) -> None:
        """Bring `host`'s link back up and wait until every other host reaches its ssh port again.

        While the link was down, the other hosts' neighbour caches marked `host`'s address FAILED; until those entries
        age out a connect gets "No route to host" instead of an answer. The caches are flushed, then a TCP connect
        from each other host must be answered (accepted, or refused when no sshd runs) within `wait_s`.
        """
        _ip("-n", self.ns[host], "link", "set", self.devs[host], "up")
        for h in self.hosts:
            _ip("-n", self.ns[h], "neigh", "flush", "all")
        probe = ("import errno, socket, sys, time\n"
                 "deadline = time.monotonic() + float(sys.argv[2])\n"
                 "while True:\n"
                 "    try:\n"
                 "        socket.create_connection((sys.argv[1], %d), timeout=1).close(); break\n"
                 "    except ConnectionRefusedError: break\n"
                 "    except OSError as e:\n"
                 "        if time.monotonic() > deadline: sys.exit(f'{sys.argv[1]} unreachable: {e}')\n"
                 "        time.sleep(0.1)\n" % SSH_PORT)
        for h in self.hosts:
            if h != host:
                done = subprocess.run(self.on(h, [sys.executable, "-c", probe, self.addrs[host], str(wait_s)]),
                                      capture_output=True, text=True, timeout=wait_s + 30)
                if done.returncode != 0:
                    raise RuntimeError(f"{host}'s link is up but {h} cannot reach it: {done.stderr.strip()}")

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for launch/multinode.sh: the rank environment file; no loopback or interface settings."""
        env = dict(os.environ if base is None else base)
        for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT", "PDSH_SSH_ARGS_APPEND"):
            env.pop(var, None)
        env["DS_ENV_FILE"] = str(self.ds_env_file)
        return env

    def write_hostfile(self, path: Path, hosts: list[str] | None = None) -> Path:
        path.write_text("".join(f"{h} slots=1\n" for h in (hosts or self.hosts)))
        return path

    def sessions(self) -> list:
        """Live processes started through the sshds (ssh sessions and what they run)."""
        return [c for proc in self.sshd.values() for c in descendants(proc.pid) if alive(c)]

    def kill_sessions(self) -> None:
        """Kill every process started through the sshds (ranks of a launch that failed); the sshds keep running."""
        for _ in range(3):
            live = self.sessions()
            if not live:
                return
            terminate(live)

    def close(self) -> None:
        for proc in list(self.sshd.values()):
            kill_group(proc)
        self.sshd.clear()
        if self.relay is not None:
            self.relay.kill()
            self.relay.wait(timeout=10)
            self.relay = None
        for ns in self._created:
            _kill_netns(ns)
        self._created.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NetnsHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def netns_hosts() -> Iterator[NetnsHosts]:
    """Two hosts node0 (10.231.7.1) and node1 (10.231.7.2) on a veth link; removed at module teardown."""
    hosts = NetnsHosts()
    try:
        yield hosts
    finally:
        hosts.close()


# --------------------------------------------------------------------------------------------------------------
# The delay relay: `python tests/netns_hosts.py relay --delay-ms 50 TUN_A TUN_B`
# --------------------------------------------------------------------------------------------------------------
def relay(delay_ms: float, names: list[str]) -> None:
    """Create TUN devices `names` (two), print "ready", then forward every IP packet read from one to the other,
    those from the second `delay_ms` late (in order), until killed. The caller moves the devices into the hosts'
    namespaces: what the second device's host sends arrives `delay_ms` late, like netem on its interface."""
    import collections
    import fcntl
    import select
    import struct

    tunsetiff, iff_tun, iff_no_pi = 0x400454CA, 0x0001, 0x1000
    fds = []
    for name in names:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", name.encode(), iff_tun | iff_no_pi))
        fds.append(fd)
    a, b = fds
    peer = {a: b, b: a}
    queues: dict[int, collections.deque] = {a: collections.deque(), b: collections.deque()}  # by destination fd
    delay = {a: 0.0, b: delay_ms / 1000}  # by source fd
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else None
        readable, _, _ = select.select(fds, [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:  # the device is down (a host's end set down): the packet is lost
                    break
                queues[peer[fd]].append((now + delay[fd], packet))
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                _, packet = queue.popleft()
                try:
                    os.write(fd, packet)
                except OSError:  # device down or queue full: the packet is lost, as on a wire
                    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="delay relay between two TUN devices (tests only)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("relay")
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("names", nargs=2)
    args = parser.parse_args(argv)
    relay(args.delay_ms, args.names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
