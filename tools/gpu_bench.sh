#!/usr/bin/env bash
# bench.py on a GPU: the dropout CNN and ResNet50 at 224x224, batch 128, pipelines (b) cached + on-device
# augmentation and (c) in-memory arrays, and (d) the self-supervised step with two views against (c) for the
# default recipe's CNN (docs/performance.md); then the default training path end to end on the synthetic demo
# data: train_cnn.py, train_masked.py --consistency 1.0 and Grad-CAM on the saved model.
#
#   pip install -r requirements.txt "jax[cuda12]"
#   bash tools/gpu_bench.sh [OUT]            # OUT defaults to runs/gpu_bench
#
# Writes OUT/cnn/bench.json, OUT/resnet50/bench.json, OUT/ssl/bench.json, the run folders under OUT/ and
# OUT/gpu_bench.log. Each epoch is STEPS x BATCH images (the demo's training images repeated), long enough to time
# at GPU speed; the first epoch (compilation) is not timed. About 5-7 minutes on one recent data-centre GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_bench}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_bench.log") 2>&1
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1
SIZE=${SIZE:-224} BATCH=${BATCH:-128} CNN_STEPS=${CNN_STEPS:-400} RESNET_STEPS=${RESNET_STEPS:-120}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import keras; print('keras', keras.__version__, 'backend', keras.backend.backend())"
DEMO=$(python3 demo_data.py)  # the synthetic demo data, generated once; both runs read it
start=$(date +%s)
python3 bench.py --model cnn --image-size "$SIZE" --batch-size "$BATCH" --pipelines cached,arrays \
    --steps "$CNN_STEPS" --epochs 3 --out "$OUT/cnn"
python3 bench.py --model resnet50 --image-size "$SIZE" --batch-size "$BATCH" --pipelines cached,arrays \
    --steps "$RESNET_STEPS" --epochs 3 --out "$OUT/resnet50"
# self-supervised pre-training's step (two views) against the model-bound rate of the CNN it pre-trains
python3 bench.py --model cnn --recipe default --image-size "$SIZE" --batch-size "$BATCH" --pipelines arrays,ssl \
    --steps "$CNN_STEPS" --epochs 3 --out "$OUT/ssl"
echo "benchmarks done after $(( $(date +%s) - start )) s"
python3 train_cnn.py --epochs 6 --out "$OUT/cnn_run" --quiet
python3 train_masked.py --epochs 3 --consistency 1.0 --out "$OUT/masked_run" --quiet
python3 inspect_model.py "$OUT/cnn_run/model.h5" gradcam "$DEMO/WBC_100/val/data/Monocyte" --out "$OUT/gradcam"
echo "everything done after $(( $(date +%s) - start )) s"
