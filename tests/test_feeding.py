"""training.py's feeding of model.fit and predict: ArrayBatches, Endless, predict, batch-norm recalibration."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import keras
import feeding
from conftest import JAX_ENV, PROJECT


def ids_of(batch_x):
    return batch_x[:, 0, 0, 0].astype(int).tolist()


def test_array_batches_show_every_image_passes_times_per_epoch_with_its_label():
    n, batch = 10, 4
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    y = np.arange(n) * 10
    batches = feeding.ArrayBatches(x, y, batch, seed=3, passes=2)
    assert len(batches) == 5  # 20 images in batches of 4

    def one_epoch():
        seen = []
        for step in range(len(batches)):
            bx, by = batches[step]
            assert len(bx) == len(by) <= batch
            assert (by == np.asarray(ids_of(bx)) * 10).all()  # each image with its own label
            seen += ids_of(bx)
        return seen

    first = one_epoch()
    assert sorted(first) == sorted(list(range(n)) * 2)
    batches.on_epoch_end()
    second = one_epoch()
    assert sorted(second) == sorted(first) and second != first  # a new order, the same images
    same_seed = feeding.ArrayBatches(x, y, batch, seed=3, passes=2)
    assert sum((ids_of(same_seed[s][0]) for s in range(len(same_seed))), []) == first


def test_array_batches_keep_paired_arrays_aligned():
    n = 7
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    paired = 100 + x
    (bx, bp), by = feeding.ArrayBatches([x, paired], np.arange(n), 3, seed=0)[1]
    assert (bp == bx + 100).all() and ids_of(bx) == by.tolist()


class CountingBatches(keras.utils.PyDataset):
    def __init__(self, steps):
        super().__init__()
        self.steps, self.epoch_ends = steps, 0

    def __len__(self):
        return self.steps

    def on_epoch_end(self):
        self.epoch_ends += 1

    def __getitem__(self, step):
        return (self.epoch_ends, step)


def test_endless_maps_every_index_to_its_pass_and_step_however_far_a_reader_runs_ahead():
    inner = CountingBatches(3)
    stream = feeding.Endless(inner)
    assert stream.num_batches is None and stream.steps_per_epoch == 3
    assert stream[0] == (0, 0) and stream[1] == (0, 1)
    assert stream[7] == (2, 1)  # read ahead two passes: on_epoch_end ran once per pass
    assert inner.epoch_ends == 2
    assert stream[8] == (2, 2) and inner.epoch_ends == 2


def test_fit_on_an_endless_stream_runs_steps_per_epoch_and_learns(tmp_path):
    keras.utils.set_random_seed(0)  # the initial weights: otherwise whatever the tests before left the seed at
    rng = np.random.default_rng(0)
    n = 40
    y = np.arange(n) % 2
    x = (y[:, None, None, None] * 200 + rng.integers(0, 40, (n, 4, 4, 3))).astype(np.uint8)
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy", metrics=["accuracy"])
    steps = []

    class CountSteps(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            steps.append(0)

        def on_train_batch_end(self, batch, logs=None):
            steps[-1] += 1

    stream = feeding.Endless(feeding.ArrayBatches(x, keras.utils.to_categorical(y, 2), 8, seed=0))
    history = model.fit(stream, steps_per_epoch=stream.steps_per_epoch, epochs=4, verbose=0, shuffle=False,
                        callbacks=[CountSteps()])
    assert steps == [5, 5, 5, 5]
    # learned: the trained model separates the two classes (the last epoch's running accuracy also counts the
    # batches before its last updates, so it is not the measure)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert model.evaluate(x, keras.utils.to_categorical(y, 2), verbose=0)[1] == 1.0


def test_predict_in_batches_matches_keras_predict_including_a_partial_batch_and_no_images():
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).integers(0, 255, (11, 4, 4, 3)).astype(np.uint8)
    ours = feeding.predict(model, x, batch_size=4)
    assert ours.shape == (11, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert feeding.predict(model, x[:0]).shape == (0, 3)


def test_predict_averages_the_views_of_each_batch(tmp_path):
    """views (test-time augmentation): each batch's probabilities are the mean of the model's on each view,
    here over a memory-mapped array and a partial last batch."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 3))
    # Rescaled to 0..1, so that the softmax is not saturated and a flipped image gets other probabilities.
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255, dtype="float32")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", dtype="float32")(flat))
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(11, 4, 4, 3))
    x[:] = np.random.default_rng(2).integers(0, 255, x.shape)
    flip = lambda batch: np.asarray(batch)[:, :, ::-1]  # noqa: E731
    ours = feeding.predict(model, x, 4, views=[lambda batch: batch, flip])
    expected = (model.predict(np.asarray(x), verbose=0) + model.predict(flip(x), verbose=0)) / 2
    assert ours.shape == (11, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(ours - feeding.predict(model, x, 4)).max() > 1e-3  # the flipped view counted


def small_bn_model():
    f32 = dict(dtype="float32")  # whatever precision policy an earlier test left set: exact statistics here
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Rescaling(1 / 255, **f32)(inputs)
    x = keras.layers.BatchNormalization(name="bn_input", **f32)(x)
    x = keras.layers.Dropout(0.5, name="drop", **f32)(x)
    x = keras.layers.Conv2D(2, 1, name="conv", **f32)(x)
    x = keras.layers.BatchNormalization(name="bn_conv", **f32)(x)
    outputs = keras.layers.Dense(2, activation="softmax", **f32)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def test_recalibrate_batchnorm_sets_the_average_of_batch_statistics_and_restores_everything_else():
    model = small_bn_model()
    images = np.random.default_rng(0).integers(0, 255, (50, 4, 4, 3)).astype(np.uint8)
    bn = model.get_layer("bn_input")
    gamma_before = np.asarray(bn.gamma).copy()
    conv_before = [np.asarray(w).copy() for w in model.get_layer("conv").weights]

    used = feeding.recalibrate_batchnorm(model, images, n_images=40, batch_size=8, seed=1)

    assert used == 40  # five full batches of 8
    rows = np.random.default_rng(1).permutation(50)[:40]
    batches = [images[np.sort(rows[i:i + 8])].astype(np.float64) / 255 for i in range(0, 40, 8)]
    expected_mean = np.mean([b.mean(axis=(0, 1, 2)) for b in batches], axis=0)
    expected_var = np.mean([b.var(axis=(0, 1, 2)) for b in batches], axis=0)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), expected_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), expected_var, rtol=1e-3, atol=1e-6)
    assert bn.momentum == 0.99 and model.get_layer("drop").rate == 0.5
    np.testing.assert_array_equal(np.asarray(bn.gamma), gamma_before)
    for w, before in zip(model.get_layer("conv").weights, conv_before):
        np.testing.assert_array_equal(np.asarray(w), before)


