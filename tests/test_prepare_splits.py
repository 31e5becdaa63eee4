"""prepare_splits.py: the course layout from a folder-per-class dataset, nested subsets, masks, proportions,
reproducibility, and one-line errors. Tiny generated images; PBC and BCCD cases skip when absent."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import prepare_splits
from conftest import run_script, shared_data

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


def make_source(root: Path, counts: dict, masks: bool = False, extra_folder: str | None = None) -> Path:
    """A folder-per-class dataset of 8x8 JPEGs (and same-stem PNG masks under root/mask)."""
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        for i in range(n):
            d = root / "data" / cls
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{cls[:2]}_{i}.jpg")
            if masks:
                m = root / "mask" / cls
                m.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8), 255, np.uint8)).save(m / f"{cls[:2]}_{i}.png")
    if extra_folder:
        (root / "data" / extra_folder).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "data" / extra_folder / "x.jpg")
    return root / "data"


def half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def names(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "src", {"basophil": 5, "eosinophil": 12, "lymphocyte": 30, "monocyte": 9,
                                          "neutrophil": 120}, masks=True, extra_folder="platelet")


def test_layout_is_stratified_nested_and_loadable(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare_splits.main([str(source), str(out), "--masks", str(source.parent / "mask")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    src = {"basophil": 5, "eosinophil": 12, "lymphocyte": 30, "monocyte": 9, "neutrophil": 120}
    for cls, n in src.items():
        train, val = counts["WBC_100/train"][cls], counts["WBC_100/val"][cls]
        assert train + val == n
        assert val == half_up(n / 6)  # 5:1 per class
        assert counts["WBC_1/train"][cls] == max(1, half_up(0.01 * train))  # every class keeps one image
        assert counts["WBC_10/train"][cls] == max(1, half_up(0.1 * train))
    assert manifest["ignored_folders"] == ["platelet"]
    # Nested: WBC_1 within WBC_10 within WBC_50 within WBC_100/train; val disjoint from train.
    sets = [names(out / s / "train" / "data") for s in ("WBC_1", "WBC_10", "WBC_50", "WBC_100")]
    assert all(a < b for a, b in zip(sets, sets[1:]))
    assert not sets[-1] & names(out / "WBC_100" / "val" / "data")
    # Symlinks to the source, never copies; the class folders spelled as the course spells them.
    link = next((out / "WBC_100" / "train" / "data" / "Neutrophil").iterdir())
    assert link.is_symlink() and Path(os.readlink(link)).parent == (source / "neutrophil").resolve()
    # Masks: 10% of each class's training images (rounded), each paired with an image of the same stem.
    masks = manifest["mask_counts"]["WBC_100/train"]
    assert masks == {c: half_up(0.1 * counts["WBC_100/train"][c]) for c in src}
    # The project's own loader reads every split, with the masks paired.
    for split in ("WBC_100", "WBC_1"):
        files = data.find_split(out, split)
        assert files.train.counts() == counts[f"{split}/train"]
        assert files.val.counts() == counts["WBC_100/val"]
    full = data.find_split(out, "WBC_100").train
    assert sum(m is not None for m in full.masks) == sum(masks.values())
    assert "WBC_1/train" in capsys.readouterr().out


def test_course_proportions_seed_and_copy(source, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prepare_splits.main([str(source), str(a), "--proportions", "course", "--seed", "3"])
    prepare_splits.main([str(source), str(b), "--proportions", "course", "--seed", "3", "--copy"])
    prepare_splits.main([str(source), str(c), "--proportions", "course", "--seed", "4"])
    counts = json.loads((a / "manifest.json").read_text())["counts"]
    total = {k: counts["WBC_100/train"][k] + counts["WBC_100/val"][k] for k in CLASSES}
    # Lymphocyte limits the total to 30 / 0.239 = 125.5 images; each class gets its course share of that.
    assert total == {"basophil": 3, "eosinophil": 9, "lymphocyte": 30, "monocyte": 7, "neutrophil": 77}
    assert names(a) == names(b)  # same seed, same files
    assert names(a) != names(c)  # another seed draws other images
    copied = next((b / "WBC_1" / "train" / "data" / "Basophil").iterdir())
    assert not copied.is_symlink() and copied.stat().st_size > 0
    assert json.loads((b / "manifest.json").read_text())["files"] == "copies"


def test_proportional_counts_never_exceed_available():
    got = prepare_splits.proportional_counts({"basophil": 899, "eosinophil": 1487, "lymphocyte": 902,
                                              "monocyte": 1050, "neutrophil": 1514},
                                             prepare_splits.PROPORTIONS["course"])
    assert got == {"basophil": 52, "eosinophil": 181, "lymphocyte": 591, "monocyte": 136, "neutrophil": 1514}


def test_bad_input_is_one_line_exit_2(source, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        ([str(tmp_path / "absent"), str(tmp_path / "o1")], "not a folder"),
        ([str(source), str(taken)], "already exists"),
        ([str(source), str(tmp_path / "o2"), "--masks", str(tmp_path / "nomasks")], "--masks"),
        ([str(source), str(tmp_path / "o3"), "--mask-fraction", "1.5"], "--mask-fraction"),
        ([str(source), str(source / "inside")], "inside SOURCE"),
        ([str(tmp_path), str(tmp_path / "o4")], "no class folders"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            import cli
            cli.run_main(lambda: prepare_splits.main(argv))
        assert e.value.code == 2, argv
    assert (taken / "keep.txt").read_text() == "mine"  # nothing already written is lost
    assert not (tmp_path / "o1").exists() and not (source / "inside").exists()
    # As a user runs it: one line on stderr, no traceback.
    r = run_script("prepare_splits.py", tmp_path / "absent", tmp_path / "o5")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "not a folder" in r.stderr


def test_real_pbc_course_proportions(tmp_path):
    pbc = shared_data("pbc")
    out = tmp_path / "pbc"
    prepare_splits.main([str(pbc), str(out), "--proportions", "course"])
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    val = counts["WBC_100/val"]
    assert abs(val["neutrophil"] / sum(val.values()) - 0.612) < 0.01
    assert all(v >= 1 for v in counts["WBC_1/train"].values())
    assert next((out / "WBC_1" / "train" / "data" / "Basophil").iterdir()).resolve().is_relative_to(pbc.resolve())


def test_real_bccd_masks(tmp_path):
    bccd = shared_data("bccd")
    out = tmp_path / "bccd"
    prepare_splits.main([str(bccd / "data"), str(out), "--masks", str(bccd / "mask"), "--mask-fraction", "0.5"])
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["counts"]["WBC_100/train"]
    masks = manifest["mask_counts"]["WBC_100/train"]
    assert masks == {c: half_up(0.5 * train[c]) for c in train}
    files = data.find_split(out, "WBC_100").train
    assert sum(m is not None for m in files.masks) == sum(masks.values())
