#!/usr/bin/env bash
# With CUDA GPUs: the seed's record run on all of them (FineWeb sp1024 data, see data/README.md); with STACK=pr1855
# or STACK=pr2135, that record's (its SP8192 CaseOps data). Without: the CPU demo of that stack on an embedded sample, in a few minutes.
# Any setting already in the environment wins over the values below. `bash run.sh CMD ARGS...` runs CMD with
# those settings instead of training (e.g. `bash run.sh python3 tools/audit_causality.py`).
set -euo pipefail
cd "$(dirname "$0")"
python3 tools/install.py   # the torch build for this machine (CPU without a GPU), then requirements.txt

set_default() { for kv in "$@"; do k=${kv%%=*}; [ -n "${!k+x}" ] || export "$kv"; done; }

ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -gt 0 ]; then
  # train_gpt.py's defaults are the seed's record command (PR #1128's; docs/stacks.md), with the legal causal SLOT.
  [ $# -eq 0 ] || exec "$@"
  exec torchrun --standalone --nproc_per_node="$ngpu" train_gpt.py
fi

if [ "${STACK:-seed}" = pr1855 ] || [ "${STACK:-seed}" = pr2135 ]; then
  # CPU demo of STACK=pr1855 (and of pr2135, the same model with its evaluation: one phase, no K adapters, the n-gram
  # tilt): all 11 layers (17 virtual once looping is on), 128 wide, every component on (smear and
  # sparse attention gates, skip gates, two lanes from layer 8, loops at 35%, document-masked attention, MuonEq-R
  # with Polar Express, WARMDOWN_FRAC with MIN_LR, int7 embedding, GPTQ on training tokens), on the embedded CaseOps
  # sample with its byte sidecar. EMA 0.97: the record's 0.9965 averages over ~300 steps, more than the demo has.
  # pr2135's demo: fp32 and no validation before the end (under 6 minutes on 2 cores; the record's bf16 numerics are
  # EMBED_BF16=1 MUON_BF16=1); each demo takes 10x its record's LoRA lr (8e-5 and 1e-4)
  if [ "$STACK" = pr2135 ]; then
    set_default TTT_LORA_LR=0.0008 EMBED_BF16=0 MUON_BF16=0 VAL_LOSS_EVERY=0
  else
    set_default TTT_LORA_LR=0.001
  fi
  set_default DATA_PATH=./data/datasets/sample_sp8192_caseops TOKENIZER_PATH=./data/tokenizers/sample_8192_bpe_caseops.model \
    OUTPUT_DIR="./out/cpu_demo_$STACK" MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 \
    TRAIN_BATCH_TOKENS=2048 ITERATIONS=150 WARMUP_STEPS=0 MAX_WALLCLOCK_SECONDS=0 MUON_MOMENTUM_WARMUP_STEPS=50 \
    EMA_DECAY=0.97 VAL_LOSS_EVERY=75 TRAIN_LOG_EVERY=25 VAL_MAX_TOKENS=32768 EVAL_BATCH_SEQS=4 \
    GPTQ_RESERVE_SECONDS=0 \
    TTT_EVAL_SEQ_LEN=256 TTT_BATCH_SIZE=8 TTT_LORA_RANK=8 PHASED_TTT_PREFIX_DOCS=24 \
    GLOBAL_TTT_CHUNK_TOKENS=4096 GLOBAL_TTT_BATCH_SEQS=8
  # Phased TTT at the demo's size: 34 documents in batches of 8 (rank-8 adapters, 10x the record's LoRA lr, 256-token
  # windows), the stack's global SGD phases (3 or 1) over the 24 longest in 4,096-token chunks (the record's 32,768
  # would be one chunk, which it skips).
  [ $# -eq 0 ] || exec "$@"
  if [ "${NPROC:-1}" -gt 1 ]; then exec torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py; fi
  exec python3 train_gpt.py
fi

# CPU demo: a 4-layer, 128-wide version of the same stack, every stage on (EMA, late QAT, GPTQ int6 export,
# sliding eval, score-first TTT with causal SLOT), on the embedded sample (data/README.md).
set_default DATA_PATH=./data/datasets/sample_sp1024 TOKENIZER_PATH=./data/tokenizers/sample_1024_bpe.model \
  OUTPUT_DIR=./out/cpu_demo NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=3 \
  VE_LAYERS=2,3 XSA_LAST_N=2 BIGRAM_DIM=32 VE_DIM=32 TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 \
  ITERATIONS=180 WARMDOWN_ITERS=60 WARMUP_STEPS=0 MAX_WALLCLOCK_SECONDS=0 MUON_MOMENTUM_WARMUP_STEPS=50 \
  EMA_DECAY=0.97 VAL_LOSS_EVERY=60 TRAIN_LOG_EVERY=20 VAL_MAX_TOKENS=65536 EVAL_STRIDE=64 \
  EVAL_BATCH_SEQS=32 TTT_CHUNK_TOKENS=2048 TTT_EPOCHS=1 TTT_BATCH_SEQS=8 TTT_LR=0.03 SLOT_LR=0.03 \
  GPTQ_CALIB_SEQS=32 GPTQ_CALIB_LEN=256
# The demo's evaluation: 65,536 val tokens in 2,048-token TTT chunks, and TTT/SLOT learning rates 10x the record's
# (a 0.8M-parameter model on a few minutes of data): sized so that sliding, TTT and SLOT each move the score.
[ $# -eq 0 ] || exec "$@"
# NPROC=2 runs it as 2 gloo processes (same global batch, same result up to float rounding).
if [ "${NPROC:-1}" -gt 1 ]; then exec torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py; fi
exec python3 train_gpt.py
