"""Devices: which devices and processes train (--devices, several hosts), the data-parallel scope a model is built
in, numeric precision, seeds, and library versions.

Data parallelism uses the engines Keras has: keras.distribution.DataParallel over a 1-D device mesh under JAX
(several hosts through keras.distribution.initialize), tf.distribute.MirroredStrategy under TensorFlow
(MultiWorkerMirroredStrategy across hosts, configured by TF_CONFIG). --batch-size is the GLOBAL batch: each of
n devices computes batch/n images per step and the gradients are averaged, so a run on n devices takes the same
optimizer steps as on one. Learning-rate rule (docs/distributed.md): keep --lr when only the device count changes;
when the global batch grows k-fold, scale --lr by k (linear scaling, Goyal et al. 2017) for SGD-like training,
or by sqrt(k) for Adam, this project's optimizer -- a starting point to check on the hold-out, not a guarantee.

Keras is imported by the functions that need it, so that --devices can be applied (visible GPUs, simulated CPU
devices) before Keras and its backend start.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
from pathlib import Path

import numpy as np

from runfiles import UserError

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
DEVICES_HELP = ("auto: every visible GPU when there are several (data-parallel), else the one device; "
                "cpu: the CPU only; gpu:0 or gpu:0,1: those GPUs (indices among the visible ones); "
                "all: every GPU, or every CPU device when there is no GPU; cpu:0,1: the CPU split into 2 "
                "devices (checks the data-parallel path without a GPU; correctness, not speed)")
# keras.distribution.initialize reads these; the flags below fill them in.
ENV_ADDRESS, ENV_COUNT, ENV_ID = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                                  "KERAS_DISTRIBUTION_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Selection:
    kind: str  # 'auto', 'cpu', 'gpu' or 'all'
    indices: tuple | None = None  # None: every device of that kind


_selection = Selection("auto")
_tf_strategy = None  # a MultiWorkerMirroredStrategy must exist before other TensorFlow work: made at start


def parse_devices(spec: str) -> Selection:
    """--devices SPEC -> Selection; a malformed SPEC is a UserError naming the accepted forms."""
    text = str(spec).strip().lower()
    if text in ("auto", "cpu", "all", "gpu"):
        return Selection(text)
    m = re.fullmatch(r"(cpu|gpu):(\d+(?:,\d+)*)", text)
    if not m:
        raise UserError(f"--devices {spec}: expected auto, cpu, all, gpu, gpu:0, gpu:0,1 or cpu:0,1")
    indices = tuple(int(i) for i in m.group(2).split(","))
    if len(set(indices)) != len(indices):
        raise UserError(f"--devices {spec}: a device is named twice")
    return Selection(m.group(1), indices)


def add_device_args(group):
    """--devices and the multi-host options, into an argument group of a training script."""
    group.add_argument("--devices", default="auto", help=DEVICES_HELP)
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help=f"several hosts (JAX): address of process 0 (default ${ENV_ADDRESS}; under srun "
                            f"with several tasks JAX reads it from Slurm)")
    group.add_argument("--num-processes", type=int, default=None,
                       help=f"several hosts (JAX): processes in the job (default ${ENV_COUNT}, else 1)")
    group.add_argument("--process-id", type=int, default=None,
                       help=f"several hosts (JAX): this process's number, 0 writes the run folder "
                            f"(default ${ENV_ID}, else 0)")


def prepare(args):
    """Before Keras is imported: check --devices and the process flags, hide unselected GPUs, split the CPU for
    cpu:0,1. The environment variables are what each backend reads when it starts."""
    global _selection
    selection = parse_devices(getattr(args, "devices", "auto") or "auto")
    if getattr(args, "coordinator", None):
        os.environ[ENV_ADDRESS] = args.coordinator
    for flag, env in (("num_processes", ENV_COUNT), ("process_id", ENV_ID)):
        value = getattr(args, flag, None)
        if value is not None:
            if value < 0 or (flag == "num_processes" and value < 1):
                raise UserError(f"--{flag.replace('_', '-')} {value}: expected a number >= {int(flag == 'num_processes')}")
            os.environ[env] = str(value)
    count, pid = _env_int(ENV_COUNT, 1), _env_int(ENV_ID, 0)
    if pid >= count and count > 1:
        raise UserError(f"--process-id {pid}: expected a number below --num-processes {count}")
    if selection.kind == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # both backends then see no GPU
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if selection.indices and max(selection.indices) > 0:
            n = max(selection.indices) + 1
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    elif selection.kind == "gpu" and selection.indices is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else None
        if ids is not None and max(selection.indices) >= len(ids):
            raise UserError(f"--devices {args.devices}: only {len(ids)} GPUs are visible "
                            f"(CUDA_VISIBLE_DEVICES={visible})")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i] if ids else str(i) for i in selection.indices)
    _selection = selection


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"${name}={value}: expected a whole number") from None


def start():
    """After Keras is imported, before any computation: join the other processes of a multi-host job."""
    global _tf_strategy
    import keras
    backend = keras.backend.backend()
    if backend == "jax" and (_env_int(ENV_COUNT, 1) > 1 or _env_int("SLURM_NTASKS", 1) > 1):
        if _env_int(ENV_COUNT, 1) > 1 and not os.environ.get(ENV_ADDRESS):
            raise UserError(f"--num-processes {_env_int(ENV_COUNT, 1)}: also give --coordinator HOST:PORT "
                            f"(the address of process 0)")
        keras.distribution.initialize()
    elif backend != "jax" and _env_int(ENV_COUNT, 1) > 1:
        raise UserError(f"--num-processes {_env_int(ENV_COUNT, 1)}: several processes are joined this way under "
                        f"KERAS_BACKEND=jax; under TensorFlow set TF_CONFIG on each host (docs/distributed.md)")
    elif backend == "tensorflow" and os.environ.get("TF_CONFIG") and _tf_strategy is None:
        import tensorflow as tf
        _tf_strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif backend == "tensorflow" and _selection.kind == "cpu" and _selection.indices:
        import tensorflow as tf
        cpus = tf.config.list_physical_devices("CPU")
        n = max(_selection.indices) + 1
        with contextlib.suppress(RuntimeError):  # already split by an earlier call in this process
            tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)


def process_index() -> int:
    """This process's number in a multi-host job (0 when alone): process 0 writes the run folder."""
    import keras
    if keras.backend.backend() == "jax":
        import jax
        return jax.process_index()
    resolver = getattr(_tf_strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None else 0


def process_count() -> int:
    import keras
    if keras.backend.backend() == "jax":
        import jax
        return jax.process_count()
    resolver = getattr(_tf_strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    return len(resolver.cluster_spec().as_dict().get("worker", [])) + len(resolver.cluster_spec().as_dict().get("chief", []))


def is_chief() -> bool:
    return process_index() == 0


def _selected(names: list[str]) -> list[str]:
    """The device names ('gpu:0', 'cpu:1', ...) the selection picks out of the local ones."""
    gpus = [d for d in names if d.split(":")[0].lower() == "gpu"]
    cpus = [d for d in names if d.split(":")[0].lower() == "cpu"]
    s = _selection
    if s.kind == "auto":
        return gpus if len(gpus) > 1 else (gpus or cpus)[:1]
    if s.kind == "all":
        return gpus or cpus
    if s.kind == "gpu":
        if not gpus:
            raise UserError(f"--devices {_spec()}: no GPU is visible to {_backend()}")
        return gpus  # the chosen ones are the only visible ones (CUDA_VISIBLE_DEVICES, set by prepare)
    wanted = s.indices or (0,)
    if max(wanted) >= len(cpus):
        raise UserError(f"--devices {_spec()}: {_backend()} sees {len(cpus)} CPU devices")
    return [cpus[i] for i in wanted]


def _spec() -> str:
    s = _selection
    return s.kind + (":" + ",".join(map(str, s.indices)) if s.indices else "")


def _backend() -> str:
    import keras
    return keras.backend.backend()


def replicas() -> int:
    """Devices that share each global batch, over every process."""
    import keras
    if keras.backend.backend() == "jax":
        return len(_jax_devices())
    if keras.backend.backend() == "tensorflow":
        return _tf_scope_strategy().num_replicas_in_sync
    return 1


def _jax_devices() -> list:
    import jax
    import keras
    if jax.process_count() > 1:  # one mesh over every process's devices of the selected kind
        kind = _selected([f"{d.platform}:{d.id}" for d in jax.local_devices()])[0].split(":")[0]
        return [f"{d.platform}:{d.id}" for d in jax.devices() if d.platform == kind]
    return _selected(keras.distribution.list_devices())


def _tf_scope_strategy():
    """The strategy for the selection, made once per process (each MirroredStrategy sets up its devices)."""
    global _tf_strategy
    import tensorflow as tf
    if _tf_strategy is not None:
        return _tf_strategy
    names = [f"{d.device_type.lower()}:{d.name.rsplit(':', 1)[-1]}" for d in tf.config.list_logical_devices()
             if d.device_type in ("CPU", "GPU")]
    chosen = _selected(names)
    if len(chosen) > 1:
        _tf_strategy = tf.distribute.MirroredStrategy([f"/{d.split(':')[0].upper()}:{d.split(':')[1]}"
                                                       for d in chosen])
        return _tf_strategy
    return tf.distribute.get_strategy()


@contextlib.contextmanager
def distribution_scope():
    """Build and compile inside this. Several selected devices: DataParallel (JAX; set for the whole process,
    since fit distributes each batch through it) or MirroredStrategy (TensorFlow); one device: a plain scope.
    Under TensorFlow with several replicas, batch normalisation is synchronised across them (Keras'
    synchronized=True), so its statistics come from the global batch, as on one device and under JAX."""
    import keras
    backend = keras.backend.backend()
    if backend == "tensorflow":
        strategy = _tf_scope_strategy()
        with strategy.scope():
            yield
    elif backend == "jax":
        devices = _jax_devices()
        # Several processes: each already feeds its own share of every batch (local_share).
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices, auto_shard_dataset=process_count() == 1)
            if len(devices) > 1 else None)
        yield
    else:
        yield


