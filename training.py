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
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

import keras

# Keras warns on every .h5 save that the format is legacy; .h5 is what the users asked for.
logging.getLogger("absl").setLevel(logging.ERROR)

import augment  # noqa: E402
import domain  # noqa: E402
import metrics as wbc_metrics  # noqa: E402
import report  # noqa: E402
from data import ImageSet  # noqa: E402
import devices  # noqa: E402
from devices import distribution_scope, set_precision, seed_everything, versions  # noqa: E402
from feeding import ArrayBatches, Endless, predict, recalibrate_batchnorm  # noqa: E402
from runfiles import (UserError, atomic_write_text, load_core_model, read_h5_metadata, read_history,  # noqa: E402
                      run_is_complete, save_model_h5, update_h5_metadata, write_history, write_json)

HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "holdout_loss", "holdout_accuracy", "val_loss",
                  "val_accuracy", "val_balanced_accuracy", "lr", "seconds", "images_per_second"]


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
    augment: dict | None = None  # augment.make_augmentation keywords; None = no augmentation
    verbose: int = 1
    loader: str = "cached"  # or 'generator': the report's ImageDataGenerator pipeline (legacy.legacy_training_data)
    # Small splits (WBC_1: ~20 images, one step per epoch) get too few optimizer steps to learn anything in a
    # sane number of epochs: an epoch then passes over the (augmented) training images several times, so that
    # it has at least this many steps. 0 = one pass per epoch, as Keras does.
    min_steps: int = 0
    # Before each epoch's evaluation, recompute batch-norm statistics from this many un-augmented training
    # images (recalibrate_batchnorm). 0 or None = off, the moving averages collected during training are kept.
    bn_recalibrate: int | None = 0
    # Stop when this many epochs pass without a new best hold-out epoch (0: off). Looks only at the hold-out.
    patience: int = 0
    tensorboard: bool = False  # scalars per epoch and the confusion matrix in the run folder's tensorboard/

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """Take the fields this config knows from parsed command-line arguments."""
        names = {f.name for f in dataclasses.fields(cls)} - {"augment"}
        values = {k: v for k, v in vars(args).items() if k in names}
        return cls(**values, augment=augment.from_args(args))


# ----------------------------------------------------------------------------------------------
# Which images train, which select, how much each class weighs
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



# ----------------------------------------------------------------------------------------------
# Callbacks: an atomic backup for --resume, and the per-epoch evaluator
# ----------------------------------------------------------------------------------------------

class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, with three changes for exact resumes:

    - each backup file is written beside and renamed into place: Keras overwrites its weights file in place, so
      a run killed during that write could not resume (a half-written .h5);
    - the state of every SeedGenerator (augmentation, dropout) is saved with the weights and restored: Keras'
      weights files leave it out, and a resumed run would otherwise draw the first epoch's random numbers again;
    - the backup is kept when training ends (delete_checkpoint=False): it is the last epoch's full training
      state (weights, optimizer moments, seeds), from which a finished run is extended with a larger --epochs.
    """

    def __init__(self, backup_dir):
        super().__init__(backup_dir, delete_checkpoint=False)

    def _seed_states(self):
        return [v for v in self.model.variables if v.name == "seed_generator_state"]

    def _save_model(self):
        if not devices.is_chief():  # several processes: process 0 keeps the backup, every process reads it
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = self._weights_path[:-len(".weights.h5")] + ".tmp.weights.h5"
        with devices.on_local_replica(self.model):
            self.model.save_weights(tmp, overwrite=True)
        # Weights before the epoch number: a kill between the two renames repeats one epoch, never skips one.
        os.replace(tmp, self._weights_path)
        seeds = [np.asarray(keras.ops.convert_to_numpy(v)).tolist() for v in self._seed_states()]
        atomic_write_text(Path(self._training_metadata_path),
                          json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen,
                                      "seed_states": seeds}))

    def _load_model(self):
        super()._load_model()
        if not os.path.exists(self._training_metadata_path):
            return
        saved = json.loads(Path(self._training_metadata_path).read_text()).get("seed_states")
        states = self._seed_states()
        if saved is not None and len(saved) == len(states):
            for variable, value in zip(states, saved):
                variable.assign(np.asarray(value, dtype=variable.dtype))

    def on_train_end(self, logs=None):
        if devices.is_chief():  # another process may finish first, while process 0 still writes the backup
            super().on_train_end(logs)


def backup_epoch(run_dir: Path) -> int:
    """The last epoch whose training state is in the run's backup/ (0: none); fit continues after it."""
    path = Path(run_dir) / "backup" / "training_metadata.json"
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


