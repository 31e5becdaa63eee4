"""Self-supervised pre-training (pretrain_ssl.py, selfsup.py), the photometric augmentation layers, --init and
prepare_splits.py --unlabeled."""
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import JAX_ENV, exit_status, run_script, selected, start_script, table_in_process

TINY = ["--image-size", "24", "--batch-size", "32", "--no-cache"]


@pytest.fixture(scope="module", autouse=True)
def jax_run(request, tmp_path_factory):
    """test_pretraining_under_jax's run, started with this module when that test is selected: it trains in its
    own process (on the second core) while the tests before it run here."""
    if importlib.util.find_spec("jax") is None or not selected(request, "test_pretraining_under_jax"):
        yield None
        return
    demo_root = request.getfixturevalue("demo_root")
    out = tmp_path_factory.mktemp("jax") / "run"
    # WBC_100's pool (about 17 steps an epoch): WBC_1's few images give one step an epoch, too few for a trend
    started = start_script("pretrain_ssl.py", "--data", demo_root, "--split", "WBC_100", *TINY, "--epochs", "3",
                           "--probe-every", "3", "--out", out, env=JAX_ENV)
    yield started, out
    started.stop()


def _images(n=6, size=24, seed=0):
    rng = np.random.default_rng(seed)
    # smooth colour gradients plus noise: every photometric change is visible on them
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, 1 - yy], -1)[None] * 200 + 20
    return np.clip(base + rng.normal(0, 10, (n, size, size, 3)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Augmentation layers
# ----------------------------------------------------------------------------------------------

def _layers(strength):
    import augment
    classes = augment.photometric_classes()
    on = strength > 0
    return {
        "jitter": lambda seed: classes["RandomColorJitter"](0.4 * strength, 0.4 * strength, 0.4 * strength,
                                                            0.1 * strength, seed=seed),
        "grayscale": lambda seed: classes["RandomGrayscale"](1.0 if on else 0.0, seed=seed),
        "blur": lambda seed: classes["RandomGaussianBlur"](1.0 if on else 0.0, sigma=(1.0, 2.0), seed=seed),
        "crop": lambda seed: classes["RandomResizedCrop"](scale=(0.2, 1.0) if on else (1.0, 1.0),
                                                          ratio=(0.75, 1.33) if on else (1.0, 1.0), seed=seed),
        "tight": lambda seed: classes["RandomTightCrop"](1.0 if on else 0.0, seed=seed),
        "randconv": lambda seed: classes["RandomConvolution"](1.0 if on else 0.0, seed=seed),
    }


@pytest.mark.parametrize("name", ["jitter", "grayscale", "blur", "crop", "tight", "randconv"])
def test_augmentation_layers_keep_shape_dtype_are_identity_at_zero_and_seeded(name):
    from keras import ops
    x = _images()
    active = _layers(1.0)[name]
    out = ops.convert_to_numpy(active(1)(x, training=True))
    assert out.shape == x.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - x).mean() > 1.0, "the layer at full strength changed nothing"
    # identity at zero strength, and when not training
    assert np.array_equal(ops.convert_to_numpy(_layers(0.0)[name](1)(x, training=True)), x)
    assert np.array_equal(ops.convert_to_numpy(active(1)(x, training=False)), x)
    # seeded: the same seed draws the same change, another seed another one
    again = ops.convert_to_numpy(active(1)(x, training=True))
    other = ops.convert_to_numpy(active(2)(x, training=True))
    assert np.array_equal(out, again)
    if name != "grayscale":  # greyscale at probability 1 has nothing random left to draw
        assert not np.array_equal(out, other)


def test_jitter_at_tiny_strength_moves_pixels_by_little():
    from keras import ops
    import augment
    x = _images()
    layer = augment.photometric_classes()["RandomColorJitter"](0.01, 0.01, 0.01, 0.002, seed=0)
    out = ops.convert_to_numpy(layer(x, training=True)).astype(int)
    assert np.abs(out - x).max() <= 6


def _chroma_angle(images):
    """Each pixel's hue as the angle of its chroma (I, Q) in YIQ, and the chroma's length, in 0-255 units."""
    import augment
    yiq = images.astype(np.float64) @ augment._RGB_TO_YIQ.T.astype(np.float64)
    return np.arctan2(yiq[..., 2], yiq[..., 1]), np.hypot(yiq[..., 1], yiq[..., 2])


def test_hue_jitter_zero_keeps_every_pixels_hue_while_the_rest_of_the_jitter_acts():
    # Brightness, contrast and saturation scale the chroma plane without turning it; only the hue shift turns it.
    from keras import ops
    import augment
    x = _images(n=16)
    before, length = _chroma_angle(x)

    def turned(hue_jitter):
        (layer,) = augment.photometric_layers(color_jitter=0.5, hue_jitter=hue_jitter, seed=4)
        out = ops.convert_to_numpy(layer(x, training=True))
        after, out_length = _chroma_angle(out)
        clean = (length > 20) & (out_length > 20) & (out.min(-1) > 0) & (out.max(-1) < 255)  # no clipping
        turn = np.abs(np.angle(np.exp(1j * (after - before))))[clean]
        return out, turn

    kept, turn = turned(0.0)
    assert np.abs(kept.astype(int) - x).mean() > 2.0, "the jitter without hue changed nothing"
    assert np.percentile(turn, 99) < 0.06, "hue turned although its strength was 0"
    _, turn = turned(0.5)
    assert turn.max() > 0.2, "hue strength 0.5 (up to 0.1 of a turn) turned no pixel's hue"


def test_tight_crop_repeats_the_kept_boxs_edge_pixels_and_never_touches_the_middle_half():
    from keras import ops
    import augment
    x = _images(n=16, size=40)
    out = ops.convert_to_numpy(augment.photometric_classes()["RandomTightCrop"](1.0, seed=3)(x, training=True))
    assert np.array_equal(out[:, 10:30, 10:30], x[:, 10:30, 10:30]), "a cut reached the middle half"
    for image, cut in zip(x, out):
        # each output row is a source row clipped into the kept band: the kept band itself is untouched
        rows = [next(r for r in range(40) if np.array_equal(cut[i, 10:30], image[r, 10:30])) for i in range(40)]
        top, bottom = min(rows), max(rows)
        assert rows == [min(max(i, top), bottom) for i in range(40)]
        assert top <= 10 and bottom >= 29
    assert not np.array_equal(out, x)


def test_one_pixel_random_convolution_remixes_colours_and_keeps_geometry():
    # A 1x1 random convolution is one colour map per batch: pixels of one colour stay of one colour (no shape
    # changes), while the colours themselves change; a single-colour image stays single-coloured at every side.
    from keras import ops
    import augment
    classes = augment.photometric_classes()
    x = np.zeros((4, 16, 16, 3), np.uint8)
    x[:, :, :8] = (200, 120, 150)  # two flat halves, pink and violet, like plasma and a nucleus
    x[:, :, 8:] = (90, 60, 140)
    out = ops.convert_to_numpy(classes["RandomConvolution"](1.0, kernel_sizes=(1,), seed=5)(x, training=True))
    for image in out.astype(int):
        assert np.ptp(image[:, :8].reshape(-1, 3), axis=0).max() <= 1 and np.ptp(image[:, 8:].reshape(-1, 3), axis=0).max() <= 1
    assert np.abs(out.astype(int) - x).mean() > 1.0, "the colours did not change"
    flat = np.full((2, 16, 16, 3), (180, 100, 160), np.uint8)
    wide = ops.convert_to_numpy(classes["RandomConvolution"](1.0, kernel_sizes=(5,), seed=5)(flat, training=True))
    assert np.ptp(wide.reshape(2, -1, 3), axis=1).max() <= 1, "a flat image gained texture"
    with pytest.raises(ValueError):
        classes["RandomConvolution"](1.0, kernel_sizes=(2,))


def test_supervised_flags_add_the_layers_and_default_off():
    import argparse
    import augment
    import cli
    import models
    from runfiles import UserError
    parser = cli.make_parser("t")
    cli.add_data_args(parser)
    cli.add_cnn_training_args(parser)
    plain = cli.resolve_cnn_args(parser.parse_args([]))
    assert not set(augment.from_args(plain)) & set(augment.PHOTOMETRIC_KEYS)
    args = cli.resolve_cnn_args(parser.parse_args(["--color-jitter", "0.5", "--grayscale", "0.2", "--blur", "0.5",
                                                   "--crop-scale", "0.3"]))
    kw = augment.from_args(args)
    assert kw["color_jitter"] == 0.5 and kw["crop_scale"] == 0.3
    tight = augment.from_args(cli.resolve_cnn_args(parser.parse_args(["--tight-crop", "0.5"])))
    assert tight["tight_crop"] == 0.5
    randconv = augment.from_args(cli.resolve_cnn_args(parser.parse_args(["--random-conv", "0.5"])))
    assert randconv["random_conv"] == 0.5 and "random_conv" not in kw
    no_hue = augment.from_args(cli.resolve_cnn_args(parser.parse_args(["--color-jitter", "0.5", "--hue-jitter", "0"])))
    assert no_hue["hue_jitter"] == 0.0 and "hue_jitter" not in kw
    # the legacy generator loader has none of them; --hue-jitter 0 alone makes no layer, so it is not refused there
    generator = ["--loader", "generator"]
    with pytest.raises(UserError, match="--blur, --crop-scale, --tight-crop and --random-conv run on the device"):
        cli.resolve_cnn_args(parser.parse_args([*generator, "--tight-crop", "0.2"]))
    assert not augment.photometric_on(cli.resolve_cnn_args(parser.parse_args([*generator, "--hue-jitter", "0"])))
    (jitter,) = augment.photometric_layers(**{k: v for k, v in no_hue.items() if k in augment.PHOTOMETRIC_KEYS})
    assert jitter.hue == 0.0 and jitter.saturation == pytest.approx(0.4)
    core = models.build_cnn(5, 24, width=4, depth=2)
    wrapped = augment.with_augmentation(core, kw, seed=0)
    names = [l.__class__.__name__ for l in wrapped.layers]
    for expected in ("RandomResizedCrop", "RandomAffine", "RandomColorJitter", "RandomGrayscale",
                     "RandomGaussianBlur"):
        assert expected in names
    randconv_names = [l.__class__.__name__ for l in augment.with_augmentation(core, randconv, seed=0).layers]
    assert "RandomConvolution" in randconv_names
    tight_names = [l.__class__.__name__ for l in augment.with_augmentation(core, tight, seed=0).layers]
    assert tight_names.index("RandomTightCrop") < tight_names.index("RandomAffine")  # the lab's cut comes first
    assert isinstance(args, argparse.Namespace)


@pytest.mark.parametrize("argv", [["--color-jitter", "2"], ["--hue-jitter", "-0.1"], ["--crop-scale", "0"],
                                  ["--tight-crop", "1.5"], ["--random-conv", "-0.5"],
                                  ["--finetune-lr", "1e-4"],
                                  ["--freeze-epochs", "2"], ["--frozen-blocks", "1"], ["--frozen-bn"],
                                  ["--init", "no/such/encoder.h5"]])
def test_bad_flags_are_one_line_exit_2(argv, capsys):
    # in this process, through the command line's own entry (cli.run_main); a fresh process's output is checked
    # for one such refusal in test_inspect.py
    import train_cnn
    assert exit_status(train_cnn.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_partial_freezing_of_an_encoder_frozen_throughout_is_refused(capsys):
    import train_cnn
    for partly, named in ((["--frozen-blocks", "1"], "--frozen-blocks 1"), (["--frozen-bn"], "--frozen-bn")):
        argv = ["--init", "no/such/encoder.h5", "--epochs", "3", "--freeze-epochs", "3", *partly]
        assert exit_status(train_cnn.main, argv) == 2
        assert capsys.readouterr().err.startswith(f"error: {named}: the encoder is frozen throughout already")


# ----------------------------------------------------------------------------------------------
# The joint-embedding model and the probe
# ----------------------------------------------------------------------------------------------

def test_two_views_differ_and_labels_never_enter_the_loss():
    from keras import ops
    import augment
    import selfsup
    x = _images(8)
    views = augment.make_two_views(seed=3)
    a, b = (ops.convert_to_numpy(v) for v in views(x, training=True))
    assert a.shape == b.shape == x.shape and a.dtype == np.uint8
    assert not np.array_equal(a, b)
    encoder = selfsup.build_encoder("cnn", 24, dict(width=4, depth=2, pooling="avg", batchnorm=True))
    model = selfsup.JointEmbedding(encoder, views, proj_width=16, proj_dim=8)
    z = model(x, training=False)  # no views when not training: both projections equal
    assert np.allclose(ops.convert_to_numpy(z[0]), ops.convert_to_numpy(z[1]), atol=1e-5)
    z = model(x, training=True)
    labels = [np.eye(5)[np.random.default_rng(s).integers(0, 5, 8)] for s in (0, 1)]
    losses = [float(ops.convert_to_numpy(model.compute_loss(x, y, z))) for y in (None, *labels)]
    assert losses[0] == losses[1] == losses[2] and np.isfinite(losses[0])


def test_losses_reward_agreeing_views():
    from keras import ops
    import selfsup
    rng = np.random.default_rng(0)
    z = rng.normal(size=(16, 8)).astype("float32")
    noise = rng.normal(size=(16, 8)).astype("float32")
    for loss in (selfsup.nt_xent_loss, selfsup.vicreg_loss):
        same = float(ops.convert_to_numpy(loss(z, z + 0.01 * noise)))
        unrelated = float(ops.convert_to_numpy(loss(z, noise)))
        assert same < unrelated


def test_probe_on_a_toy_problem_with_known_answer():
    import selfsup
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 16))
    y_train, y_val = np.repeat(np.arange(3), 10), np.repeat(np.arange(3), 20)
    f_train = centres[y_train] + rng.normal(0, 0.5, (30, 16))
    f_val = centres[y_val] + rng.normal(0, 0.5, (60, 16))
    for method in ("logreg", "knn"):
        s = selfsup.probe_scores(f_train, y_train, f_val, y_val, method)
        assert s["balanced_accuracy"] == 1.0 and s["macro_f1"] == 1.0
        # features that carry no class information score near chance (1/3)
        noise = selfsup.probe_scores(rng.normal(size=(30, 16)), y_train, rng.normal(size=(60, 16)), y_val, method)
        assert noise["balanced_accuracy"] < 0.6


