"""Preflight for a multi-node launch: every host in the hostfile answers over ssh and sees the same run.

    python -m pipeline.preflight --hostfile hosts --config configs/recipe.yaml [--ssh-config F] [KEY=VALUE ...]

For each host (all in parallel, each bounded by ``--connect-timeout`` and ``--timeout``) one ssh command
(BatchMode, so never a password prompt) runs a small stdlib-only Python snippet in the launch directory, with the
same interpreter path DeepSpeed's pdsh runner will use (``sys.executable`` of the launching Python). The very same
snippet runs on this machine first; it is the reference. Compared with it, per host:

* code: sha256 over the repo's code files (``*.py`` and ``*.sh`` under ``pipeline/ preprocess/ launch/``, plus
  top-level ``*.py``), path by path, so a mismatch names the files that differ;
* config: sha256 of the YAML recipe and of the DeepSpeed JSON it names;
* data: the shard directory (``data.shards``) exists and its ``manifest.json`` has the same sha256;
* environment: Python version and the versions of torch, deepspeed and transformers.

Output: one line per host, ``OK`` or ``FAIL`` with why; a summary naming the failed hosts. Exit status: 0 all
OK, 1 some host failed (or this machine itself is missing something), 2 bad input (hostfile, config, arguments).

ssh is run as pdsh will run it: ``PDSH_SSH_ARGS_APPEND`` from the environment is appended, ``--ssh-config`` adds
``-F FILE`` and ``--ssh-port`` adds ``-p PORT`` (DeepSpeed's ``--ssh_port``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CODE_DIRS = ("pipeline", "preprocess", "launch")
CODE_SUFFIXES = (".py", ".sh")
PACKAGES = ("torch", "deepspeed", "transformers")
MANIFEST = "manifest.json"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class PreflightError(ValueError):
    """Bad input (hostfile, config, arguments); the message is one line."""


# --------------------------------------------------------------------------------------------------------------
# Hostfile
# --------------------------------------------------------------------------------------------------------------
def parse_hostfile(path: str | Path) -> dict[str, int]:
    """DeepSpeed hostfile -> {host: slots}, in file order.

    Accepts what DeepSpeed's own parser accepts: one ``HOST slots=N`` per line (N >= 1), blank lines and lines
    starting with ``#``. Anything else (inline comments included: DeepSpeed rejects them too) is an error naming
    the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PreflightError(f"{path}: cannot read hostfile ({exc.strerror})") from None
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        slots = None
        if len(parts) == 2 and parts[1].startswith("slots="):
            value = parts[1][len("slots="):]
            if value.isdigit() and int(value) >= 1:
                slots = int(value)
        if slots is None:
            raise PreflightError(f"{path}:{lineno}: expected 'HOSTNAME slots=N' (N >= 1), got {line!r}")
        if parts[0] in hosts:
            raise PreflightError(f"{path}:{lineno}: host {parts[0]!r} is listed twice")
        hosts[parts[0]] = slots
    if not hosts:
        raise PreflightError(f"{path}: no hosts (expected lines like 'node0 slots=8')")
    return hosts


# --------------------------------------------------------------------------------------------------------------
# The fingerprint snippet: stdlib only, run as `python -` with `ARGS = {...}` prepended, here and on every host.
# --------------------------------------------------------------------------------------------------------------
FINGERPRINT_SNIPPET = r'''
import hashlib, json, os, socket, sys
from importlib import metadata

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def file_entry(path):
    try:
        return {"sha256": sha256(path)}
    except OSError as exc:
        return {"error": exc.strerror or str(exc)}

code = {}
for name in sorted(os.listdir(".")):
    if name.endswith(".py") and os.path.isfile(name):
        code[name] = sha256(name)
for top in ARGS["code_dirs"]:
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.endswith(tuple(ARGS["suffixes"])):
                path = os.path.join(root, name)
                code[path.replace(os.sep, "/")] = sha256(path)
total = hashlib.sha256("".join(f"{p}\0{h}\n" for p, h in sorted(code.items())).encode()).hexdigest()

data = None
if ARGS["shards"]:
    shards = ARGS["shards"]
    data = {"path": os.path.abspath(shards), "exists": os.path.isdir(shards)}
    if data["exists"]:
        data["manifest"] = file_entry(os.path.join(shards, ARGS["manifest"]))

packages = {}
for name in ARGS["packages"]:
    try:
        packages[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        packages[name] = None

print(json.dumps({
    "hostname": socket.gethostname(),
    "cwd": os.getcwd(),
    "python": sys.version.split()[0],
    "executable": sys.executable,
    "packages": packages,
    "code": {"sha256": total, "files": code},
    "files": {label: dict(file_entry(path), path=path) for label, path in ARGS["files"].items()},
    "data": data,
}))
'''


