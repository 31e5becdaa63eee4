"""Semi-supervised training on unlabeled images, FixMatch-style (train_cnn.py --unlabeled; docs/ssl.md).

Each training step sees a batch of labelled images and `ratio` times as many unlabeled ones. The model's
prediction on a weakly augmented view of an unlabeled image (the run's own augmentation) becomes its pseudo-label
when confident enough; the model is then trained to give that label to a strongly augmented view of the same
image (the weak augmentation plus colour jitter, greyscale and blur). After Sohn et al., "FixMatch", NeurIPS 2020.

How confident is confident enough: `fixed` (the default) is FixMatch's one bar for every class; `per-class` lowers
it for the classes the model rarely predicts on the pool, in proportion to their running share of the predictions
(FreeMatch's class-wise scaling, Wang et al., ICLR 2023, on FixMatch's bar), so that the rare basophils' pool images
can keep their own label (docs/ssl.md).

With a teacher (`--teacher MODEL`) the pool serves as in SimCLRv2's last step (Chen et al., NeurIPS 2020: pre-train,
fine-tune, then distil on the unlabeled images): a fixed, already trained model's probabilities on each pool image
are the soft target of the model being trained on its augmented view. The teacher never learns, so its targets
cannot drift towards what the student already predicts, the confirmation bias of pseudo-labels the model makes
itself (docs/ssl.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import augment
from runfiles import UserError

# The strong view's photometric part: SimCLR's colour jitter, greyscale and blur (augment.make_two_views), the
# project's stand-in for FixMatch's RandAugment, which has no built-in Keras 3 layer working on uint8 batches.
STRONG = dict(color_jitter=0.5, grayscale=0.2, blur=0.5)
THRESHOLDS = ("fixed", "per-class")


def confidence_bar(threshold: float, label_smoothing: float, num_classes: int) -> float:
    """The probability a pseudo-label needs: `threshold` of the most confident prediction the loss asks for.

    Why: with label smoothing e the training target of the true class is 1 - e + e/K, so a well-trained model's
    top probability settles near it (0.92 for e = 0.1, K = 5) and FixMatch's 0.95 would never be reached."""
    return float(threshold) * (1.0 - label_smoothing + label_smoothing / num_classes)


def _class_weight_vector(num_classes: int, class_weights: dict | None) -> np.ndarray:
    """The labelled loss's class weights ({class: weight}, or None: all 1) as one weight per class."""
    w = np.ones(num_classes, "float32")
    for c, v in (class_weights or {}).items():
        w[int(c)] = v
    return w


def _add_pool_averages(layer, num_classes: int, rate_column: str) -> None:
    """The moving averages a wrapper layer keeps for history.csv (pool_columns): layer.confidence (top probability)
    and layer.share (class shares), both starting at 1/K, and layer.rate, a share of pool images starting at 0,
    whose column is rate_column. Non-trainable weights: saved with the backup, so a resumed run continues them;
    aggregation "mean": under several TensorFlow replicas each updates them from its share of the batch."""
    import keras
    start = keras.initializers.Constant(1.0 / num_classes)
    layer.confidence = layer.add_weight(shape=(), initializer=start, trainable=False, aggregation="mean",
                                        name="pool_confidence")
    layer.share = layer.add_weight(shape=(num_classes,), initializer=start, trainable=False, aggregation="mean",
                                   name="pool_share")
    layer.rate = layer.add_weight(shape=(), initializer="zeros", trainable=False, aggregation="mean",
                                  name=rate_column)
    layer.rate_column = rate_column


def _pool_wrapper(inner_model, layer, suffix: str):
    """[labelled, unlabeled] uint8 inputs of inner_model's size -> `layer`'s output: a training-only model."""
    import keras
    size = inner_model.input_shape[1]
    labelled = keras.Input((size, size, 3), dtype="uint8", name="image")
    unlabeled = keras.Input((size, size, 3), dtype="uint8", name="unlabeled_image")
    return keras.Model([labelled, unlabeled], layer([labelled, unlabeled]), name=f"{inner_model.name}_{suffix}")


