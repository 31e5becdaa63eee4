#!/usr/bin/env bash
# The PBC benchmark (README, "Results on real images (PBC)") on the device machine: one H100/H200, JAX, no
# TensorFlow. reproduce_table.py's '*_raw_*' rows (the report's recipe and the default recipe, 4 fractions,
# 3 seeds) at each size in SIZES, several runs sharing the GPU at once (--jobs). For each size, $OUT/tableSIZE.tgz
# holds the results folder without the .h5 models (unpack it and run `reproduce_table.py --out DIR --report-only`
# to rebuild every file); $OUT/gpu_table.log has the output.
#
#   run(command="bash tools/gpu_table.sh", carry=[".whl", ".device_data"], timeout_s=540)
#
# .device_data/pbc_course is `prepare_splits.py ../shared/data/pbc /tmp/pbc_course --proportions course` with the
# 2,474 images it uses copied into pbc_course/files/<class>/ and every split entry a relative link to them (45 MB;
# ../shared does not travel to that machine, and --copy would duplicate the nested subsets past the 64 MiB
# limit); list .device_data in .git/info/exclude and delete it afterwards. .whl: keras 3.15.1, namex, optree for
# Python 3.12 (see tools/gpu_bench.sh). BUDGET_S stops the last size early so the files
# still come back inside the call's limit.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/device_env.sh gpu_table
DATA=${DATA:-.device_data/pbc_course}
SIZES=${SIZES:-"96 128"} EPOCHS=${EPOCHS:-30} SEEDS=${SEEDS:-3} JOBS=${JOBS:-8} ROWS=${ROWS:-'*_raw_*'}
BUDGET_S=${BUDGET_S:-420}
python3 -c "import keras; print('backend', keras.backend.backend(), 'keras', keras.__version__)"
start=$(date +%s)
for size in $SIZES; do
    left=$(( BUDGET_S - ($(date +%s) - start) ))
    [ "$left" -gt 30 ] || { echo "no time left for size $size"; break; }
    echo "== size $size, $left s left"
    timeout "$left" python3 reproduce_table.py --data "$DATA" --rows "$ROWS" --seeds "$SEEDS" --epochs "$EPOCHS" \
        --image-size "$size" --holdout 0 --jobs "$JOBS" --out "/tmp/table$size"
    echo "size $size ended (exit $?) after $(( $(date +%s) - start )) s"
    tar czf "$OUT/table$size.tgz" -C /tmp --exclude='*.h5' "table$size" || true
done
grep -h "^error\|Error" /tmp/table*/runs/*.log | sort | uniq -c | head -20 || true