class EpochEvaluator(keras.callbacks.Callback):
    """After each epoch: evaluate hold-out and validation sets with the core model, append a history row,
    and save model.h5 when the hold-out accuracy improves. Picks up its state from history.csv on resume.

    Placed after BackupAndRestore in the callback list: a run killed between the backup and the history row
    re-evaluates the restored weights (exactly that epoch's) when it resumes, so no epoch goes missing.
    """

    def __init__(self, run_dir, core, holdout: ImageSet, val: ImageSet, n_train: int, batch_size: int,
                 metadata: dict, verbose: int = 1, recalibration: tuple | None = None, patience: int = 0,
                 history_columns=None):
        super().__init__()
        self.history_columns = history_columns
        self.run_dir = Path(run_dir)
        self.core, self.holdout, self.val = core, holdout, val
        self.recalibration = recalibration  # (training images, how many, seed) for recalibrate_batchnorm
        self.n_train, self.batch_size = n_train, batch_size
        self.metadata = metadata
        self.verbose = verbose
        self.rows: list[dict] = []
        self.selected_epoch = 0
        self.diverged_epoch = None
        self.patience = patience
        self.stopped_early = False
        self._epoch_start = None

    # -- state --
    def on_train_begin(self, logs=None):
        done = int(getattr(self.model, "_initial_epoch", 0) or 0)
        rows = [r for r in read_history(self.run_dir / "history.csv") if int(r["epoch"]) <= done]
        self.rows = [{k: _num(v) for k, v in r.items()} for r in rows]
        # From the rows, not from model.h5: a run killed after saving model.h5 but before its backup redoes
        # that epoch, and the file may hold an epoch the rows do not have yet.
        self.selected_epoch = selected_epoch(self.rows, len(self.holdout) > 0)
        if done and (not self.rows or int(self.rows[-1]["epoch"]) < done):
            # Killed after the backup of epoch `done` but before its row: its weights are the restored ones.
            self._record(done, {"loss": float("nan"), "accuracy": float("nan")}, seconds=float("nan"))
        elif done and self.recalibration:
            # The uninterrupted run recalibrated after the backup was written, so the next epoch started from
            # recalibrated statistics; recalibration replaces them entirely, so redoing it restores them.
            images, n_images, seed = self.recalibration
            recalibrate_batchnorm(self.core, images, n_images, self.batch_size, seed + done)
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
        if not self.rows:  # several processes: only process 0 evaluates
            return
        # The hold-out and validation figures, for the callbacks after this one (TensorBoard).
        logs.update({k: self.rows[-1][k] for k in ("holdout_loss", "holdout_accuracy", "val_loss", "val_accuracy",
                                                   "val_balanced_accuracy")})
        if early_stop_due(self.rows, self.patience, len(self.holdout) > 0):
            self.stopped_early = True
            self.model.stop_training = True
            if self.verbose:
                print(f"stopping early: no better hold-out epoch than {self.selected_epoch} in {self.patience} "
                      f"epochs (--patience {self.patience})")

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True

    def _record(self, epoch: int, logs: dict, seconds: float):
        with devices.on_local_replica(self.core):
            if self.recalibration:  # here, so that a resumed run recalibrates the restored weights the same way
                images, n_images, seed = self.recalibration
                recalibrate_batchnorm(self.core, images, n_images, self.batch_size, seed + epoch)
            if devices.is_chief():  # several processes: process 0 evaluates and writes the run folder
                self._evaluate_and_write(epoch, logs, seconds)

    def _evaluate_and_write(self, epoch: int, logs: dict, seconds: float):
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
        if self.history_columns:
            row.update(self.history_columns(self.model))
        self.rows.append(row)
        extra = [k for k in self.rows[-1] if k not in HISTORY_FIELDS]
        write_history(self.run_dir / "history.csv", self.rows, HISTORY_FIELDS + extra)
        if self._improved(row):
            self.selected_epoch = epoch
            with devices.plain_config(self.core):
                save_model_h5(self.core, self.run_dir / "model.h5", {**self.metadata, "epoch": epoch})
        if self.verbose:
            print(f"epoch {epoch}: train acc {row['train_accuracy']:.3f}  hold-out acc {row['holdout_accuracy']:.3f}"
                  f"  val acc {row['val_accuracy']:.3f}  ({seconds:.1f}s, {row['images_per_second']:.0f} img/s)"
                  + ("  *saved" if self.selected_epoch == epoch else ""))

    def _improved(self, row) -> bool:
        return selected_epoch(self.rows, len(self.holdout) > 0) == row["epoch"]