# ----------------------------------------------------------------------------------------------
# The pool: validation images refused
# ----------------------------------------------------------------------------------------------

def test_a_validation_image_offered_to_the_pool_is_refused(demo_root, tmp_path, capsys):
    import data
    import pretrain_ssl
    import selfsup
    from runfiles import UserError
    files = data.find_split(demo_root, "WBC_10")
    val = list(files.val.paths)
    copied = tmp_path / "copied" / "deep"
    copied.mkdir(parents=True)
    shutil.copy(val[3], copied / "renamed.png")  # the same bytes under another name
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(val[5], linked / "x.png")
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(files.train.paths[0], clean / "a.png")
    for folder in (tmp_path / "copied", linked):
        with pytest.raises(UserError, match="validation image"):
            selfsup.gather_pool([folder], list(files.train.paths), val, demo_root)
    pool, info = selfsup.gather_pool([clean], list(files.train.paths), val, demo_root)
    assert len(pool) == len(files.train.paths) + 1  # a copy of a training image is allowed in
    capsys.readouterr()
    code = exit_status(pretrain_ssl.main, ["--data", demo_root, "--split", "WBC_10", "--unlabeled", clean,
                                           tmp_path / "copied", *TINY, "--out", tmp_path / "run"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.startswith("error: --unlabeled") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "encoder.h5").exists()


# ----------------------------------------------------------------------------------------------
# pretrain_ssl.py end to end, then --init
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, demo_root):
    """pretrain_ssl.py run in-process (its run under JAX below is a fresh process)."""
    import pretrain_ssl
    out = tmp_path_factory.mktemp("ssl") / "run"
    code = exit_status(pretrain_ssl.main, ["--data", demo_root, "--split", "WBC_100", *TINY, "--epochs", "3",
                                           "--probe-every", "2", "--seed", "1", "--out", out])
    assert code == 0
    return out