def end_distribution():
    """After fit: later model loads and predictions (finishing the run folder) use one device."""
    import keras
    if keras.backend.backend() == "jax":
        keras.distribution.set_distribution(None)


def synchronize_batchnorm(model, on: bool):
    """TensorFlow with several replicas: BatchNormalization takes its batch statistics across replicas (on) or
    per replica (off: the saved config, so the .h5 is the same as a one-device run's)."""
    import keras
    if keras.backend.backend() != "tensorflow" or replicas() < 2:
        return
    for layer in model._flatten_layers():  # noqa: SLF001 - nested models' layers included
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = on


@contextlib.contextmanager
def plain_config(model):
    """Save inside this: the model's config as a one-device run writes it."""
    synchronize_batchnorm(model, False)
    try:
        yield
    finally:
        synchronize_batchnorm(model, True)


@contextlib.contextmanager
def on_local_replica(model):
    """JAX with several processes: run eager calls (evaluation, batch-norm recalibration) on this process's
    copy of the replicated weights, then put the (possibly changed) weights back replicated. Every process
    does the same computation on the same images, so the copies stay identical. Elsewhere: nothing to do."""
    import keras
    if keras.backend.backend() != "jax" or process_count() < 2:
        yield
        return
    import jax
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    saved = {}
    for v in model.variables:  # layout None: an assignment (batch-norm statistics) stays on this process
        saved[id(v)] = (v.value.sharding, v._layout)  # noqa: SLF001
        v._layout = None  # noqa: SLF001
        v._value = jax.numpy.asarray(np.asarray(v.value.addressable_data(0)))  # noqa: SLF001
    try:
        yield
    finally:
        for v in model.variables:
            local = np.asarray(v.value)
            sharding, v._layout = saved[id(v)]  # noqa: SLF001
            v._value = jax.make_array_from_process_local_data(sharding, local, local.shape)  # noqa: SLF001
        keras.distribution.set_distribution(distribution)