def selected_epoch(rows: list[dict], has_holdout: bool) -> int:
    """The epoch model selection picks from history rows: best hold-out (metrics.select_epoch), or the last."""
    if not rows:
        return 0
    if not has_holdout:
        return int(rows[-1]["epoch"])
    acc = [float(r["holdout_accuracy"]) for r in rows]
    loss = [float(r["holdout_loss"]) for r in rows]
    return int(rows[wbc_metrics.select_epoch(acc, loss)]["epoch"])


def early_stop_due(rows: list[dict], patience: int, has_holdout: bool) -> bool:
    """--patience: `patience` epochs have passed since the selected (best hold-out) epoch. Computed from the
    history rows, not kept in a callback's memory (keras.callbacks.EarlyStopping), so that a resumed run stops
    where the uninterrupted run stopped."""
    if not patience or not has_holdout or not rows:
        return False
    return int(rows[-1]["epoch"]) - selected_epoch(rows, True) >= patience


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


@dataclasses.dataclass
class Hooks:
    """What a script changes about the standard fit; every field is optional."""
    # before_fit(core): adjust the built core model before compiling (e.g. freeze a backbone).
    before_fit: Callable | None = None
    # build_train_model(core, config, steps_per_epoch) -> the training model, instead of [augmentation] -> core;
    # steps_per_epoch: the optimizer steps of one epoch of this fit.
    build_train_model: Callable | None = None
    # An array aligned with train_set.x: the training model is fed [x, paired_x] (each image and its masked copy).
    paired_x: np.ndarray | None = None
    # compile_model(train_model, optimizer, config): instead of the standard compile (e.g. extra losses).
    compile_model: Callable | None = None
    # Select the epoch on this set instead of a hold-out of train_set, which is then trained on whole (CAM16 val).
    selection_set: ImageSet | None = None
    # wrap_batches(batches) -> the epoch of batches fit reads instead (e.g. unlabeled images added to each step).
    wrap_batches: Callable | None = None
    # history_columns(train_model) -> {column: number}: more columns for each epoch's history.csv row.
    history_columns: Callable | None = None


