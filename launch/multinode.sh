#!/usr/bin/env bash
# Multi-node launch: preflight every host, then `deepspeed --hostfile` (pdsh + ssh) runs launch/train.py everywhere.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/multinode.sh --hostfile FILE --config CONFIG [options] [KEY=VALUE ...] [-- TRAINER_ARGS ...]

Runs `python -m pipeline.preflight` (every host answers over ssh and has the same code, config, data manifest and
package versions), then
  deepspeed --hostfile FILE --master_addr ADDR --master_port PORT launch/train.py --config CONFIG [ARGS ...]
from the repository root, which must be the same path on every node (DeepSpeed's pdsh runner cds there).
KEY=VALUE arguments are config overrides: given to the trainer and to preflight.

Options:
  --hostfile FILE      DeepSpeed hostfile, one 'HOST slots=N' per line                      [env HOSTFILE]
  --config FILE        training recipe (YAML)                                               [env CONFIG]
  --master-addr ADDR   address of the first node, reachable from all nodes                  [env MASTER_ADDR;
                       default: first address of `hostname -I` on the first host, over ssh]
  --master-port PORT   rendezvous port                                       [env MASTER_PORT; default 29500]
  --ssh-config FILE    ssh client config (ssh -F) for preflight and pdsh     [env SSH_CONFIG]
  --ssh-port PORT      ssh port (deepspeed --ssh_port)                        [env SSH_PORT]
  --module MOD         run `python -m MOD` instead of launch/train.py (e.g. pipeline.gradcheck)
  --script PATH        run PATH instead of launch/train.py
  --skip-preflight     launch without the preflight check                    [env SKIP_PREFLIGHT=1]
  --check              only validate: run `launch/train.py --check --hostfile FILE` here (config, DeepSpeed
                       JSON, data, tokenizer, hostfile; prints the plan for the hostfile's world size) and exit
  --dry-run            print the commands and the exported environment, run nothing  [env DRY_RUN=1]
  -h, --help           this help

Network knobs, exported to every rank (through a generated DeepSpeed env file, DS_ENV_FILE, merged with
~/.deepspeed_env and ./.deepspeed_env); set them in the environment to change the defaults:
  NCCL_SOCKET_IFNAME   default: lo when the master address is loopback, else ^lo,docker0 (any other interface)
  GLOO_SOCKET_IFNAME   default: lo when the master address is loopback, else unset: each rank then uses its host's
                       interface towards the master address (not the address its hostname resolves to, which may
                       be loopback); set it (e.g. eth0, ib0) to choose
  NCCL_IB_DISABLE      default 0 (InfiniBand on when present); 1 forces TCP sockets
  NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_NET_GDR_LEVEL, NCCL_DEBUG (default WARN), NCCL_DEBUG_SUBSYS,
  OMP_NUM_THREADS, TORCH_NCCL_ASYNC_ERROR_HANDLING, HF_HOME, TRANSFORMERS_OFFLINE, HF_HUB_OFFLINE:
                       forwarded when set
Other environment: PYTHON (default python3: runs preflight and the DeepSpeed launcher, so every rank uses this
interpreter's path), PDSH_SSH_ARGS_APPEND (extra ssh options for pdsh; --ssh-config appends -F FILE),
SSH_ALIVE_S (default: train.collective_timeout_s plus two heartbeat intervals, the longest the ranks take to name a
silent host; 0 = off): pdsh's ssh session to a host that has sent nothing for about this long is dropped
(ServerAliveInterval = SSH_ALIVE_S/5, ServerAliveCountMax = 4: five keepalives unanswered), so that a host whose
network is gone cannot keep the launch waiting forever.

Exit status: 0 when every rank exited 0; else the first status a host's ranks reported (the trainer's: 3 a rank
died or stopped answering, 2 bad input, 1 training aborted), else 255 when ssh to a host failed or was lost, else
the launcher's. The last line says how the run ended: "multinode.sh: finished ..." or "multinode.sh: failed (exit
N): " with the first "error:" line of any rank and the hosts whose ssh session was lost.

Example:
  MASTER_ADDR=10.0.0.1 NCCL_SOCKET_IFNAME=ens5 launch/multinode.sh --hostfile hosts --config configs/f2llm.yaml
EOF
}

