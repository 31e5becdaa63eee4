"""Feeding the model: batch streams for fit, batched prediction, and batch-norm recalibration.

fit reads one endless stream (Endless over ArrayBatches): under TensorFlow a finite dataset gets a fresh tf.data
iterator every epoch, and tearing the old one down waits for tf.data's autotuning thread.
"""
from __future__ import annotations

import math

import keras
import numpy as np


def predict(model: keras.Model, x, batch_size: int = 64, views=None) -> np.ndarray:
    """Class probabilities for uint8 images x (N, H, W, 3), read batch by batch (x may be memory-mapped).

    views: functions of a batch (N, H, W, 3) -> batch; each batch's probabilities are then the mean over its
    views (test-time augmentation, adapt.py). None: the batch as it is.

    predict_on_batch, not model.predict: under TensorFlow, model.predict builds a tf.data iterator per call
    and tearing it down waits for tf.data's autotuning thread; timed once on a 2-core x86-64 CPU, that halved the speed of the
    per-epoch hold-out and validation passes (about 500 against 990 images/s at 224 px)."""
    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    strategy = getattr(model, "distribute_strategy", None)
    replicas = strategy is not None and strategy.num_replicas_in_sync > 1

    def run(batch):
        if replicas:  # predict_on_batch would give every replica the whole batch; predict splits it between them
            return model.predict(batch, batch_size=batch_size, verbose=0)
        return model.predict_on_batch(batch)
    if replicas and views is None:
        return np.asarray(run(x), dtype=np.float32)

    def probs(batch):
        if views is None:
            return np.asarray(run(batch), dtype=np.float32)
        return np.mean([np.asarray(run(view(batch)), np.float64) for view in views], 0).astype(np.float32)
    return np.concatenate([probs(x[start:start + batch_size]) for start in range(0, len(x), batch_size)])


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
    (tools/bn_recalibration_check.py, docs/results.md).
    """
    norms = [l for l in _nested_layers(core) if isinstance(l, keras.layers.BatchNormalization) and l.trainable]
    count = min(int(n_images or 0), len(images))
    batch_size = min(batch_size, count)  # a split smaller than a batch (WBC_1) is one batch
    if not norms or batch_size < 2:
        return 0
    count = count // batch_size * batch_size
    rows = np.random.default_rng(seed).permutation(len(images))[:count]
    batches = (images[np.sort(rows[start:start + batch_size])] for start in range(0, count, batch_size))
    dropouts = [l for l in _nested_layers(core) if isinstance(l, keras.layers.Dropout)]
    momenta, rates = [l.momentum for l in norms], [l.rate for l in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        if keras.backend.backend() == "jax":
            _recalibrate_compiled(core, norms, batches)
        else:
            for k, batch in enumerate(batches, start=1):
                for layer in norms:  # moving = moving * (k-1)/k + batch / k: the running mean over batches
                    layer.momentum = (k - 1) / k
                core(batch, training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    return count


def _recalibrate_compiled(core: keras.Model, norms: list, batches) -> None:
    """recalibrate_batchnorm's passes as one compiled JAX function: each batch's statistics of every layer in
    norms (momentum 0: the moving values become the batch's), averaged, then set. Why: called eagerly, JAX
    compiles each operation of the model on its own, a few seconds a run on a CPU, once per process."""
    import jax
    for layer in norms:
        layer.momentum = 0.0
    index = {id(v): i for i, v in enumerate(core.non_trainable_variables)}
    slots = [(index[id(l.moving_mean)], index[id(l.moving_variance)]) for l in norms]

    @jax.jit
    def statistics(trainable, non_trainable, x):
        _, updated = core.stateless_call(trainable, non_trainable, x, training=True)
        return [(updated[m], updated[v]) for m, v in slots]

    trainable = [v.value for v in core.trainable_variables]
    non_trainable = [v.value for v in core.non_trainable_variables]
    sums, n = None, 0
    for batch in batches:
        stats = [(np.asarray(m, np.float64), np.asarray(v, np.float64))
                 for m, v in statistics(trainable, non_trainable, batch)]
        sums = stats if sums is None else [(a + m, b + v) for (a, b), (m, v) in zip(sums, stats)]
        n += 1
    for layer, (mean, variance) in zip(norms, sums):
        layer.moving_mean.assign((mean / n).astype(layer.moving_mean.dtype))
        layer.moving_variance.assign((variance / n).astype(layer.moving_variance.dtype))



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
    the old one down waits for tf.data's autotuning thread, on a 2-core x86-64 CPU about as long as the epoch
    itself in roughly half the epochs (100 instead of 190 images/s for the default CNN at 224 px). One
    iterator for the whole fit has no such pause. Batch `index` is always step index % len(b) of pass
    index // len(b), however far a prefetching reader runs ahead of the epoch callbacks.

    start_epoch: a resumed run's fit counts batches from 0 again, but its data must continue from the restored
    epoch: the shuffling generator is advanced over the finished epochs' orders, so the resumed run reads the
    batches the uninterrupted run read."""

    def __init__(self, batches, start_epoch: int = 0):
        super().__init__()
        self.batches = batches
        self.steps_per_epoch = len(batches)
        for _ in range(int(start_epoch)):
            batches.on_epoch_end()
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
