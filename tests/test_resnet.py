"""ResNet50 pre-training on CAM16 and fine-tuning on WBC (pretrain_resnet.py, models.build_resnet50).

One tiny end-to-end run (32 px, a few demo images, one epoch per stage, from a weights file the test makes)
carries most checks, because every ResNet50 compile costs seconds on a CPU. Each stage's training images fit in
one batch and its hold-out and validation sets are of one size: every new batch shape traces the training or
prediction step again. Under TensorFlow that run's steps execute eagerly (tf.config.run_functions_eagerly):
tracing ResNet50's training step into a graph took ~10 s of each stage's ~12 s on a 2-core CPU, and what is
checked here (which weights each stage starts from, freezes and trains) does not depend on it; every other
training test runs the graph."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import keras

import models
import pretrain_resnet
from runfiles import UserError

SIZE = 32


def _link_subset(src: Path, dst: Path, per_class: int):
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / class_dir.name
        out.mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            os.symlink(f, out / f.name)


@pytest.fixture(scope="module")
def tiny_root(demo_root, tmp_path_factory):
    """A few demo images per class, in the course layout (symlinks): 12 CAM16 training images and 15 WBC ones
    after the hold-out (one per class, as many as WBC validation images), each set one batch of 16."""
    root = tmp_path_factory.mktemp("tiny")
    for part, n in (("train", 6), ("val", 3), ("test", 3)):
        _link_subset(demo_root / "CAM16_100cls_10mask" / part / "data",
                     root / "CAM16_100cls_10mask" / part / "data", n)
    _link_subset(demo_root / "WBC_100" / "train" / "data", root / "WBC_100" / "train" / "data", 4)
    _link_subset(demo_root / "WBC_100" / "val" / "data", root / "WBC_100" / "val" / "data", 1)
    return root


def _backbone_weights(path):
    core = keras.models.load_model(path, compile=False, safe_mode=True)
    return core, [np.asarray(w) for w in core.get_layer(models.BACKBONE_NAME).weights]


@pytest.fixture
def eager_steps():
    """Keras' tf.function steps run as plain Python for one test (TensorFlow backend; nothing to do otherwise)."""
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf
    before = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(before)


@pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions_eagerly`")
def test_both_stages_from_a_local_weights_file(tiny_root, tmp_path, cache_dir, eager_steps):
    # A ResNet50 weights file without top, as Keras' ImageNet download would be, made here.
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3),
                                           pooling="avg")
    weights_file = tmp_path / "resnet50_notop.weights.h5"
    backbone.save_weights(weights_file)
    out = tmp_path / "run"
    pretrain_resnet.main(["--data", str(tiny_root), "--image-size", str(SIZE), "--init", str(weights_file),
                          "--pretrain-epochs", "1", "--head-epochs", "1", "--epochs", "1", "--batch-size", "16",
                          "--no-compare", "--out", str(out), "--quiet"])

    for stage in ("pretrain", "finetune_frozen", "finetune"):
        assert (out / stage / "metrics.json").exists() and (out / stage / "history.csv").exists()
    test = json.loads((out / "pretrain" / "cam16_test.json").read_text())
    assert test["images"] == 6 and 0.0 <= test["roc_auc"] <= 1.0

    # Stage 1 started from the file: caffe preprocessing inside, and the training changed the file's weights.
    pre, pre_w = _backbone_weights(out / "pretrain" / "model.h5")
    assert "caffe_bgr_mean" in [layer.name for layer in pre.layers]
    assert pre.output_shape == (None, 2)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(pre_w, backbone.weights))

    # Through a frozen epoch the backbone, batch-norm moving statistics included, stays exactly as pre-trained.
    frozen, frozen_w = _backbone_weights(out / "finetune_frozen" / "model.h5")
    assert frozen.output_shape == (None, 5)
    assert len(pre_w) == len(frozen_w) and all(np.array_equal(a, b) for a, b in zip(pre_w, frozen_w))
    # ... and unfrozen, it trains.
    final, final_w = _backbone_weights(out / "finetune" / "model.h5")
    assert any(not np.array_equal(a, b) for a, b in zip(frozen_w, final_w))
    x = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    probs = final.predict(x, verbose=0)
    assert probs.shape == (2, 5) and np.allclose(probs.sum(1), 1.0, atol=1e-3)

    table = (out / "comparison.md").read_text()
    assert "file -> CAM16" in table


def test_preprocessing_matches_keras_imagenet_preprocess_input():
    core = models.build_resnet50(5, SIZE, weights=None)
    assert "scale_minus1_1" in [layer.name for layer in core.layers]
    x = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3)).astype("float32")
    inputs = keras.Input((SIZE, SIZE, 3))
    caffe = keras.Model(inputs, models.caffe_preprocessing(inputs))
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(caffe.predict(x, verbose=0), expected, atol=1e-4)
    assert not caffe.get_layer("caffe_bgr_mean").trainable


def test_backbone_batchnorm_momentum_is_lowered():
    # The literal 0.9, not the constant the code reads: with Keras' own 0.99 the moving statistics lag behind on
    # small datasets and validation stays at chance. Built the way pretrain_resnet.py builds it.
    core = models.build_from_init(None, 2, SIZE)
    bns = [layer for layer in core.get_layer(models.BACKBONE_NAME).layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 53 and all(layer.momentum == 0.9 for layer in bns)


def test_offline_imagenet_is_one_line_exit_2(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")
    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(UserError, match=r"--init PATH/TO/resnet50_weights_tf_dim_ordering_tf_kernels_notop\.h5"):
        models.resolve_init("imagenet")
    import cli
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: models.resolve_init("imagenet"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offline" in err


def test_bad_init_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such weights file"):
        pretrain_resnet.parse_args(["--data", str(tmp_path), "--init", str(tmp_path / "missing.h5")])


def test_out_of_range_augmentation_is_a_user_error(tmp_path):
    # pretrain_resnet.py takes the shared augmentation options and checks them as train_cnn.py does
    for flag in ("--random-conv", "--color-jitter", "--tight-crop"):
        with pytest.raises(UserError, match=f"{flag} 1.5: expected a number between 0 and 1"):
            pretrain_resnet.parse_args(["--data", str(tmp_path), flag, "1.5"])


def test_not_a_weights_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="not a Keras ResNet50 weights file"):
        models.build_from_init(str(bad), 5, SIZE)


def test_a_self_supervised_resnet50_encoder_initialises_the_backbone_at_any_size(tmp_path):
    import selfsup
    from runfiles import save_model_h5
    encoder = selfsup.build_encoder("resnet50", SIZE)
    for w in encoder.get_layer(models.BACKBONE_NAME).weights:  # weights no fresh initialisation would draw
        w.assign(0.01 + np.arange(np.prod(w.shape), dtype=np.float32).reshape(w.shape) * 1e-6)
    path = tmp_path / "encoder.h5"
    save_model_h5(encoder, path, {"model": "resnet50"})
    expected = [np.asarray(w) for w in encoder.get_layer(models.BACKBONE_NAME).weights]
    for size in (SIZE, 48):  # the classifier may be built at another side than the pre-training's
        core = models.build_from_init(str(path), 5, size)
        got = [np.asarray(w) for w in core.get_layer(models.BACKBONE_NAME).weights]
        assert core.input_shape == (None, size, size, 3) and core.output_shape == (None, 5)
        assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
        assert "scale_minus1_1" in [layer.name for layer in core.layers]  # the encoder's own preprocessing


def test_a_saved_model_that_is_no_resnet50_encoder_is_a_user_error(tmp_path):
    import selfsup
    from runfiles import save_model_h5
    path = tmp_path / "cnn_encoder.h5"
    save_model_h5(selfsup.build_encoder("cnn", SIZE), path, {"model": "cnn"})
    with pytest.raises(UserError, match="not a ResNet50 encoder"):
        models.build_from_init(str(path), 5, SIZE)