def test_pretraining_writes_its_run_folder_and_the_loss_falls(pretrained):
    import csv
    for name in ("args.json", "history.csv", "curves.png", "encoder.h5", "metrics.json"):
        assert (pretrained / name).is_file(), name
    with open(pretrained / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]  # epoch 0: the random encoder's probe
    losses = [float(r["loss"]) for r in rows[1:]]
    assert losses[-1] < losses[0] - 0.05, losses
    probes = [float(r["probe_balanced_accuracy"]) for r in rows]
    assert [e for e, p in enumerate(probes) if np.isfinite(p)] == [0, 2, 3]  # epoch 0, every 2nd, the last
    assert all(0.0 <= p <= 1.0 for p in probes if np.isfinite(p))
    m = json.loads((pretrained / "metrics.json").read_text())
    assert m["kept_epoch"] == 3 and m["selection"] == "last epoch"
    # the pool is the split's training images (labels ignored), nothing from val
    assert m["pool_images"] == json.loads((pretrained / "args.json").read_text())["pool"]["images"]


def test_encoder_h5_loads_with_plain_keras_in_a_fresh_process(pretrained, tmp_path):
    code = ("import keras, numpy as np, sys; m = keras.models.load_model(sys.argv[1], compile=False); "
            "x = np.zeros((2,) + m.input_shape[1:], 'uint8'); print(m(x).shape, m.layers[1].name)")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    import subprocess
    result = subprocess.run([sys.executable, "-c", code, str(pretrained / "encoder.h5")], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=120)  # cwd: the project is not importable
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(2, 256)" in result.stdout  # the default recipe's CNN: 4 blocks from width 32 (32 x 2^3), pooled


