#!/usr/bin/env bash
# One prepared check for a lent H100/H200 (one GPU, at most about 8 minutes), at the record settings:
#  1. tools/bench.py on the embedded sample: compile time, train ms/step and MFU of the full 786,432-token record
#     step on one GPU, the attention backend, peak memory, each final-evaluation pass's tokens/s and MFU on a
#     131,072-token val slice, and their projection to 8xH100 at the full val size against the 600 s budget;
#  2. a short train_gpt.py run on the sample (round trip only): the score of the real export path on a GPU;
#  3. one summary block, ready to paste into docs/performance.md (GPU figures).
# Usage: bash tools/gpu_check.sh [OUTPUT_DIR]   (BENCH_TIMEOUT, RUN_TIMEOUT, ITERATIONS, BENCH_VAL_TOKENS override the sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-./out}/gpu_check}
mkdir -p "$out"
export DATA_PATH=./data/datasets/sample_sp1024 TOKENIZER_PATH=./data/tokenizers/sample_1024_bpe.model PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
rm -f "$out/bench.json" "$out/logs/gpu_check.json"

timeout "${BENCH_TIMEOUT:-300}" python3 tools/bench.py --project-8xh100 --val-tokens "${BENCH_VAL_TOKENS:-131072}" --train-steps 5 \
  --train-warmup 2 --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
echo "bench exit: ${PIPESTATUS[0]}"

OUTPUT_DIR="$out" RUN_ID=gpu_check ITERATIONS=${ITERATIONS:-30} WARMUP_STEPS=3 WARMDOWN_ITERS=15 MAX_WALLCLOCK_SECONDS=0 \
  TRAIN_LOG_EVERY=10 VAL_LOSS_EVERY=0 VAL_MAX_TOKENS=131072 ARTIFACT_LIMIT_BYTES=100000000 EVAL_STRIDE="${EVAL_SEQ_LEN:-2048}" \
  TTT_ENABLED=0 SLOT_ENABLED=0 timeout "${RUN_TIMEOUT:-150}" python3 train_gpt.py 2>&1 | tee "$out/train.txt" | grep -vE '^step:[0-9]+/'
echo "train_gpt exit: ${PIPESTATUS[0]}"

echo
echo "----- paste into docs/performance.md (GPU figures) -----"
python3 tools/bench.py --summary "$out/bench.json" "$out/logs/gpu_check.json" | tee "$out/summary.md"
