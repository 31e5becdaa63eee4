"""Devices: numeric precision, seeds, the distribution scope a model is built in, and library versions.

Keras is imported by the functions that use it, so that the argument parser can read PRECISIONS cheaply."""
from __future__ import annotations

import contextlib
import platform
from pathlib import Path

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # --precision's choices, in every script


def has_gpu() -> bool:
    import keras
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "tensorflow":
        import tensorflow as tf
        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "torch":
        import torch
        return torch.cuda.is_available()
    return False


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """'auto' picks by measurement (README, Performance): bfloat16 mixed precision on GPUs and on CPUs with
    native bf16 (about 2.5x faster than float32 in a one-off timing on a 2-core x86-64 CPU), float32 elsewhere."""
    import keras
    if precision != "auto":
        return precision
    if has_gpu():
        return "mixed_bfloat16"
    if keras.backend.backend() == "tensorflow" and cpu_has_bf16():
        return "mixed_bfloat16"
    return "float32"


def set_precision(precision: str) -> str:
    import keras
    precision = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(precision)
    return precision


def seed_everything(seed: int):
    """Python, numpy and backend seeds; deterministic TF kernels so a CPU rerun gives the same numbers."""
    import keras
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        with contextlib.suppress(Exception):
            tf.config.experimental.enable_op_determinism()


@contextlib.contextmanager
def distribution_scope():
    """Build and compile inside this: data-parallel over every local GPU when there are several."""
    import keras
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
        with strategy.scope():
            yield
    elif backend == "jax":
        import jax
        if len([d for d in jax.devices() if d.platform == "gpu"]) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel())
        yield
    else:
        yield


def versions() -> dict:
    import keras
    import numpy as np
    import PIL
    import sklearn
    out = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__,
           "pillow": PIL.__version__, "scikit-learn": sklearn.__version__, "backend": keras.backend.backend()}
    backend_module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(keras.backend.backend())
    if backend_module:
        with contextlib.suppress(Exception):
            out[backend_module] = __import__(backend_module).__version__
    return out