die() { echo "multinode.sh: error: $*" >&2; exit 2; }

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$REPO_DIR/launch/common.sh"
HOSTFILE="${HOSTFILE:-}"
CONFIG="${CONFIG:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
SSH_CONFIG="${SSH_CONFIG:-}"
SSH_PORT="${SSH_PORT:-}"
SSH_ALIVE_S="${SSH_ALIVE_S:-}"
SKIP_PREFLIGHT="${SKIP_PREFLIGHT:-0}"
CHECK=0
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python3}"
ENTRY=(launch/train.py)
OVERRIDES=()       # KEY=VALUE before --: to the trainer and to preflight
TRAINER_ARGS=()    # everything after --: to the trainer (its KEY=VALUE items to preflight too)

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --hostfile) need_value "$@"; HOSTFILE="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --master-addr) need_value "$@"; MASTER_ADDR="$2"; shift 2 ;;
    --master-port) need_value "$@"; MASTER_PORT="$2"; shift 2 ;;
    --ssh-config) need_value "$@"; SSH_CONFIG="$2"; shift 2 ;;
    --ssh-port) need_value "$@"; SSH_PORT="$2"; shift 2 ;;
    --module) need_value "$@"; ENTRY=(--module "$2"); shift 2 ;;
    --script) need_value "$@"; ENTRY=("$2"); shift 2 ;;
    --skip-preflight) SKIP_PREFLIGHT=1; shift ;;
    --check) CHECK=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAINER_ARGS+=("$@"); break ;;
    --hostfile=*|--config=*|--master-addr=*|--master-port=*|--ssh-config=*|--ssh-port=*|--module=*|--script=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    -*) die "unknown option $1 (see --help)" ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) die "unexpected argument '$1' (config overrides look like KEY=VALUE; trainer flags go after --)" ;;
  esac
done
PREFLIGHT_OVERRIDES=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
for a in "${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"}"; do
  case "$a" in -*) ;; *=*) PREFLIGHT_OVERRIDES+=("$a") ;; esac
done

