#!/usr/bin/env bash
# One prepared check for a lent H100/H200 (one GPU, at most about 9 minutes), every stack at its record settings:
#  1. per stack (seed, pr1855, pr2135), tools/bench.py on its embedded sample: compile time, train ms/step and MFU
#     of the full 786,432-token record step on one GPU, the attention backends that ran (dense and
#     document-masked), peak memory, each final-evaluation pass's tokens/s and MFU on a 131,072-token val slice
#     (phased TTT: its chunk steps and ms per step), and their projection to 8xH100 against the 600 s budget;
#  2. a short train_gpt.py run of the seed stack on its sample (round trip only): the real export path on a GPU;
#  3. one summary block, ready to paste into docs/performance.md (GPU figures).
# Each part runs under its own timeout (520 s in all), so a part that hangs or fails costs only its own lines: the
# summary always prints, and a benchmark cut short keeps the phases it measured (bench.py writes --json after
# each). On the CPU at tiny shapes (tests/test_gpu_check.py) the same script runs end to end.
# Usage: bash tools/gpu_check.sh [OUTPUT_DIR]
#   GPU_CHECK_STACKS (default "seed pr1855 pr2135"), BENCH_TIMEOUT (per stack: 110 s seed, 170 s the others),
#   RUN_TIMEOUT (70 s), ITERATIONS (30), BENCH_VAL_TOKENS and RUN_VAL_TOKENS (131072), BENCH_TRAIN_STEPS (5),
#   BENCH_TRAIN_WARMUP (2).
#   Any train_gpt.py setting in the environment applies to every stack (tests/test_gpu_check.py shrinks the model).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-./out}/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The embedded sample of each stack's data: SP1024 for the seed, SP8192 with CaseOps for the later stacks.
data_of() {
  case $1 in
    seed) echo "DATA_PATH=./data/datasets/sample_sp1024 TOKENIZER_PATH=./data/tokenizers/sample_1024_bpe.model" ;;
    *) echo "DATA_PATH=./data/datasets/sample_sp8192_caseops TOKENIZER_PATH=./data/tokenizers/sample_8192_bpe_caseops.model" ;;
  esac
}

# Each benchmark's limit: the later stacks compile more (two loop graphs) and run phased TTT.
bench_timeout() {
  case $1 in
    seed) echo "${BENCH_TIMEOUT:-110}" ;;
    *) echo "${BENCH_TIMEOUT:-170}" ;;
  esac
}

summary_args=()
for stack in ${GPU_CHECK_STACKS:-seed pr1855 pr2135}; do
  dir="$out/$stack"
  mkdir -p "$dir"
  rm -f "$dir/bench.json" "$dir/logs/gpu_check.json"
  echo
  limit=$(bench_timeout "$stack")
  echo "===== STACK=$stack: benchmark (timeout $limit s) ====="
  env STACK="$stack" $(data_of "$stack") timeout -k 10 "$limit" python3 tools/bench.py --project-8xh100 \
    --val-tokens "${BENCH_VAL_TOKENS:-131072}" --train-steps "${BENCH_TRAIN_STEPS:-5}" \
    --train-warmup "${BENCH_TRAIN_WARMUP:-2}" --json "$dir/bench.json" 2>&1 | tee "$dir/bench.txt"
  echo "bench STACK=$stack exit: ${PIPESTATUS[0]}"
  summary_args+=("$dir/bench.json")
  if [ "$stack" = seed ]; then
    echo
    echo "===== STACK=seed: short train_gpt.py run (timeout ${RUN_TIMEOUT:-70} s) ====="
    env STACK=seed $(data_of seed) OUTPUT_DIR="$dir" RUN_ID=gpu_check ITERATIONS="${ITERATIONS:-30}" \
      WARMUP_STEPS="${WARMUP_STEPS:-3}" WARMDOWN_ITERS="${WARMDOWN_ITERS:-15}" MAX_WALLCLOCK_SECONDS=0 \
      TRAIN_LOG_EVERY=10 VAL_LOSS_EVERY=0 ARTIFACT_LIMIT_BYTES=100000000 VAL_MAX_TOKENS="${RUN_VAL_TOKENS:-131072}" \
      EVAL_STRIDE="${EVAL_SEQ_LEN:-2048}" TTT_ENABLED=0 SLOT_ENABLED=0 \
      timeout -k 10 "${RUN_TIMEOUT:-70}" python3 train_gpt.py 2>&1 | tee "$dir/train.txt" | grep -vE '^step:[0-9]+/'
    echo "train_gpt STACK=seed exit: ${PIPESTATUS[0]}"
    summary_args+=("$dir/logs/gpu_check.json")
  fi
done

echo
echo "----- paste into docs/performance.md (GPU figures) -----"
python3 tools/bench.py --summary "${summary_args[@]}" | tee "$out/summary.md"
