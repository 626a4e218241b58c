#!/usr/bin/env bash
# The export defaults' table (docs/export.md): tools/quant_report.py --many, every candidate (the stack's default,
# the record's scheme, gptq_lite) on three model shapes x two seeds: the seed CPU demo (4 x 128, sp1024 sample), the
# STACK=pr1855 CPU demo (11 x 128 looped, SP8192 CaseOps sample) and a narrow, deeper seed-stack model (6 x 96).
# Each shape's files are reported together, with the data and export settings run.sh gives that shape: their gaps
# at the stack's settings, then at equal bytes (every candidate at MATRIX_BITS 5..8, read off at the default's bytes).
# Usage: bash tools/quant_defaults.sh [OUT]   (trains what OUT lacks; default ./out/quant_defaults; SEEDS="1337 2")
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-./out/quant_defaults}
seeds=${SEEDS:-"1337 2"}
mkdir -p "$out"
shapes=(
  "seed|"
  "pr|STACK=pr1855"
  "narrow6|NUM_LAYERS=6 MODEL_DIM=96 VE_LAYERS=4,5 XSA_LAST_N=3 ITERATIONS=150 WARMDOWN_ITERS=50"
)
for shape in "${shapes[@]}"; do
  name=${shape%%|*}; vars=${shape#*|}
  files=()
  for seed in $seeds; do
    dir="$out/${name}_$seed"
    if [ ! -f "$dir/final_model.float.safetensors" ]; then
      echo "training $dir" >&2
      env $vars CUDA_VISIBLE_DEVICES= SEED="$seed" OUTPUT_DIR="$dir" bash run.sh > "$dir.train.log" 2>&1
    fi
    files+=("$dir/final_model.float.safetensors")
  done
  echo "### $name: ${vars:-the seed demo}"
  # the gaps at the stack's settings, then at equal bytes (each candidate at MATRIX_BITS 5..8)
  env $vars CUDA_VISIBLE_DEVICES= bash run.sh python3 tools/quant_report.py --many "${files[@]}" --val-tokens 32768 \
    --bits 5,6,7,8
done
