"""Self-supervised pre-training: the encoders, the joint-embedding model and its losses (SimCLR, VICReg), the
frozen-feature probe, and starting a classifier from a pre-trained encoder (--init, --freeze-epochs,
--frozen-blocks).

The joint-embedding model is a keras.Model whose call makes two augmented views of a batch (augment.make_two_views)
and projects both; its compute_loss reads only those projections, never labels, so one compiled training step
runs on every backend. Only the encoder is saved (encoder.h5, built-in layers, loads with plain Keras).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

import augment
import framing
import models
from feeding import ArrayBatches
from runfiles import UserError, load_core_model, read_h5_metadata, save_model_h5, write_history

# Keras warns on every .h5 save that the format is legacy; .h5 is what the users asked for.
logging.getLogger("absl").setLevel(logging.ERROR)

METHODS = ("simclr", "vicreg")
# The pooled-feature layer each core model ends its encoder at (models.build_cnn, models.build_resnet50).
FEATURE_LAYERS = ("gap", "flatten", "gap_blocks", models.FEATURES_NAME)
# A trained classifier's head (models.classifier_head): what an --init classifier brings besides its encoder.
HEAD_LAYERS = ("head_dense", "predictions")


# ----------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------

def encoder_of(core: keras.Model, name: str = "encoder") -> keras.Model:
    """The core model up to its pooled features (shared layers, same names): what pre-training trains and
    what --init copies back into a classifier."""
    for layer_name in FEATURE_LAYERS:
        try:
            features = core.get_layer(layer_name).output
        except ValueError:
            continue
        return keras.Model(core.input, features, name=name)
    raise ValueError(f"{core.name}: no pooled feature layer ({', '.join(FEATURE_LAYERS)})")


def build_encoder(model: str, image_size: int, cnn_kwargs: dict | None = None) -> keras.Model:
    """A fresh encoder: the dropout CNN's (with cnn_kwargs, e.g. the default recipe's shape) or ResNet50's."""
    if model == "cnn":
        return encoder_of(models.build_cnn(2, image_size, **(cnn_kwargs or {})), "encoder_cnn")
    if model == "resnet50":
        return encoder_of(models.build_resnet50(2, image_size, weights=None), "encoder_resnet50")
    raise ValueError(f"model must be cnn or resnet50, not {model!r}")


def projector(width: int, out_dim: int) -> keras.Sequential:
    """SimCLR's projection head: dense + batch norm + ReLU, then a linear layer; dropped after pre-training."""
    return keras.Sequential([layers.Dense(width, use_bias=False, name="proj_dense1"),
                             layers.BatchNormalization(name="proj_bn"), layers.Activation("relu", name="proj_relu"),
                             layers.Dense(out_dim, dtype="float32", name="proj_out")], name="projector")


# ----------------------------------------------------------------------------------------------
# Losses on two batches of projections (B, D), float32
# ----------------------------------------------------------------------------------------------

def nt_xent_loss(z_a, z_b, temperature: float = 0.2):
    """SimCLR's normalised-temperature cross-entropy: each view must pick its partner out of the 2B - 1 others."""
    z = ops.concatenate([z_a, z_b], axis=0)
    z = z / ops.sqrt(ops.sum(ops.square(z), axis=1, keepdims=True) + 1e-12)
    n = ops.shape(z)[0]
    sim = ops.matmul(z, ops.transpose(z)) / temperature
    sim = sim - 1e9 * ops.eye(n)  # a view is not its own partner
    half = n // 2
    positives = ops.sum(z[:half] * z[half:], axis=1) / temperature
    positives = ops.concatenate([positives, positives], axis=0)
    return ops.mean(ops.logsumexp(sim, axis=1) - positives)


