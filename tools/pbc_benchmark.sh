#!/usr/bin/env bash
# The PBC benchmark (README, "Results on real images (PBC)"): the report's recipe vs the default recipe on
# course-proportion splits of ../shared/data/pbc, 4 fractions x 2 recipes x 3 seeds, one training at a time.
#   tools/pbc_benchmark.sh [PBC_DIR] [SPLITS_DIR] [RUNS_DIR]
# Budget chosen for a 2-core CPU: 64 px, --holdout 0 (every labelled image trains; the last epoch is reported,
# the validation set never selects), and more epochs where a split has fewer images so that every fraction
# gets a comparable number of optimisation steps. Finished runs (metrics.json present) are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PBC=${1:-../shared/data/pbc}
SPLITS=${2:-/tmp/pbc_course}
RUNS=${3:-runs/pbc_benchmark}
SIZE=${SIZE:-64}
SEEDS=${SEEDS:-"0 1 2"}
declare -A EPOCHS=([WBC_1]=50 [WBC_10]=25 [WBC_50]=10 [WBC_100]=8)
[ -f "$SPLITS/manifest.json" ] || python prepare_splits.py "$PBC" "$SPLITS" --proportions course --seed 0
for split in WBC_1 WBC_10 WBC_100 WBC_50; do
  for seed in $SEEDS; do
    for recipe in report default; do
      out="$RUNS/${recipe}_${split}_seed${seed}"
      [ -f "$out/metrics.json" ] && continue
      rm -rf "$out"  # an interrupted run restarts from scratch
      python train_cnn.py --data "$SPLITS" --split "$split" --recipe "$recipe" --image-size "$SIZE" \
        --epochs "${EPOCHS[$split]}" --holdout 0 --seed "$seed" --out "$out" --quiet
    done
  done
done
python tools/summarize_runs.py "$RUNS"
