#!/usr/bin/env bash
# One row per evaluation path (sliding, TTT, TTT + causal SLOT, TTT + batch SLOT) on one trained artifact
# of the CPU demo configuration: val_bpb and eval seconds from an eval-only run on the demo's val slice,
# and the causality audit's verdict on that artifact (a 4,096-token slice in 1,024-token TTT chunks).
# Usage: bash tools/eval_paths.sh   (trains the CPU demo first when out/cpu_demo has no artifact)
set -euo pipefail
cd "$(dirname "$0")/.."
demo=./out/cpu_demo
[ -f "$demo/final_model.int6.ptz" ] || CUDA_VISIBLE_DEVICES= bash run.sh > /dev/null
paths=(
  "sliding|TTT_ENABLED=0 SLOT_ENABLED=0"
  "ttt|SLOT_ENABLED=0"
  "ttt+slot_causal|SLOT_MODE=causal"
  "ttt+slot_batch|SLOT_MODE=batch"
)
echo "| eval path | val_bpb | eval seconds | audit |"
echo "|---|---|---|---|"
for p in "${paths[@]}"; do
  name=${p%%|*}; vars=${p#*|}
  run_id="eval_${name//+/_}"
  (
    for kv in $vars; do export "$kv"; done
    CUDA_VISIBLE_DEVICES= EVAL_ONLY=1 ARTIFACT_PATH="$demo/final_model.int6.ptz" OUTPUT_DIR="$demo" RUN_ID="$run_id" \
      bash run.sh > /dev/null
  )
  read -r bpb secs < <(python3 -c "
import json, sys
m = json.load(open(sys.argv[1]))
last = list(m['metrics'].values())[-1]
print('%.4f %.1f' % (m['final']['val_bpb'], last['eval_time_s']))" "$demo/logs/$run_id.json")
  verdict=$(
    for kv in $vars; do export "$kv"; done
    # One thread: a 2-thread CPU run is not bit-reproducible, and TTT at the demo's LR grows that noise to the
    # audit's 1e-5 tolerance; single-threaded the unperturbed rerun matches exactly.
    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 ARTIFACT_PATH="$demo/final_model.int6.ptz" VAL_MAX_TOKENS=4096 \
      TTT_CHUNK_TOKENS=1024 OUTPUT_DIR="$demo/audit" bash run.sh python3 tools/audit_causality.py | grep -E '^verdict' || true
  )
  echo "| $name | $bpb | $secs | ${verdict:-?} |"
done
