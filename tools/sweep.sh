#!/usr/bin/env bash
# A small grid sweep on the CPU demo configuration, then a table of the final val_bpb of every run.
#
#   bash tools/sweep.sh                                   # MATRIX_LR in {0.02, 0.04} x SEED in {1337, 42}
#   SWEEP_VAR=TIED_EMBED_LR SWEEP_VALUES="0.02 0.035 0.05" SWEEP_SEEDS="1 2 3" bash tools/sweep.sh
#   SWEEP_DRY_RUN=1 bash tools/sweep.sh                   # print the commands, run nothing
#
# Each grid point runs `bash run.sh` (the CPU demo; it honours settings already in the environment and
# passes OUTPUT_DIR / RUN_ID through) with SEED, the swept variable, OUTPUT_DIR=$SWEEP_DIR and a RUN_ID
# exported.
# Every run writes $SWEEP_DIR/logs/<RUN_ID>.{txt,json}; its console output goes to $SWEEP_DIR/<RUN_ID>.out.
# Any other setting can be fixed for the whole grid from the environment (e.g. ITERATIONS=50 bash tools/sweep.sh).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

# ----------------------------------------------------------------------------- the grid
SWEEP_VAR="${SWEEP_VAR:-MATRIX_LR}"          # the swept setting (any train_gpt.py environment variable)
SWEEP_VALUES="${SWEEP_VALUES:-0.02 0.04}"    # its values
SWEEP_SEEDS="${SWEEP_SEEDS:-1337 42}"        # seeds, crossed with the values
SWEEP_DIR="${SWEEP_DIR:-out/sweep_$(date +%Y%m%d_%H%M%S)}"
SWEEP_RUNNER="${SWEEP_RUNNER:-bash run.sh}"  # command for one run
SWEEP_DRY_RUN="${SWEEP_DRY_RUN:-0}"
PYTHON="${PYTHON:-python3}"
# keep the sweep's own variables out of the training process's environment
export -n SWEEP_VAR SWEEP_VALUES SWEEP_SEEDS SWEEP_DIR SWEEP_RUNNER SWEEP_DRY_RUN PYTHON 2>/dev/null

mkdir -p "$SWEEP_DIR" || exit 1
SWEEP_DIR="$(cd "$SWEEP_DIR" && pwd)"   # absolute, so a runner that changes directory still finds it
STAMP="$(date +%H%M%S)"
index="$SWEEP_DIR/index.tsv"             # value, seed, run id, exit status: one line per grid point
: > "$index"

failed=0
for value in $SWEEP_VALUES; do
  for seed in $SWEEP_SEEDS; do
    run_id="sweep_${STAMP}_${SWEEP_VAR}_${value}_seed${seed}"
    echo "sweep: $SWEEP_VAR=$value SEED=$seed -> $SWEEP_DIR/$run_id.out" >&2
    if [[ "$SWEEP_DRY_RUN" == 1 ]]; then
      echo "env SEED=$seed $SWEEP_VAR=$value OUTPUT_DIR=$SWEEP_DIR RUN_ID=$run_id $SWEEP_RUNNER"
      continue
    fi
    env SEED="$seed" "$SWEEP_VAR=$value" OUTPUT_DIR="$SWEEP_DIR" RUN_ID="$run_id" \
      $SWEEP_RUNNER > "$SWEEP_DIR/$run_id.out" 2>&1
    rc=$?
    if [[ $rc -ne 0 ]]; then
      failed=$((failed + 1))
      echo "sweep: run $run_id failed (exit $rc); last lines of its output:" >&2
      tail -n 5 "$SWEEP_DIR/$run_id.out" >&2
    fi
    printf '%s\t%s\t%s\t%s\n' "$value" "$seed" "$run_id" "$rc" >> "$index"
  done
done
[[ "$SWEEP_DRY_RUN" == 1 ]] && exit 0

# ----------------------------------------------------------------------------- the table
"$PYTHON" - "$ROOT/tools" "$SWEEP_DIR" "$SWEEP_VAR" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from record import parse_log, RecordError, text_table

sweep_dir, var = Path(sys.argv[2]), sys.argv[3]
rows, by_value = [], {}
for line in (sweep_dir / "index.tsv").read_text().splitlines():
    value, seed, run_id, rc = line.split("\t")
    found = sorted(sweep_dir.rglob(f"{run_id}.json")) or sorted(sweep_dir.rglob(f"{run_id}.txt"))
    log = None
    if found:
        try:
            log = parse_log(found[0])
        except RecordError:
            log = None
    if log is not None and log.has_score:
        rows.append([value, seed, f"{log.val_bpb:.4f}", f"{log.val_loss:.4f}", str(log.steps or "-"),
                     str(log.bytes_total or "-"), "ok" if rc == "0" else f"exit {rc}"])
        by_value.setdefault(value, []).append(log.val_bpb)
    else:
        rows.append([value, seed, "-", "-", "-", "-", f"exit {rc}" if rc != "0" else "no score"])
header = [var, "SEED", "val_bpb", "val_loss", "steps", "bytes", "status"]
print(text_table(header, rows))
print()
for value, bpbs in by_value.items():
    print(f"{var}={value}: mean val_bpb {sum(bpbs) / len(bpbs):.4f} over {len(bpbs)} seed(s)")
EOF
[[ $failed -eq 0 ]] || { echo "sweep: $failed run(s) failed" >&2; exit 1; }
