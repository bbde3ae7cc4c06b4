"""A throwaway "cluster" of ssh host aliases on loopback, for multi-node launch tests.

``deepspeed --hostfile FILE`` always launches through pdsh + ssh, even for localhost. This module starts a private
``sshd`` on a free 127.0.0.1 port (own host key, own authorized user key, all in a temp dir; the system sshd and
``~/.ssh`` are not touched) and writes an ssh client config that maps the aliases ``node0``/``node1`` to it, plus
``deadnode`` (a closed loopback port, for failure tests).

How ``deepspeed --hostfile`` is pointed at it, with nothing written to ``~/.ssh``:

* pdsh's ssh module honours ``PDSH_SSH_ARGS_APPEND`` -> ``-F <ssh_config>`` (DeepSpeed keeps and extends that
  variable, see ``deepspeed/launcher/multinode_runner.py:PDSHRunner.get_cmd``);
* DeepSpeed's own pre-launch check runs a bare ``ssh -o PasswordAuthentication=no node0 hostname`` (and OpenSSH
  reads ``~/.ssh/config`` from the passwd home, not ``$HOME``), so ``PATH`` gets a directory whose ``ssh`` is a
  two-line wrapper adding ``-F <ssh_config>``;
* the remote side is a fresh ssh session: variables reach the ranks only through DeepSpeed's export list or a
  ``.deepspeed_env`` file, whose path DeepSpeed reads from ``DS_ENV_FILE`` (here: ``<tmp>/deepspeed_env``).
  Each alias also sends ``NODE_ALIAS=<alias>`` (ssh ``SetEnv``, sshd ``AcceptEnv``), so a rank can report which
  host alias it was launched for.

``diverged_node(overlays)`` starts a second sshd inside a private mount namespace (``unshare -m``, root only) in
which some files are bind-mounted over by other content: a host that really sees a different config / manifest at
the same path, for preflight's mismatch tests.

Use the ``sshd_cluster`` fixture (import it into a test module), or :class:`SshdCluster` as a context manager.
Teardown kills every process started through each sshd (psutil: sshd puts each connection in a new session, so
the listener's process group alone would miss them), then the sshd's process group, and removes the temp dir.
``kill_sessions()`` does the first part between tests (e.g. after a launch that timed out).

Under ``CI=true`` a missing sshd / ssh / pdsh fails the test with a clear message; elsewhere it skips with a reason.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

ALIASES = ("node0", "node1")
DEAD_ALIAS = "deadnode"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tools(*names: str) -> dict[str, str]:
    """Absolute paths of the tools; skip (locally) or fail (CI=true) naming what is missing."""
    found: dict[str, str] = {}
    missing = []
    for name in names:
        path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
        if path:
            found[name] = path
        else:
            missing.append(name)
    if missing:
        msg = (
            f"multi-node tests need {', '.join(missing)} (Debian packages: openssh-server openssh-client pdsh); "
            "not found on PATH or in /usr/sbin"
        )
        if in_ci():
            pytest.fail(f"CI=true: {msg}", pytrace=False)
        pytest.skip(msg)
    return found


def make_keys(ssh_keygen: str, d: Path) -> None:
    """In `d`: a host key (host_key), a user key (id_ed25519) and authorized_keys holding the user key."""
    for name in ("host_key", "id_ed25519"):
        subprocess.run([ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", "sshd_cluster", "-f", str(d / name)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
    (d / "authorized_keys").chmod(0o600)
    if os.geteuid() == 0:
        # sshd started as root insists on its privilege-separation dir (the distro unit creates it at boot).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


def sshd_config_text(d: Path, name: str, *, port: int, listen: str, accept_env: str = "") -> str:
    """A private sshd's config: keys from `d` (see make_keys), public key only, no PAM, pid file d/sshd.NAME.pid."""
    lines = [
        f"Port {port}",
        f"ListenAddress {listen}",
        f"HostKey {d / 'host_key'}",
        f"PidFile {d / f'sshd.{name}.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",  # the temp dir lies under world-writable /tmp
        *([f"AcceptEnv {accept_env}"] if accept_env else []),
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "MaxStartups 50:30:100",
        "MaxSessions 50",
        "LogLevel ERROR",
        "",
    ]
    return "\n".join(lines)


