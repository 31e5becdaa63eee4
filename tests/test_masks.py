"""Masks: pairing by stem, every mask format, the four modes' counts, the fill, train_masked.py end to end."""
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

import data
import runfiles

SIZE = 16


def _save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def _disc(size=48, radius=14, value=255):
    yy, xx = np.mgrid[:size, :size]
    return np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius ** 2, value, 0).astype(np.uint8)


def _image(rng, size=48):
    return rng.integers(40, 220, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- pairing

def test_pairing_by_stem_across_suffixes_and_class_spellings(tmp_path):
    rng = np.random.default_rng(0)
    data_dir, mask_dir = tmp_path / "data", tmp_path / "mask"
    suffixes = [".png", ".jpg", ".jpeg", ".bmp", ".tif"]
    for i, suffix in enumerate(suffixes):
        _save(data_dir / "Neutrophil" / f"cell{i}.jpg", _image(rng))
        # The mask folder is spelled differently (plural, lower case): matched canonically.
        _save(mask_dir / "neutrophils" / f"cell{i}{suffix}", _disc())
    _save(data_dir / "Neutrophil" / "nomask.jpg", _image(rng))
    _save(data_dir / "Monocyte" / "twice.jpg", _image(rng))
    _save(mask_dir / "Monocyte" / "twice.jpg", _disc())
    _save(mask_dir / "Monocyte" / "twice.png", _disc())  # lossless wins when one stem has several masks
    _save(mask_dir / "Monocyte" / "cell0.png", _disc())  # same stem, other class: not this image's mask

    files = data.scan_class_folders(data_dir, data.WBC_CLASSES, mask_dir)
    pairs = {p.name: (m.name if m else None) for p, m in zip(files.paths, files.masks)}
    assert pairs == {**{f"cell{i}.jpg": f"cell{i}{s}" for i, s in enumerate(suffixes)},
                     "nomask.jpg": None, "twice.jpg": "twice.png"}
    assert [m.parent.name for m in files.masks if m and m.stem.startswith("cell")] == ["neutrophils"] * 5


# ---------------------------------------------------------------------------------------------- formats

def _mask_files(tmp_path):
    """The same disc (the whole cell) in every format a mask arrives in; 96 px while images are 48 px."""
    disc = _disc(96, 28)
    three = _disc(96, 28, 128)
    three[_disc(96, 12) > 0] = 255  # 0 background, 128 cytoplasm, 255 nucleus
    jpeg = io.BytesIO()
    Image.fromarray(disc).save(jpeg, "JPEG", quality=40)
    noisy = np.asarray(Image.open(jpeg))
    assert len(np.unique(noisy)) > 2  # really noisy
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[..., 3] = disc  # transparent background, opaque white cell
    rgba[..., :3] = 255
    palette = Image.fromarray((disc > 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # VOC style: class 1 is dark red
    palette_path = tmp_path / "palette.png"
    palette.save(palette_path)
    return {
        "binary": _save(tmp_path / "binary.png", disc),
        "one_bit": _save(tmp_path / "one_bit.png", disc > 0),
        "label_map_0_1": _save(tmp_path / "label.png", (disc > 0).astype(np.uint8)),
        "jpeg_noisy": _save(tmp_path / "noisy.jpg", noisy, quality=95),
        "three_level": _save(tmp_path / "three.png", three),
        "three_level_bmp": _save(tmp_path / "three.bmp", three),
        "three_level_tif": _save(tmp_path / "three.tif", three),
        "rgb_white": _save(tmp_path / "rgb.png", np.repeat(disc[..., None], 3, -1)),
        "rgba_transparent": _save(tmp_path / "rgba.png", rgba),
        "palette_dark_red": palette_path,
    }


def test_every_mask_format_gives_the_whole_cell(tmp_path):
    expected = np.asarray(Image.fromarray(_disc(96, 28)).resize((SIZE, SIZE), Image.NEAREST)) > 0
    assert 0 < expected.sum() < SIZE * SIZE
    for kind, path in _mask_files(tmp_path).items():
        cell = data.decode_mask(path, SIZE)
        assert cell.dtype == bool and cell.shape == (SIZE, SIZE), kind
        # JPEG noise may move the edge by a pixel; nothing else may differ.
        assert (cell != expected).sum() <= (3 if kind == "jpeg_noisy" else 0), kind


# ---------------------------------------------------------------------------------------------- fill

@pytest.mark.parametrize("fill", data.MASK_FILLS)
def test_outside_the_cell_is_the_fill_and_inside_unchanged(fill):
    rng = np.random.default_rng(1)
    image = _image(rng, SIZE * 2)
    cell = _disc(SIZE * 2, 9) > 0
    out = data.apply_mask(image, cell, fill)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[cell], image[cell])
    if fill == "black":
        expected = np.zeros_like(image)
    elif fill == "mean":
        expected = np.broadcast_to(image.reshape(-1, 3).mean(0).round().astype(np.uint8), image.shape)
    else:
        expected = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(max(2, SIZE * 2 // 16))))
        assert not np.array_equal(expected[~cell], image[~cell])  # a blur, not a copy
    np.testing.assert_array_equal(out[~cell], expected[~cell])


# ---------------------------------------------------------------------------------------------- modes

@pytest.fixture
def tiny_layout(tmp_path):
    """WBC_100 with 3 neutrophils (2 masked, one mask empty), 2 lymphocytes (1 masked, unreadable), 1 monocyte."""
    rng = np.random.default_rng(2)
    root = tmp_path / "root"
    train, mask = root / "WBC_100" / "train" / "data", root / "WBC_100" / "train" / "mask"
    for cls, n in (("Neutrophil", 3), ("Lymphocyte", 2), ("Monocyte", 1)):
        for i in range(n):
            _save(train / cls / f"{cls[:3]}{i}.jpg", _image(rng))
            _save(root / "WBC_100" / "val" / "data" / cls / f"v{cls[:3]}{i}.jpg", _image(rng))
    _save(mask / "Neutrophil" / "Neu0.png", _disc())
    _save(mask / "Neutrophil" / "Neu1.png", _disc())
    _save(mask / "Neutrophil" / "Neu2.png", np.zeros((48, 48), np.uint8))  # empty
    (mask / "Lymphocyte").mkdir(parents=True)
    (mask / "Lymphocyte" / "Lym0.png").write_bytes(b"not a png")  # unreadable
    return root


def test_counts_of_each_mode_and_broken_masks(tiny_layout, cache_dir, capsys):
    files = data.find_split(tiny_layout, "WBC_100").train
    assert sum(m is not None for m in files.masks) == 4
    sets = {}
    for mode in data.MASK_MODES:
        sets[mode] = data.load_images(files, SIZE, mode, cache_dir=cache_dir, verbose=False)
        err = capsys.readouterr().err
        if mode == "none":
            assert "mask" not in err
        else:  # both broken masks counted and named in ONE line
            lines = [line for line in err.splitlines() if "mask" in line]
            assert len(lines) == 1 and "2 unreadable or empty mask(s)" in lines[0], err
            assert "Neu2.png" in lines[0] and "Lym0.png" in lines[0]
            assert sorted(data.Path(p).name for p in sets[mode].mask_problems) == ["Lym0.png", "Neu2.png"]
    counts = {mode: (s.counts(), int(s.masked.sum())) for mode, s in sets.items()}
    by_class = lambda neu, lym, mon: {"basophil": 0, "eosinophil": 0, "lymphocyte": lym, "monocyte": mon,  # noqa
                                      "neutrophil": neu}
    assert counts["none"] == (by_class(3, 2, 1), 0)
    assert counts["only"] == (by_class(2, 0, 0), 2)       # broken masks: no masked copy, no raw stand-in
    assert counts["replace"] == (by_class(3, 2, 1), 2)    # broken masks: the image stays, unmasked
    assert counts["add"] == (by_class(5, 2, 1), 2)
    # The masked images really are masked (black corners) and the raw ones are not.
    for mode in ("only", "replace", "add"):
        s = sets[mode]
        assert (s.x[s.masked][:, 0, 0] == 0).all() and (s.x[~s.masked][:, 0, 0] > 0).all()

    # A cache hit gives the same sets and the same one warning.
    again = data.load_images(files, SIZE, "only", cache_dir=cache_dir, verbose=False)
    np.testing.assert_array_equal(again.x, sets["only"].x)
    assert "2 unreadable or empty mask(s), masked copies left out" in capsys.readouterr().err


def test_cache_key_includes_mode_and_fill(tiny_layout):
    files = data.find_split(tiny_layout, "WBC_100").train
    files.masks = [files.masks[0]] * len(files)  # every image has a mask: 'only' and 'replace' list the same files
    keys = {(mode, fill): data.cache_key(data._entries(files, mode), SIZE, fill, mode)
            for mode in ("only", "replace") for fill in data.MASK_FILLS}
    assert len(set(keys.values())) == len(keys)


# ---------------------------------------------------------------------------------------------- training

def test_consistency_penalty_zero_without_mask_positive_with():
    import keras

    import consistency
    import models

    keras.utils.set_random_seed(0)
    core = models.build_cnn(5, SIZE, width=4, depth=2, dense=8, dropout=0.0, dropout_step=0.0)
    aug = dict(rotation=30.0, shear=5.0, horizontal_flip=True, vertical_flip=True, zoom=0.0, shift=0.0)
    model = consistency.consistency_model(core, aug, weight=2.0, seed=0)
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    masked = raw.copy()
    masked[:, : SIZE // 2] = 0

    def penalty(a, b):
        out = model([a, b], training=True)
        assert out.shape == (4, 5)
        return float(keras.ops.convert_to_numpy(sum(model.losses)))

    assert penalty(raw, raw) == 0.0
    assert penalty(raw, masked) > 0.0
    # Only the masked rows count: half masked, half not, gives a smaller penalty than all masked.
    half = np.concatenate([masked[:2], raw[2:]])
    assert 0.0 < penalty(raw, half) < penalty(raw, masked)
    # The training wrapper shares the core's weights (model.h5 stays the plain core).
    assert {id(w) for w in core.weights} <= {id(w) for w in model.weights}


@pytest.mark.parametrize("argv", [["--masks", "none"], ["--masks", "only"], ["--masks", "replace"],
                                  ["--masks", "add", "--mask-fill", "blur"], ["--consistency", "1.0"]])
def test_train_masked_runs_every_mode_on_demo_data(argv, demo_root, cache_dir, tmp_path, capsys):
    import train_masked
    out = tmp_path / "run"
    train_masked.main(["--data", str(demo_root), "--image-size", str(SIZE), "--epochs", "1", "--batch-size", "64",
                       "--width", "4", "--depth", "2", "--dense", "8", "--quiet", "--out", str(out), *argv])
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    mode = "consistency" if "--consistency" in argv else argv[1]
    assert metrics["mask_mode"] == mode
    files = data.find_split(demo_root, "WBC_100").train
    n_images, n_masks = len(files), sum(m is not None for m in files.masks)
    total = {"none": n_images, "only": n_masks, "replace": n_images, "add": n_images + n_masks,
             "consistency": n_images}[mode]
    counts = metrics["mask_counts"]
    assert sum(c["images"] for c in counts.values()) == total
    assert sum(c["masked"] for c in counts.values()) == (0 if mode == "none" else n_masks)
    assert f"--masks {mode}: {total} training images" in printed
    for cls, c in counts.items():
        assert f"{cls} {c['images']} ({c['masked']})" in printed
    assert (out / "model.h5").exists()


def test_tiny_masked_subset_runs_to_the_end_and_collapse_is_visible(demo_root, cache_dir, tmp_path, capsys):
    import train_masked
    out = tmp_path / "run"
    train_masked.main(["--data", str(demo_root), "--split", "WBC_1", "--masks", "only", "--image-size", str(SIZE),
                       "--epochs", "2", "--width", "4", "--depth", "2", "--dense", "8", "--quiet",
                       "--out", str(out)])
    captured = capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    counts = metrics["mask_counts"]
    assert 0 < sum(c["images"] for c in counts.values()) < 10
    assert set(metrics["per_class_recall"]) == set(data.WBC_CLASSES)
    absent = [cls for cls, c in counts.items() if c["images"] == 0]
    assert absent and "no training images in this mode for " + ", ".join(absent) in captured.err
    for key in ("balanced_accuracy", "macro_f1", "majority_baseline", "collapsed_to_majority"):
        assert key in metrics
    assert ("warning: the model collapsed" in captured.err) == metrics["collapsed_to_majority"]


def test_bad_options_are_one_line_errors(tmp_path, cache_dir, tiny_layout, capsys):
    import cli
    import train_masked
    with pytest.raises(runfiles.UserError, match="--consistency -1"):
        train_masked.main(["--data", str(tiny_layout), "--consistency", "-1"])
    # the consistency wrapper warps 6-channel images: every on-device photometric option is refused, by name
    with pytest.raises(runfiles.UserError, match="no --color-jitter, .* or --random-conv"):
        train_masked.main(["--data", str(tiny_layout), "--consistency", "1", "--random-conv", "0.5"])
    (tiny_layout / "WBC_100" / "train" / "mask").rename(tmp_path / "gone")
    with pytest.raises(runfiles.UserError, match="no image has a mask"):
        train_masked.main(["--data", str(tiny_layout), "--masks", "only", "--image-size", str(SIZE),
                           "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: train_masked.main(["--data", str(tiny_layout), "--masks", "only",
                                                "--image-size", str(SIZE), "--out", str(tmp_path / "run")]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no image has a mask" in err[-1]


def test_real_bccd_masks_pair_and_give_the_whole_cell(cache_dir):
    from conftest import shared_data
    bccd = shared_data("bccd")
    files = data.scan_class_folders(bccd / "data", data.WBC_CLASSES, bccd / "mask")
    assert len(files) == 351 and all(m is not None for m in files.masks)
    for mask_path in files.masks[::50]:
        levels = np.asarray(Image.open(mask_path).convert("L"))
        assert {0, 128, 255} <= set(np.unique(levels).tolist())  # really 3-level: cytoplasm and nucleus
        cell = data.decode_mask(mask_path, 32)
        whole = np.asarray(Image.fromarray(levels).resize((32, 32), Image.NEAREST)) > 0
        np.testing.assert_array_equal(cell, whole)  # cytoplasm included, not only the nucleus
