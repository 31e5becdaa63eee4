"""data.py: layout discovery, class matching, decoding, the cache, the augmentation layer."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import data
from conftest import shared_data
import augment
import runfiles


def write_image(path, color=(200, 100, 50), size=(40, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)
    return path


def make_course(root, classes=("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil"), per_class=2):
    for split in ("WBC_100", "WBC_10"):
        for i, cls in enumerate(classes):
            for k in range(per_class):
                write_image(root / split / "train" / "data" / cls / f"{cls}_{k}.jpg", (i * 40, 80, 120))
    for i, cls in enumerate(classes):
        write_image(root / "WBC_100" / "val" / "data" / cls / f"v_{cls}.jpg", (i * 40, 80, 120))
    write_image(root / "WBC_100" / "train" / "mask" / classes[0] / f"{classes[0]}_0.png", (255,), mode="L")
    return root


# ---------------------------------------------------------------- layout and classes

@pytest.mark.parametrize("name,expected", [("Neutrophil", "neutrophil"), ("neutrophils", "neutrophil"),
                                           ("LYMPHOCYTE", "lymphocyte"), ("Eosinophiles", "eosinophil"), ("eosinophilia", None),
                                           ("basophil ", "basophil"), ("monocytes", "monocyte"), ("rbc", None)])
def test_canonical_class_matches_case_and_plural(name, expected):
    assert data.canonical_class(name) == expected


def test_course_layout_uses_shared_val_and_pairs_masks(tmp_path):
    root = make_course(tmp_path)
    split = data.find_split(root, "WBC_10")
    assert split.train.classes == data.WBC_CLASSES
    assert len(split.train) == 10 and len(split.val) == 5
    assert all("WBC_100/val" in str(p) for p in split.val.paths)  # WBC_10 has no val/: the shared one
    assert split.train.counts() == {c: 2 for c in data.WBC_CLASSES}
    full = data.find_split(root, "WBC_100")
    assert sum(m is not None for m in full.train.masks) == 1
    assert full.train.masks[0].name == "Basophil_0.png"


def test_split_own_val_wins(tmp_path):
    root = make_course(tmp_path)
    write_image(root / "WBC_10" / "val" / "data" / "Neutrophil" / "own.jpg")
    split = data.find_split(root, "WBC_10")
    assert [p.name for p in split.val.paths] == ["own.jpg"]


def test_folder_per_class_with_junk_and_other_spellings(tmp_path):
    write_image(tmp_path / "neutrophils" / "a.png")
    write_image(tmp_path / "MONOCYTE" / "b.jpg")
    write_image(tmp_path / "MONOCYTE" / ".ipynb_checkpoints" / "b-checkpoint.jpg")
    (tmp_path / "MONOCYTE" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "MONOCYTE" / "notes.txt").write_text("not an image")
    (tmp_path / "Thumbs.db").write_bytes(b"junk")
    files = data.scan_class_folders(tmp_path)
    assert [p.name for p in files.paths] == ["b.jpg", "a.png"]  # canonical class order: monocyte first
    assert files.labels.tolist() == [3, 4]


@pytest.mark.parametrize("make,fragment", [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: (p / "WBC_100").mkdir() or p, "missing train/data"),
    (lambda p: p, "no WBC_100 folder"),
])
def test_bad_layouts_raise_user_errors_naming_the_path(tmp_path, make, fragment):
    root = make(tmp_path)
    with pytest.raises(runfiles.UserError) as e:
        data.find_split(root, "WBC_100")
    assert fragment in str(e.value) and str(tmp_path) in str(e.value)


def test_empty_class_folders_are_a_user_error(tmp_path):
    (tmp_path / "neutrophil").mkdir()
    with pytest.raises(runfiles.UserError, match="hold no images"):
        data.scan_class_folders(tmp_path)


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("mode,color", [("RGB", (10, 20, 30)), ("L", (77,)), ("RGBA", (10, 20, 30, 255)),
                                        ("P", (5,)), ("CMYK", (0, 0, 0, 0)), ("I;16", (65535,))])
def test_decode_any_mode_to_rgb_uint8(tmp_path, mode, color):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    Image.new(mode, (20, 10), color).save(path)
    out = data.decode_image(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out.min() == 255  # full-scale 16-bit is white, not clipped garbage


def test_decode_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = data.decode_image(tmp_path / "r.jpg", 20).astype(int)
    assert out[:8].mean() > 200 and out[-8:].mean() < 50  # after rotation the white half is on top


# ---------------------------------------------------------------- the cache

def test_cache_hit_invalidation_and_no_partial_files(tmp_path):
    root = make_course(tmp_path / "d")
    files = data.find_split(root, "WBC_100").train
    cache = tmp_path / "cache"
    first = data.load_images(files, 16, cache_dir=cache, verbose=False)
    assert isinstance(first.x, np.memmap) or isinstance(getattr(first.x, "base", None), np.memmap)
    (npy,) = cache.glob("*.npy")
    mtime = npy.stat().st_mtime_ns
    second = data.load_images(files, 16, cache_dir=cache, verbose=False)
    assert npy.stat().st_mtime_ns == mtime  # hit: not rewritten
    np.testing.assert_array_equal(first.x, second.x)
    assert not list(cache.glob("*.part")) and not list(cache.glob("*.tmp-*"))
    # Changing a file or a pixel-changing option makes a new key.
    write_image(files.paths[0], (0, 255, 0))
    os.utime(files.paths[0], ns=(1, 1))
    changed = data.load_images(files, 16, cache_dir=cache, verbose=False)
    assert len(list(cache.glob("*.npy"))) == 2
    assert not np.array_equal(changed.x[0], first.x[0])
    data.load_images(files, 24, cache_dir=cache, verbose=False)
    assert len(list(cache.glob("*.npy"))) == 3


def test_torn_cache_array_or_foreign_json_is_rebuilt_not_read(tmp_path):
    root = make_course(tmp_path / "d")
    files = data.find_split(root, "WBC_100").train
    cache = tmp_path / "cache"
    expected = np.array(data.load_images(files, 16, cache_dir=cache, verbose=False).x)
    (meta,) = cache.glob("*.json")
    npy = meta.with_suffix(".npy")
    torn = npy.with_name("torn")
    torn.write_bytes(npy.read_bytes()[:200])
    os.replace(torn, npy)  # a torn array file under the cache's name (a new inode: live maps stay valid)
    again = data.load_images(files, 16, cache_dir=cache, verbose=False)  # rebuilt, not read
    np.testing.assert_array_equal(again.x, expected)
    meta.write_text(json.dumps({"key": "other"}))  # a JSON that does not match
    assert data._read_cache(cache, meta.stem, data.WBC_CLASSES) is None


def test_corrupt_image_is_skipped_and_counted(tmp_path, capsys):
    root = make_course(tmp_path / "d")
    bad = root / "WBC_100" / "train" / "data" / "Neutrophil" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    files = data.find_split(root, "WBC_100").train
    images = data.load_images(files, 16, cache_dir=tmp_path / "c", verbose=False)
    assert len(images) == len(files) - 1 and images.skipped == [str(bad)]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 1 unreadable image" in err and "broken.jpg" in err


# ---------------------------------------------------------------- augmentation

def _batch(n=4, size=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("warp", ["builtin", "gather"])
def test_augmentation_shapes_dtype_and_seeded_determinism(warp):
    x = _batch()
    a = augment.make_augmentation(rotation=30, shear=10, seed=3, warp=warp)
    b = augment.make_augmentation(rotation=30, shear=10, seed=3, warp=warp)
    out_a = np.asarray(a(x, training=True))
    out_b = np.asarray(b(x, training=True))
    assert out_a.shape == x.shape and out_a.dtype == np.uint8
    np.testing.assert_array_equal(out_a, out_b)
    assert not np.array_equal(out_a, x)
    np.testing.assert_array_equal(np.asarray(a(x, training=False)), x)  # inference: untouched


@pytest.mark.parametrize("warp", ["builtin", "gather"])
def test_identity_at_zero_strength_and_exact_flip(warp):
    x = _batch()
    keras = pytest.importorskip("keras")
    identity = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]], np.float32), (len(x), 1, 1))
    np.testing.assert_array_equal(np.asarray(augment.warp_images(x, keras.ops.convert_to_tensor(identity), warp)), x)
    flip = identity.copy()
    flip[:, 1, 1], flip[:, 1, 2] = -1.0, x.shape[2] - 1.0  # col -> W-1-col
    np.testing.assert_array_equal(np.asarray(augment.warp_images(x, keras.ops.convert_to_tensor(flip), warp)),
                                  x[:, :, ::-1])
    layer = augment.make_augmentation(rotation=0, shear=0, horizontal_flip=False, vertical_flip=False)
    np.testing.assert_array_equal(np.asarray(layer(x, training=True)), x)


def test_builtin_and_gather_warps_agree():
    pytest.importorskip("keras")
    x = _batch(size=32)
    layer = augment.make_augmentation(rotation=40, shear=15, zoom=0.1, shift=0.1, seed=1)
    m = layer.random_matrices(len(x), 32, 32)
    a = np.asarray(augment.warp_images(x, m, "builtin")).astype(int)
    b = np.asarray(augment.warp_images(x, m, "gather")).astype(int)
    assert np.abs(a - b).mean() < 1.0  # same geometry; rounding differs by at most a grey level or so


@pytest.mark.parametrize("warp", ["builtin", "gather"])
def test_augmentation_keeps_each_image_with_its_label(warp):
    """Image i of a batch stays image i: a flat image whose colour encodes its label keeps that colour."""
    labels = np.arange(8) % 5
    x = np.repeat((labels * 50 + 5).astype(np.uint8)[:, None, None, None], 16, 1).repeat(16, 2).repeat(3, 3)
    out = np.asarray(augment.make_augmentation(rotation=90, shear=20, zoom=0.2, shift=0.2, seed=0, warp=warp)(
        x, training=True))
    np.testing.assert_array_equal(out, x)


def test_training_model_wraps_core_and_saved_core_has_no_augmentation():
    import models
    core = models.build_cnn(5, 16, width=4, depth=1, dense=0)
    train_model = augment.with_augmentation(core, dict(rotation=30, shear=10, horizontal_flip=True,
                                                           vertical_flip=True, zoom=0, shift=0), seed=0)
    assert any(type(l).__name__ == "RandomAffine" for l in train_model.layers)
    assert not any(type(l).__name__ == "RandomAffine" for l in core.layers)
    assert augment.with_augmentation(core, None, seed=0) is core


# ---------------------------------------------------------------- real images

def test_real_pbc_images_decode_and_cache(tmp_path):
    pbc = shared_data("pbc")
    files = data.scan_class_folders(pbc)
    assert files.classes == data.WBC_CLASSES and len(files) > 5000
    few = data.FileList(files.paths[::600], files.labels[::600], files.classes, [None] * 10, pbc)
    images = data.load_images(few, 32, cache_dir=tmp_path, verbose=False)
    assert images.x.shape == (len(few), 32, 32, 3) and not images.skipped
    assert 60 < images.x.mean() < 240  # real stained cells, not black frames
