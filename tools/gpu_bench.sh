#!/usr/bin/env bash
# The GPU half of issue 7's benchmark, for the device machine (one H100/H200, JAX, no TensorFlow there):
# bench.py for the dropout CNN and for ResNet50 at 224x224, batch 128, pipelines (b) cached + on-device
# augmentation and (c) in-memory arrays without augmentation; the precision is the project's default (auto:
# mixed_bfloat16 on a GPU). Writes $OUT/cnn/bench.json, $OUT/resnet50/bench.json and $OUT/gpu_bench.log.
#
#   run(command="bash tools/gpu_bench.sh", carry=[".whl"], timeout_s=540)
#
# .whl holds keras==3.15.1, namex and optree for Python 3.12 (see /work/.library/device/README.md); the machine
# has jax, numpy, pillow, scipy, scikit-learn, h5py, matplotlib and psutil already. About 4-6 minutes, JAX
# compilation included. Each epoch is STEPS x 128 images (the demo's 520 training images repeated), long enough
# to time at GPU speed; the first epoch (compilation) is not timed.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/device_env.sh gpu_bench
SIZE=${SIZE:-224} BATCH=${BATCH:-128}  # smaller only for a dry run on a CPU
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"
python3 demo_data.py >/dev/null  # the synthetic demo data, once (both runs read it)
start=$(date +%s)
python3 bench.py --model cnn --image-size "$SIZE" --batch-size "$BATCH" --pipelines cached,arrays \
    --steps "${CNN_STEPS:-400}" --epochs 3 --out "$OUT/cnn"
echo "cnn done after $(( $(date +%s) - start )) s"
python3 bench.py --model resnet50 --image-size "$SIZE" --batch-size "$BATCH" --pipelines cached,arrays \
    --steps "${RESNET_STEPS:-120}" --epochs 3 --out "$OUT/resnet50"
echo "all done after $(( $(date +%s) - start )) s"
# The default training path end to end under JAX on the GPU (no TensorFlow on that machine): the CNN on the demo
# data, the mask-consistency model, and Grad-CAM through jax.grad on the saved model.
python3 train_cnn.py --epochs 6 --out /tmp/runs/cnn_jax --quiet
cp /tmp/runs/cnn_jax/metrics.json "$OUT/cnn_jax_metrics.json"
python3 train_masked.py --epochs 3 --consistency 1.0 --out /tmp/runs/masked_jax --quiet
python3 inspect_model.py /tmp/runs/cnn_jax/model.h5 gradcam "$(python3 demo_data.py)/WBC_100/val/data/Monocyte" \
    --out /tmp/runs/gradcam_jax && ls /tmp/runs/gradcam_jax | head -3
python3 -c "import importlib.util as u; print('tensorflow installed here:', u.find_spec('tensorflow') is not None)"
echo "everything done after $(( $(date +%s) - start )) s"

