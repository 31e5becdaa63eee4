"""The one fit loop every script uses: hold-out model selection, class weights, resume, the run folder.

Run folder (docs/ARCHITECTURE.md): args.json, history.csv, metrics.json, model.h5 (the selected epoch's core
model), val_predictions.csv, curves.png, confusion.png. Model selection looks only at a stratified hold-out of
the training split; the validation set is evaluated every epoch and reported, never used to choose.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import keras

# Keras warns on every .h5 save that the format is legacy; .h5 is what the users asked for.
logging.getLogger("absl").setLevel(logging.ERROR)

import metrics as wbc_metrics
import report
from data import ImageSet, UserError, atomic_write_text, make_augmentation

HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "holdout_loss", "holdout_accuracy", "val_loss",
                  "val_accuracy", "val_balanced_accuracy", "lr", "seconds", "images_per_second"]
METADATA_ATTR = "wbc_metadata"  # JSON stored in the .h5 file's root attributes


class TrainingDiverged(UserError):
    """The loss became NaN or infinite. A user-fixable condition: lower the learning rate."""


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or 'cosine'
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    holdout: float = 0.15
    class_weight: bool = True
    # Exponent on the 'balanced' weights: 1 = inverse class frequency, 0.5 = its square root (milder: full
    # inverse frequency makes a 2% class weigh ~30x and pulls majority-class images into it), 0 = none.
    class_weight_power: float = 1.0
    precision: str = "auto"
    augment: dict | None = None  # make_augmentation keywords; None = no augmentation
    verbose: int = 1
    loader: str = "cached"  # or 'generator': the report's ImageDataGenerator pipeline (legacy_training_data)
    # Small splits (WBC_1: ~20 images, one step per epoch) get too few optimizer steps to learn anything in a
    # sane number of epochs: an epoch then passes over the (augmented) training images several times, so that
    # it has at least this many steps. 0 = one pass per epoch, as Keras does.
    min_steps: int = 0
    # Before each epoch's evaluation, recompute batch-norm statistics from this many un-augmented training
    # images (recalibrate_batchnorm). 0 or None = off, the moving averages collected during training are kept.
    bn_recalibrate: int | None = 0

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """Take the fields this config knows from parsed command-line arguments."""
        names = {f.name for f in dataclasses.fields(cls)} - {"augment"}
        values = {k: v for k, v in vars(args).items() if k in names}
        return cls(**values, augment=augmentation_from_args(args))


def augmentation_from_args(args) -> dict | None:
    if getattr(args, "no_augment", False):
        return None
    return dict(rotation=args.rotation, shear=args.shear, horizontal_flip=not args.no_hflip,
                vertical_flip=not args.no_vflip, zoom=getattr(args, "zoom", None) or 0.0,
                shift=getattr(args, "shift", None) or 0.0)


# ----------------------------------------------------------------------------------------------
# Environment: precision, seeds, devices
# ----------------------------------------------------------------------------------------------

def has_gpu() -> bool:
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
    native bf16 (about 2.5x faster than float32 on this project's 2-core CPU), float32 elsewhere."""
    if precision != "auto":
        return precision
    if has_gpu():
        return "mixed_bfloat16"
    if keras.backend.backend() == "tensorflow" and cpu_has_bf16():
        return "mixed_bfloat16"
    return "float32"


def set_precision(precision: str) -> str:
    precision = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(precision)
    return precision


def seed_everything(seed: int):
    """Python, numpy and backend seeds; deterministic TF kernels so a CPU rerun gives the same numbers."""
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        with contextlib.suppress(Exception):
            tf.config.experimental.enable_op_determinism()


@contextlib.contextmanager
def distribution_scope():
    """Build and compile inside this: data-parallel over every local GPU when there are several."""
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
    import PIL
    import sklearn
    out = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__,
           "pillow": PIL.__version__, "scikit-learn": sklearn.__version__, "backend": keras.backend.backend()}
    backend_module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(keras.backend.backend())
    if backend_module:
        with contextlib.suppress(Exception):
            out[backend_module] = __import__(backend_module).__version__
    return out