def train(run_dir: Path, build_core, train_set: ImageSet, val_set: ImageSet, config: TrainConfig,
          args: dict | None = None, resume: bool = False, extra_metadata: dict | None = None,
          hooks: Hooks | None = None, test_set: ImageSet | None = None) -> dict:
    """Train one model and write its run folder. Returns metrics.json's content.

    build_core() -> keras.Model is called inside the distribution scope. Hold-out and validation always use the
    core model on un-augmented images; `hooks` changes the rest (Hooks). test_set, when given, is evaluated once
    with the selected model at the end (metrics.json, "test").

    A finished run resumed with a larger config.epochs is extended from its last training state (backup/).
    """
    hooks = hooks or Hooks()
    run_dir = Path(run_dir)
    if resume and run_is_complete(run_dir):
        finished = json.loads((run_dir / "metrics.json").read_text())
        if finished.get("stopped_early"):
            print(f"{run_dir}: run already complete (stopped early at epoch {finished.get('epochs')}); nothing to do")
            return finished
        if int(finished.get("epochs", 0)) >= config.epochs:
            print(f"{run_dir}: run already complete; nothing to do")
            return finished
        if backup_epoch(run_dir) < int(finished.get("epochs", 0)):
            raise UserError(f"{run_dir}: cannot extend to {config.epochs} epochs: the run's last training state "
                            "(backup/) is missing; start a new run with --epochs instead")
    if not resume and (run_dir / "history.csv").exists():
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or --out to start another")
    if len(train_set) == 0:
        raise UserError("the training split holds no images")
    if len(val_set) == 0:
        raise UserError(f"the validation set holds no readable images ({len(val_set.skipped)} skipped as unreadable)")
    if test_set is not None and len(test_set) == 0:
        raise UserError(f"--test: none of the test images could be decoded ({len(test_set.skipped)} skipped)")
    if config.patience and devices.process_count() > 1:
        raise UserError(f"--patience {config.patience}: not available with several processes (only process 0 "
                        "evaluates the hold-out); train with --epochs")
    if config.patience and config.holdout <= 0 and hooks.selection_set is None:
        raise UserError(f"--patience {config.patience} needs a hold-out to watch (--holdout > 0); early stopping "
                        "never looks at the validation set")
    if config.tensorboard:
        import importlib.util
        missing = [m for m in ("tensorflow", "tensorboard") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"--tensorboard: needs the package{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                            f"to write its event files (pip install {' '.join(missing)}), or drop --tensorboard")
    # A run that fails before its first epoch leaves no folder behind: remember the first folder created here.
    created = next((p for p in reversed((run_dir, *run_dir.parents)) if not p.exists()), None)
    try:
        return _train(run_dir, build_core, train_set, val_set, config, args, resume, extra_metadata, hooks, test_set)
    except BaseException:
        if created is not None and not (run_dir / "history.csv").exists() and devices.is_chief():
            shutil.rmtree(created, ignore_errors=True)
        raise


def _train(run_dir, build_core, train_set, val_set, config, args, resume, extra_metadata, hooks, test_set) -> dict:
    classes = train_set.classes
    chief = devices.is_chief()
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
    precision = set_precision(config.precision)
    seed_everything(config.seed)
    for stale in run_dir.glob(".*.tmp-*") if chief else ():  # left by a killed run's atomic writes
        stale.unlink(missing_ok=True)
    train_idx, holdout_idx = holdout_split(train_set, config, hooks.selection_set)
    fit_set = train_set.subset(train_idx)
    holdout_set = train_set.subset(holdout_idx) if hooks.selection_set is None else hooks.selection_set
    weights = (class_weights(fit_set.y, len(classes), config.class_weight_power)
               if config.class_weight else None)

    args = dict(args or {})
    meta = {"classes": list(classes), "image_size": int(train_set.x.shape[1]), "args": args,
            "config": dataclasses.asdict(config), "precision": precision, "versions": versions(),
            "train_images": len(fit_set), "holdout_images": len(holdout_set), "val_images": len(val_set),
            "train_counts": fit_set.counts(), "val_counts": val_set.counts(),
            "skipped_images": list(train_set.skipped) + list(val_set.skipped),
            "input": "uint8 RGB, shape (N, H, W, 3), preprocessing inside the model",
            # mean colour and apparent cell size, for inspect_model.py's warning on unlike images (domain.py)
            "image_stats": domain.image_stats(fit_set.x, seed=config.seed),
            **(extra_metadata or {})}
    if chief:
        write_json(run_dir / "args.json", {**args, "resolved_config": dataclasses.asdict(config),
                                           "precision": precision, "backend": keras.backend.backend(),
                                           "versions": versions(), "distribution": devices.describe(), "argv": sys.argv,
                                           "holdout_images": len(holdout_set), "train_images": len(fit_set)})

    done = [{k: _num(v) for k, v in r.items()} for r in read_history(run_dir / "history.csv")] if resume else []
    has_holdout = len(holdout_set) > 0
    if ((len(done) >= config.epochs or early_stop_due(done, config.patience, has_holdout))
            and (run_dir / "model.h5").exists()):
        # Killed after its last epoch, while the folder was being finished: finish it, train nothing again.
        rows = done[:config.epochs]
        if not chief:
            return _after_chief(run_dir)
        try:
            return finish_run(run_dir, rows, val_set, classes, config, meta,
                              float(np.nansum([float(r["seconds"]) for r in rows])), len(fit_set), test_set,
                              stopped_early=len(rows) < config.epochs)
        finally:
            devices.barrier("run finished")
    # An extended run is in progress again until it finishes: metrics.json marks a finished run.
    if chief:
        (run_dir / "metrics.json").unlink(missing_ok=True)

    passes = epoch_passes(len(fit_set), config)
    paired = None if hooks.paired_x is None else np.asarray(hooks.paired_x)[train_idx]
    # One epoch = one pass of the batches: stream.steps_per_epoch optimizer steps. A resumed fit continues after
    # the backup's epoch (BackupAndRestore), and so does the data order.
    batches = training_batches(fit_set, config, passes, paired)
    if hooks.wrap_batches:
        batches = hooks.wrap_batches(batches)
    stream = Endless(batches, start_epoch=backup_epoch(run_dir))
    fed = devices.local_share(stream)  # several JAX devices or processes: what each process feeds
    # The schedule spans config.epochs: a run extended with a larger --epochs continues on the longer cosine from
    # the step it reached (its optimizer step count is restored), so its learning rate rises to where the longer
    # schedule stands at that step and decays to the new end.
    core, train_model = build_and_compile(build_core, config, hooks, stream.steps_per_epoch)
    evaluator = EpochEvaluator(run_dir, core, holdout_set, val_set, passes * len(fit_set), config.batch_size,
                               meta, config.verbose,
                               (fit_set.x, config.bn_recalibrate, config.seed) if config.bn_recalibrate else None,
                               config.patience, hooks.history_columns)
    callbacks = [AtomicBackupAndRestore(str(run_dir / "backup")), evaluator]
    if config.tensorboard:  # after the evaluator, which adds the hold-out and validation figures to the logs
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False,
                                                     profile_batch=0))
    start = time.perf_counter()
    train_model.fit(fed, steps_per_epoch=stream.steps_per_epoch, epochs=config.epochs, class_weight=weights,
                    callbacks=callbacks, verbose=_fit_verbosity(config.verbose), shuffle=False)
    seconds = time.perf_counter() - start
    devices.end_distribution()
    if not chief:
        return _after_chief(run_dir)
    try:
        if evaluator.diverged_epoch:
            shutil.rmtree(run_dir / "backup", ignore_errors=True)  # never resume from NaN weights
            kept = (f"model.h5 keeps epoch {evaluator.selected_epoch}" if evaluator.selected_epoch
                    else "no model was saved")
            raise TrainingDiverged(f"loss became NaN in epoch {evaluator.diverged_epoch}; {kept}; "
                                   f"try a lower --lr (now {config.lr:g})")
        return finish_run(run_dir, evaluator.rows, val_set, classes, config, meta, seconds, len(fit_set),
                          test_set, stopped_early=evaluator.stopped_early)
    finally:
        devices.barrier("run finished")  # the other processes wait for the finished folder


