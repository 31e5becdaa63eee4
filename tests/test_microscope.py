"""Other microscopes: stain normalisation, stain jitter, cell framing, group / layer norm, test-time augmentation,
batch-norm adaptation, the out-of-distribution warning, and a saved model with all of it that plain Keras loads."""
import json
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

import keras

import adapt
import cli
import domain
import feeding
import framing
import inspect_model
import models
import runfiles
import stain
from conftest import exit_status, load_tool


def smear(size=64, cell=(32.0, 32.0), radius=10.0, seed=0, tint=(1.0, 1.0, 1.0)):
    """A synthetic blood smear: pale background, pink red cells, one dark violet nucleus (the white cell)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (236, 214, 206)
    for _ in range(6):
        cy, cx = rng.uniform(0, size, 2)
        if np.hypot(cy - cell[0], cx - cell[1]) > radius * 1.8:
            img[np.hypot(rows - cy, cols - cx) < size * 0.09] = (214, 160, 160)
    img[np.hypot(rows - cell[0], cols - cell[1]) < radius] = (80, 40, 130)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img * np.asarray(tint), 0, 255).astype(np.uint8)


def smears(n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return np.stack([smear(cell=tuple(rng.uniform(24, 40, 2)), radius=rng.uniform(8, 11), seed=seed * 1000 + i, **kw)
                     for i in range(n)])


# ----------------------------------------------------------------------------------------------
# Stain normalisation and stain jitter
# ----------------------------------------------------------------------------------------------

def test_reinhard_maps_the_reference_to_itself_and_a_recoloured_copy_back():
    ref = smear(seed=1)
    means, stds = stain.opponent_stats(ref[None])
    reference = {"mean": means[0].tolist(), "std": stds[0].tolist()}
    same = stain.reinhard_normalise(ref, reference)
    assert same.shape == ref.shape and same.dtype == np.float32
    assert np.abs(same - ref).max() < 1.5  # the std floor (EPSILON) and float rounding only

    shifted = np.clip(ref * np.array([0.8, 0.95, 1.15]) + np.array([10, -5, 20]), 0, 255).astype(np.uint8)
    before = np.abs(shifted.astype(float) - ref).mean()
    after = np.abs(stain.reinhard_normalise(shifted, reference) - ref).mean()
    assert before > 15 and after < 0.25 * before and after < 5


def test_the_models_normalisation_layers_compute_the_numpy_function():
    x = np.stack([smear(seed=2), smear(seed=3, tint=(0.8, 0.9, 1.1))])
    reference = stain.reference_stats(x)
    inputs = keras.Input((64, 64, 3), dtype="uint8")
    model = keras.Model(inputs, stain.add_normalisation_layers(inputs, reference))
    np.testing.assert_allclose(np.asarray(model.predict_on_batch(x)), stain.reinhard_normalise(x, reference),
                               atol=0.05)


def test_nucleus_view_layers_compute_the_numpy_function_and_ignore_the_stains_strength():
    x = np.stack([smear(seed=4), smear(seed=5, tint=(0.8, 0.9, 1.1))])
    inputs = keras.Input((64, 64, 3), dtype="uint8")
    model = keras.Model(inputs, stain.add_nucleus_view_layers(inputs))
    view = stain.nucleus_view(x)
    np.testing.assert_allclose(np.asarray(model.predict_on_batch(x)), view, atol=0.01)
    assert view.shape == x.shape and view.dtype == np.float32 and np.array_equal(view[..., 0], view[..., 2])
    # The nucleus (dark violet, drawn at the centre) is what the view shows brightest; background and red cells sit
    # together well below it.
    nucleus = view[0, 30:35, 30:35, 0].mean()
    assert nucleus > 127.5 + 2 * 255 / stain.NUCLEUS_VIEW_SPREAD and view[0, :4, :4, 0].mean() < 127.5
    # A paler stain (every pixel's distance from white halved) looks very different and gives the same view.
    pale = 255.0 - 0.5 * (255.0 - x.astype(np.float64))
    assert np.abs(pale - x).mean() > 20
    np.testing.assert_allclose(stain.nucleus_view(pale), view, atol=0.01)


def test_stain_jitter_keeps_shape_and_dtype_is_identity_at_zero_and_seeded():
    x = np.stack([smear(seed=s) for s in range(4)])
    assert np.array_equal(np.asarray(stain.make_stain_jitter(0.0, seed=0)(x, training=True)), x)
    out = [np.asarray(stain.make_stain_jitter(0.2, seed=seed)(x, training=True)) for seed in (5, 5, 6)]
    assert out[0].shape == x.shape and out[0].dtype == np.uint8
    assert np.array_equal(out[0], out[1]) and not np.array_equal(out[0], out[2])
    assert np.abs(out[0].astype(float) - x).mean() > 2  # it does change the colours
    assert np.array_equal(np.asarray(stain.make_stain_jitter(0.2, seed=5)(x, training=False)), x)


def test_style_noise_redraws_channel_statistics_by_the_batchs_spread_only_while_training():
    import augment
    layer_class = augment.style_noise_class()
    rng = np.random.default_rng(0)
    # Feature maps whose channel means and spreads differ from image to image, as different stains make them.
    x = (rng.normal(size=(8, 6, 6, 4)) * rng.uniform(0.5, 2, (8, 1, 1, 4)) + rng.normal(0, 3, (8, 1, 1, 4)))
    x = x.astype("float32")
    out = [np.asarray(layer_class(1.0, seed=seed)(x, training=True)) for seed in (3, 3, 4)]
    assert out[0].shape == x.shape and out[0].dtype == np.float32
    assert np.array_equal(out[0], out[1]) and not np.array_equal(out[0], out[2])
    moved = np.abs(out[0].mean((1, 2)) - x.mean((1, 2)))
    assert moved.mean() > 0.5  # the means are redrawn with the batch's spread of means (3 here)
    # Each image keeps its own pattern: only the per-channel mean and scale change (correlation 1 per channel).
    a, b = x[0, :, :, 0].ravel(), out[0][0, :, :, 0].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) > 0.999
    # A batch whose images share one style has no spread to draw from: nothing moves.
    same = np.repeat(x[:1], 8, axis=0)
    np.testing.assert_allclose(np.asarray(layer_class(1.0, seed=3)(same, training=True)), same, atol=1e-2)
    assert np.array_equal(np.asarray(layer_class(1.0, seed=3)(x, training=False)), x)
    assert np.array_equal(np.asarray(layer_class(0.0, seed=3)(x, training=True)), x)
    half = np.asarray(layer_class(0.5, seed=1)(np.tile(x, (8, 1, 1, 1)), training=True))
    kept = np.all(half == np.tile(x, (8, 1, 1, 1)), axis=(1, 2, 3))
    assert 0.2 < kept.mean() < 0.8  # about half the images pass unchanged


def test_style_noise_training_copy_trains_the_saved_models_own_layers():
    import augment
    core = models.build_cnn(5, 24, width=4, depth=3, dense=8, batchnorm=True, pooling="avg")
    wrapped = stain.with_normalisation(core, stain.reference_stats(smears(4, size=24)))
    train = augment.with_style_noise(wrapped, 0.5, seed=0)
    noise = [layer for _, layer in models.flat_layers(train) if layer.__class__.__name__ == "StyleNoise"]
    assert [layer.name for layer in noise] == ["block1_dropout_style_noise", "block2_dropout_style_noise"]
    assert not any(layer.__class__.__name__ == "StyleNoise" for _, layer in models.flat_layers(wrapped))
    copy = dict((layer.name, layer) for _, layer in models.flat_layers(train))
    weighted = [layer for _, layer in models.flat_layers(wrapped) if layer.weights]
    assert len(weighted) >= 6 and all(copy[layer.name] is layer for layer in weighted)
    x = smears(4, size=24)
    np.testing.assert_allclose(np.asarray(train(x, training=False)), np.asarray(wrapped(x, training=False)))
    with pytest.raises(ValueError, match="no convolution blocks"):
        augment.with_style_noise(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), 0.5, seed=0)


def test_hed_round_trip_is_exact_enough_for_uint8():
    x = smear(seed=4).astype(np.float64)
    back = 256.0 * np.exp(-(stain.rgb_to_hed(x) @ stain.RGB_FROM_HED)) - 1.0
    assert np.abs(back - x).max() < 1e-6


# ----------------------------------------------------------------------------------------------
# Framing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("centre,radius", [((32.0, 32.0), 10.0), ((20.0, 41.0), 8.0), ((44.0, 24.0), 13.0)])
def test_framing_finds_a_drawn_cells_centre_and_size(centre, radius):
    img = smear(cell=centre, radius=radius, seed=7)
    cy, cx, extent = framing.find_cell(img)
    assert abs(cy - centre[0]) < 1.5 and abs(cx - centre[1]) < 1.5
    assert abs(extent - 2 * radius) <= 0.15 * 2 * radius + 1
    framed = framing.frame_image(img, 48, 0.5)
    assert framed.shape == (48, 48, 3) and framed.dtype == np.uint8
    assert abs(framing.apparent_size(framed) - 0.5) < 0.08
    fy, fx, _ = framing.find_cell(framed)
    assert abs(fy - 23.5) < 3 and abs(fx - 23.5) < 3  # centred


def test_nucleus_score_is_darkness_times_saturation():
    img = np.random.default_rng(3).integers(0, 256, (17, 19, 3), dtype=np.uint8)
    x = img.astype(np.float64) / 255
    expected = (1 - x.mean(-1)) * (x.max(-1) - x.min(-1)) / np.maximum(x.max(-1), 1e-6)
    np.testing.assert_allclose(framing.nucleus_score(img), expected, atol=1e-6)
    assert framing.nucleus_score(np.zeros((2, 2, 3), np.uint8)).max() == 0  # black: no saturation


def test_framing_check_finds_a_drawn_cell_alike_in_every_variant_and_notices_a_finder_that_does_not_scale(
        tmp_path, monkeypatch, capsys):
    from PIL import Image
    from conftest import exit_status
    check = load_tool("framing_check")
    images = [smear(size=128, cell=(60.0 + 3 * s, 66.0 - 2 * s), radius=14.0, seed=s) for s in range(3)]
    table = check.summarise([check.check_image(img) for img in images])
    assert len(table) == 8
    for name, row in table.items():
        assert 0.85 < row["median_ratio"] < 1.15 and row["moved"] == 0, (name, row)
    # A finder whose extent ignores the image's scale (as one cutting a nucleus to a fixed size would) is caught.
    real = framing.find_cell
    monkeypatch.setattr(framing, "find_cell", lambda img, mask=None: (*real(img)[:2], 28.0))
    broken = check.summarise([check.check_image(img) for img in images])
    assert broken[f"tight crop x{check.ENLARGE:g}"]["shrank"] == 1.0
    monkeypatch.undo()
    (tmp_path / "Neutrophil").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "Neutrophil" / "a.png")
    assert exit_status(check.main, [tmp_path]) == 0
    assert "Neutrophil     bluer" in capsys.readouterr().out
    assert exit_status(check.main, [tmp_path / "missing"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_framing_uses_a_mask_where_given():
    img = smear(cell=(20.0, 20.0), radius=11.0, seed=8)
    rows, cols = np.mgrid[:64, :64]
    img[np.hypot(rows - 46, cols - 46) < 7] = (80, 40, 130)  # a second, smaller nucleus
    assert np.hypot(*np.subtract(framing.find_cell(img)[:2], (20, 20))) < 1.5  # the larger one, by stain
    mask = np.hypot(rows - 46, cols - 46) < 12  # the whole second cell
    cy, cx, extent = framing.find_cell(img, mask)
    assert abs(cy - 46) < 1.5 and abs(cx - 46) < 1.5 and abs(extent - 13) <= 2  # its nucleus, not the mask


def test_decoding_frames_an_image_and_its_mask_alike(tmp_path):
    import data
    from PIL import Image
    img = smear(size=96, cell=(30.0, 60.0), radius=12.0, seed=9)
    rows, cols = np.mgrid[:96, :96]
    Image.fromarray(img).save(tmp_path / "cell.png")
    Image.fromarray((np.hypot(rows - 30, cols - 60) < 20).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    framed, cell = data.decode_framed(tmp_path / "cell.png", 32, 0.5, tmp_path / "mask.png")
    assert framed.shape == (32, 32, 3) and cell.shape == (32, 32) and cell.dtype == bool
    cy, cx = np.argwhere(cell).mean(0)
    assert abs(cy - 15.5) < 1.5 and abs(cx - 15.5) < 1.5  # the mask moved with the image
    np.testing.assert_array_equal(data.decode_image(tmp_path / "cell.png", 32, frame_share=0.5), framed)


def test_framing_version_keys_the_cache_and_names_a_model_framed_otherwise(monkeypatch):
    import data
    entries = [("a.png", None, 0)]
    key = data.cache_key(entries, 32, "black", frame_share=0.5)
    assert data.cache_key(entries, 32, "black") != key
    assert framing.version_warning({"framing": framing.describe(0.5)}) is None
    assert framing.version_warning({"framing": {"share": 0.5}}) is None  # before versions: the first version
    assert framing.version_warning({}) is None
    monkeypatch.setattr(framing, "VERSION", framing.VERSION + 1)
    assert data.cache_key(entries, 32, "black", frame_share=0.5) != key  # another framing: never the old cache
    assert "framing version 1" in framing.version_warning({"framing": {"share": 0.5}})


# ----------------------------------------------------------------------------------------------
# Normalisation layers, test-time augmentation, batch-norm adaptation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,groups", [("group", 4), ("layer", 1)])
def test_cnn_with_group_or_layer_norm_has_no_batch_statistics(norm, groups):
    model = models.build_cnn(5, 16, width=4, depth=2, dense=8, batchnorm=True, norm=norm)
    kinds = [type(l).__name__ for l in model.layers]
    assert "BatchNormalization" not in kinds and kinds.count("GroupNormalization") == 2
    assert model.get_layer(f"block1_{norm}norm").groups == groups
    with pytest.raises(ValueError):
        models.build_cnn(5, 16, batchnorm=True, norm="instance")


def test_tta_1_equals_plain_prediction_and_tta_averages_symmetric_views():
    keras.utils.set_random_seed(0)
    model = models.build_cnn(5, 16, width=4, depth=2, dense=8, pooling="avg", batchnorm=True)
    x = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(adapt.predict(model, x, 4, tta=1), feeding.predict(model, x, 4))
    views = [feeding.predict(model, adapt.dihedral(x, name), 4) for name in adapt.DIHEDRAL[:3]]
    np.testing.assert_allclose(adapt.predict(model, x, 4, tta=3), np.mean(views, 0), atol=1e-6)
    assert len({adapt.dihedral(x, n).tobytes() for n in adapt.DIHEDRAL}) == 8  # eight different views


def test_adapting_batchnorm_changes_statistics_not_weights():
    keras.utils.set_random_seed(0)
    model = models.build_cnn(5, 16, width=4, depth=2, dense=8, batchnorm=True)
    bn = model.get_layer("block1_bn")
    conv = model.get_layer("block1_conv").get_weights()[0].copy()
    before = np.asarray(bn.moving_mean).copy()
    x = np.full((8, 16, 16, 3), 200, np.uint8)
    assert adapt.adapt_batchnorm(model, x, batch_size=4) == 8
    assert not np.allclose(np.asarray(bn.moving_mean), before)
    np.testing.assert_array_equal(model.get_layer("block1_conv").get_weights()[0], conv)
    assert adapt.adapt_batchnorm(models.build_cnn(5, 16, width=4, depth=2, batchnorm=True, norm="group"), x) == 0


# ----------------------------------------------------------------------------------------------
# The out-of-distribution warning
# ----------------------------------------------------------------------------------------------

def test_ood_warning_fires_on_recoloured_or_rescaled_copies_not_on_the_set_itself():
    x = smears(60, seed=1)
    stats = domain.image_stats(x)
    assert domain.ood_warnings(stats, x) == []
    assert domain.ood_warnings(stats, smears(60, seed=2)) == []  # another draw of the same kind
    bluer = np.clip(x * np.array([0.75, 0.9, 1.1]), 0, 255).astype(np.uint8)
    reasons = domain.ood_warnings(stats, bluer)
    assert len(reasons) == 1 and "mean colour" in reasons[0]
    # The same smears with the cell twice as large: the middle half, enlarged.
    zoomed = np.stack([np.asarray(keras.ops.image.resize(img[16:48, 16:48], (64, 64))).round().astype(np.uint8)
                       for img in x])
    assert any("white cell spans" in r for r in domain.ood_warnings(stats, zoomed))
    assert domain.ood_warnings({}, bluer) == []  # a model without statistics says nothing


def test_image_stats_measures_a_sample_once_and_any_change_in_it_again(monkeypatch):
    """A run's phases and stages train on the same images: their statistics are measured once (the cell finder
    is the cost), and a sample differing in one pixel, or another sample, is measured afresh."""
    x = smears(20, seed=3)
    real, calls = framing.apparent_size, []
    monkeypatch.setattr(framing, "apparent_size", lambda img: calls.append(1) or real(img))
    monkeypatch.setattr(domain, "_MEASURED", {})
    first = domain.image_stats(x, max_images=10, seed=5)
    assert len(calls) == 10
    first["mean_rgb"][0] = -1.0  # the caller's copy: what is remembered stays as measured
    again = domain.image_stats(x.copy(), max_images=10, seed=5)
    assert len(calls) == 10 and again["mean_rgb"][0] != -1.0
    monkeypatch.setattr(domain, "_MEASURED", {})
    assert domain.image_stats(x, max_images=10, seed=5) == again and len(calls) == 20  # the same figures
    changed = x.copy()
    changed[np.sort(np.random.default_rng(5).permutation(20)[:10])[0], 0, 0, 0] ^= 1
    domain.image_stats(changed, max_images=10, seed=5)
    domain.image_stats(x, max_images=10, seed=6)
    assert len(calls) == 40


# ----------------------------------------------------------------------------------------------
# End to end: train with every lever, load with plain Keras, inspect
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lever_run(demo_root, tmp_path_factory):
    import train_cnn
    base = tmp_path_factory.mktemp("microscope")
    policy = keras.mixed_precision.global_policy().name
    train_cnn.main(["--data", str(demo_root), "--image-size", "24", "--epochs", "1", "--width", "4", "--depth", "2",
                    "--dense", "8", "--stain-norm", "reinhard", "--stain-jitter", "0.1", "--frame-cell", "0.5",
                    "--style-noise", "0.5", "--nucleus-view", "--out", str(base / "run"), "--cache-dir",
                    str(base / "cache"), "--quiet"])
    yield base / "run", base / "cache", demo_root
    keras.mixed_precision.set_global_policy(policy)


def test_saved_model_with_normalisation_inside_loads_and_predicts_with_plain_keras(lever_run, tmp_path):
    run_dir, _, _ = lever_run
    meta = runfiles.read_h5_metadata(run_dir / "model.h5")
    assert meta["framing"]["share"] == 0.5 and meta["stain_normalisation"]["method"] == "reinhard"
    assert meta["framing"]["version"] == framing.VERSION
    assert meta["domain_options"]["style_noise"] == 0.5  # trained with it; the plain-Keras load below has none of it
    assert set(meta["image_stats"]) >= {"mean_rgb", "std_rgb", "cell_size_median"}
    x = np.stack([framing.frame_image(smear(seed=s), 24, 0.5) for s in range(3)])
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, keras, numpy as np; m = keras.models.load_model(sys.argv[1], compile=False); "
            "x = np.load(sys.argv[2]); np.save(sys.argv[3], m.predict_on_batch(x)); "
            "np.save(sys.argv[4], keras.Model(m.input, m.get_layer('stain_norm_clip').output)(x)); "
            "np.save(sys.argv[5], keras.Model(m.input, m.get_layer('nucleus_view_rgb').output)(x))")
    # A fresh interpreter in another folder, without this project on its path: built-in layers only.
    done = subprocess.run([sys.executable, "-c", code, str(run_dir / "model.h5"), str(tmp_path / "x.npy"),
                           str(tmp_path / "p.npy"), str(tmp_path / "n.npy"), str(tmp_path / "v.npy")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    plain = np.load(tmp_path / "p.npy")
    ours = runfiles.load_core_model(run_dir / "model.h5").predict_on_batch(x)
    np.testing.assert_allclose(plain, np.asarray(ours), atol=1e-5)
    assert plain.shape == (3, 5) and np.allclose(plain.sum(1), 1, atol=1e-3)
    # The loaded model normalises exactly as the documented function does (Keras' .h5 loader once lost a
    # LayerNormalization's axes here, silently).
    normalised = stain.reinhard_normalise(x, meta["stain_normalisation"])
    np.testing.assert_allclose(np.load(tmp_path / "n.npy"), normalised, atol=0.01)
    # ... and reads the nucleus view of the normalised image, as the documented function computes it.
    assert meta["nucleus_view"]["inside_model"] and meta["domain_options"]["nucleus_view"] is True
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), stain.nucleus_view(normalised), atol=0.05)


def test_init_from_a_model_with_another_nucleus_view_is_one_line(lever_run, tmp_path, capsys):
    import train_cnn
    run_dir, _, demo_root = lever_run
    argv = ["--data", demo_root, "--image-size", "24", "--stain-norm", "reinhard", "--frame-cell", "0.5",
            "--init", run_dir / "model.h5", "--out", tmp_path / "x"]
    assert exit_status(train_cnn.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained with --nucleus-view, this run without it" in err, err
    assert not (tmp_path / "x").exists()


def call(argv):
    with pytest.raises(SystemExit) as done:
        cli.run_main(lambda: inspect_model.main([str(a) for a in argv]))
    return done.value.code


def test_inspect_tta_1_and_adapt_bn_and_the_adapted_model(lever_run, tmp_path, capsys):
    run_dir, cache, demo_root = lever_run
    images = demo_root / "WBC_100" / "val" / "data"
    model = run_dir / "model.h5"
    assert call([model, "predict", images, "--out", tmp_path / "plain.csv"]) == 0
    assert call([model, "predict", images, "--tta", "1", "--out", tmp_path / "tta1.csv"]) == 0
    assert (tmp_path / "plain.csv").read_text() == (tmp_path / "tta1.csv").read_text()
    assert call([model, "evaluate", images, "--tta", "2", "--adapt-bn", images, "--save-adapted",
                 tmp_path / "adapted.h5", "--out", tmp_path / "eval", "--cache-dir", cache]) == 0
    err = capsys.readouterr().err
    assert "batch-norm statistics re-estimated on" in err
    adapted = runfiles.read_h5_metadata(tmp_path / "adapted.h5")
    assert adapted["adapted_batchnorm"]["images"] > 0 and adapted["framing"] == {
        **runfiles.read_h5_metadata(model)["framing"]}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] > 0


def test_adapt_bn_skips_and_names_an_image_over_max_pixels(lever_run, tmp_path, capsys, cache_dir):
    """--max-pixels reaches the --adapt-bn folder's decoding: the 200x200 image there (over 20,000 pixels) is
    left out and named, the four 128x128 ones adapt the statistics."""
    import shutil
    from PIL import Image
    run_dir, _, demo_root = lever_run
    cells = sorted((demo_root / "WBC_100" / "val" / "data" / "Neutrophil").iterdir())[:4]
    lab = tmp_path / "other_lab"
    lab.mkdir()
    for f in cells:
        shutil.copy(f, lab / f.name)
    with Image.open(cells[0]) as im:
        im.resize((200, 200)).save(lab / "huge.png")
    capsys.readouterr()
    assert call([run_dir / "model.h5", "predict", *cells, "--adapt-bn", lab, "--max-pixels", "20000",
                 "--out", tmp_path / "p.csv"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "huge.png" in line]
    assert len(warning) == 1 and "over --max-pixels" in warning[0] and warning[0].startswith("warning: other_lab"), err
    assert "batch-norm statistics re-estimated on 4 images" in err


def test_domain_option_mistakes_are_one_line_errors(tmp_path, capsys):
    # through the command line's entry (cli.run_main) in this process; fresh processes' output: test_train_cnn.py
    import train_cnn
    for argv in (["--stain-jitter", "1.5"], ["--frame-cell", "2"], ["--norm", "instance"], ["--style-noise", "-0.5"]):
        assert exit_status(train_cnn.main, [*argv, "--out", tmp_path / "x"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
    assert exit_status(inspect_model.main, [tmp_path / "m.h5", "predict", tmp_path, "--save-adapted",
                                            tmp_path / "a.h5"]) == 2
    assert "--save-adapted: needs --adapt-bn" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_default_recipe_frames_and_normalises_stain_and_the_report_recipe_does_not():
    import pretrain_ssl
    import train_cnn
    import train_masked
    default = train_cnn.parse_args([])
    assert (default.frame_cell, default.stain_norm, default.stain_jitter) == (0.5, "reinhard", 0.2)
    report = train_cnn.parse_args(["--recipe", "report"])
    assert (report.frame_cell, report.stain_norm, report.stain_jitter) == (0.0, "none", 0.0)
    off = train_cnn.parse_args(["--frame-cell", "0", "--stain-norm", "none", "--stain-jitter", "0"])
    assert (off.frame_cell, off.stain_norm, off.stain_jitter) == (0.0, "none", 0.0)
    # --consistency has its own augmentation: the recipe's stain jitter is left out, a given one is refused
    assert train_masked.parse_args(["--consistency", "0.5"]).stain_jitter == 0.0
    with pytest.raises(cli.UserError, match="--stain-jitter with --consistency"):
        train_masked.parse_args(["--consistency", "0.5", "--stain-jitter", "0.1"])
    with pytest.raises(cli.UserError, match="--style-noise with --consistency"):  # its wrapper would be left out
        train_masked.parse_args(["--consistency", "0.5", "--style-noise", "0.5"])
    # the self-supervised encoder sees the cells framed as the classifier it initialises will
    assert pretrain_ssl.parse_args([]).frame_cell == 0.5
    assert pretrain_ssl.parse_args(["--recipe", "report"]).frame_cell == 0.0
