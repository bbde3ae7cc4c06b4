#!/usr/bin/env bash
# One-node launch: every GPU of this machine (or NPROC CPU processes without GPUs) runs launch/train.py.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/train.sh --config CONFIG [options] [KEY=VALUE ...] [-- TRAINER_ARGS ...]

Runs, from the repository root,
  deepspeed --num_gpus N --master_port PORT launch/train.py --config CONFIG [KEY=VALUE ...] [TRAINER_ARGS ...]
N = the GPUs nvidia-smi lists (CUDA_VISIBLE_DEVICES, when set, picks which: --include localhost:IDS), or NPROC
CPU processes (gloo backend) when there is no GPU.

Options:
  --config FILE     training recipe (YAML)                                        [env CONFIG]
  --module MOD      run `python -m MOD` instead of launch/train.py (e.g. pipeline.gradcheck)
  --script PATH     run PATH instead of launch/train.py
  --dry-run         print the command and environment, run nothing                [env DRY_RUN=1]
  --check           only validate: `python launch/train.py --check --world-size N` (config, DeepSpeed JSON,
                    data, tokenizer; prints the plan for this machine's N ranks) and exit, no launcher
  --selftest        only self-test this machine: `python -m pipeline.selftest --config CONFIG --world-size N`
                    (one process, one GPU: kernels, compile, GradCache dtype, chunk_tokens, one optimizer step,
                    attention; a line per check, then the verdict; exit 0 safe / 1 a check failed / 2 bad config)
                    and exit, no launcher; `--selftest --help` lists its options
  -h, --help        this help

Environment:
  NUM_GPUS          GPUs to use (default: all that nvidia-smi lists)
  NPROC             processes on a machine without GPUs (default 1)
  OMP_NUM_THREADS   default: CPU cores / processes (at least 1)
  MASTER_PORT       rendezvous port (default 29500; change it to run two jobs on one machine)
  NCCL_DEBUG        default WARN (GPU)
  GLOO_SOCKET_IFNAME  default lo (CPU: all ranks are local)
  PYTHON            interpreter for the DeepSpeed launcher and the ranks (default python3)

Examples:
  launch/train.sh --config configs/f2llm-v2-0.6b.yaml train.lr=1e-5
  NPROC=2 launch/train.sh --config configs/tiny-cpu.yaml -- --resume auto
  launch/train.sh --selftest --config configs/f2llm-v2-0.6b.yaml     # before a long job, on its node
EOF
}

die() { echo "train.sh: error: $*" >&2; exit 2; }

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$REPO_DIR/launch/common.sh"
CONFIG="${CONFIG:-}"
DRY_RUN="${DRY_RUN:-0}"
CHECK=0
SELFTEST=0
SELFTEST_HELP=0
CUSTOM_ENTRY=0
PYTHON="${PYTHON:-python3}"
MASTER_PORT="${MASTER_PORT:-29500}"
ENTRY=(launch/train.py)
ARGS=()

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) if [ "$SELFTEST" = 1 ]; then SELFTEST_HELP=1; shift; else usage; exit 0; fi ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --module) need_value "$@"; ENTRY=(--module "$2"); CUSTOM_ENTRY=1; shift 2 ;;
    --script) need_value "$@"; ENTRY=("$2"); CUSTOM_ENTRY=1; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --check) CHECK=1; shift ;;
    --selftest) SELFTEST=1; shift ;;
    --) shift; ARGS+=("$@"); break ;;
    --config=*|--module=*|--script=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    -*) die "unknown option $1 (see --help; trainer flags go after --)" ;;
    *=*) ARGS+=("$1"); shift ;;
    *) die "unexpected argument '$1' (config overrides look like KEY=VALUE; trainer flags go after --)" ;;
  esac
done

if [ "$SELFTEST_HELP" = 1 ]; then  # the self-test's own options; no config needed
  cd "$REPO_DIR"
  HELP_CMD=("$PYTHON" -m pipeline.selftest --help)
  if [ "$DRY_RUN" = 1 ]; then print_cmd "${HELP_CMD[@]}"; exit 0; fi
  exec "${HELP_CMD[@]}"