def _after_chief(run_dir: Path) -> dict | None:
    """Processes other than 0: wait until process 0 has finished the run folder, then read its result."""
    devices.barrier("run finished")
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def holdout_split(train_set: ImageSet, config: TrainConfig, selection_set=None) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, hold-out indices) into train_set: a stratified hold-out (none with a selection set).
    Several copies of one file (e.g. raw + masked) stay together: a held-out image takes its copies along."""
    train_idx, holdout_idx = stratified_holdout(train_set.y, 0.0 if selection_set is not None else config.holdout,
                                                config.seed)
    if len(holdout_idx) and len(set(train_set.paths)) < len(train_set.paths):
        held = {train_set.paths[i] for i in holdout_idx}
        moved = np.asarray([i for i in train_idx if train_set.paths[i] in held], dtype=np.int64)
        train_idx, holdout_idx = np.setdiff1d(train_idx, moved), np.union1d(holdout_idx, moved)
    return train_idx, holdout_idx


def training_batches(fit_set: ImageSet, config: TrainConfig, passes: int, paired_x=None):
    """One epoch of training batches: the uint8 images (with their paired copies) in `passes` shuffled passes,
    or with --loader generator the report's ImageDataGenerator pipeline."""
    if config.loader == "generator":
        from legacy import legacy_training_data
        return legacy_training_data(fit_set, config, paired_x)
    y_onehot = keras.utils.to_categorical(fit_set.y, len(fit_set.classes)).astype("float32")
    fit_x = fit_set.x if paired_x is None else [fit_set.x, paired_x]
    return ArrayBatches(fit_x, y_onehot, config.batch_size, config.seed, passes)


