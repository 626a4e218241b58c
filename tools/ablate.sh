#!/usr/bin/env bash
# The seed stack's departures from its reference code (docs/stacks.md) measured on the CPU demo configuration of
# run.sh (TTT and SLOT off: these are training-side choices, scored by the final int6 round-trip val_bpb).
# Prints a markdown table.
# Usage: bash tools/ablate.sh [OUTPUT_ROOT]   (about 3 minutes a variant on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-./out/ablate}
variants=(
  "defaults (EMA only, banks in late QAT, no rotary scaling)|"
  "SWA snapshots averaged into the final weights|SWA_ENABLED=1"
  "late QAT without banks (reference)|LATE_QAT_BANKS=0"
  "EMA decay 0.997 as the reference hard-codes|EMA_DECAY=0.997"
  "rotary base scaling from half the train length (reference at 2048)|ROPE_TRAIN_SEQ_LEN=128"
  "all of the reference's effective behaviours|LATE_QAT_BANKS=0 EMA_DECAY=0.997 ROPE_TRAIN_SEQ_LEN=128"
  "2 processes, global clip (ours)|NPROC=2"
  "2 processes, per-rank local clip (reference)|NPROC=2 GRAD_CLIP_LOCAL=1"
)
echo "| variant | settings | final_int6_roundtrip val_bpb |"
echo "|---|---|---|"
i=0
for v in "${variants[@]}"; do
  name=${v%%|*}; vars=${v#*|}; i=$((i + 1))
  out="$root/v$i"
  (
    export TTT_ENABLED=0 SLOT_ENABLED=0 EVAL_STRIDE=256 OUTPUT_DIR="$out" RUN_ID=ablate NPROC=1
    for kv in $vars; do export "$kv"; done
    CUDA_VISIBLE_DEVICES= bash run.sh > /dev/null 2>&1
  ) || { echo "| $name | $vars | failed (see $out/logs) |"; continue; }
  bpb=$(python3 -c "import json,sys; print('%.4f' % json.load(open(sys.argv[1]))['metrics']['final_int6_roundtrip_exact']['val_bpb'])" "$out/logs/ablate.json")
  echo "| $name | \`${vars:-defaults}\` | $bpb |"
done