def fixmatch_model(weak_model, num_classes: int, bar: float, weight: float, class_weights: dict | None,
                   seed: int, strong: dict | None = None, per_class: bool = False, momentum: float = 0.99):
    """Training-only wrapper: [labelled, unlabeled] uint8 -> the labelled images' probabilities, with the
    unlabeled loss added (add_loss).

    weak_model: uint8 images -> probabilities with the run's own augmentation (training.train's standard
    training model). All three parts go through it as ONE batch, so batch norm sees labelled and unlabeled images
    together, as in FixMatch. Unlabeled loss: the mean over unlabeled images of
    [max p_weak >= bar of its class] * w[pseudo] * cross-entropy(p_strong, pseudo), times `weight`; w = class
    weights as the labelled loss computes them (semisup.hooks: from the whole labelled split, before the hold-out is
    taken), so a rare class's pseudo-labels count about as its labels do. No gradient flows through the
    pseudo-labels.

    Bars: `bar` for every class, or with `per_class` bar x share[c] / max(share), share being a moving average
    (`momentum`) of the probabilities on the pool's weak views, starting at 1/K: every bar starts at `bar`, the
    best-predicted class keeps it. A moving average of the top probability and of the share of pool images over
    their bar are kept too, in both modes (non-trainable weights, saved with the backup, so a resumed run continues
    them); semisup.pool_columns reads them into history.csv."""
    import keras
    from keras import ops

    strong_layers = augment.photometric_layers(**(strong or STRONG), seed=int(seed) + 200)
    w = _class_weight_vector(num_classes, class_weights)

    class FixMatch(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.weak_model = weak_model
            self.strong_layers = strong_layers
            self.momentum = float(momentum)
            _add_pool_averages(self, num_classes, "pool_used")

        def call(self, inputs, training=None):
            labelled, unlabeled = inputs
            strong_view = unlabeled
            for layer in self.strong_layers:
                strong_view = layer(strong_view, training=training)
            n, u = ops.shape(labelled)[0], ops.shape(unlabeled)[0]
            probs = ops.cast(self.weak_model(ops.concatenate([labelled, unlabeled, strong_view], axis=0),
                                             training=training), "float32")
            p_labelled, p_weak, p_strong = probs[:n], probs[n:n + u], probs[n + u:]
            p_weak = ops.stop_gradient(p_weak)
            pseudo = ops.argmax(p_weak, axis=-1)
            top = ops.max(p_weak, axis=-1)
            m = self.momentum
            confidence = m * self.confidence + (1 - m) * ops.mean(top)
            share = m * self.share + (1 - m) * ops.mean(p_weak, axis=0)
            if per_class:
                confident = ops.cast(top >= ops.take(bar * share / ops.max(share), pseudo), "float32")
            else:
                confident = ops.cast(top >= bar, "float32")
            if training:
                self.confidence.assign(confidence)
                self.share.assign(share)
                self.rate.assign(m * self.rate + (1 - m) * ops.mean(confident))
            class_w = ops.take(ops.convert_to_tensor(w), pseudo)
            ce = -ops.sum(ops.one_hot(pseudo, num_classes) * ops.log(ops.clip(p_strong, 1e-7, 1.0)), axis=-1)
            self.add_loss(weight * ops.mean(confident * class_w * ce))
            return p_labelled

        def compute_output_shape(self, input_shapes):
            return (input_shapes[0][0], num_classes)

    return _pool_wrapper(weak_model, FixMatch(name="fixmatch", dtype="float32"), "fixmatch")


def distill_model(student_model, teacher, num_classes: int, weight: float, class_weights: dict | None,
                  momentum: float = 0.99):
    """Training-only wrapper for --teacher: [labelled, unlabeled] uint8 -> the labelled images' probabilities, with
    the distillation loss added (add_loss).

    student_model: uint8 images -> probabilities with the run's own augmentation; labelled and unlabeled images go
    through it as one batch, as in fixmatch_model. teacher: a trained model of the same classes and input, frozen,
    called in inference mode on the unlabeled images as they are (no augmentation: its best targets; the student
    learns them on its augmented views, as in Noisy Student). Loss: `weight` x the mean over unlabeled images of
    w[teacher's class] x cross-entropy(teacher's probabilities, student's), w the labelled loss's class weights,
    so a rare class's pool images count about as its labels do. Moving averages (`momentum`) of the student's top
    probability, its class shares on the pool and its agreement with the teacher's classes are kept for
    history.csv (pool_columns)."""
    import keras
    from keras import ops

    teacher.trainable = False
    w = _class_weight_vector(num_classes, class_weights)

    class Distill(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.student_model = student_model
            self.teacher = teacher
            self.momentum = float(momentum)
            _add_pool_averages(self, num_classes, "pool_agreement")

        def call(self, inputs, training=None):
            labelled, unlabeled = inputs
            n = ops.shape(labelled)[0]
            probs = ops.cast(self.student_model(ops.concatenate([labelled, unlabeled], axis=0), training=training),
                             "float32")
            p_labelled, p_pool = probs[:n], probs[n:]
            target = ops.stop_gradient(ops.cast(self.teacher(unlabeled, training=False), "float32"))
            teacher_class = ops.argmax(target, axis=-1)
            if training:
                m = self.momentum
                self.confidence.assign(m * self.confidence + (1 - m) * ops.mean(ops.max(p_pool, axis=-1)))
                self.share.assign(m * self.share + (1 - m) * ops.mean(p_pool, axis=0))
                agree = ops.cast(ops.argmax(p_pool, axis=-1) == teacher_class, "float32")
                self.rate.assign(m * self.rate + (1 - m) * ops.mean(agree))
            class_w = ops.take(ops.convert_to_tensor(w), teacher_class)
            ce = -ops.sum(target * ops.log(ops.clip(p_pool, 1e-7, 1.0)), axis=-1)
            self.add_loss(weight * ops.mean(class_w * ce))
            return p_labelled

        def compute_output_shape(self, input_shapes):
            return (input_shapes[0][0], num_classes)

    return _pool_wrapper(student_model, Distill(name="distill", dtype="float32"), "distill")


def pool_columns(classes):
    """training.Hooks.history_columns: the wrapper's moving averages at the end of each epoch, for history.csv:
    pool_confidence (top probability), pool_share_<class> (that class's probability on the pool's weak views) and
    pool_used (FixMatch: share of pool images whose pseudo-label passed its bar) or pool_agreement (distillation:
    share of pool images given the teacher's class)."""
    def columns(train_model) -> dict:
        from keras import ops
        layer = next(layer for layer in train_model.layers if layer.name in ("fixmatch", "distill"))
        share = ops.convert_to_numpy(layer.share)
        return {layer.rate_column: float(ops.convert_to_numpy(layer.rate)),
                "pool_confidence": float(ops.convert_to_numpy(layer.confidence)),
                **{f"pool_share_{c}": float(v) for c, v in zip(classes, share)}}
    return columns


# Total variation between the pool's predicted class mix and the labelled split's above which a run is warned.
# On PBC's WBC_1 a pool of the labelled population ended at 0.02-0.04, a pool of another class mix at 0.36-0.44
# (docs/ssl.md); 0.2 lies between.
MIX_WARNING_DISTANCE = 0.2


def pool_mix_warning(run_dir, labels, classes) -> str | None:
    """One line when the model's predicted class mix on the pool (history.csv's last pool_share_* columns) lies far
    from the labelled split's class mix: pseudo-labels of another mix pull the model's prior towards it."""
    import csv
    try:
        with open(Path(run_dir) / "history.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
        pool = np.array([float(last[f"pool_share_{c}"]) for c in classes])
    except (OSError, IndexError, KeyError, ValueError):
        return None
    labelled = np.bincount(np.asarray(labels), minlength=len(classes)) / max(1, len(labels))
    distance = 0.5 * float(np.abs(pool - labelled).sum())
    if distance <= MIX_WARNING_DISTANCE:
        return None
    shares = ", ".join(f"{c} {p:.2f} vs {q:.2f}" for c, p, q in zip(classes, pool, labelled))
    return (f"warning: on the unlabeled pool the model predicts a class mix far from the labelled images' "
            f"(total variation {distance:.2f}; pool vs labelled: {shares}); pseudo-labels of another mix pull the "
            f"model towards it: a pool from the labelled images' own population is safer (docs/ssl.md)")


def ema_momentum(steps_per_epoch: int) -> float:
    """The moving averages' momentum: an average over about one epoch's steps. FreeMatch's 0.999 spans 1,000
    of its 1,000,000 steps; a run here has 20-70 steps per epoch and 30 epochs, where 0.999 would barely move
    from its start in the whole run."""
    return 1.0 - 1.0 / max(2, int(steps_per_epoch))


def with_unlabeled_batches(pool_x: np.ndarray, ratio: int, seed: int):
    """training.Hooks.wrap_batches: each labelled batch gets ratio x its size unlabeled images from pool_x."""
    import keras

    class WithUnlabeled(keras.utils.PyDataset):
        """(labelled x, unlabeled x), y per step. The unlabeled rows are drawn without replacement from a
        generator seeded by (seed, epoch, step): the same step of the same epoch reads the same images, however
        the stream is read or resumed (feeding.Endless counts epochs through on_epoch_end)."""

        def __init__(self, batches):
            super().__init__()
            self.batches = batches
            self.epoch = 0

        def __len__(self):
            return len(self.batches)

        def on_epoch_end(self):
            self.batches.on_epoch_end()
            self.epoch += 1

        def __getitem__(self, step):
            x, y = self.batches[step]
            n = min(len(pool_x), ratio * len(y))
            rng = np.random.default_rng([int(seed), self.epoch, int(step)])
            rows = np.sort(rng.choice(len(pool_x), n, replace=False))
            return (x, pool_x[rows]), y

    return WithUnlabeled


def hooks(base_hooks, pool_x: np.ndarray, labels, classes, config, ratio: int, weight: float, threshold: float,
          thresholds: str = "fixed", teacher=None):
    """base_hooks (training.Hooks) turned semi-supervised: the FixMatch wrapper (or with `teacher`, a loaded
    model, the distillation wrapper) around base_hooks' training model (or the standard augmented one), unlabeled
    images added to every batch, the pool's moving averages in history.csv."""
    import dataclasses

    import training
    num_classes = len(classes)
    bar = confidence_bar(threshold, config.label_smoothing, num_classes)
    weights = (training.class_weights(labels, num_classes, config.class_weight_power)
               if config.class_weight else None)
    base_build = base_hooks.build_train_model

    def build(core, config, steps_per_epoch):
        weak = (base_build(core, config, steps_per_epoch) if base_build
                else augment.with_augmentation(core, config.augment, config.seed))
        if teacher is not None:
            return distill_model(weak, teacher, num_classes, weight, weights, momentum=ema_momentum(steps_per_epoch))
        return fixmatch_model(weak, num_classes, bar, weight, weights, config.seed,
                              per_class=thresholds == "per-class", momentum=ema_momentum(steps_per_epoch))

    return dataclasses.replace(base_hooks, build_train_model=build,
                               wrap_batches=with_unlabeled_batches(pool_x, ratio, config.seed),
                               history_columns=pool_columns(classes))


def load_teacher(path: Path, classes, image_size: int, frame_share: float):
    """--teacher MODEL: (the model, what the metadata records about it). It must have been trained on these
    classes, at this image size and framing, as a model saved by this project records them; otherwise one line
    naming both."""
    import framing
    from runfiles import load_core_model, read_h5_metadata
    from selfsup import file_sha256
    model = load_core_model(path)
    meta = read_h5_metadata(path)
    what = "expected a model.h5 of train_cnn.py or train_masked.py trained on this run's classes and image size"
    if "classes" not in meta or "image_size" not in meta:
        raise UserError(f"--teacher {path}: no training metadata ({what})")
    if list(meta["classes"]) != list(classes):
        raise UserError(f"--teacher {path}: classes {', '.join(meta['classes'])}; this run's are "
                        f"{', '.join(classes)} ({what})")
    if int(meta["image_size"]) != int(image_size):
        raise UserError(f"--teacher {path}: trained at {meta['image_size']} px, this run at {image_size} px ({what})")
    share = framing.frame_share(meta) or 0.0
    if abs(share - (frame_share or 0.0)) > 1e-9:
        raise UserError(f"--teacher {path}: its images framed at {share or 'none'}, this run's at "
                        f"{frame_share or 'none'} (expected the same --frame-cell: the teacher sees the run's pool)")
    return model, {"path": str(path), "sha256": file_sha256(path)}


def from_args(args, base_hooks, train_set, val_set, config):
    """(hooks, metadata) for train_cnn.py --unlabeled: the pool decoded like the training images (validation
    images refused), the teacher when --teacher is given, and what model.h5's metadata records about them."""
    import cli
    import data
    import selfsup
    num_classes = len(train_set.classes)
    teacher, teacher_info = None, None
    if args.teacher is not None:  # before the pool's decoding: a wrong file answers at once
        teacher, teacher_info = load_teacher(args.teacher, train_set.classes, args.image_size,
                                             getattr(args, "frame_cell", 0.0))
    # Every validation file found, the ones decoding skipped included: none may enter the pool.
    val_files = list(val_set.paths) + list(val_set.skipped)
    pool_files, pool_info = selfsup.gather_pool(args.unlabeled, [], val_files, args.data)
    pool = data.load_images(pool_files, verbose=not args.quiet, name="unlabeled", **cli.decode_options(args))
    if not args.quiet:
        print(f"unlabeled: {len(pool)} images from {', '.join(pool_info['sources'])}")
    semi = hooks(base_hooks, pool.x, train_set.y, train_set.classes, config, args.unlabeled_ratio,
                 args.unlabeled_weight, args.threshold, args.thresholds, teacher=teacher)
    common = {"unlabeled_images": len(pool), "sources": pool_info["sources"], "ratio": args.unlabeled_ratio,
              "weight": args.unlabeled_weight}
    if teacher is not None:
        return semi, {"semi_supervised": {"method": "distillation", "teacher": teacher_info, **common}}
    meta = {"semi_supervised": {"method": "fixmatch", "thresholds": args.thresholds, **common,
                                "threshold": args.threshold,
                                "confidence_bar": confidence_bar(args.threshold, config.label_smoothing,
                                                                 num_classes)}}
    return semi, meta
