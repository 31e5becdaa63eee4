"""models.py: the dropout CNN's shape, and the .h5 round trip in a process that never imports this project."""
import os
import subprocess
import sys

import numpy as np
import pytest

import models
import runfiles
from conftest import PROJECT


def test_cnn_shape_dropout_rising_and_uint8_input():
    model = models.build_cnn(5, 32, width=8, depth=3, dropout=0.1, dropout_step=0.1)
    assert model.input.dtype == "uint8" and model.output_shape == (None, 5)
    rates = [l.rate for l in model.layers if type(l).__name__ == "Dropout" and l.name.startswith("block")]
    assert rates == pytest.approx([0.1, 0.2, 0.3])
    convs = [l.filters for l in model.layers if type(l).__name__ == "Conv2D"]
    assert convs == [8, 16, 32]
    probs = np.asarray(model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_stem_stride_halves_every_later_feature_map_with_the_same_weights():
    plain = models.build_cnn(5, 64, width=8, depth=3, pooling="avg", batchnorm=True)
    strided = models.build_cnn(5, 64, width=8, depth=3, pooling="avg", batchnorm=True, stem_stride=2)
    assert strided.get_layer("block1_conv").output.shape[1:3] == (32, 32)
    assert plain.get_layer("block1_conv").output.shape[1:3] == (64, 64)
    assert strided.get_layer("block3_pool").output.shape[1:3] == (4, 4)
    assert strided.count_params() == plain.count_params()  # same layers, fewer positions to compute
    # 'auto' (the default recipe's): stride 2 from 160 px up, 1 below.
    assert models.resolve_stem_stride("auto", 160) == 2 and models.resolve_stem_stride("auto", 159) == 1
    assert models.resolve_stem_stride("2", 64) == 2
    auto = models.build_cnn(5, 160, width=4, depth=2, pooling="avg", stem_stride="auto")
    assert auto.get_layer("block1_conv").output.shape[1:3] == (80, 80)
    with pytest.raises(ValueError, match="stem_stride"):
        models.resolve_stem_stride(3, 224)


def test_blocks_pooling_reads_every_blocks_average_and_takes_an_avg_pooled_encoders_weights(tmp_path):
    import selfsup
    model = models.build_cnn(5, 32, width=4, depth=3, pooling="blocks", batchnorm=True)
    features = model.get_layer("gap_blocks").output
    assert tuple(features.shape) == (None, 4 + 8 + 16)  # each block's channels, side by side
    # the first block's pooled output is what its dropout passed on, averaged over the positions
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    import keras
    probe = keras.Model(model.input, [features, model.get_layer("block1_dropout").output])
    pooled, block1 = (np.asarray(a, "float32") for a in probe.predict(x, verbose=0))
    np.testing.assert_allclose(pooled[:, :4], block1.mean(axis=(1, 2)), rtol=1e-4, atol=1e-6)
    # an encoder pre-trained with the usual average pooling fits: pooling has no weights
    encoder = selfsup.encoder_of(models.build_cnn(2, 32, width=4, depth=3, pooling="avg", batchnorm=True))
    encoder.save(tmp_path / "encoder.h5")
    names = selfsup.load_encoder_weights(model, tmp_path / "encoder.h5")
    assert "block3_conv" in names and "block3_bn" in names
    for name in names:
        for mine, theirs in zip(model.get_layer(name).get_weights(), encoder.get_layer(name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    assert selfsup.encoder_of(model).output.shape[-1] == 28  # pre-training with blocks pooling reads them all
    with pytest.raises(ValueError, match="pooling"):
        models.build_cnn(5, 32, pooling="max")


def test_h5_round_trip_in_a_fresh_process_without_the_project(tmp_path):
    model = models.build_cnn(5, 24, width=4, depth=2, pooling="avg", batchnorm=True)
    x = np.random.default_rng(0).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    expected = np.asarray(model.predict(x, verbose=0))
    path = tmp_path / "model.h5"
    runfiles.save_model_h5(model, path, {"classes": ["a", "b", "c", "d", "e"], "epoch": 1})
    np.save(tmp_path / "x.npy", x)
    # The fresh process cannot reach this project: it runs in tmp_path with the project's folder taken off
    # sys.path and PYTHONPATH; it then checks that no module it loaded comes from the project's folder (outside
    # a virtual environment kept there).
    project = str(PROJECT)
    script = (
        "import os, sys\n"
        f"project = {project!r}\n"
        "sys.path = [p for p in sys.path if os.path.realpath(p or '.') != project]\n"
        "import numpy as np\n"
        "import keras\n"
        f"m = keras.models.load_model({str(path)!r})\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0))\n"
        # A virtual environment inside the project folder (the README's .venv) holds Keras, not the project.
        "env = os.path.realpath(sys.prefix) + os.sep\n"
        "files = [os.path.realpath(getattr(mod, '__file__', None) or '/') for mod in list(sys.modules.values())]\n"
        "ours = [f for f in files if f.startswith(project + os.sep) and not f.startswith(env)]\n"
        "assert not ours, f'modules loaded from the project: {ours}'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # KERAS_BACKEND and the rest kept
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
    assert runfiles.read_h5_metadata(path)["epoch"] == 1