# ---- validate ------------------------------------------------------------------------------------------------
[ -n "$HOSTFILE" ] || die "--hostfile is required (see --help)"
[ -n "$CONFIG" ] || die "--config is required (see --help)"
[ -f "$HOSTFILE" ] || die "hostfile not found: $HOSTFILE"
HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"
case "$CONFIG" in /*) CONFIG_ABS="$CONFIG" ;; *) CONFIG_ABS="$PWD/$CONFIG" ;; esac
[ -f "$CONFIG_ABS" ] || die "config not found: $CONFIG"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
  || die "--master-port must be a port number 1-65535, got '$MASTER_PORT'"
[ -z "$SSH_PORT" ] || [[ "$SSH_PORT" =~ ^[0-9]+$ ]] || die "--ssh-port must be a number, got '$SSH_PORT'"
[ -z "$SSH_ALIVE_S" ] || [[ "$SSH_ALIVE_S" =~ ^[0-9]+$ ]] || die "SSH_ALIVE_S must be whole seconds, got '$SSH_ALIVE_S'"
if [ -n "$SSH_CONFIG" ]; then
  [ -f "$SSH_CONFIG" ] || die "ssh config not found: $SSH_CONFIG"
  SSH_CONFIG="$(cd "$(dirname "$SSH_CONFIG")" && pwd)/$(basename "$SSH_CONFIG")"
fi
if [ "${ENTRY[0]}" != --module ]; then   # ranks start in $REPO_DIR: make a script path given from here absolute
  case "${ENTRY[0]}" in
    /*) [ -f "${ENTRY[0]}" ] || die "entry script not found: ${ENTRY[0]}" ;;
    *) if [ -f "$PWD/${ENTRY[0]}" ]; then ENTRY=("$PWD/${ENTRY[0]}")
       elif [ ! -f "$REPO_DIR/${ENTRY[0]}" ]; then die "entry script not found: ${ENTRY[0]}"; fi ;;
  esac
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter not found: $PYTHON (set PYTHON)"
if [ "$CHECK" = 1 ]; then   # dry run of the trainer's checks on this machine: no ssh, no pdsh
  CHECK_CMD=("$PYTHON" "$REPO_DIR/launch/train.py" --config "$CONFIG_ABS" --check --hostfile "$HOSTFILE"
             "${PREFLIGHT_OVERRIDES[@]+"${PREFLIGHT_OVERRIDES[@]}"}")
  if [ "$DRY_RUN" = 1 ]; then print_cmd "${CHECK_CMD[@]}"; exit 0; fi
  cd "$REPO_DIR"
  exec "${CHECK_CMD[@]}"
fi
if [ "$DRY_RUN" != 1 ]; then
  command -v pdsh >/dev/null 2>&1 || die "pdsh not found: DeepSpeed's multi-node launcher needs it (apt-get install pdsh)"
  command -v ssh >/dev/null 2>&1 || die "ssh not found (apt-get install openssh-client)"
fi

# First host of the hostfile (preflight validates the whole file; this only needs the first name).
FIRST_HOST="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")"
[ -n "$FIRST_HOST" ] || die "$HOSTFILE: no hosts (expected lines like 'node0 slots=8')"

SSH_CMD=(ssh)
[ -z "$SSH_CONFIG" ] || SSH_CMD+=(-F "$SSH_CONFIG")
SSH_CMD+=(-o BatchMode=yes -o ConnectTimeout=10)
[ -z "$SSH_PORT" ] || SSH_CMD+=(-p "$SSH_PORT")

if [ -z "$MASTER_ADDR" ]; then
  if [ "$DRY_RUN" = 1 ]; then
    MASTER_ADDR="<first address of 'hostname -I' on $FIRST_HOST>"
  else
    MASTER_ADDR="$("${SSH_CMD[@]}" "$FIRST_HOST" hostname -I 2>/dev/null | awk '{print $1}')" || true
    [ -n "$MASTER_ADDR" ] || die "cannot find the master address: 'ssh $FIRST_HOST hostname -I' failed; pass --master-addr"
  fi
fi

# ---- environment for every rank ------------------------------------------------------------------------------
case "$MASTER_ADDR" in
  127.*|localhost) : "${NCCL_SOCKET_IFNAME:=lo}" "${GLOO_SOCKET_IFNAME:=lo}" ;;
  *) : "${NCCL_SOCKET_IFNAME:=^lo,docker0}" ;;
esac
: "${NCCL_IB_DISABLE:=0}" "${NCCL_DEBUG:=WARN}"
export NCCL_SOCKET_IFNAME NCCL_IB_DISABLE NCCL_DEBUG
[ -z "${GLOO_SOCKET_IFNAME:-}" ] || export GLOO_SOCKET_IFNAME
FORWARD=(NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_DISABLE NCCL_IB_HCA NCCL_IB_GID_INDEX NCCL_NET_GDR_LEVEL
         NCCL_DEBUG NCCL_DEBUG_SUBSYS OMP_NUM_THREADS TORCH_NCCL_ASYNC_ERROR_HANDLING HF_HOME TRANSFORMERS_OFFLINE
         HF_HUB_OFFLINE)

# DeepSpeed exports only PYTHON*/NCCL*-like variables plus the lines of its env file (DS_ENV_FILE, default
# .deepspeed_env in ~ and in .). Build one file: the user's env files first, then the knobs above.
ENV_FILE="$(mktemp "${TMPDIR:-/tmp}/multinode_env.XXXXXX")"
OUTCOME="$(mktemp "${TMPDIR:-/tmp}/multinode_outcome.XXXXXX")"
cleanup() { rm -f "$ENV_FILE" "$OUTCOME"; }
trap cleanup EXIT
ds_env_name="${DS_ENV_FILE:-.deepspeed_env}"
case "$ds_env_name" in
  /*) user_env_files=("$ds_env_name") ;;
  *) user_env_files=("$HOME/$ds_env_name" "$REPO_DIR/$ds_env_name") ;;   # where DeepSpeed looks: ~ and the run dir
esac
for f in "${user_env_files[@]}"; do
  if [ -f "$f" ]; then grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$f" >>"$ENV_FILE" || true; fi
done
for v in "${FORWARD[@]}"; do
  if [ -n "${!v:-}" ]; then
    case "${!v}" in *$'\n'*) die "$v contains a newline" ;; esac
    printf '%s=%s\n' "$v" "${!v}" >>"$ENV_FILE"
  fi
done
export DS_ENV_FILE="$ENV_FILE"
if [ -n "$SSH_CONFIG" ]; then
  export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} -F $SSH_CONFIG"
fi
# ssh keepalives on pdsh's sessions. Without them, a host whose link is cut keeps pdsh - and this script - waiting
# forever: its ranks' exit never arrives, and no TCP reset either. With them the session is dropped after about
# SSH_ALIVE_S, by default the longest the surviving ranks take to name a silent host and exit
# (train.collective_timeout_s + two heartbeat intervals): a network outage the ranks ride out does not end the launch.
if [ -z "$SSH_ALIVE_S" ]; then
  SSH_ALIVE_S="$(cd "$REPO_DIR" && "$PYTHON" -c 'import sys
from pipeline.config import ConfigError, load_config
from pipeline.resilience import silence_limit_s
try:
    print(int(-(-silence_limit_s(load_config(sys.argv[1], sys.argv[2:]).train.collective_timeout_s) // 1)))
except ConfigError as exc:
    sys.exit(f"multinode.sh: error: {exc}")' "$CONFIG_ABS" "${PREFLIGHT_OVERRIDES[@]+"${PREFLIGHT_OVERRIDES[@]}"}")" \
    || exit 2
fi
if [ "$SSH_ALIVE_S" -gt 0 ]; then
  PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} -o ServerAliveInterval=$(( (SSH_ALIVE_S + 4) / 5 ))"
  export PDSH_SSH_ARGS_APPEND="$PDSH_SSH_ARGS_APPEND -o ServerAliveCountMax=4"
fi

# ---- preflight, then launch ----------------------------------------------------------------------------------
cd "$REPO_DIR"
PREFLIGHT=("$PYTHON" -m pipeline.preflight --hostfile "$HOSTFILE" --config "$CONFIG_ABS")
[ -z "$SSH_CONFIG" ] || PREFLIGHT+=(--ssh-config "$SSH_CONFIG")
[ -z "$SSH_PORT" ] || PREFLIGHT+=(--ssh-port "$SSH_PORT")
PREFLIGHT+=("${PREFLIGHT_OVERRIDES[@]+"${PREFLIGHT_OVERRIDES[@]}"}")

# `deepspeed` is deepspeed.launcher.runner:main; running it with $PYTHON makes preflight, the launcher and (through
# the runner's sys.executable) every remote rank use the same interpreter path.
LAUNCH=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR"
        --master_port "$MASTER_PORT")
[ -z "$SSH_PORT" ] || LAUNCH+=(--ssh_port "$SSH_PORT")
# DeepSpeed's own check is a bare `ssh FIRST_HOST` (no -F, first host only); preflight checked every host.
if [ "$SKIP_PREFLIGHT" != 1 ] || [ -n "$SSH_CONFIG" ]; then LAUNCH+=(--no_ssh_check); fi
LAUNCH+=("${ENTRY[@]}" --config "$CONFIG_ABS" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
         "${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"}")

if [ "$DRY_RUN" = 1 ]; then
  echo "# environment exported to every rank (DS_ENV_FILE):"
  sed 's/^/#   /' "$ENV_FILE"
  [ -z "${PDSH_SSH_ARGS_APPEND:-}" ] || echo "PDSH_SSH_ARGS_APPEND=\"$PDSH_SSH_ARGS_APPEND\""
  [ "$SKIP_PREFLIGHT" = 1 ] || print_cmd "${PREFLIGHT[@]}"
  print_cmd "${LAUNCH[@]}"
  exit 0
fi

if [ "$SKIP_PREFLIGHT" != 1 ]; then
  "${PREFLIGHT[@]}" || { rc=$?; echo "multinode.sh: preflight failed (exit $rc); not launching" >&2; exit "$rc"; }
fi
NHOSTS="$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE")"
echo "multinode.sh: launching on $NHOSTS host(s), master $MASTER_ADDR:$MASTER_PORT" >&2

# The launcher's stderr (the ranks' stderr through pdsh, and pdsh's own) passes through awk unchanged; awk keeps the
# lines that say how the run ended: the ranks' "error: ..." lines and pdsh's "HOST: ssh exited with exit code N".
# awk ignores SIGINT/SIGTERM, so that what the ranks print while they stop still gets through.
exec 3>&1
set +e
"${LAUNCH[@]}" 2>&1 1>&3 3>&- | (trap '' INT TERM; exec awk -v keep="$OUTCOME" '
  { print; fflush() }
  /^([^ ]+: )?error: / || /: ssh exited with exit code [0-9]+$/ { print >> keep; fflush(keep) }' 1>&2 3>&-)
rc=${PIPESTATUS[0]}
set -e
exec 3>&-

# Per host, in the order pdsh reported them: the first status a host's ranks gave is the run's. 255 is ssh's own
# (connection refused or lost): it says nothing of the ranks, and a lost host's session may end before the
# survivors have named it.
first_rc=""
lost=()
while IFS= read -r line; do
  case "$line" in
    *": ssh exited with exit code "*)
      code="${line##* }"; host="${line%: ssh exited with exit code *}"; host="${host##* }"
      if [ "$code" = 255 ]; then lost+=("$host"); elif [ -z "$first_rc" ]; then first_rc="$code"; fi ;;
  esac
done <"$OUTCOME"
if [ "$rc" = 0 ]; then
  echo "multinode.sh: finished: every rank on $NHOSTS host(s) exited 0" >&2
  exit 0
fi
status="${first_rc:-$rc}"
[ -n "$first_rc" ] || [ "${#lost[@]}" = 0 ] || status=255
what="$(grep -m1 -E '^([^ ]+: )?error: ' "$OUTCOME" | sed -E 's/^([^ ]+: )?error: //')" || true
msg="multinode.sh: failed (exit $status)"
[ -z "$what" ] || msg+=": $what"
[ "${#lost[@]}" = 0 ] || msg+="; ssh to ${lost[*]} failed or was lost (exit 255: host down or unreachable)"
if [ "$status" = 3 ] || [ "${#lost[@]}" -gt 0 ]; then
  msg+="; continue from the last complete checkpoint with -- --resume auto (leave out or fix the failed host)"
fi
echo "$msg" >&2
exit "$status"