def snippet_source(args: dict[str, Any]) -> str:
    return f"import json\nARGS = json.loads({json.dumps(args)!r})\n" + FINGERPRINT_SNIPPET


# --------------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------------
def _short(sha: str | None) -> str:
    return sha[:12] if sha else "?"


def _list(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" +{len(items) - limit} more" if len(items) > limit else "")


def local_problems(ref: dict[str, Any]) -> list[str]:
    """What is missing on the reference machine itself (compared hosts would all "agree" on it)."""
    problems = []
    for label, entry in ref["files"].items():
        if "error" in entry:
            problems.append(f"{label} {entry['path']}: {entry['error']}")
    data = ref.get("data")
    if data is not None:
        if not data["exists"]:
            problems.append(f"data: shard directory {data['path']} not found")
        elif "error" in data["manifest"]:
            problems.append(f"data: {data['path']}/{MANIFEST}: {data['manifest']['error']}")
    if not ref["code"]["files"]:
        problems.append(f"code: no code files found under {ref['cwd']} (wrong --workdir?)")
    return problems


def compare(ref: dict[str, Any], remote: dict[str, Any], host: str) -> list[str]:
    """Reasons why `host`'s fingerprint differs from the reference one; empty when they agree."""
    problems: list[str] = []
    if remote.get("cwd") != ref.get("cwd"):
        problems.append(f"workdir is {remote.get('cwd')} on {host}, {ref.get('cwd')} here")
    if remote["python"] != ref["python"]:
        problems.append(f"python {ref['python']} here, {remote['python']} on {host}")
    for name, version in ref["packages"].items():
        other = remote["packages"].get(name)
        if other != version:
            problems.append(f"{name} {version or 'missing'} here, {other or 'missing'} on {host}")

    ref_code, rem_code = ref["code"], remote["code"]
    if rem_code["sha256"] != ref_code["sha256"]:
        a, b = ref_code["files"], rem_code["files"]
        changed = sorted(p for p in a.keys() & b.keys() if a[p] != b[p])
        only_here = sorted(a.keys() - b.keys())
        only_there = sorted(b.keys() - a.keys())
        parts = []
        if changed:
            parts.append(f"{len(changed)} changed ({_list(changed)})")
        if only_here:
            parts.append(f"{len(only_here)} missing on {host} ({_list(only_here)})")
        if only_there:
            parts.append(f"{len(only_there)} only on {host} ({_list(only_there)})")
        problems.append(f"code differs (sha256 {_short(ref_code['sha256'])} here, "
                        f"{_short(rem_code['sha256'])} on {host}): " + "; ".join(parts))

    for label, entry in ref["files"].items():
        other = remote["files"].get(label, {"error": "not checked"})
        if "error" in other:
            problems.append(f"{label} {entry['path']}: {other['error']} on {host}")
        elif other.get("sha256") != entry.get("sha256"):
            problems.append(f"{label} {entry['path']} differs (sha256 {_short(entry.get('sha256'))} here, "
                            f"{_short(other['sha256'])} on {host})")

    data, other = ref.get("data"), remote.get("data")
    if data is not None and other is not None:
        if not other["exists"]:
            problems.append(f"data: shard directory {other['path']} not found on {host}")
        elif "error" in other["manifest"]:
            problems.append(f"data: {other['path']}/{MANIFEST}: {other['manifest']['error']} on {host}")
        elif data["exists"] and other["manifest"].get("sha256") != data["manifest"].get("sha256"):
            problems.append(f"data: {other['path']}/{MANIFEST} differs (sha256 "
                            f"{_short(data['manifest'].get('sha256'))} here, "
                            f"{_short(other['manifest']['sha256'])} on {host})")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Running the snippet
# --------------------------------------------------------------------------------------------------------------
@dataclass
class HostResult:
    host: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    fingerprint: dict[str, Any] | None = None


