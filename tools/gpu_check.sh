#!/usr/bin/env bash
# One prepared check for a lent H100/H200 (one GPU, about 5-8 minutes): the full record configuration on the
# embedded sample for a fixed number of steps, then the round-trip, sliding, TTT and TTT+SLOT evaluations
# on a val slice. Prints ms/step, tokens/s, model FLOPs utilization, peak memory, the attention backend,
# the scores and eval throughput. Usage: bash tools/gpu_check.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-./out}/gpu_check}
mkdir -p "$out"
export DATA_PATH=./data/datasets/sample_sp1024 TOKENIZER_PATH=./data/tokenizers/sample_1024_bpe.model \
  OUTPUT_DIR="$out" RUN_ID=gpu_check ITERATIONS=${ITERATIONS:-40} WARMUP_STEPS=3 WARMDOWN_ITERS=20 \
  MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=10 VAL_LOSS_EVERY=0 VAL_MAX_TOKENS=${VAL_MAX_TOKENS:-131072} \
  ARTIFACT_LIMIT_BYTES=100000000 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 train_gpt.py 2>&1 | grep -v '_chunk:' | tee "$out/stdout.txt"
python3 - "$out/logs/gpu_check.json" "$out/logs/gpu_check.txt" <<'PY'
import json, re, sys
summary, log = json.load(open(sys.argv[1])), open(sys.argv[2]).read()
s = summary["settings"]
import torch
from train_gpt import GPT
n_params = sum(p.numel() for p in GPT(s).parameters())
tokens = s["TRAIN_BATCH_TOKENS"]
step_s = summary["step_avg_ms"] / 1000
# 6 N per token for the matmuls, plus causal attention: 6 * layers * seq * dim (fwd+bwd, half masked).
flops_per_token = 6 * n_params + 6 * s["NUM_LAYERS"] * s["TRAIN_SEQ_LEN"] * s["MODEL_DIM"]
name = torch.cuda.get_device_name(0)
peak = 989e12  # dense bf16 tensor-core peak of H100 SXM and H200
print(f"gpu: {name}")
backend = re.findall(r"^torch:.* attention:(\S+)", log, flags=re.M)[-1]  # the header line, not the code dump
print(f"attention: {backend}")
print(f"ms_per_step: {summary['step_avg_ms']:.1f} (one GPU doing all 8 micro-batches of the record step)")
print(f"tokens_per_s: {tokens / step_s:,.0f}")
print(f"mfu: {100 * flops_per_token * tokens / step_s / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s")
m = re.search(r"peak memory allocated: (\d+) MiB", log)
print(f"peak_memory_allocated_mib: {m.group(1) if m else '?'}")
val_tokens = int(re.search(r"val_tokens:(\d+)", log).group(1))
for label, r in summary["metrics"].items():
    print(f"{label}: val_bpb {r['val_bpb']:.4f}  eval {r['eval_time_s']:.1f}s  "
          f"{val_tokens / r['eval_time_s']:,.0f} val tokens scored/s")
PY
# TTT alone (no SLOT) from the same artifact, for its own throughput line.
EVAL_ONLY=1 ARTIFACT_PATH="$out/final_model.int6.ptz" SLOT_ENABLED=0 RUN_ID=gpu_check_ttt python3 train_gpt.py 2>&1 \
  | grep -E "^(legal_ttt |final_score_exact)"