def test_init_puts_exactly_the_encoders_weights_into_the_classifier(pretrained):
    import models
    import recipes
    import selfsup
    from runfiles import load_core_model
    encoder = load_core_model(pretrained / "encoder.h5")
    kwargs = recipes.recipe_model_kwargs("default")
    core = models.build_cnn(5, 24, **kwargs)
    before = {l.name: [w.copy() for w in l.get_weights()] for l in core.layers}
    names = selfsup.load_encoder_weights(core, pretrained / "encoder.h5")
    assert names and all(n.startswith("block") for n in names)
    for layer in encoder.layers:
        for mine, theirs in zip(core.get_layer(layer.name).get_weights(), layer.get_weights()):
            assert np.array_equal(mine, theirs)
    assert any(not np.array_equal(a, b) for n in names for a, b in zip(before[n], core.get_layer(n).get_weights()))
    # the head is not in the encoder: it keeps its fresh weights
    assert all(np.array_equal(a, b) for a, b in zip(before["predictions"], core.get_layer("predictions").get_weights()))


def test_train_cnn_init_with_frozen_head_phase_names_the_encoder(pretrained, demo_root, tmp_path, capsys):
    from runfiles import load_core_model, read_h5_metadata
    import selfsup
    import train_cnn
    out = tmp_path / "ft"
    code = exit_status(train_cnn.main, ["--data", demo_root, "--split", "WBC_10", *TINY, "--epochs", "2",
                                        "--freeze-epochs", "1", "--init", pretrained / "encoder.h5", "--out", out,
                                        "--finetune-lr", "3e-4", "--lr-schedule", "constant", "--quiet"])
    assert code == 0, capsys.readouterr().err[-2000:]
    digest = selfsup.file_sha256(pretrained / "encoder.h5")
    args = json.loads((out / "args.json").read_text())
    assert args["init_sha256"] == digest and args["init"] == str(pretrained / "encoder.h5")
    meta = read_h5_metadata(out / "model.h5")
    assert meta["init_encoder"]["sha256"] == digest
    # the epochs after the head-only ones ran at --finetune-lr (LP-FT), the head-only ones at --lr
    import csv
    with open(out / "history.csv") as f:
        assert float(next(csv.DictReader(f))["lr"]) == pytest.approx(3e-4, rel=0.01)
    with open(out / "head_frozen" / "history.csv") as f:
        assert float(next(csv.DictReader(f))["lr"]) == pytest.approx(2e-3, rel=0.01)  # the recipe's --lr
    assert meta["finetune_lr"] == pytest.approx(3e-4)
    # during the frozen phase the encoder's weights (batch-norm statistics included) did not move at all
    encoder = load_core_model(pretrained / "encoder.h5")
    frozen = load_core_model(out / "head_frozen" / "model.h5")
    for layer in encoder.layers:
        for a, b in zip(layer.get_weights(), selfsup.find_layer(frozen, layer.name).get_weights()):
            assert np.array_equal(a, b), layer.name
    assert (out / "metrics.json").is_file()
    _check_wise_ft(out, capsys)
    _check_ensemble(out, capsys)


