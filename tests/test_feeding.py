"""training.py's feeding of model.fit and predict: ArrayBatches, Endless, predict."""
import numpy as np

import keras
import training


def ids_of(batch_x):
    return batch_x[:, 0, 0, 0].astype(int).tolist()


def test_array_batches_show_every_image_passes_times_per_epoch_with_its_label():
    n, batch = 10, 4
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    y = np.arange(n) * 10
    batches = training.ArrayBatches(x, y, batch, seed=3, passes=2)
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
    same_seed = training.ArrayBatches(x, y, batch, seed=3, passes=2)
    assert sum((ids_of(same_seed[s][0]) for s in range(len(same_seed))), []) == first


def test_array_batches_keep_paired_arrays_aligned():
    n = 7
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    paired = 100 + x
    (bx, bp), by = training.ArrayBatches([x, paired], np.arange(n), 3, seed=0)[1]
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
    stream = training.Endless(inner)
    assert stream.num_batches is None and stream.steps_per_epoch == 3
    assert stream[0] == (0, 0) and stream[1] == (0, 1)
    assert stream[7] == (2, 1)  # read ahead two passes: on_epoch_end ran once per pass
    assert inner.epoch_ends == 2
    assert stream[8] == (2, 2) and inner.epoch_ends == 2


def test_fit_on_an_endless_stream_runs_steps_per_epoch_and_learns(tmp_path):
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

    stream = training.Endless(training.ArrayBatches(x, keras.utils.to_categorical(y, 2), 8, seed=0))
    history = model.fit(stream, steps_per_epoch=stream.steps_per_epoch, epochs=4, verbose=0, shuffle=False,
                        callbacks=[CountSteps()])
    assert steps == [5, 5, 5, 5]
    assert history.history["accuracy"][-1] == 1.0


def test_predict_in_batches_matches_keras_predict_including_a_partial_batch_and_no_images():
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).integers(0, 255, (11, 4, 4, 3)).astype(np.uint8)
    ours = training.predict(model, x, batch_size=4)
    assert ours.shape == (11, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert training.predict(model, x[:0]).shape == (0, 3)