def client_defaults(d: Path, user: str, known_hosts: Path) -> list[str]:
    """The ``Host *`` block of a client config for a private sshd: its user key, pinned host keys, batch mode."""
    return [
        "Host *",
        f"  User {user}",
        f"  IdentityFile {d / 'id_ed25519'}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {known_hosts}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  ConnectTimeout 5",
        "  LogLevel ERROR",
        "",
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text(errors='replace').strip()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {timeout:.0f}s: {log.read_text()}")


def descendants(pid: int) -> list:
    try:
        import psutil
    except ImportError:  # psutil is a test extra; without it only the process group is killed
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def terminate(procs: list, grace: float = 3.0) -> None:
    """SIGTERM the given psutil processes, wait up to `grace` s, SIGKILL the survivors (the list is fixed up front)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except Exception:  # already gone
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in procs):
            time.sleep(0.05)
        procs = [p for p in procs if alive(p)]
        if not procs:
            return


def kill_group(proc: subprocess.Popen) -> None:
    """Stop an sshd started with start_new_session=True: every descendant, and its process group.

    sshd puts each connection (and so each remote command) in a new session, out of the listener's process group,
    so the descendants are collected first (psutil) and killed by pid, before the group.
    """
    terminate(descendants(proc.pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is reaped; anything else left in the group?
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    if proc.poll() is None:
        proc.wait(timeout=5)


def alive(p) -> bool:
    try:
        import psutil

        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


class SshdCluster:
    """A private sshd on loopback plus an ssh client config with host aliases pointing at it."""

    def __init__(self, aliases: tuple[str, ...] = ALIASES) -> None:
        self.tools = require_tools("sshd", "ssh", "ssh-keygen", "pdsh")
        self.aliases = tuple(aliases)
        self.user = getpass.getuser()
        self.dir = Path(tempfile.mkdtemp(prefix="sshd_cluster_"))
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}
        self.ssh_config = self.dir / "ssh_config"
        self.known_hosts = self.dir / "known_hosts"
        self.bin_dir = self.dir / "bin"
        self.ds_env_file = self.dir / "deepspeed_env"
        self.port = 0
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        d = self.dir
        d.chmod(0o700)
        make_keys(self.tools["ssh-keygen"], d)
        self.port = self._start_sshd("main")
        self.ports[DEAD_ALIAS] = free_port()  # nothing listens there
        self._write_client_config()
        self.bin_dir.mkdir()
        wrapper = self.bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {self.tools["ssh"]} -F {self.ssh_config} "$@"\n')
        wrapper.chmod(0o755)
        self.ds_env_file.write_text("OMP_NUM_THREADS=1\n")

    def _sshd_config(self, name: str, port: int) -> Path:
        cfg = self.dir / f"sshd_config.{name}"
        cfg.write_text(sshd_config_text(self.dir, name, port=port, listen="127.0.0.1", accept_env="NODE_ALIAS"))
        return cfg

    def _start_sshd(self, name: str, wrap=None) -> int:
        """Start one sshd (`wrap(argv) -> argv` may wrap its command line); returns its port. Retries port races."""
        last: Exception | None = None
        for _ in range(3):
            port = free_port()
            cfg = self._sshd_config(name, port)
            log = self.dir / f"sshd.{name}.log"
            cmd = [self.tools["sshd"], "-D", "-e", "-f", str(cfg)]
            if wrap:
                cmd = wrap(cmd)
            with open(log, "wb") as logf:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
                )
            self.procs.append(proc)
            try:
                _wait_listening(port, proc, log)
                return port
            except RuntimeError as exc:
                last = exc
                kill_group(proc)
                if "Address already in use" not in log.read_text(errors="replace"):
                    break
        raise RuntimeError(f"cannot start sshd ({name}): {last}")

    def _write_client_config(self) -> None:
        d = self.dir
        host_pub = (d / "host_key.pub").read_text().split()
        lines = []
        for alias in self.aliases:
            self.ports.setdefault(alias, self.port)
        for alias, port in self.ports.items():
            lines += [
                f"Host {alias}",
                "  HostName 127.0.0.1",
                f"  Port {port}",
                f"  SetEnv NODE_ALIAS={alias}",
            ]
        lines += client_defaults(d, self.user, self.known_hosts)
        self.ssh_config.write_text("\n".join(lines))
        # Pin the host key for every port in use: strict checking stays on.
        ports = sorted({p for a, p in self.ports.items() if a != DEAD_ALIAS})
        self.known_hosts.write_text(
            "".join(f"[127.0.0.1]:{p} {host_pub[0]} {host_pub[1]}\n" for p in ports)
        )

    # ---------------------------------------------------------------------------------------------------------
    def diverged_node(self, alias: str, overlays: dict[str | Path, str | bytes | None]) -> str:
        """Add host `alias`: a second sshd in a private mount namespace where each overlay path shows other content.

        The paths must exist; content None shows an empty directory there. Needs ``unshare -m`` (root / CAP_SYS_ADMIN): skips with a reason otherwise, fails under CI.
        """
        unshare = shutil.which("unshare")
        probe = subprocess.run([unshare, "-m", "true"], capture_output=True) if unshare else None
        if probe is None or probe.returncode != 0:
            why = probe.stderr.decode(errors="replace").strip() if probe is not None else "unshare not found"
            msg = f"cannot emulate a host with different files: mount namespaces unavailable ({why})"
            if os.environ.get("CI"):
                pytest.fail(msg + "; CI runs as root and must run this test")
            pytest.skip(msg)
        mounts = []
        for i, (target, content) in enumerate(overlays.items()):
            target = Path(target).resolve()
            src = self.dir / f"overlay.{alias}.{i}"
            if isinstance(content, bytes):
                src.write_bytes(content)
            elif content is None:
                src.mkdir()
            else:
                src.write_text(content)
            mounts.append(f"mount --bind {_shq(str(src))} {_shq(str(target))}")

        def wrap(cmd: list[str]) -> list[str]:
            script = " && ".join(mounts + ["exec " + " ".join(map(_shq, cmd))])
            return [unshare, "-m", "--propagation", "private", "sh", "-c", script]

        return self.add_alias(alias, self._start_sshd(alias, wrap=wrap))

    def add_alias(self, alias: str, port: int) -> str:
        """Map one more alias to 127.0.0.1:`port` (anything may listen there, or nothing)."""
        self.ports[alias] = port
        self._write_client_config()
        return alias

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for `deepspeed --hostfile`, pdsh and ssh to reach the aliases."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["PDSH_SSH_ARGS_APPEND"] = f"-F {self.ssh_config}"
        env["DS_ENV_FILE"] = str(self.ds_env_file)
        return env

    def write_hostfile(self, path: Path, hosts: dict[str, int] | None = None) -> Path:
        hosts = hosts or {a: 1 for a in self.aliases}
        path.write_text("".join(f"{h} slots={n}\n" for h, n in hosts.items()))
        return path

    def ssh(self, alias: str, command: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.tools["ssh"], "-F", str(self.ssh_config), alias, command],
            capture_output=True, text=True, timeout=timeout,
        )

    def sessions(self) -> list:
        """Live processes started through the sshds (ssh sessions and what they run); needs psutil."""
        return [c for proc in self.procs for c in descendants(proc.pid) if alive(c)]

    def kill_sessions(self) -> None:
        """Kill every process started through the sshds (e.g. ranks left by a timed-out launch); sshds keep running.

        The process list is taken before signalling: a killed session's children are re-parented to init and
        would no longer show up as descendants of sshd.
        """
        for _ in range(3):  # again, for anything spawned while the first list was being killed
            live = self.sessions()
            if not live:
                return
            terminate(live)

    def close(self) -> None:
        for proc in self.procs:
            kill_group(proc)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SshdCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shq(s: str) -> str:
    import shlex

    return shlex.quote(s)


@pytest.fixture(scope="module")
def sshd_cluster() -> Iterator[SshdCluster]:
    """A running :class:`SshdCluster` (aliases node0, node1, deadnode); stopped and removed at module teardown."""
    cluster = SshdCluster()
    try:
        yield cluster
    finally:
        cluster.close()