def _check_wise_ft(run, capsys):
    # tools/wise_ft.py: weights half-way between the head-only model and the fine-tuned one, batch norm recomputed
    import keras
    import adapt
    from conftest import load_tool
    from runfiles import load_core_model, read_h5_metadata
    wise_ft = load_tool("wise_ft")
    assert exit_status(wise_ft.main, [run, "--alpha", "0.5"]) == 0, capsys.readouterr().err
    start, end = load_core_model(run / "head_frozen" / "model.h5"), load_core_model(run / "model.h5")
    mixed = keras.models.load_model(run / "model_wise0.5.h5", compile=False)  # plain Keras loads it
    assert read_h5_metadata(run / "model_wise0.5.h5")["wise_ft"]["alpha"] == 0.5
    kernels = [(a, b, m) for a, b, m in zip(start.get_weights(), end.get_weights(), mixed.get_weights())
               if a.ndim == 4]  # convolution kernels: interpolated, never recalibrated
    assert kernels and any(not np.array_equal(a, b) for a, b, _ in kernels)
    for a, b, m in kernels:
        assert np.allclose(m, 0.5 * a + 0.5 * b, atol=1e-6)
    assert np.array_equal(adapt.interpolate_weights(start, load_core_model(run / "model.h5"), 0.0).get_weights()[0],
                          start.get_weights()[0])
    assert exit_status(wise_ft.main, [run, "--alpha", "1.5"]) == 2
    assert exit_status(wise_ft.main, [run / "head_frozen"]) == 2  # no head-only phase of its own
    assert "head_frozen/model.h5" in capsys.readouterr().err


def _check_ensemble(run, capsys):
    # tools/ensemble.py: the head-only and the fine-tuned model as one, their probabilities averaged
    import data
    import inspect_model
    from conftest import load_tool
    from runfiles import load_core_model, read_h5_metadata, update_h5_metadata
    ensemble = load_tool("ensemble")
    members = [run / "head_frozen" / "model.h5", run / "model.h5"]
    out = run / "ensemble.h5"
    assert exit_status(ensemble.main, [*members, "--out", out]) == 0, capsys.readouterr().err
    x = data.load_images(data.find_split(json.loads((run / "args.json").read_text())["data"], "WBC_10").val,
                         size=24, use_cache=False, verbose=False).x[:16]
    mean = np.mean([load_core_model(m).predict(x, verbose=0) for m in members], axis=0)
    assert np.allclose(load_core_model(out).predict(x, verbose=0), mean, atol=1e-5)
    meta = read_h5_metadata(out)
    assert meta["classes"] == read_h5_metadata(members[0])["classes"] and meta["framing"] is not None
    assert [m["stage"] for m in meta["ensemble"]["members"]] == ["head_frozen", "after_head_frozen"]
    assert "stage" not in meta  # what differs between members is kept per member only
    capsys.readouterr()
    assert exit_status(inspect_model.main, [out, "summary"]) == 0
    assert "member 1: " in capsys.readouterr().out
    assert exit_status(inspect_model.main, [out, "gradcam", run / "nowhere", "--out", run / "cams"]) == 2
    assert "an ensemble of 2 models" in capsys.readouterr().err
    # refused, one line each: a single model, --out one of the members, members of other classes
    other = run / "other_classes.h5"
    shutil.copy(members[1], other)
    update_h5_metadata(other, classes=list(reversed(meta["classes"])))
    for argv, fragment in (([members[0], "--out", run / "one.h5"], "one model"),
                           ([*members, "--out", members[1]], "one of the members"),
                           ([members[0], other, "--out", run / "mixed.h5"], "its classes")):
        assert exit_status(ensemble.main, argv) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_freeze_for_every_epoch_trains_the_head_alone_and_keeps_the_encoder_exactly(pretrained, demo_root,
                                                                                       tmp_path, capsys):
    # --freeze-epochs = --epochs: one phase in RUN itself, the encoder (batch-norm statistics included) untouched.
    from runfiles import load_core_model, read_h5_metadata
    import selfsup
    import train_cnn
    out = tmp_path / "head_only"
    code = exit_status(train_cnn.main, ["--data", demo_root, "--split", "WBC_10", *TINY, "--epochs", "2",
                                        "--freeze-epochs", "2", "--init", pretrained / "encoder.h5", "--out", out,
                                        "--quiet"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert not (out / "head_frozen").exists()
    trained = load_core_model(out / "model.h5")
    encoder = load_core_model(pretrained / "encoder.h5")
    for layer in encoder.layers:
        for a, b in zip(layer.get_weights(), selfsup.find_layer(trained, layer.name).get_weights()):
            assert np.array_equal(a, b), layer.name
    meta = read_h5_metadata(out / "model.h5")
    assert meta["stage"] == "head_only" and meta["head_frozen_epochs"] == 2
    history = (out / "history.csv").read_text().strip().splitlines()
    assert len(history) == 3  # header + both epochs, all in the one phase


def test_frozen_blocks_and_batchnorm_stay_as_pretrained_while_the_rest_learns_also_after_a_resume(
        pretrained, demo_root, tmp_path, capsys):
    # --frozen-blocks 1: block 1 (conv and batch-norm statistics) stays the encoder's in every epoch, block 2 learns
    # after the head-only epoch; --frozen-bn: block 2's batch norm (scale, offset, statistics) stays the encoder's
    # while its convolution learns. The run is cut after its head-only phase and resumed: the resumed phase, which
    # builds nothing before it, must still unfreeze the later blocks.
    from runfiles import load_core_model, read_h5_metadata
    import shutil
    import selfsup
    import train_cnn
    out = tmp_path / "partial"
    argv = ["--data", demo_root, "--split", "WBC_10", *TINY, "--epochs", "2", "--freeze-epochs", "1",
            "--frozen-blocks", "1", "--frozen-bn", "--init", pretrained / "encoder.h5", "--out", out, "--quiet"]
    assert exit_status(train_cnn.main, argv) == 0, capsys.readouterr().err[-2000:]
    for path in out.iterdir():  # keep only the finished head-only phase, as if stopped there
        if path.name != "head_frozen":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert exit_status(train_cnn.main, [*argv, "--resume"]) == 0, capsys.readouterr().err[-2000:]
    encoder = load_core_model(pretrained / "encoder.h5")
    head_only = load_core_model(out / "head_frozen" / "model.h5")
    tuned = load_core_model(out / "model.h5")
    for layer in encoder.layers:
        if not layer.weights:
            continue
        mine = selfsup.find_layer(tuned, layer.name).get_weights()
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), mine))
        assert same == (layer.name.startswith("block1_") or layer.name.endswith("_bn")), layer.name
    assert "block2_bn" in [layer.name for layer in encoder.layers]
    moved = [n for n in ("block2_conv",) if not np.array_equal(
        selfsup.find_layer(head_only, n).get_weights()[0], selfsup.find_layer(tuned, n).get_weights()[0])]
    assert moved == ["block2_conv"]
    meta = read_h5_metadata(out / "model.h5")
    assert meta["frozen_blocks"] == 1 and meta["frozen_bn"] is True