def build_and_compile(build_core, config: TrainConfig, hooks: Hooks, steps_per_epoch: int):
    """(core model, compiled training model), built inside the distribution scope."""
    with distribution_scope():
        core = build_core()
        if hooks.before_fit:
            hooks.before_fit(core)
        train_model = (hooks.build_train_model(core, config, steps_per_epoch) if hooks.build_train_model
                       else augment.with_augmentation(core, None if config.loader == "generator" else config.augment,
                                                      config.seed))
        devices.synchronize_batchnorm(core, True)
        optimizer = make_optimizer(config, steps_per_epoch)
        if hooks.compile_model:
            hooks.compile_model(train_model, optimizer, config)
        else:
            train_model.compile(optimizer=optimizer,
                                loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
                                metrics=["accuracy"])
    return core, train_model


def epoch_passes(n_images: int, config: TrainConfig) -> int:
    """Passes over the training images per epoch: enough for config.min_steps optimizer steps."""
    if not config.min_steps or config.loader == "generator" or n_images == 0:
        return 1
    return max(1, math.ceil(config.min_steps * config.batch_size / n_images))


def _fit_verbosity(verbose: int):
    # Keras' progress bar on a terminal; in logs and CI the evaluator's one line per epoch is enough.
    return 1 if verbose and sys.stdout.isatty() else 0


def finish_run(run_dir: Path, rows: list[dict], val_set: ImageSet, classes, config: TrainConfig, meta: dict,
               seconds: float, n_train: int, test_set: ImageSet | None = None, stopped_early: bool = False) -> dict:
    """Final metrics from the selected model on the validation set (and once on test_set); plots; metadata
    into model.h5."""
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
        "stopped_early": bool(stopped_early), "patience": config.patience,
    }
    if test_set is not None:
        test_probs = predict(core, test_set.x, config.batch_size)
        result["test"] = {"data": (meta.get("args") or {}).get("test"),
                          "images": len(test_set), "counts": test_set.counts(),
                          "skipped_images": list(test_set.skipped),
                          **wbc_metrics.classification_metrics(test_set.y, test_probs, classes)}
        write_predictions(run_dir / "test_predictions.csv", test_set, test_probs, classes)
    for key in ("mask_counts", "mask_mode"):
        if key in meta:
            result[key] = meta[key]
    summary = {k: result[k] for k in ("val_accuracy_selected", "balanced_accuracy", "macro_f1", "majority_baseline",
                                      "collapsed_to_majority", "selected_epoch")}
    update_h5_metadata(model_path, metrics=summary)
    report.plot_curves(rows, run_dir / "curves.png", selected, title=run_dir.name)
    report.plot_confusion(m["confusion_matrix"], classes, run_dir / "confusion.png",
                          title=f"{run_dir.name}: validation, epoch {selected} "
                                f"({'selected on hold-out' if meta.get('holdout_images') else 'last epoch'})")
    if config.tensorboard:
        tensorboard_image(run_dir / "tensorboard" / "validation", "confusion_matrix", run_dir / "confusion.png",
                          selected)
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


def tensorboard_image(log_dir: Path, name: str, png: Path, step: int):
    """A PNG into TensorBoard's Images tab (tf.summary.image; TensorFlow writes the event files)."""
    import tensorflow as tf
    image = tf.image.decode_png(tf.io.read_file(str(png)), channels=3)[None]
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        tf.summary.image(name, image, step=step)
    writer.close()


def write_predictions(path: Path, images: ImageSet, probs: np.ndarray, classes):
    """One row per image: path, true class, predicted class, correct, a probability per class."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true", "predicted", "correct"] + [f"p_{c}" for c in classes])
    pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
    for p, t, q, pr in zip(images.paths, images.y, pred, probs):
        w.writerow([p, classes[t], classes[q], int(t == q)] + [f"{v:.6f}" for v in pr])
    atomic_write_text(path, buf.getvalue())


def print_summary(run_dir: Path, result: dict | None):
    if not devices.is_chief():
        print(f"process {devices.process_index()} of {devices.process_count()}: done; process 0 wrote {run_dir}")
        return
    print(f"\nrun folder: {run_dir}")
    print(f"  val accuracy (epoch {result['selected_epoch']}, {result.get('selection', 'selected on hold-out')}): {result['val_accuracy_selected']:.4f}"
          f"   best/mean/last over epochs: {result['val_accuracy_best']:.4f} / {result['val_accuracy_mean']:.4f} / "
          f"{result['val_accuracy_last']:.4f}")
    print(f"  balanced accuracy {result['balanced_accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   "
          f"majority baseline {result['majority_baseline']:.4f}"
          + ("   COLLAPSED to one class" if result["collapsed_to_majority"] else ""))