def test_recalibrate_batchnorm_leaves_models_without_trainable_batchnorm_alone():
    images = np.zeros((16, 4, 4, 3), np.uint8)
    inputs = keras.Input((4, 4, 3))
    plain = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    assert feeding.recalibrate_batchnorm(plain, images, 16, 8, 0) == 0
    frozen = small_bn_model()
    for layer in frozen.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    before = np.asarray(frozen.get_layer("bn_input").moving_mean).copy()
    assert feeding.recalibrate_batchnorm(frozen, images, 16, 8, 0) == 0
    np.testing.assert_array_equal(np.asarray(frozen.get_layer("bn_input").moving_mean), before)
    assert feeding.recalibrate_batchnorm(small_bn_model(), images[:1], 16, 8, 0) == 0  # one image: no statistics
    assert feeding.recalibrate_batchnorm(small_bn_model(), images[:5], 16, 8, 0) == 5  # fewer than a batch: one batch


def test_recalibrate_batchnorm_under_jax_compiles_the_same_statistics():
    """Under JAX the passes run as one compiled function (feeding._recalibrate_compiled): the same averages,
    checked by the two tests above in a JAX process."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    code = ("import test_feeding as t; t.test_recalibrate_batchnorm_sets_the_average_of_batch_statistics_and_"
            "restores_everything_else(); t.test_recalibrate_batchnorm_leaves_models_without_trainable_batchnorm_"
            "alone(); import keras; print(keras.backend.backend())")
    env = {**os.environ, **JAX_ENV,
           "PYTHONPATH": os.pathsep.join([JAX_ENV["PYTHONPATH"], str(PROJECT / "tests"), str(PROJECT)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "jax"