def test_init_shape_mismatch_is_one_line_naming_both_shapes(demo_root, tmp_path, capsys):
    import models
    import selfsup
    import train_cnn
    from runfiles import save_model_h5
    narrow = selfsup.encoder_of(models.build_cnn(5, 24, width=4, depth=4, pooling="avg", batchnorm=True))
    save_model_h5(narrow, tmp_path / "narrow.h5", {})
    capsys.readouterr()
    code = exit_status(train_cnn.main, ["--data", demo_root, "--split", "WBC_1", *TINY, "--epochs", "1",
                                        "--init", tmp_path / "narrow.h5", "--out", tmp_path / "ft"])
    assert code == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: --init")
    assert "(3, 3, 3, 4)" in line and "(3, 3, 3, 32)" in line


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_pretraining_under_jax(jax_run):
    started, out = jax_run
    result = started.result(timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["backend"] == "jax" and m["final_loss"] < m["first_loss"]


# ----------------------------------------------------------------------------------------------
# prepare_splits.py --unlabeled
# ----------------------------------------------------------------------------------------------

def test_prepare_splits_unlabeled_pool_is_every_left_over_image_and_no_validation_image(demo_root, tmp_path):
    import data
    # The demo's training images plus its validation neutrophils: more neutrophils than the course's share
    # allows, so --proportions course leaves some images out.
    source = tmp_path / "source"
    for folder in sorted((demo_root / "WBC_100" / "train" / "data").iterdir()):
        (source / folder.name).mkdir(parents=True)
        extra = data.list_images(demo_root / "WBC_100" / "val" / "data" / folder.name) \
            if folder.name == "Neutrophil" else []
        for i, f in enumerate(data.list_images(folder) + extra):
            os.symlink(f, source / folder.name / f"{i}{f.suffix}")
    out = tmp_path / "splits"
    result = run_script("prepare_splits.py", source, out, "--proportions", "course", "--unlabeled", timeout=120)
    assert result.returncode == 0, result.stderr
    real = lambda paths: {os.path.realpath(p) for p in paths}  # noqa: E731
    pool = real(data.list_images(out / "WBC_unlabeled"))
    val = real(data.list_images(out / "WBC_100" / "val"))
    train = real(data.list_images(out / "WBC_100" / "train"))
    assert pool and not pool & val and not pool & train
    assert pool | val | train == real(data.list_images(source))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unlabeled_images"] == len(pool)


def test_table_ssl_rows_pretrain_once_per_seed_and_start_from_that_encoder(demo_root, tmp_path, capsys):
    result = table_in_process(capsys, "--data", demo_root, "--rows",
                              "WBC_1_ssl_default,WBC_10_ssl_default,WBC_1_raw_default", "--seeds", "2", "--dry-run",
                              "--out", tmp_path / "table")
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stdout.splitlines() if "python" in ln or ln.startswith("/")]
    pretrain = [ln for ln in lines if "pretrain_ssl.py" in ln]
    assert len(pretrain) == 2 and all("--split WBC_100" in ln for ln in pretrain)
    for seed in (0, 1):
        encoder = str(tmp_path / "table" / "runs" / f"ssl_pretrain_seed{seed}" / "encoder.h5")
        ssl_runs = [ln for ln in lines if "_ssl_default_seed" in ln and f"--seed {seed} " in ln]
        assert len(ssl_runs) == 2 and all(f"--init {encoder} " in ln + " " for ln in ssl_runs)
    assert not any("--init" in ln for ln in lines if "_raw_default_" in ln)


