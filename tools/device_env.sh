# Sourced by tools/gpu_bench.sh and tools/gpu_table.sh on the device machine (JAX, no TensorFlow, no internet):
# install the carried keras/namex/optree wheels from .whl unless keras 3.15.1 is already importable, select the
# JAX backend, and send the output to $OUT/$1.log as well as the terminal.
OUT=${OUT:-/tmp/$1}
mkdir -p "$OUT"
exec > >(tee "$OUT/$1.log") 2>&1
if ! python3 -c "import keras, sys; sys.exit(keras.__version__ != '3.15.1')" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1 WBC_CACHE_DIR=${WBC_CACHE_DIR:-/tmp/wbc_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