def local_share(stream):
    """Under JAX with several devices: the batch stream as fit must see it, else `stream` itself.

    Each batch keeps a multiple of the device count of its images (the few beyond it wait for the next pass;
    TensorFlow splits uneven batches itself), and with several processes this process feeds its contiguous share
    of every global batch: keras.distribution assembles the global batch from the processes' shares."""
    import keras
    n = replicas() if keras.backend.backend() == "jax" else 1
    if n < 2:
        return stream
    process, processes = process_index(), process_count()

    class LocalShare(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.steps_per_epoch = stream.steps_per_epoch

        @property
        def num_batches(self):
            return stream.num_batches

        def __getitem__(self, index):
            x, y = stream[index]
            return (tuple(share(a) for a in x) if isinstance(x, tuple) else share(x)), share(y)

    def share(a):
        # Each array by its own length: a semi-supervised step's unlabeled images outnumber its labelled ones.
        per = len(a) // n * n // processes
        return a[process * per:(process + 1) * per]

    return LocalShare()


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
    """'auto' picks by measurement (docs/performance.md): bfloat16 mixed precision on GPUs and on CPUs with
    native bf16 (about 2.5x faster than float32 on this project's 2-core CPU), float32 elsewhere."""
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


def describe() -> dict:
    """For args.json: the devices and processes a run trained on."""
    import keras
    out = {"devices": _spec(), "replicas": replicas(), "processes": process_count()}
    if keras.backend.backend() == "jax":
        out["device_names"] = _jax_devices()
    return out


def versions() -> dict:
    import PIL
    import keras
    import sklearn
    out = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__,
           "pillow": PIL.__version__, "scikit-learn": sklearn.__version__, "backend": keras.backend.backend()}
    backend_module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(keras.backend.backend())
    if backend_module:
        with contextlib.suppress(Exception):
            out[backend_module] = __import__(backend_module).__version__
    return out


def barrier(name: str):
    """Several JAX processes: wait here until every process arrives (e.g. process 0 has written the run folder)."""
    import keras
    if keras.backend.backend() == "jax" and process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