def test_table_ssl_semi_row_starts_from_the_seeds_encoder_and_trains_on_the_semi_pool(demo_root, tmp_path, capsys):
    import reproduce_table
    result = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl-semi_default,WBC_1_ssl_default",
                              "--seeds", "1", "--unlabeled-ratio", "3", "--dry-run", "--out", tmp_path / "table")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len([ln for ln in lines if "pretrain_ssl.py" in ln]) == 1  # one encoder for both rows
    both = [ln for ln in lines if "_ssl-semi_default_seed0" in ln]
    encoder = str(tmp_path / "table" / "runs" / "ssl_pretrain_seed0" / "encoder.h5")
    assert len(both) == 1 and f"--init {encoder} " in both[0] and "--unlabeled-ratio 3" in both[0]
    pool = str(reproduce_table.unlabeled_pool(demo_root)[0])
    assert f"--unlabeled {pool} " in both[0]
    assert not any("--unlabeled" in ln for ln in lines if "_ssl_default_seed0" in ln)
    assert ("ssl-semi_default", "ssl_default") in reproduce_table.PAIRS
    # a finished encoder is reused: the dry run lists no pre-training for its seed
    (tmp_path / "table" / "runs" / "ssl_pretrain_seed0").mkdir(parents=True)
    (tmp_path / "table" / "runs" / "ssl_pretrain_seed0" / "metrics.json").write_text("{}")
    again = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl-semi_default", "--seeds", "1",
                             "--unlabeled-ratio", "3", "--dry-run", "--out", tmp_path / "table")
    assert again.returncode == 0 and "pretrain_ssl.py" not in again.stdout, again.stdout


def test_table_ssl_views_keep_hue_reach_pretraining_only_and_an_older_folder_keeps_its_views(
        demo_root, tmp_path, capsys):
    result = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default,WBC_1_raw_default",
                              "--seeds", "1", "--ssl-views", "keep-hue", "--dry-run", "--out", tmp_path / "t")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [ln for ln in lines if "pretrain_ssl.py" in ln and "--hue-jitter 0 --grayscale 0" in ln]
    assert not any("--hue-jitter" in ln for ln in lines if "train_cnn.py" in ln)
    # a results folder from before --ssl-views pre-trained with pretrain_ssl.py's own views
    old = tmp_path / "old"
    old.mkdir()
    (old / "table_config.json").write_text(json.dumps({"ssl_epochs": 2}))
    refused = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--seeds", "1",
                               "--ssl-epochs", "2", "--ssl-views", "keep-hue", "--dry-run", "--out", old)
    assert refused.returncode == 2 and "--ssl-views simclr" in refused.stderr, refused.stderr


def test_table_ssl_image_size_reaches_pretraining_only_and_an_older_folder_keeps_the_tables_size(
        demo_root, tmp_path, capsys):
    result = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default,WBC_1_raw_default",
                              "--seeds", "1", "--image-size", "32", "--ssl-image-size", "24", "--dry-run",
                              "--out", tmp_path / "t")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pretrain = [ln for ln in lines if "pretrain_ssl.py" in ln]
    assert len(pretrain) == 1 and "--image-size 24 " in pretrain[0]
    training = [ln for ln in lines if "train_cnn.py" in ln]
    assert len(training) == 2 and all("--image-size 32 " in ln for ln in training)
    # a folder from before the option pre-trained at the table's --image-size: continued at that size only
    old = tmp_path / "old"
    old.mkdir()
    (old / "table_config.json").write_text(json.dumps({"ssl_epochs": 2, "image_size": 32}))
    same = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--seeds", "1",
                            "--ssl-epochs", "2", "--image-size", "32", "--dry-run", "--out", old)
    assert same.returncode == 0, same.stderr
    refused = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--seeds", "1",
                               "--ssl-epochs", "2", "--image-size", "32", "--ssl-image-size", "24", "--dry-run",
                               "--out", old)
    assert refused.returncode == 2 and "--ssl-image-size 32" in refused.stderr, refused.stderr
    tiny = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--ssl-image-size", "4",
                            "--dry-run", "--out", tmp_path / "u")
    assert tiny.returncode == 2 and "--ssl-image-size 4" in tiny.stderr and "Traceback" not in tiny.stderr