# ----------------------------------------------------------------------------------------------
# Data helpers
# ----------------------------------------------------------------------------------------------

def stratified_holdout(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, holdout), taking `fraction` of every class, rounded; a class always keeps
    at least one training image, so a class with a single image is never held out."""
    labels = np.asarray(labels)
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    if not 0 < fraction < 1:
        raise UserError(f"--holdout {fraction}: expected a fraction between 0 and 1")
    rng = np.random.default_rng(seed)
    holdout = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(idx) - 1, int(math.floor(fraction * len(idx) + 0.5)))
        holdout += idx[:k].tolist()
    holdout = np.sort(np.asarray(holdout, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), holdout)
    return train, holdout


def class_weights(labels, num_classes: int, power: float = 1.0) -> dict[int, float]:
    """'Balanced' weights (n / (k * n_c)) from scikit-learn raised to `power`; absent classes get 1."""
    from sklearn.utils.class_weight import compute_class_weight
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels) ** power
    out = {c: 1.0 for c in range(num_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights)})
    return out


def predict(model: keras.Model, x, batch_size: int = 64) -> np.ndarray:
    """Class probabilities for uint8 images x (N, H, W, 3), read batch by batch (x may be memory-mapped).

    predict_on_batch, not model.predict: under TensorFlow, model.predict builds a tf.data iterator per call
    and tearing it down waits for tf.data's autotuning thread; timed once on the 2-core CPU, that halved the speed of the
    per-epoch hold-out and validation passes (about 500 against 990 images/s at 224 px)."""
    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.concatenate([np.asarray(model.predict_on_batch(x[start:start + batch_size]), dtype=np.float32)
                           for start in range(0, len(x), batch_size)])


def _nested_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _nested_layers(layer)


def recalibrate_batchnorm(core: keras.Model, images, n_images: int, batch_size: int, seed: int) -> int:
    """Recompute the moving mean and variance of every trainable BatchNormalization layer from up to n_images
    un-augmented images (the average of their full batches' statistics, dropout off); weights are untouched.
    Returns the number of images used (0 when the model has no such layer or there are fewer than 2 images).

    Why: the moving averages collected during training describe the augmented images (rotated up to 180°,
    zoomed and shifted, edges repeated), not the plain ones the model is evaluated on. On PBC WBC_100 at 96 px
    (default recipe, seed 0) the last epoch's model scored 0.939 validation accuracy with them and 0.985 with
    statistics recomputed from plain training images; recomputed from augmented images, 0.908
    (tools/bn_recalibration_check.py, README).
    """
    norms = [l for l in _nested_layers(core) if isinstance(l, keras.layers.BatchNormalization) and l.trainable]
    count = min(int(n_images or 0), len(images))
    batch_size = min(batch_size, count)  # a split smaller than a batch (WBC_1) is one batch
    if not norms or batch_size < 2:
        return 0
    count = count // batch_size * batch_size
    rows = np.random.default_rng(seed).permutation(len(images))[:count]
    dropouts = [l for l in _nested_layers(core) if isinstance(l, keras.layers.Dropout)]
    momenta, rates = [l.momentum for l in norms], [l.rate for l in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        for k, start in enumerate(range(0, count, batch_size), start=1):
            for layer in norms:  # moving = moving * (k-1)/k + batch / k: the running mean over batches
                layer.momentum = (k - 1) / k
            core(images[np.sort(rows[start:start + batch_size])], training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    return count


# ----------------------------------------------------------------------------------------------
# Feeding model.fit: one endless stream of batches per fit
# ----------------------------------------------------------------------------------------------

class ArrayBatches(keras.utils.PyDataset):
    """One epoch of shuffled batches from aligned arrays, each batch gathering only its own rows, so x may be a
    memory-mapped cache (or a list of aligned arrays, e.g. each image and its masked copy). An epoch is
    `passes` shuffled passes over the images, each image `passes` times; on_epoch_end draws the next order."""

    def __init__(self, x, y, batch_size: int, seed: int = 0, passes: int = 1):
        super().__init__()
        self.x, self.y = x, y
        self.batch_size, self.passes = int(batch_size), int(passes)
        self._rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def on_epoch_end(self):
        self.order = np.concatenate([self._rng.permutation(len(self.y)) for _ in range(self.passes)])

    def __len__(self):
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, step):
        # Sorted rows read a memory map front to back; the order within a batch does not matter to training.
        rows = np.sort(self.order[step * self.batch_size:(step + 1) * self.batch_size])
        x = tuple(a[rows] for a in self.x) if isinstance(self.x, (list, tuple)) else self.x[rows]
        return x, self.y[rows]


class Endless(keras.utils.PyDataset):
    """A finite PyDataset (one epoch of batches) as an endless stream: fit(Endless(b),
    steps_per_epoch=len(b)) reads one pass per epoch, calling b.on_epoch_end() between passes.

    Why: for a finite dataset Keras builds a fresh tf.data iterator every epoch under TensorFlow, and tearing
    the old one down waits for tf.data's autotuning thread, on the 2-core CPU about as long as the epoch
    itself in roughly half the epochs (100 instead of 190 images/s for the default CNN at 224 px). One
    iterator for the whole fit has no such pause. Batch `index` is always step index % len(b) of pass
    index // len(b), however far a prefetching reader runs ahead of the epoch callbacks."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches
        self.steps_per_epoch = len(batches)
        self._pass = 0

    @property
    def num_batches(self):
        return None  # endless

    def __getitem__(self, index):
        epoch, step = divmod(int(index), self.steps_per_epoch)
        while self._pass < epoch:
            self.batches.on_epoch_end()
            self._pass += 1
        return self.batches[step]


# ----------------------------------------------------------------------------------------------
# Run folder I/O: every write goes beside, then renames, so nothing half-written is ever read
# ----------------------------------------------------------------------------------------------

def write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_history(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_history(path: Path, rows: list[dict]):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def save_model_h5(model: keras.Model, path: Path, metadata: dict):
    """Save the core model as legacy .h5 with the training metadata inside it; atomic."""
    import h5py
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.h5")
    model.save(tmp)
    with h5py.File(tmp, "a") as f:
        f.attrs[METADATA_ATTR] = json.dumps(metadata, default=_json_default)
    os.replace(tmp, path)


def update_h5_metadata(path: Path, **fields):
    """Merge `fields` into the metadata stored in an .h5, atomically (copy, edit, rename)."""
    import h5py
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.h5")
    shutil.copyfile(path, tmp)
    with h5py.File(tmp, "a") as f:
        meta = json.loads(f.attrs.get(METADATA_ATTR, "{}"))
        meta.update(fields)
        f.attrs[METADATA_ATTR] = json.dumps(meta, default=_json_default)
    os.replace(tmp, path)


def read_h5_metadata(path: Path) -> dict:
    import h5py
    with h5py.File(path, "r") as f:
        raw = f.attrs.get(METADATA_ATTR)
    return json.loads(raw) if raw else {}


def load_core_model(path: Path) -> keras.Model:
    """Load a saved core model in Keras' safe mode: a model file can never run code here."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a model file (expected a .h5 saved by this project or Keras)")
    if not path.is_file():
        raise UserError(f"{path}: no such model file (expected a .h5 saved by this project or Keras)")
    problem = model_file_problem(path)
    if problem:
        raise UserError(f"{path}: {problem}")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - every failure here is a bad file, reported in one line
        if "safe_mode" in str(e) or "arbitrary code" in str(e):  # e.g. a Lambda layer: Python code in the file
            raise UserError(f"{path}: refused: the file holds Python code (a Lambda layer or a pickled function) "
                            "that would run on loading; safe mode loads only built-in Keras layers") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a loadable Keras model ({reason[:200]})") from None


# Leading bytes of formats a model file is often confused with, for a message that says what the file is.
_FILE_SIGNATURES = {b"PK\x03\x04": "a zip archive (a Keras 3 .keras model? then name it .keras)",
                    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                    b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip archive"}


def model_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a Keras model file, in words, or None when it looks like one. Checks the bytes,
    not the name: an .h5 must be HDF5 with a model_config (not weights only), a .keras file a zip."""
    import h5py
    import zipfile
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "an empty file (expected a Keras model: .h5 or .keras)"
    if path.suffix.lower() == ".keras":
        return None if zipfile.is_zipfile(path) else "not a .keras archive (not a zip file; truncated?)"
    if not h5py.is_hdf5(path):
        kind = next((what for sig, what in _FILE_SIGNATURES.items() if head.startswith(sig)), None)
        return (f"{kind}, not an HDF5 model file" if kind
                else "not an HDF5 file (expected a Keras .h5 model; is it another format?)")
    try:
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                return ("an HDF5 file without a Keras model in it (weights only, or other data); "
                        "expected a model saved with model.save(...h5)")
    except Exception as e:  # noqa: BLE001 - h5py reports truncation and corruption as assorted errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"a truncated or corrupt HDF5 file ({reason[:160]})"
    return None


def run_is_complete(run_dir: Path) -> bool:
    return all((Path(run_dir) / f).exists() for f in ("metrics.json", "model.h5", "history.csv", "args.json"))


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, but each backup file is written beside and renamed into place: Keras overwrites
    its weights file in place, so a run killed during that write could not resume (a half-written .h5)."""

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = self._weights_path[:-len(".weights.h5")] + ".tmp.weights.h5"
        self.model.save_weights(tmp, overwrite=True)
        # Weights before the epoch number: a kill between the two renames repeats one epoch, never skips one.
        os.replace(tmp, self._weights_path)
        atomic_write_text(Path(self._training_metadata_path),
                          json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}))


# ----------------------------------------------------------------------------------------------
# The per-epoch evaluator
# ----------------------------------------------------------------------------------------------

class EpochEvaluator(keras.callbacks.Callback):
    """After each epoch: evaluate hold-out and validation sets with the core model, append a history row,
    and save model.h5 when the hold-out accuracy improves. Picks up its state from history.csv on resume.

    Placed after BackupAndRestore in the callback list: a run killed between the backup and the history row
    re-evaluates the restored weights (exactly that epoch's) when it resumes, so no epoch goes missing.
    """

    def __init__(self, run_dir, core, holdout: ImageSet, val: ImageSet, n_train: int, batch_size: int,
                 metadata: dict, verbose: int = 1, recalibration: tuple | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.core, self.holdout, self.val = core, holdout, val
        self.recalibration = recalibration  # (training images, how many, seed) for recalibrate_batchnorm
        self.n_train, self.batch_size = n_train, batch_size
        self.metadata = metadata
        self.verbose = verbose
        self.rows: list[dict] = []
        self.selected_epoch = 0
        self.diverged_epoch = None
        self._epoch_start = None

    # -- state --
    def on_train_begin(self, logs=None):
        done = int(getattr(self.model, "_initial_epoch", 0) or 0)
        rows = [r for r in read_history(self.run_dir / "history.csv") if int(r["epoch"]) <= done]
        self.rows = [{k: _num(v) for k, v in r.items()} for r in rows]
        model_path = self.run_dir / "model.h5"
        self.selected_epoch = 0
        if model_path.exists():
            with contextlib.suppress(Exception):
                epoch = int(read_h5_metadata(model_path).get("epoch", 0))
                self.selected_epoch = epoch if epoch <= done else 0
        if done and (not self.rows or int(self.rows[-1]["epoch"]) < done):
            # Killed after the backup of epoch `done` but before its row: its weights are the restored ones.
            self._record(done, {"loss": float("nan"), "accuracy": float("nan")}, seconds=float("nan"))
        if done:
            print(f"resuming after epoch {done} of {self.params.get('epochs')}")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - (self._epoch_start or time.perf_counter())
        logs = logs or {}
        if not math.isfinite(float(logs.get("loss", 0.0))):
            self.diverged_epoch = epoch + 1
            self.model.stop_training = True
            return
        self._record(epoch + 1, logs, seconds)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True

    def _record(self, epoch: int, logs: dict, seconds: float):
        if self.recalibration:  # here, so that a resumed run recalibrates the restored weights the same way
            images, n_images, seed = self.recalibration
            recalibrate_batchnorm(self.core, images, n_images, self.batch_size, seed + epoch)
        row = {"epoch": epoch, "train_loss": float(logs.get("loss", float("nan"))),
               "train_accuracy": float(logs.get("accuracy", float("nan")))}
        for part, images in (("holdout", self.holdout), ("val", self.val)):
            if images is None or len(images) == 0:
                row.update({f"{part}_loss": float("nan"), f"{part}_accuracy": float("nan")})
                continue
            probs = predict(self.core, images.x, self.batch_size)
            m = wbc_metrics.classification_metrics(images.y, probs, images.classes)
            row.update({f"{part}_loss": m["log_loss"], f"{part}_accuracy": m["accuracy"]})
            if part == "val":
                row["val_balanced_accuracy"] = m["balanced_accuracy"]
        row["lr"] = _current_lr(self.model)
        row["seconds"] = seconds
        row["images_per_second"] = self.n_train / seconds if seconds and math.isfinite(seconds) else float("nan")
        self.rows.append(row)
        write_history(self.run_dir / "history.csv", self.rows)
        if self._improved(row):
            self.selected_epoch = epoch
            save_model_h5(self.core, self.run_dir / "model.h5", {**self.metadata, "epoch": epoch})
        if self.verbose:
            print(f"epoch {epoch}: train acc {row['train_accuracy']:.3f}  hold-out acc {row['holdout_accuracy']:.3f}"
                  f"  val acc {row['val_accuracy']:.3f}  ({seconds:.1f}s, {row['images_per_second']:.0f} img/s)"
                  + ("  *saved" if self.selected_epoch == epoch else ""))

    def _improved(self, row) -> bool:
        if len(self.holdout) == 0 or not self.selected_epoch:
            return True  # no hold-out: the last epoch is the selected one
        acc = [r["holdout_accuracy"] for r in self.rows]
        loss = [r["holdout_loss"] for r in self.rows]
        return self.rows[wbc_metrics.select_epoch(acc, loss)]["epoch"] == row["epoch"]


def _num(v):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f
    except (TypeError, ValueError):
        return v


def _current_lr(model) -> float:
    with contextlib.suppress(Exception):
        lr = model.optimizer.learning_rate
        return float(keras.ops.convert_to_numpy(lr))
    return float("nan")


# ----------------------------------------------------------------------------------------------
# The fit loop
# ----------------------------------------------------------------------------------------------

def make_optimizer(config: TrainConfig, steps_per_epoch: int):
    lr = config.lr
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=max(1, config.epochs * steps_per_epoch),
                                                    alpha=0.01, warmup_target=None)
    elif config.lr_schedule != "constant":
        raise UserError(f"--lr-schedule {config.lr_schedule}: expected constant or cosine")
    if config.weight_decay:
        return keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
    return keras.optimizers.Adam(lr)


def build_training_model(core: keras.Model, augment: dict | None, seed: int) -> keras.Model:
    """[augmentation] -> core. The augmentation layer exists only in this training wrapper, never in model.h5."""
    if not augment:
        return core
    size = core.input_shape[1]
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = make_augmentation(**augment, seed=seed)(inputs)
    return keras.Model(inputs, core(x), name=f"{core.name}_train")


def legacy_training_data(fit_set: ImageSet, config: TrainConfig, paired_x=None):
    """--loader generator: the report's ImageDataGenerator pipeline over the training images (hold-out
    excluded), decoding from disk every epoch and augmenting on the CPU; it replaces the augmentation layer.
    Hold-out and validation are still evaluated from the decoded cache by the EpochEvaluator."""
    from data import legacy_generator
    if fit_set.masked.any() or paired_x is not None:
        raise UserError("--loader generator reads the raw image files from disk and cannot apply masks; "
                        "use --loader cached (the default) or --masks none")
    return legacy_generator(fit_set.paths, fit_set.y, fit_set.classes, int(fit_set.x.shape[1]), config.batch_size,
                            **(config.augment or {}), seed=config.seed)


def train(run_dir: Path, build_core, train_set: ImageSet, val_set: ImageSet, config: TrainConfig,
          args: dict | None = None, resume: bool = False, extra_metadata: dict | None = None,
          compile_model=None, before_fit=None, build_train_model=None, paired_x=None,
          selection_set: ImageSet | None = None) -> dict:
    """Train one model and write its run folder. Returns metrics.json's content.

    build_core() -> keras.Model is called inside the distribution scope. compile_model(train_model, optimizer,
    config) may replace the standard compile (e.g. extra losses); before_fit(core) may adjust layers
    (e.g. freezing) after building and before compiling. build_train_model(core, config) may replace the
    training wrapper; with paired_x (an array aligned with train_set.x) the wrapper is fed [x, paired_x]
    (e.g. each image and its masked copy). Hold-out and validation always use the core model on train_set.x.
    selection_set, when given, is the hold-out (e.g. CAM16's own val/): all of train_set is trained on.
    """
    run_dir = Path(run_dir)
    if resume and run_is_complete(run_dir):
        print(f"{run_dir}: run already complete; nothing to do")
        return json.loads((run_dir / "metrics.json").read_text())
    if not resume and (run_dir / "history.csv").exists():
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or --out to start another")
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = set_precision(config.precision)
    seed_everything(config.seed)
    classes = train_set.classes
    if len(train_set) == 0:
        raise UserError("the training split holds no images")
    if len(val_set) == 0:
        raise UserError(f"the validation set holds no readable images ({len(val_set.skipped)} skipped as unreadable)")
    for stale in run_dir.glob(".*.tmp-*"):  # left by a killed run's atomic writes (write beside, then rename)
        stale.unlink(missing_ok=True)
    train_idx, holdout_idx = stratified_holdout(train_set.y, 0.0 if selection_set is not None else config.holdout,
                                                config.seed)
    if len(holdout_idx) and len(set(train_set.paths)) < len(train_set.paths):
        # Several copies of one file (e.g. raw + masked): a held-out image takes its copies along.
        held = {train_set.paths[i] for i in holdout_idx}
        moved = np.asarray([i for i in train_idx if train_set.paths[i] in held], dtype=np.int64)
        train_idx, holdout_idx = np.setdiff1d(train_idx, moved), np.union1d(holdout_idx, moved)
    fit_set, holdout_set = train_set.subset(train_idx), train_set.subset(holdout_idx)
    if selection_set is not None:
        holdout_set = selection_set
    weights = (class_weights(fit_set.y, len(classes), config.class_weight_power)
               if config.class_weight else None)

    args = dict(args or {})
    meta = {"classes": list(classes), "image_size": int(train_set.x.shape[1]), "args": args,
            "config": dataclasses.asdict(config), "precision": precision, "versions": versions(),
            "train_images": len(fit_set), "holdout_images": len(holdout_set), "val_images": len(val_set),
            "train_counts": fit_set.counts(), "val_counts": val_set.counts(),
            "skipped_images": list(train_set.skipped) + list(val_set.skipped),
            "input": "uint8 RGB, shape (N, H, W, 3), preprocessing inside the model",
            **(extra_metadata or {})}
    write_json(run_dir / "args.json", {**args, "resolved_config": dataclasses.asdict(config), "precision": precision,
                                       "backend": keras.backend.backend(), "versions": versions(),
                                       "argv": sys.argv, "holdout_images": len(holdout_set),
                                       "train_images": len(fit_set)})

    done = read_history(run_dir / "history.csv") if resume else []
    if len(done) >= config.epochs and (run_dir / "model.h5").exists() and not (run_dir / "backup").exists():
        # Killed after its last epoch, while the folder was being finished: finish it, train nothing again.
        rows = [{k: _num(v) for k, v in r.items()} for r in done[:config.epochs]]
        return finish_run(run_dir, rows, val_set, classes, config, meta,
                          float(np.nansum([float(r["seconds"]) for r in rows])), len(fit_set))

    passes = epoch_passes(len(fit_set), config)
    y_onehot = keras.utils.to_categorical(fit_set.y, len(classes)).astype("float32")
    if config.loader == "generator":
        batches = legacy_training_data(fit_set, config, paired_x)
    else:
        fit_x = fit_set.x if paired_x is None else [fit_set.x, np.asarray(paired_x)[train_idx]]
        batches = ArrayBatches(fit_x, y_onehot, config.batch_size, config.seed, passes)
    stream = Endless(batches)  # one epoch = one pass of `batches`: stream.steps_per_epoch optimizer steps
    with distribution_scope():
        core = build_core()
        if before_fit:
            before_fit(core)
        train_model = (build_train_model(core, config) if build_train_model
                       else build_training_model(core, None if config.loader == "generator" else config.augment,
                                                 config.seed))
        optimizer = make_optimizer(config, stream.steps_per_epoch)
        if compile_model:
            compile_model(train_model, optimizer, config)
        else:
            train_model.compile(optimizer=optimizer,
                                loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
                                metrics=["accuracy"])
    evaluator = EpochEvaluator(run_dir, core, holdout_set, val_set, passes * len(fit_set), config.batch_size,
                               meta, config.verbose,
                               (fit_set.x, config.bn_recalibrate, config.seed) if config.bn_recalibrate else None)
    callbacks = [AtomicBackupAndRestore(str(run_dir / "backup")), evaluator]
    start = time.perf_counter()
    train_model.fit(stream, steps_per_epoch=stream.steps_per_epoch, epochs=config.epochs, class_weight=weights,
                    callbacks=callbacks, verbose=_fit_verbosity(config.verbose), shuffle=False)
    seconds = time.perf_counter() - start
    if evaluator.diverged_epoch:
        shutil.rmtree(run_dir / "backup", ignore_errors=True)  # never resume from NaN weights
        kept = f"model.h5 keeps epoch {evaluator.selected_epoch}" if evaluator.selected_epoch else "no model was saved"
        raise TrainingDiverged(f"loss became NaN in epoch {evaluator.diverged_epoch}; {kept}; "
                               f"try a lower --lr (now {config.lr:g})")
    return finish_run(run_dir, evaluator.rows, val_set, classes, config, meta, seconds, len(fit_set))


def epoch_passes(n_images: int, config: TrainConfig) -> int:
    """Passes over the training images per epoch: enough for config.min_steps optimizer steps."""
    if not config.min_steps or config.loader == "generator" or n_images == 0:
        return 1
    return max(1, math.ceil(config.min_steps * config.batch_size / n_images))


def _fit_verbosity(verbose: int):
    # Keras' progress bar on a terminal; in logs and CI the evaluator's one line per epoch is enough.
    return 1 if verbose and sys.stdout.isatty() else 0


def finish_run(run_dir: Path, rows: list[dict], val_set: ImageSet, classes, config: TrainConfig, meta: dict,
               seconds: float, n_train: int) -> dict:
    """Final metrics from the selected model on the validation set; plots; metadata into model.h5."""
    model_path = run_dir / "model.h5"
    core = load_core_model(model_path)
    selected = int(read_h5_metadata(model_path).get("epoch", len(rows)))
    probs = predict(core, val_set.x, config.batch_size)
    m = wbc_metrics.classification_metrics(val_set.y, probs, classes)
    write_predictions(run_dir / "val_predictions.csv", val_set, probs, classes)
    val_acc = [float(r["val_accuracy"]) for r in rows]
    bml = wbc_metrics.best_mean_last(val_acc)
    train_seconds = float(np.nansum([float(r["seconds"]) for r in rows]))
    result = {
        "val_accuracy_best": bml["best"], "val_accuracy_mean": bml["mean"], "val_accuracy_last": bml["last"],
        "val_accuracy_selected": m["accuracy"], "selected_epoch": selected,
        **{k: v for k, v in m.items() if k != "accuracy"},
        "classes": list(classes), "epochs": len(rows), "train_images": n_train,
        "holdout_images": meta.get("holdout_images"), "val_images": len(val_set),
        "train_counts": meta.get("train_counts"), "val_counts": meta.get("val_counts"),
        "skipped_images": meta.get("skipped_images", []),
        "seconds": seconds, "train_seconds": train_seconds,
        "images_per_second": (n_train * len(rows) / train_seconds) if train_seconds else float("nan"),
        "precision": meta.get("precision"), "backend": keras.backend.backend(),
        "selection": "best hold-out accuracy" if meta.get("holdout_images") else "last epoch (no hold-out)",
    }
    for key in ("mask_counts", "mask_mode"):
        if key in meta:
            result[key] = meta[key]
    summary = {k: result[k] for k in ("val_accuracy_selected", "balanced_accuracy", "macro_f1", "majority_baseline",
                                      "collapsed_to_majority", "selected_epoch")}
    update_h5_metadata(model_path, metrics=summary)
    report.plot_curves(rows, run_dir / "curves.png", selected, title=run_dir.name)
    report.plot_confusion(m["confusion_matrix"], classes, run_dir / "confusion.png",
                          title=f"validation, epoch {selected} (selected on hold-out)")
    # metrics.json last: it marks the run complete (run_is_complete), so a run killed while finishing is
    # finished again by --resume instead of being taken as done without its plots or model metadata.
    write_json(run_dir / "metrics.json", result)
    if result["collapsed_to_majority"]:
        top = max(m["predicted_class_share"], key=m["predicted_class_share"].get)
        print(f"warning: the model collapsed: it predicts '{top}' for "
              f"{m['predicted_class_share'][top]:.0%} of validation images (balanced accuracy "
              f"{m['balanced_accuracy']:.3f}); accuracy {m['accuracy']:.4f} vs majority baseline "
              f"{m['majority_baseline']:.4f}", file=sys.stderr)
    return result


def write_predictions(path: Path, images: ImageSet, probs: np.ndarray, classes):
    """One row per image: path, true class, predicted class, correct, a probability per class."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true", "predicted", "correct"] + [f"p_{c}" for c in classes])
    pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
    for p, t, q, pr in zip(images.paths, images.y, pred, probs):
        w.writerow([p, classes[t], classes[q], int(t == q)] + [f"{v:.6f}" for v in pr])
    atomic_write_text(path, buf.getvalue())


def print_summary(run_dir: Path, result: dict):
    print(f"\nrun folder: {run_dir}")
    print(f"  val accuracy (epoch {result['selected_epoch']}, {result.get('selection', 'selected on hold-out')}): {result['val_accuracy_selected']:.4f}"
          f"   best/mean/last over epochs: {result['val_accuracy_best']:.4f} / {result['val_accuracy_mean']:.4f} / "
          f"{result['val_accuracy_last']:.4f}")
    print(f"  balanced accuracy {result['balanced_accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   "
          f"majority baseline {result['majority_baseline']:.4f}"
          + ("   COLLAPSED to one class" if result["collapsed_to_majority"] else ""))