def vicreg_loss(z_a, z_b, invariance: float = 25.0, variance: float = 25.0, covariance: float = 1.0):
    """VICReg: views agree (mean squared error), each dimension keeps a standard deviation of at least 1 over
    the batch, dimensions are decorrelated."""
    def var_cov(z):
        z = z - ops.mean(z, axis=0, keepdims=True)
        std = ops.sqrt(ops.var(z, axis=0) + 1e-4)
        n, d = ops.cast(ops.shape(z)[0], "float32"), ops.cast(ops.shape(z)[1], "float32")
        cov = ops.matmul(ops.transpose(z), z) / (n - 1.0)
        off = cov * (1.0 - ops.eye(ops.shape(z)[1]))
        return ops.mean(ops.relu(1.0 - std)), ops.sum(ops.square(off)) / d

    v_a, c_a = var_cov(z_a)
    v_b, c_b = var_cov(z_b)
    return (invariance * ops.mean(ops.square(z_a - z_b)) + variance * (v_a + v_b) / 2.0
            + covariance * (c_a + c_b))


class JointEmbedding(keras.Model):
    """Two views of each image -> encoder -> projector; the loss compares the two projections of each image.

    call returns the stacked projections (2, B, D); compute_loss ignores x and y, so labels cannot enter it
    (the pool has none anyway: fit is given images only)."""

    def __init__(self, encoder: keras.Model, views, method: str = "simclr", temperature: float = 0.2,
                 proj_width: int = 512, proj_dim: int = 128, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        self.encoder, self.views = encoder, views
        self.projector = projector(proj_width, proj_dim)
        self.method, self.temperature = method, float(temperature)

    def call(self, images, training=None):
        a, b = self.views(images, training=training)
        n = ops.shape(a)[0]
        z = ops.cast(self.projector(self.encoder(ops.concatenate([a, b], axis=0), training=training),
                                    training=training), "float32")
        return ops.stack([z[:n], z[n:]], axis=0)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        z_a, z_b = y_pred[0], y_pred[1]
        if self.method == "simclr":
            return nt_xent_loss(z_a, z_b, self.temperature)
        return vicreg_loss(z_a, z_b)


class PoolBatches(ArrayBatches):
    """Shuffled batches of images only (no labels exist in a pool); the last, partial batch is dropped so that
    every step compares a full batch (a batch of one has no negatives and no batch statistics)."""

    def __init__(self, x, batch_size: int, seed: int = 0):
        super().__init__(x, np.zeros(len(x), np.int8), batch_size, seed)

    def __len__(self):
        return max(1, len(self.order) // self.batch_size)

    def __getitem__(self, step):
        return super().__getitem__(step)[0]


# ----------------------------------------------------------------------------------------------
# The probe: a light classifier on frozen features (reporting only)
# ----------------------------------------------------------------------------------------------

def features(encoder: keras.Model, x, batch_size: int = 128) -> np.ndarray:
    if len(x) == 0:
        return np.zeros((0, encoder.output_shape[-1]), np.float32)
    return np.concatenate([np.asarray(encoder.predict_on_batch(x[i:i + batch_size]), np.float32)
                           for i in range(0, len(x), batch_size)])


def probe_scores(train_features, train_y, val_features, val_y, method: str = "logreg", k: int = 20) -> dict:
    """Fit a classifier on the labelled training features, score it on the validation features.

    logreg: standardised features, multinomial logistic regression with balanced class weights (a small split's
    rare classes count); knn: cosine k-nearest neighbours (k capped at the training set's size), distance-weighted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    if method == "logreg":
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    elif method == "knn":
        clf = make_pipeline(Normalizer(), KNeighborsClassifier(min(k, len(train_y)), weights="distance"))
    else:
        raise ValueError(f"probe must be logreg or knn, not {method!r}")
    clf.fit(train_features, train_y)
    pred = clf.predict(val_features)
    labels = np.unique(np.concatenate([train_y, val_y]))
    return {"balanced_accuracy": float(balanced_accuracy_score(val_y, pred)),
            "macro_f1": float(f1_score(val_y, pred, labels=labels, average="macro", zero_division=0))}


# ----------------------------------------------------------------------------------------------
# The pre-training loop's per-epoch record
# ----------------------------------------------------------------------------------------------

HISTORY_FIELDS = ["epoch", "loss", "probe_balanced_accuracy", "probe_macro_f1", "lr", "seconds", "images_per_second"]


@dataclasses.dataclass
class ProbeData:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    method: str = "logreg"
    every: int = 2


class PretrainLogger(keras.callbacks.Callback):
    """Per epoch: a history.csv row (loss, probe scores every `probe.every` epochs and at the last epoch),
    encoder.h5 of the kept epoch (the last, or with select_on='probe' the best probe balanced accuracy), and an
    optional time budget: training stops after the epoch that passes `max_seconds` (never on a score)."""

    def __init__(self, run_dir: Path, encoder, probe: ProbeData | None, epochs: int, n_images: int,
                 metadata: dict, select_on: str = "last", max_seconds: float | None = None, verbose: int = 1):
        super().__init__()
        self.run_dir, self.encoder, self.probe = Path(run_dir), encoder, probe
        self.epochs, self.n_images, self.metadata = epochs, n_images, metadata
        self.select_on, self.max_seconds, self.verbose = select_on, max_seconds, verbose
        self.rows, self.kept_epoch, self.best_probe = [], 0, -1.0
        self.start = self.epoch_start = None

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        if self.probe is not None:  # epoch 0: the random encoder's probe, the reference pre-training must beat
            row = {"epoch": 0, "loss": float("nan"), **self._probe(), "lr": float("nan"), "seconds": float("nan"),
                   "images_per_second": float("nan")}
            self.rows.append(row)
            if self.verbose:
                print(f"epoch 0 (random encoder): probe balanced acc {row['probe_balanced_accuracy']:.3f} "
                      f"macro-F1 {row['probe_macro_f1']:.3f}", flush=True)

    def _probe(self) -> dict:
        p = self.probe
        scores = probe_scores(features(self.encoder, p.train_x), p.train_y, features(self.encoder, p.val_x),
                              p.val_y, p.method)
        return {"probe_balanced_accuracy": scores["balanced_accuracy"], "probe_macro_f1": scores["macro_f1"]}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.epoch_start
        epoch += 1
        loss = float((logs or {}).get("loss", float("nan")))
        if not math.isfinite(loss):
            self.model.stop_training = True
            raise UserError(f"pre-training loss became {loss} in epoch {epoch}; try a lower --lr")
        out_of_time = self.max_seconds is not None and time.perf_counter() - self.start > self.max_seconds
        last = epoch == self.epochs or out_of_time
        row = {"epoch": epoch, "loss": loss, "probe_balanced_accuracy": float("nan"), "probe_macro_f1": float("nan"),
               "lr": _current_lr(self.model), "seconds": seconds, "images_per_second": self.n_images / seconds}
        if self.probe is not None and (epoch % self.probe.every == 0 or last):
            row.update(self._probe())
        self.rows.append(row)
        write_history(self.run_dir / "history.csv", self.rows, HISTORY_FIELDS)
        keep = self.select_on == "last" or (math.isfinite(row["probe_balanced_accuracy"])
                                            and row["probe_balanced_accuracy"] > self.best_probe)
        if keep:
            if self.select_on == "probe":
                self.best_probe = row["probe_balanced_accuracy"]
            self.kept_epoch = epoch
            save_model_h5(self.encoder, self.run_dir / "encoder.h5", {**self.metadata, "epoch": epoch})
        if self.verbose:
            probe = (f"  probe balanced acc {row['probe_balanced_accuracy']:.3f} macro-F1 {row['probe_macro_f1']:.3f}"
                     if math.isfinite(row["probe_balanced_accuracy"]) else "")
            print(f"epoch {epoch}: loss {loss:.4f}{probe}  ({seconds:.1f}s, {row['images_per_second']:.0f} img/s)"
                  + ("  *saved" if keep else ""), flush=True)
        if out_of_time and epoch < self.epochs:
            print(f"time budget reached after epoch {epoch}: stopping", flush=True)
            self.model.stop_training = True


def _current_lr(model) -> float:
    try:
        return float(ops.convert_to_numpy(model.optimizer.learning_rate))
    except Exception:  # noqa: BLE001 - a schedule-less optimizer or a backend without the attribute
        return float("nan")


# ----------------------------------------------------------------------------------------------
# Starting a classifier from an encoder (train_cnn.py / train_masked.py --init, --freeze-epochs)
# ----------------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weighted_layers(model: keras.Model) -> list:
    """The layers of `model` that hold weights (what --init copies), nested models opened: a trained classifier's
    CNN inside its stain-normalisation wrapper counts by its own layers."""
    return [layer for _, layer in models.flat_layers(model) if layer.weights]


def is_classifier(path: Path) -> bool:
    """Whether an --init file is a trained classifier (train_cnn.py's model.h5: it names its classes) rather than a
    pretrain_ssl.py encoder."""
    return "classes" in read_h5_metadata(path)


def load_encoder_weights(core: keras.Model, path: Path, encoder: keras.Model | None = None,
                         head: bool = False) -> list[str]:
    """Put the --init file's weights, exactly, into the same-named layers of `core`; returns those names.
    `encoder`: the file's model when the caller has loaded it already. A trained classifier's head (HEAD_LAYERS) is
    copied only with head=True (the same classes in the same order); otherwise `core` keeps its fresh head. A layer
    missing from `core` or weights of another shape end in one line naming both."""
    encoder = load_core_model(path) if encoder is None else encoder
    names = []
    for layer in weighted_layers(encoder):
        if layer.name in HEAD_LAYERS and not head:
            continue
        weights = layer.get_weights()
        target = find_layer(core, layer.name)
        if target is None:
            raise UserError(f"--init {path}: its layer {layer.name} is not in the {core.name} model (expected an "
                            f"encoder.h5 of pretrain_ssl.py --model cnn or a model.h5 of train_cnn.py, trained "
                            f"with this run's --stain-norm, --norm and shape options)")
        own = target.get_weights()
        shapes = [tuple(w.shape) for w in weights]
        if [tuple(w.shape) for w in own] != shapes:
            raise UserError(f"--init {path}: layer {layer.name} has weights of shape "
                            f"{', '.join(map(str, shapes))} in the file but "
                            f"{', '.join(str(tuple(w.shape)) for w in own)} in the classifier (train or pre-train "
                            f"with the same --width, --depth, --dense and --batchnorm as this model)")
        target.set_weights(weights)
        names.append(layer.name)
    if not names:
        raise UserError(f"--init {path}: the model holds no weights (expected an encoder.h5 from pretrain_ssl.py)")
    return names


def find_layer(model: keras.Model, name: str):
    """The layer called `name` in `model` or in a model nested in it (the CNN inside its stain-normalisation
    wrapper), else None."""
    return next((layer for _, layer in models.flat_layers(model) if layer.name == name), None)


def set_layers_trainable(core: keras.Model, names, trainable: bool):
    for name in names:
        find_layer(core, name).trainable = trainable


def block_number(layer_name: str) -> int | None:
    """3 for 'block3_conv' (models.build_cnn's names); None for a layer outside the numbered blocks."""
    head, _, _ = layer_name.partition("_")
    return int(head[5:]) if head.startswith("block") and head[5:].isdigit() else None


@dataclasses.dataclass(frozen=True)
class FineTune:
    """How a classifier starts from a pre-trained encoder (train_cnn.py / train_masked.py --init ...).

    freeze_epochs N: the first N epochs train the head alone; N >= the epochs: the encoder stays frozen throughout.
    lr: the learning rate of the epochs after the head-only ones (None: the run's own; LP-FT, Kumar et al., ICLR
    2022: a small step keeps the pre-trained features nearly as they were).
    frozen_blocks K: the encoder's first K convolution blocks stay frozen in every epoch, batch norm included, while
    the later blocks and the head learn (the low-level features, which see stain and camera, stay those learned
    from every source; Yosinski et al., 2014: early layers are the general ones; on PBC -> BCCD, K=2 did not help:
    docs/microscopes.md).
    frozen_bn: the encoder's batch-norm layers stay as pre-trained in every epoch (moving statistics, scale and
    offset; in inference mode): the features are normalised as on the pre-training pool, which mixes sources,
    rather than re-estimated on one lab's labelled images (frozen batch-norm statistics generalised better across
    WBC datasets in Tsutsui et al., ICASSP 2023)."""
    init: Path | None = None
    freeze_epochs: int = 0
    lr: float | None = None
    frozen_blocks: int = 0
    frozen_bn: bool = False

    @classmethod
    def from_args(cls, args) -> "FineTune":
        return cls(args.init, args.freeze_epochs, args.finetune_lr, args.frozen_blocks, args.frozen_bn)

    def always_frozen(self, names) -> list[str]:
        """The encoder layers (of `names`) kept frozen after the head-only epochs: the first frozen_blocks blocks,
        and with frozen_bn every batch-norm layer (models.build_cnn names them blockK_bn)."""
        return [n for n in names if 0 < (block_number(n) or 0) <= self.frozen_blocks
                or (self.frozen_bn and n.endswith("_bn"))]


def train_from_init(run_dir: Path, build_core, train_set, val_set, config, args: dict, resume: bool,
                    extra_metadata: dict, finetune: FineTune = FineTune(), hooks=None, test_set=None) -> dict:
    """training.train, started from the file finetune.init when given (else exactly training.train): a
    pretrain_ssl.py encoder, or a trained classifier (train_cnn.py's model.h5) to fine-tune on new images, whose
    head is kept where its classes are the run's, in the same order (a fresh head otherwise).

    args.json and model.h5's metadata name the file and its sha256. With finetune.freeze_epochs N, the
    first N epochs train the head alone (encoder layers frozen, their batch norm in inference mode) in
    RUN/head_frozen/, and the run continues from that phase's selected model for the remaining epochs with the
    encoder trainable (but for finetune.frozen_blocks), at learning rate finetune.lr when given; with N >= the
    epochs the encoder stays frozen throughout and only the head is trained (in RUN)."""
    import training
    hooks = hooks or training.Hooks()
    if finetune.init is None:
        return training.train(run_dir, build_core, train_set, val_set, config, args=args, resume=resume,
                              extra_metadata=extra_metadata, hooks=hooks, test_set=test_set)
    init = Path(finetune.init)
    init_meta = read_h5_metadata(init)
    # A trained classifier of the same classes in the same order keeps its head; any other starts a fresh one.
    head = list(init_meta.get("classes") or []) == list(train_set.classes)
    info = {"path": str(init), "sha256": file_sha256(init), "pretraining": init_meta.get("method"),
            "kind": "classifier" if "classes" in init_meta else "encoder", "head": "copied" if head else "fresh"}
    args = {**args, "init_sha256": info["sha256"]}
    meta = {**extra_metadata, "init_encoder": info}
    encoder = load_core_model(init)
    # from the file, not from a build: a resumed run whose head-only phase is done builds nothing before the rest.
    # The encoder's layers: what the head-only epochs freeze (a copied head trains in them too).
    names = [layer.name for layer in weighted_layers(encoder) if layer.name not in HEAD_LAYERS]
    if info["kind"] == "classifier":  # its fixed layers (the stain normalisation's) stay fixed when the rest tunes
        fresh = build_core()
        names = [n for n in names if find_layer(fresh, n).trainable]

    def build():
        core = build_core()
        load_encoder_weights(core, init, encoder, head=head)
        return core

    def tune_after(core):  # everything trainable but the blocks kept frozen
        set_layers_trainable(core, names, True)
        set_layers_trainable(core, finetune.always_frozen(names), False)

    frozen = dataclasses.replace(hooks, before_fit=lambda core: set_layers_trainable(core, names, False))
    tuned = dataclasses.replace(hooks, before_fit=tune_after)
    if finetune.frozen_blocks:
        meta["frozen_blocks"] = finetune.frozen_blocks
    if finetune.frozen_bn:
        meta["frozen_bn"] = True
    if not finetune.freeze_epochs:
        return training.train(run_dir, build, train_set, val_set, config, args=args, resume=resume,
                              extra_metadata=meta, hooks=tuned, test_set=test_set)
    if finetune.freeze_epochs >= config.epochs:  # the encoder stays as pre-trained: only the head learns
        return training.train(run_dir, build, train_set, val_set, config, args=args, resume=resume,
                              extra_metadata={**meta, "stage": "head_only", "head_frozen_epochs": config.epochs},
                              hooks=frozen, test_set=test_set)
    head_dir = Path(run_dir) / "head_frozen"
    training.train(head_dir, build, train_set, val_set, dataclasses.replace(config, epochs=finetune.freeze_epochs),
                   args=args, resume=resume, extra_metadata={**meta, "stage": "head_frozen"}, hooks=frozen)
    rest = dataclasses.replace(config, epochs=config.epochs - finetune.freeze_epochs, lr=finetune.lr or config.lr)
    return training.train(run_dir, lambda: load_core_model(head_dir / "model.h5"), train_set, val_set, rest,
                          args=args, resume=resume,
                          extra_metadata={**meta, "stage": "after_head_frozen",
                                          "head_frozen_epochs": finetune.freeze_epochs, "finetune_lr": rest.lr},
                          hooks=tuned, test_set=test_set)


# ----------------------------------------------------------------------------------------------
# The pool of unlabeled images
# ----------------------------------------------------------------------------------------------

def validation_overlap(pool: list[Path], val: list[Path]) -> list[Path]:
    """The pool files that are validation images: the same file (after symlinks) or the same bytes."""
    import os
    real_val = {os.path.realpath(p) for p in val}
    hits = [p for p in pool if os.path.realpath(p) in real_val]
    by_size = {}
    for p in val:
        by_size.setdefault(os.path.getsize(p), []).append(p)
    digests = {}

    def digest(p):
        if p not in digests:
            digests[p] = file_sha256(p)
        return digests[p]

    for p in pool:
        if p in hits:
            continue
        same_size = by_size.get(os.path.getsize(p), [])
        if same_size and any(digest(p) == digest(v) for v in same_size):
            hits.append(p)
    return hits


def _is_course_mask(path: Path, top: Path) -> bool:
    """A mask of the course layout (a `mask` folder beside a `data` folder) under `top`: never a cell image."""
    rel = Path(path).relative_to(top)
    here = Path(top)
    for part in rel.parts[:-1]:
        if part.lower() in ("mask", "masks") and any((here / d).is_dir() for d in ("data", "Data")):
            return True
        here = here / part
    return False


def gather_pool(unlabeled: list[Path], split_train: list[Path], val: list[Path], root: Path):
    """(FileList, description): every image under the --unlabeled folders (recursively, folder names ignored;
    the masks of a course-layout split left out) plus the split's training images, each file once; refuses
    (UserError) a folder that holds a validation image."""
    import os

    import data
    sources, seen, pool = {}, set(), []
    for folder in unlabeled:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"--unlabeled {folder}: not a folder (expected a folder of images, searched recursively)")
        files = [f for f in data.list_images(folder) if not _is_course_mask(f, folder)]
        if not files:
            raise UserError(f"--unlabeled {folder}: holds no images (.jpg, .png, .bmp, .tif)")
        overlap = validation_overlap(files, val)
        if overlap:
            raise UserError(f"--unlabeled {folder}: holds {len(overlap)} validation image(s) (e.g. {overlap[0]}); "
                            "validation images must stay out of pre-training")
        sources[str(folder)] = len(files)
        for f in files:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                pool.append(f)
    if split_train:
        overlap = validation_overlap(split_train, val)
        if overlap:
            raise UserError(f"the training split holds {len(overlap)} validation image(s) (e.g. {overlap[0]}); "
                            "validation images must stay out of pre-training")
        sources["split training images (labels ignored)"] = len(split_train)
        for f in split_train:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                pool.append(f)
    files = data.FileList(pool, np.zeros(len(pool), np.int32), ("image",), [None] * len(pool), Path(root))
    return files, {"sources": sources, "images": len(pool)}


# ----------------------------------------------------------------------------------------------
# Pre-training: the run folder of pretrain_ssl.py
# ----------------------------------------------------------------------------------------------

def pretrain(run_dir: Path, args, pool_x: np.ndarray, labelled, val, pool_info: dict) -> dict:
    """Train the encoder on pool_x and write the run folder; returns metrics.json's content.

    labelled and val (ImageSets) feed only the probe. --resume keeps a complete run; an incomplete one restarts
    (pre-training runs are short; the kept encoder.h5 of an interrupted run stays until the new run replaces it)."""
    import sys

    import cli
    import recipes
    import report
    from devices import seed_everything, set_precision, versions
    from feeding import Endless
    from runfiles import update_h5_metadata, write_json
    import json

    run_dir = Path(run_dir)
    done = all((run_dir / f).exists() for f in ("metrics.json", "encoder.h5", "history.csv", "args.json"))
    if done and args.resume:
        print(f"{run_dir}: run already complete; nothing to do")
        return json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "history.csv").exists() and not args.resume:
        raise UserError(f"{run_dir}: already holds a run; pass --resume to redo it or --out to start another")
    if len(pool_x) < 2:
        raise UserError(f"the pool holds {len(pool_x)} image(s); self-supervised pre-training needs at least 2")
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = set_precision(args.precision)
    seed_everything(args.seed)
    batch_size = min(args.batch_size, len(pool_x))
    cnn_kwargs = recipes.recipe_model_kwargs(args.recipe)
    meta = {"model": f"encoder_{args.model}", "method": args.method, "image_size": int(pool_x.shape[1]),
            "recipe": args.recipe if args.model == "cnn" else None, "pool": pool_info, "seed": args.seed,
            "framing": framing.describe(getattr(args, "frame_cell", 0.0)),
            "input": "uint8 RGB, shape (N, H, W, 3), preprocessing inside the model; output: pooled features",
            "precision": precision, "versions": versions(), "demo_data": getattr(args, "demo", False)}
    write_json(run_dir / "args.json", {**cli.args_dict(args), "precision": precision, "argv": sys.argv,
                                       "backend": keras.backend.backend(), "pool": pool_info,
                                       "versions": versions()})
    encoder = build_encoder(args.model, int(pool_x.shape[1]), cnn_kwargs)
    views = augment.make_two_views(args.crop_scale, args.color_jitter, args.grayscale, args.blur, args.rotation,
                                   seed=args.seed, hue_jitter=args.hue_jitter)
    model = JointEmbedding(encoder, views, args.method, args.temperature, proj_dim=args.proj_dim, name="ssl")
    stream = Endless(PoolBatches(pool_x, batch_size, args.seed))
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, max(1, args.epochs * stream.steps_per_epoch),
                                                      alpha=0.01)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay))
    probe = None
    if args.probe != "none":
        probe = ProbeData(labelled.x, labelled.y, val.x, val.y, args.probe, args.probe_every)
    logger = PretrainLogger(run_dir, encoder, probe, args.epochs, stream.steps_per_epoch * batch_size, meta,
                            args.select_on, args.max_minutes * 60 if args.max_minutes else None,
                            verbose=0 if args.quiet else 1)
    start = time.perf_counter()
    model.fit(stream, steps_per_epoch=stream.steps_per_epoch, epochs=args.epochs, callbacks=[logger], verbose=0,
              shuffle=False)
    seconds = time.perf_counter() - start
    rows = logger.rows
    kept = next(r for r in rows if r["epoch"] == logger.kept_epoch)
    last, trained = rows[-1], [r for r in rows if r["epoch"] > 0]
    random_probe = rows[0] if rows[0]["epoch"] == 0 else {}
    result = {"epochs": len(trained), "kept_epoch": logger.kept_epoch,
              "selection": "best probe balanced accuracy (looks at val)" if args.select_on == "probe"
              else "last epoch",
              "final_loss": last["loss"], "first_loss": trained[0]["loss"],
              "probe": args.probe, "probe_balanced_accuracy": kept["probe_balanced_accuracy"],
              "probe_macro_f1": kept["probe_macro_f1"],
              "probe_random_encoder_balanced_accuracy": random_probe.get("probe_balanced_accuracy"),
              "probe_random_encoder_macro_f1": random_probe.get("probe_macro_f1"),
              "probe_labelled_images": len(labelled),
              "val_images": len(val), "pool_images": len(pool_x), "pool": pool_info, "image_size": int(pool_x.shape[1]),
              "batch_size": batch_size, "method": args.method, "model": args.model, "seconds": seconds,
              "images_per_second": float(np.mean([r["images_per_second"] for r in trained])),
              "precision": precision, "backend": keras.backend.backend()}
    update_h5_metadata(run_dir / "encoder.h5", metrics={k: result[k] for k in (
        "probe_balanced_accuracy", "probe_macro_f1", "final_loss", "kept_epoch")})
    report.plot_pretraining(rows, run_dir / "curves.png", logger.kept_epoch, title=run_dir.name)
    write_json(run_dir / "metrics.json", result)  # last: marks the run complete
    return result