def ssh_command(host: str, remote_cmd: str, *, ssh: str = "ssh", ssh_config: str | None = None,
                ssh_port: int | None = None, connect_timeout: int = 10,
                env: dict[str, str] | None = None) -> list[str]:
    """The ssh argv preflight uses: the options pdsh would get (PDSH_SSH_ARGS_APPEND), batch mode, a timeout."""
    env = os.environ if env is None else env
    cmd = [ssh]
    if ssh_config:
        cmd += ["-F", ssh_config]
    cmd += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}"]
    if ssh_port is not None:
        cmd += ["-p", str(ssh_port)]
    cmd += shlex.split(env.get("PDSH_SSH_ARGS_APPEND", ""))
    return cmd + [host, remote_cmd]


# ssh's error (last stderr line) -> what to do about it; {host} is the hostfile's name.
SSH_FIXES = (
    ("Connection refused", "nothing answers on {host}'s ssh port: start sshd there (or fix the port: --ssh-port, "
                           "Port in the ssh config)"),
    ("No route to host", "{host} is unreachable: check that it is up and its network link, or leave it out of the "
                         "hostfile"),
    ("Network is unreachable", "no route to {host} from this machine: check this machine's network and the "
                               "address {host} resolves to, or leave it out of the hostfile"),
    ("Connection timed out", "{host} does not answer: check that it is up and reachable (firewall, link), or leave "
                             "it out of the hostfile"),
    ("Could not resolve hostname", "the name {host} does not resolve: fix it in DNS or /etc/hosts, or give its "
                                   "address as HostName in the ssh config"),
    ("Permission denied", "{host} refuses the key: set up passwordless ssh to it (ssh-copy-id {host})"),
    ("Host key verification failed", "{host}'s host key is unknown or changed: check it, then accept it once with "
                                     "ssh {host}"),
)


def ssh_fix(host: str, error: str) -> str | None:
    """What to do about ssh's `error` reaching `host`, or None for an error not known here."""
    for needle, fix in SSH_FIXES:
        if needle.lower() in error.lower():
            return fix.format(host=host)
    return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _parse_output(stdout: str) -> dict[str, Any]:
    # The JSON is the last line; login banners or rc-file chatter may come before it.
    return json.loads(stdout.strip().splitlines()[-1])


def run_local(snippet: str, workdir: str, python: str, timeout: float) -> dict[str, Any]:
    proc = subprocess.run([python, "-"], input=snippet, capture_output=True, text=True, cwd=workdir,
                          timeout=timeout)
    if proc.returncode != 0:
        raise PreflightError(f"fingerprint snippet failed here (exit {proc.returncode}): {_last_line(proc.stderr)}")
    return _parse_output(proc.stdout)


