#!/usr/bin/env bash
# The PBC benchmark (docs/results.md) on a GPU: reproduce_table.py's '*_raw_*' rows (the report's recipe and the
# default recipe, four label fractions, 3 seeds) at each image size in SIZES, JOBS runs sharing the GPU at once.
#
#   pip install -r requirements.txt "jax[cuda12]"
#   python prepare_splits.py PBC_FOLDER ROOT --proportions course
#   DATA=ROOT bash tools/gpu_table.sh [OUT]          # OUT defaults to runs/gpu_table
#
# Writes one results folder per size, OUT/table<SIZE> (table.md, comparisons.md, results.csv,
# label_efficiency.png, runs/), and OUT/gpu_table.log. Rerunning continues where a stopped run left off.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a course-layout root, e.g. DATA=ROOT (see prepare_splits.py)}"
OUT=${1:-runs/gpu_table}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_table.log") 2>&1
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1
SIZES=${SIZES:-96} EPOCHS=${EPOCHS:-30} SEEDS=${SEEDS:-3} JOBS=${JOBS:-8} ROWS=${ROWS:-'*_raw_*'}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import keras; print('keras', keras.__version__, 'backend', keras.backend.backend())"
for size in $SIZES; do
    python3 reproduce_table.py --data "$DATA" --rows "$ROWS" --seeds "$SEEDS" --epochs "$EPOCHS" \
        --image-size "$size" --holdout 0 --jobs "$JOBS" --out "$OUT/table$size" \
        || echo "size $size: some runs failed (listed above, logs in $OUT/table$size/runs/); rerun to retry them"
done
