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
  GLOO_SOCKET_IFNAME   default: lo when the master address is loopback, else unset (gloo resolves the hostname);
                       set it (e.g. eth0, ib0) when hostnames resolve to an unreachable address
  NCCL_IB_DISABLE      default 0 (InfiniBand on when present); 1 forces TCP sockets
  NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_NET_GDR_LEVEL, NCCL_DEBUG (default WARN), NCCL_DEBUG_SUBSYS,
  OMP_NUM_THREADS, TORCH_NCCL_ASYNC_ERROR_HANDLING, HF_HOME, TRANSFORMERS_OFFLINE, HF_HUB_OFFLINE:
                       forwarded when set
Other environment: PYTHON (default python3: runs preflight and the DeepSpeed launcher, so every rank uses this
interpreter's path), PDSH_SSH_ARGS_APPEND (extra ssh options for pdsh; --ssh-config appends -F FILE).

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
cleanup() { rm -f "$ENV_FILE"; }
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
echo "multinode.sh: launching on $(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE") host(s), master $MASTER_ADDR:$MASTER_PORT" >&2
"${LAUNCH[@]}"