def test_table_ssl_unlabeled_folders_join_the_pretraining_pool_only_and_a_folder_keeps_its_pool(
        demo_root, tmp_path, capsys):
    other_lab = tmp_path / "other_lab"
    other_lab.mkdir()
    result = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default,WBC_1_raw_default",
                              "--seeds", "1", "--ssl-unlabeled", other_lab, "--dry-run", "--out", tmp_path / "t")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pretrain = [ln for ln in lines if "pretrain_ssl.py" in ln]
    assert len(pretrain) == 1 and str(other_lab.resolve()) in pretrain[0].split("--unlabeled", 1)[1]
    assert not any(str(other_lab) in ln for ln in lines if "train_cnn.py" in ln)
    # a results folder pre-trained on another pool is not continued with this one
    old = tmp_path / "old"
    old.mkdir()
    (old / "table_config.json").write_text(json.dumps({"ssl_epochs": 2}))
    refused = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--seeds", "1",
                               "--ssl-epochs", "2", "--ssl-unlabeled", other_lab, "--dry-run", "--out", old)
    assert refused.returncode == 2 and "--ssl-unlabeled []" in refused.stderr, refused.stderr
    missing = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--dry-run",
                               "--ssl-unlabeled", tmp_path / "nowhere", "--out", tmp_path / "u")
    assert missing.returncode == 2 and "--ssl-unlabeled" in missing.stderr and "Traceback" not in missing.stderr


def test_table_ssl_rows_train_the_head_alone_first_and_refuse_a_freeze_longer_than_training(demo_root, tmp_path, capsys):
    # The ssl rows start with the encoder frozen (linear probing, then fine-tuning) within the same epochs.
    result = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default,WBC_1_raw_default",
                              "--seeds", "1", "--epochs", "8", "--freeze-epochs", "3", "--dry-run",
                              "--out", tmp_path / "t")
    assert result.returncode == 0, result.stderr
    ssl_runs = [ln for ln in result.stdout.splitlines() if "_ssl_default_seed" in ln]
    raw_runs = [ln for ln in result.stdout.splitlines() if "_raw_default_seed" in ln]
    assert len(ssl_runs) == 1 and "--freeze-epochs 3" in ssl_runs[0] and "--epochs 8 " in ssl_runs[0]
    assert raw_runs and not any("--freeze-epochs" in ln for ln in raw_runs)
    refused = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--epochs", "4",
                               "--freeze-epochs", "5", "--dry-run", "--out", tmp_path / "u")
    assert refused.returncode == 2 and "--freeze-epochs 5" in refused.stderr and "Traceback" not in refused.stderr
    head_only = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--epochs", "4",
                                 "--freeze-epochs", "4", "--dry-run", "--out", tmp_path / "h")
    assert head_only.returncode == 0, head_only.stderr
    assert any("--freeze-epochs 4" in ln for ln in head_only.stdout.splitlines() if "_ssl_default_seed" in ln)
    # --finetune-lr reaches the ssl rows only, and a folder keeps one value of it (one from before the option: none)
    old = tmp_path / "old"
    old.mkdir()
    (old / "table_config.json").write_text(json.dumps({"ssl_epochs": 2}))
    refused = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--seeds", "1",
                               "--ssl-epochs", "2", "--epochs", "8", "--freeze-epochs", "3", "--finetune-lr", "0.0002",
                               "--dry-run", "--out", old)
    assert refused.returncode == 2 and "--finetune-lr None" in refused.stderr, refused.stderr
    lpft = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default,WBC_1_raw_default",
                            "--seeds", "1", "--epochs", "8", "--freeze-epochs", "3", "--finetune-lr", "0.0002",
                            "--dry-run", "--out", tmp_path / "lpft")
    assert lpft.returncode == 0, lpft.stderr
    lines = lpft.stdout.splitlines()
    assert any("--finetune-lr 0.0002" in ln for ln in lines if "_ssl_default_seed" in ln)
    assert not any("--finetune-lr" in ln for ln in lines if "_raw_default_seed" in ln)
    # --frozen-blocks reaches the ssl rows only; --class-weight-power every row; a whole frozen encoder is refused
    partial = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default,WBC_1_raw_default",
                               "--seeds", "1", "--epochs", "8", "--frozen-blocks", "2", "--class-weight-power", "1",
                               "--dry-run", "--out", tmp_path / "partial")
    assert partial.returncode == 0, partial.stderr
    passed = {row: [("--frozen-blocks 2" in ln, "--class-weight-power 1.0" in ln)
                    for ln in partial.stdout.splitlines() if f"{row}_seed" in ln]
              for row in ("ssl_default", "raw_default")}
    assert passed == {"ssl_default": [(True, True)], "raw_default": [(False, True)]}
    for bad in (["--frozen-blocks", "4"], ["--frozen-blocks", "2", "--freeze-epochs", "8"]):
        refused = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_ssl_default", "--epochs", "8",
                                   *bad, "--dry-run", "--out", tmp_path / "bad")
        assert refused.returncode == 2 and f"--frozen-blocks {bad[1]}" in refused.stderr, refused.stderr