fi
[ -n "$CONFIG" ] || die "--config is required (see --help)"
case "$CONFIG" in /*) ;; *) CONFIG="$PWD/$CONFIG" ;; esac
[ -f "$CONFIG" ] || die "config not found: $CONFIG"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
  || die "MASTER_PORT must be a port number 1-65535, got '$MASTER_PORT'"
if [ "${ENTRY[0]}" != --module ]; then
  case "${ENTRY[0]}" in
    /*) [ -f "${ENTRY[0]}" ] || die "entry script not found: ${ENTRY[0]}" ;;
    *) if [ -f "$PWD/${ENTRY[0]}" ]; then ENTRY=("$PWD/${ENTRY[0]}")
       elif [ ! -f "$REPO_DIR/${ENTRY[0]}" ]; then die "entry script not found: ${ENTRY[0]}"; fi ;;
  esac
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter not found: $PYTHON (set PYTHON)"

# ---- devices ---------------------------------------------------------------------------------------------------
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c '[0-9]' || true)"
fi
PLACEMENT=()
if [ "$gpus" -gt 0 ]; then
  DEVICE=gpu
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ -z "${NUM_GPUS:-}" ]; then
    # deepspeed drops CUDA_VISIBLE_DEVICES when --num_gpus is given; --include keeps the selection.
    [[ "$CUDA_VISIBLE_DEVICES" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "CUDA_VISIBLE_DEVICES must be GPU indices like 0,1, got '$CUDA_VISIBLE_DEVICES'"
    NRANKS="$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)"
    PLACEMENT=(--include "localhost:$CUDA_VISIBLE_DEVICES")
  else
    NRANKS="${NUM_GPUS:-$gpus}"
    [[ "$NRANKS" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '$NRANKS'"
    [ "$NRANKS" -le "$gpus" ] || die "NUM_GPUS=$NRANKS but nvidia-smi lists $gpus GPU(s)"
    PLACEMENT=(--num_gpus "$NRANKS")
  fi
  : "${NCCL_DEBUG:=WARN}"
  export NCCL_DEBUG
else
  DEVICE=cpu
  NRANKS="${NPROC:-1}"
  [[ "$NRANKS" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NRANKS'"
  PLACEMENT=(--num_gpus "$NRANKS")   # the CPU accelerator reads it as the number of processes
  : "${GLOO_SOCKET_IFNAME:=lo}"
  export GLOO_SOCKET_IFNAME
fi
cores="$(nproc 2>/dev/null || echo 1)"
OMP_FROM_ENV="${OMP_NUM_THREADS:-}"
: "${OMP_NUM_THREADS:=$(( cores / NRANKS > 0 ? cores / NRANKS : 1 ))}"
export OMP_NUM_THREADS

cd "$REPO_DIR"
if [ "$SELFTEST" = 1 ]; then
  [ "$CHECK" = 0 ] || die "--check and --selftest: choose one"
  [ "$CUSTOM_ENTRY" = 0 ] || die "--selftest runs python -m pipeline.selftest; drop --module/--script"
  export OMP_NUM_THREADS="${OMP_FROM_ENV:-$cores}"   # one process: every core
  SELFTEST_CMD=("$PYTHON" -m pipeline.selftest --config "$CONFIG" --world-size "$NRANKS" "${ARGS[@]+"${ARGS[@]}"}")
  if [ "$DRY_RUN" = 1 ]; then
    echo "# $DEVICE: self-test in one process for a run of $NRANKS rank(s); OMP_NUM_THREADS=$OMP_NUM_THREADS"
    print_cmd "${SELFTEST_CMD[@]}"
    exit 0
  fi
  exec "${SELFTEST_CMD[@]}"
fi
if [ "$CHECK" = 1 ]; then
  [ "$CUSTOM_ENTRY" = 0 ] || die "--check runs launch/train.py's checks; drop --module/--script"
  [ "$DEVICE" = gpu ] && CHECK_DEVICE=cuda || CHECK_DEVICE=cpu
  CHECK_CMD=("$PYTHON" launch/train.py --config "$CONFIG" --check --world-size "$NRANKS" --device "$CHECK_DEVICE"
             "${ARGS[@]+"${ARGS[@]}"}")
  if [ "$DRY_RUN" = 1 ]; then print_cmd "${CHECK_CMD[@]}"; exit 0; fi
  exec "${CHECK_CMD[@]}"
fi
LAUNCH=("$PYTHON" -m deepspeed.launcher.runner "${PLACEMENT[@]}" --master_port "$MASTER_PORT"
        "${ENTRY[@]}" --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}")
if [ "$DRY_RUN" = 1 ]; then
  echo "# $DEVICE: $NRANKS rank(s); OMP_NUM_THREADS=$OMP_NUM_THREADS${NCCL_DEBUG:+ NCCL_DEBUG=$NCCL_DEBUG}${GLOO_SOCKET_IFNAME:+ GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME}"
  print_cmd "${LAUNCH[@]}"
  exit 0
fi
echo "train.sh: $NRANKS rank(s) on $DEVICE, OMP_NUM_THREADS=$OMP_NUM_THREADS, master port $MASTER_PORT" >&2
exec "${LAUNCH[@]}"