def check_host(host: str, snippet: str, ref: dict[str, Any], *, workdir: str, python: str, timeout: float,
               **ssh_kw: Any) -> HostResult:
    q = shlex.quote
    remote_cmd = (f"cd {q(workdir)} 2>/dev/null || {{ echo 'preflight: no such directory {workdir}' >&2; exit 3; }}; "
                  f"exec {q(python)} -")
    cmd = ssh_command(host, remote_cmd, **ssh_kw)
    try:
        proc = subprocess.run(cmd, input=snippet, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return HostResult(host, False, [f"no answer within {timeout:g}s (ssh {host} hung): check that {host} is up "
                                        "and not overloaded, or leave it out of the hostfile"])
    except OSError as exc:
        return HostResult(host, False, [f"cannot run ssh: {exc.strerror or exc}"])
    err = _last_line(proc.stderr)
    if proc.returncode == 255:
        fix = ssh_fix(host, err)
        return HostResult(host, False, [f"ssh failed: {err or 'exit 255'}" + (f"; {fix}" if fix else "")])
    if proc.returncode == 3:
        return HostResult(host, False, [f"workdir {workdir} does not exist on {host}"])
    if proc.returncode == 127:
        return HostResult(host, False, [f"python {python} not found on {host}"])
    if proc.returncode != 0:
        return HostResult(host, False, [f"remote check exited {proc.returncode}: {err}"])
    try:
        remote = _parse_output(proc.stdout)
    except (ValueError, IndexError):
        return HostResult(host, False, [f"unreadable answer from {host}: {_last_line(proc.stdout)[:120]!r}"])
    problems = compare(ref, remote, host)
    return HostResult(host, not problems, problems, remote)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.preflight",
        description="Check, before a multi-node launch, that every host of a DeepSpeed hostfile answers over ssh "
        "and has the same code, config, data manifest and package versions as this machine.",
        epilog="Exit status: 0 all hosts OK, 1 a host (or this machine) failed a check, 2 bad input.",
    )
    p.add_argument("--hostfile", required=True, help="DeepSpeed hostfile ('HOST slots=N' lines)")
    p.add_argument("--config", required=True, help="training recipe (YAML), relative to --workdir or absolute")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides as given to the trainer (e.g. data.shards=/data/x)")
    p.add_argument("--ssh-config", default=None, help="ssh client config file (ssh -F); pdsh needs the same, "
                   "via PDSH_SSH_ARGS_APPEND='-F FILE' (launch/multinode.sh sets it)")
    p.add_argument("--ssh-port", type=int, default=None, help="ssh port (as deepspeed --ssh_port)")
    p.add_argument("--connect-timeout", type=int, default=10, help="ssh ConnectTimeout seconds (default 10)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per host, all in all (default 60)")
    p.add_argument("--workdir", default=None, help="launch directory, the same path on every host (default: "
                   "current directory; DeepSpeed's pdsh runner cds there on each host)")
    p.add_argument("--python", default=None, help="interpreter on the hosts (default: this one, "
                   f"{sys.executable}, as DeepSpeed's runner uses its own sys.executable remotely)")
    p.add_argument("--shards", default=None, help="shard directory to check (default: data.shards of the config)")
    p.add_argument("--code-dirs", default=",".join(DEFAULT_CODE_DIRS),
                   help=f"comma-separated code directories to hash (default {','.join(DEFAULT_CODE_DIRS)})")
    p.add_argument("--json", action="store_true", help="also print the per-host results as one JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except PreflightError as exc:
        print(f"preflight: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config

    workdir = os.path.abspath(args.workdir or os.getcwd())
    if not os.path.isdir(workdir):
        raise PreflightError(f"--workdir {workdir}: not a directory")
    python = args.python or sys.executable
    hosts = parse_hostfile(args.hostfile)

    config_path = Path(args.config)
    config_abs = config_path if config_path.is_absolute() else Path(workdir) / config_path
    try:
        cfg = load_config(config_abs, args.overrides)
    except ConfigError as exc:
        raise PreflightError(str(exc)) from None
    files = {"config": str(config_abs)}
    if cfg.deepspeed:
        ds = Path(cfg.deepspeed)
        files["deepspeed config"] = str(ds if ds.is_absolute() else Path(workdir) / ds)
    shards = args.shards if args.shards is not None else cfg.data.shards
    if shards and not os.path.isabs(shards):
        shards = os.path.join(workdir, shards)

    snippet = snippet_source({
        "code_dirs": [d for d in args.code_dirs.split(",") if d],
        "suffixes": list(CODE_SUFFIXES),
        "files": files,
        "shards": shards or None,
        "manifest": MANIFEST,
        "packages": list(PACKAGES),
    })
    ref = run_local(snippet, workdir, python, args.timeout)
    data_desc = (f"data {ref['data']['path']}" if ref.get("data") else "data: not configured (data.shards empty)")
    print(f"preflight: {len(hosts)} host(s) from {args.hostfile}; workdir {workdir}; config {args.config}")
    print(f"  here: code {_short(ref['code']['sha256'])} ({len(ref['code']['files'])} files), "
          f"config {_short(ref['files']['config'].get('sha256'))}, {data_desc}, python {ref['python']}, "
          + ", ".join(f"{k} {v}" for k, v in ref["packages"].items()))
    here = local_problems(ref)
    if here:
        for problem in here:
            print(f"  {'(this machine)':<{max(map(len, hosts))}}  FAIL  {problem}")
        print("preflight: FAIL on this machine: fix it before checking the hosts")
        return EXIT_FAIL

    ssh_kw = dict(ssh_config=args.ssh_config, ssh_port=args.ssh_port, connect_timeout=args.connect_timeout)
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        futures = [pool.submit(check_host, h, snippet, ref, workdir=workdir, python=python,
                               timeout=args.timeout, **ssh_kw) for h in hosts]
        results = [f.result() for f in futures]

    width = max(map(len, hosts))
    for r in results:
        print(f"  {r.host:<{width}}  {'OK' if r.ok else 'FAIL'}" + (f"  {'; '.join(r.problems)}" if r.problems else ""))
    failed = [r.host for r in results if not r.ok]
    if args.json:
        print(json.dumps({"ok": not failed, "failed": failed,
                          "hosts": {r.host: {"ok": r.ok, "problems": r.problems} for r in results}}))
    if failed:
        print(f"preflight: FAIL on {len(failed)} of {len(results)} host(s): {', '.join(failed)}")
        return EXIT_FAIL
    print(f"preflight: OK, {len(results)} host(s) agree")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
