"""Hostile and odd files (docs/reliability.md): named pipes, sockets, device files and dangling links named like
images, decompression bombs of four formats, large legitimate images, many decoding threads and reads that stall.
Training, evaluate, predict, gradcam and prepare_splits skip each one, name it by its path in the data folder and
carry on, within seconds and within a stated memory bound; a named pipe used to hang a run forever.

The memory cases run tests/hostile.py in a fresh process and read its peak resident memory (getrusage)."""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import PROJECT, run_script
from hostile import gif_claiming, jpeg_claiming, make_bombs, make_special_files, png_bomb, tiff_bomb
import data

pytestmark = [pytest.mark.skipif(not hasattr(os, "mkfifo") or sys.platform == "win32",
                                 reason="named pipes, Unix sockets and /dev/zero are POSIX"),
              pytest.mark.usefixtures("no_hang")]

CLASS_FOLDERS = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
MB = 2 ** 20


def tiny_copy(demo_root: Path, root: Path, train: int = 3, val: int = 2) -> Path:
    """The first few images per class of the demo layout's WBC_100."""
    for part, n in (("train", train), ("val", val)):
        for cls in CLASS_FOLDERS:
            dst = root / "WBC_100" / part / "data" / cls
            dst.mkdir(parents=True)
            for f in sorted((demo_root / "WBC_100" / part / "data" / cls).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    return root


@pytest.fixture(scope="module")
def hostile(demo_root, tmp_path_factory):
    """A tiny demo copy with special files in two class folders (the same names in both), a bomb of each format,
    and a named pipe in the validation set: (root, {path relative to train/data: expected reason word})."""
    root = tiny_copy(demo_root, tmp_path_factory.mktemp("hostile") / "root")
    train = root / "WBC_100" / "train" / "data"
    expected = {}
    for cls in ("Neutrophil", "Basophil"):
        expected.update({f"{cls}/{name}": why for name, why in make_special_files(train / cls).items()})
    expected.update({f"Monocyte/{name}": "over --max-pixels" for name in make_bombs(train / "Monocyte")})
    os.mkfifo(root / "WBC_100" / "val" / "data" / "Eosinophil" / "val_fifo.png")
    return root, expected


@pytest.fixture(scope="module")
def trained(hostile, tmp_path_factory):
    """train_cnn.py on the hostile copy as a user runs it: (completed process, run folder, wall seconds)."""
    root, _ = hostile
    base = tmp_path_factory.mktemp("hostile_run")
    start = time.perf_counter()
    proc = run_script("train_cnn.py", "--data", root, "--image-size", 16, "--epochs", 1, "--width", 4, "--depth", 1,
                      "--dense", 8, "--batch-size", 8, "--holdout", 0, "--precision", "float32",
                      "--cache-dir", base / "cache", "--out", base / "run", "--quiet", timeout=110)
    return proc, base / "run", time.perf_counter() - start


def skipped_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "skipped" in line]


def assert_named(line: str, expected: dict):
    """Every file is named by its path relative to the data folder, beside the reason."""
    for rel, why in expected.items():
        assert rel in line, (rel, line)
        assert why in line, (why, line)


# ----------------------------------------------------------------------------------------------
# Special files: never opened, skipped, named
# ----------------------------------------------------------------------------------------------

def test_scanning_keeps_regular_files_and_names_the_rest_without_opening_them(hostile, monkeypatch):
    root, expected = hostile
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    start = time.perf_counter()
    files = data.find_split(root).train
    scan_seconds = time.perf_counter() - start
    specials = {f"{files.root}/{rel}" for rel, why in expected.items() if why != "over --max-pixels"}
    assert {str(p) for p, _ in files.rejected} == specials
    assert not specials & {str(p) for p in files.paths}
    assert not specials & set(opened)  # stat only: a pipe's open would wait for a writer
    assert scan_seconds < 10, scan_seconds  # a hang guard, not a speed figure

    images = data.load_images(files, 16, use_cache=False, verbose=False)
    assert len(images) == len(files) - 4  # the four bombs
    reasons = {os.path.relpath(p, files.root): why for p, why in zip(images.skipped, images.skip_reasons)}
    assert set(reasons) == set(expected)
    for rel, why in expected.items():
        assert reasons[rel].startswith(why), (rel, reasons[rel])


def test_training_skips_and_names_each_hostile_file_and_finishes(trained, hostile):
    proc, run_dir, seconds = trained
    _, expected = hostile
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = skipped_lines(proc.stderr)
    assert len(lines) == 2, proc.stderr  # one line for train, one for val
    train_line, val_line = lines
    assert f"skipped {len(expected)} file(s)" in train_line, train_line
    assert_named(train_line, expected)
    assert "Eosinophil/val_fifo.png" in val_line and "named pipe" in val_line, val_line
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["skipped_images"]) == len(expected) + 1
    assert metrics["train_images"] == 3 * 5 and metrics["val_images"] == 2 * 5
    assert seconds < 100, seconds  # includes importing TensorFlow; a pipe used to block for ever


# ----------------------------------------------------------------------------------------------
# Bombs: refused from the header, before any pixel is decoded
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def count_decodes(monkeypatch):
    """How many times Pillow decodes pixel data (ImageFile.load) from now on."""
    calls = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(self.size) or real(self))
    return calls


def test_bombs_of_every_format_are_refused_from_the_header(tmp_path, count_decodes):
    made = [png_bomb(tmp_path / "png_8000.png", 8000, 8000),      # 64 M: over ours (50 M), under Pillow's (89 M)
            png_bomb(tmp_path / "png_12000.png", 12000, 12000),   # 144 M: Pillow would only warn
            tiff_bomb(tmp_path / "deflate.tif", 9000, 9000),
            gif_claiming(tmp_path / "screen.gif", 9000, 9000),
            jpeg_claiming(tmp_path / "huge_header.jpg", 65535, 65535)]  # Pillow's own check refuses it first
    for path in made:
        with pytest.raises(data.SkippedFile, match="over --max-pixels"):
            data.decode_image(path, 16)
        with pytest.raises(data.SkippedFile, match="over --max-pixels"):
            data.probe_image(path)
    assert count_decodes == []


def test_jpegs_count_the_pixels_libjpeg_decodes_at_reduced_size(tmp_path, count_decodes):
    """A JPEG header claiming 12000 x 12000 decodes at 1/8 scale to 1500 x 1500: over a 1 M budget, refused; a
    real 4000 x 4000 JPEG decodes at 500 x 500 (draft mode): within it, decoded."""
    claim = jpeg_claiming(tmp_path / "claim.jpg", 12000, 12000)
    with pytest.raises(data.SkippedFile, match=r"12000x12000, 1500x1500 at reduced JPEG size"):
        data.decode_image(claim, 16, max_pixels=1_000_000)
    assert count_decodes == []
    Image.new("L", (4000, 4000), 90).save(tmp_path / "real.jpg", quality=80)
    x = data.decode_image(tmp_path / "real.jpg", 16, max_pixels=1_000_000)
    assert x.shape == (16, 16, 3) and abs(int(x.mean()) - 90) <= 2
    assert count_decodes and set(count_decodes) == {(500, 500)}


def test_raising_max_pixels_decodes_what_the_default_refuses(tmp_path):
    path = png_bomb(tmp_path / "big.png", 8000, 8000)
    with pytest.raises(data.SkippedFile):
        data.decode_image(path, 16)
    assert (data.decode_image(path, 16, max_pixels=70_000_000) == 0).all()
    files = data.FileList([path], np.zeros(1, np.int32), ("a",), [None], tmp_path)
    keys = {data.cache_key(data._entries(files, "none"), 16, "black", "none", m) for m in (50_000_000, 70_000_000)}
    assert len(keys) == 2  # the budget decides which images are kept: it is part of the cache key


def measure(folder: Path, *args) -> dict:
    """tests/hostile.py measure in a fresh process: peak memory before and after decoding `folder`."""
    proc = subprocess.run([sys.executable, str(PROJECT / "tests" / "hostile.py"), "measure", str(folder),
                           *map(str, args)], capture_output=True, text=True, timeout=110, cwd=PROJECT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    result["growth"] = result["peak_after"] - result["peak_before"]
    return result


def test_bombs_cost_no_memory_in_a_fresh_process(tmp_path):
    """Decoding the smallest of these bombs would take 81 MB (9000 x 9000 gray), all of them over 300 MB; the
    decode of a folder holding them and two ordinary images grows the peak by less than 16 MB."""
    bombs = make_bombs(tmp_path / "bombs")
    for i in range(2):
        Image.new("RGB", (300, 300), (40 * i, 90, 200)).save(tmp_path / "bombs" / f"cell{i}.png")
    result = measure(tmp_path / "bombs")
    assert sorted(result["kept"]) == ["cell0.png", "cell1.png"]
    assert set(result["skipped"]) == set(bombs)
    assert all(r.startswith("over --max-pixels") for r in result["skipped"].values())
    assert result["growth"] < 16 * MB, result


def test_a_large_legitimate_image_is_decoded_with_little_more_than_its_own_size(tmp_path):
    """A 6000 x 6000 RGB PNG (36 M pixels, 108 MB decoded) is within the budget and decoded; it is shrunk with
    Image.reduce right after decoding, so the peak grows by less than 1.5x its size (the three full-size copies
    made before this measure took 3.8x)."""
    (tmp_path / "big").mkdir()
    png_bomb(tmp_path / "big" / "slide.png", 6000, 6000, channels=3)
    result = measure(tmp_path / "big")
    assert result["kept"] == ["slide.png"]
    assert result["growth"] < 1.5 * 108 * MB, result


def test_memory_is_bounded_whatever_the_number_of_threads(tmp_path):
    """16 threads, 16 images of 2500 x 2500 RGB (6.25 M pixels, 18.75 MB each) and a budget of one such image:
    at most two are held at once (the budget is twice --max-pixels), so the peak grows by less than 3.5 images'
    worth, where unbounded threads held all 16 (over 300 MB)."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(16):
        png_bomb(folder / f"img{i:02d}.png", 2500, 2500, channels=3)
    result = measure(folder, "--threads", 16, "--max-pixels", 2500 * 2500)
    assert len(result["kept"]) == 16
    assert result["growth"] < 3.5 * 18.75 * MB, result


# ----------------------------------------------------------------------------------------------
# Reads that stall: bounded time, then skipped; three stop the run with one line
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def stalling(tmp_path, monkeypatch):
    """make(path) -> a named pipe whose reads block (a writer holds it open and never writes), and the checks
    that keep pipes out bypassed: a file that slipped through, as a stalled network mount would look."""
    holders = []
    monkeypatch.setattr(data, "file_problem", lambda path: None)
    monkeypatch.setattr(data, "_open_regular", lambda path: open(path, "rb"))
    monkeypatch.setattr(data, "STALL_SECONDS", 1.0)

    def make(path):
        os.mkfifo(path)
        holders.append(os.open(path, os.O_RDWR))
        return path
    yield make
    for fd in holders:
        os.close(fd)  # the abandoned readers see end of file and finish


def test_a_stalled_read_is_skipped_after_the_time_limit(tmp_path, stalling):
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(good)
    stuck = stalling(tmp_path / "stuck.jpg")
    start = time.perf_counter()
    results = list(data.decode_each([good, stuck, good], 16))
    seconds = time.perf_counter() - start
    assert [why for _, _, why in results] == [None, "stalled (no image after 1 s)", None]
    assert 0.9 < seconds < 10, seconds


def test_training_names_a_stalled_file_and_three_stop_it_with_one_line(demo_root, tmp_path, stalling, capsys):
    import cli
    import train_cnn
    root = tiny_copy(demo_root, tmp_path / "root")
    stalling(root / "WBC_100" / "train" / "data" / "Lymphocyte" / "slow.jpg")
    argv = ["--data", str(root), "--image-size", "16", "--epochs", "1", "--width", "4", "--depth", "1", "--dense",
            "8", "--batch-size", "8", "--holdout", "0", "--precision", "float32", "--quiet", "--no-cache"]

    def run(out):
        with pytest.raises(SystemExit) as stop:
            cli.run_main(lambda: train_cnn.main(argv + ["--out", str(out)]))
        return stop.value.code or 0, capsys.readouterr().err

    code, err = run(tmp_path / "one")
    assert code == 0, err
    assert "1 stalled (Lymphocyte/slow.jpg: no image after 1 s)" in skipped_lines(err)[0], err
    for name in ("slow2.jpg", "slow3.jpg"):
        stalling(root / "WBC_100" / "train" / "data" / "Lymphocyte" / name)
    code, err = run(tmp_path / "three")
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "slow" in errors[0] and "3 files stalled" in errors[0], err


# ----------------------------------------------------------------------------------------------
# The same files given to inspect_model.py and prepare_splits.py
# ----------------------------------------------------------------------------------------------

def inspect(argv) -> int:
    import cli
    import inspect_model
    with pytest.raises(SystemExit) as done:
        cli.run_main(lambda: inspect_model.main([str(a) for a in argv]))
    return done.value.code or 0


def test_evaluate_predict_and_gradcam_skip_and_name_the_same_files(trained, hostile, tmp_path, capsys):
    _, run_dir, _ = trained
    root, expected = hostile
    train = root / "WBC_100" / "train" / "data"
    model = run_dir / "model.h5"

    assert inspect([model, "evaluate", train, "--out", tmp_path / "eval", "--no-cache"]) == 0
    lines = skipped_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"in {train}" in lines[0], lines
    assert_named(lines[0], expected)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 15 and len(metrics["skipped_images"]) == len(expected)

    # Folders and one explicit named pipe: named as the user gave them.
    assert inspect([model, "predict", train / "Neutrophil", train / "Monocyte", train / "Basophil" / "fifo.jpg",
                    "--out", tmp_path / "pred.csv"]) == 0
    lines = skipped_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    named = {str(train / rel): why for rel, why in expected.items() if rel.split("/")[0] in ("Neutrophil", "Monocyte")}
    named[str(train / "Basophil" / "fifo.jpg")] = "named pipe"
    assert_named(lines[0], named)
    with open(tmp_path / "pred.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6  # three cells in each folder

    assert inspect([model, "gradcam", train / "Monocyte", "--out", tmp_path / "cams"]) == 0
    lines = skipped_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "4 over --max-pixels" in lines[0], lines
    assert len(list((tmp_path / "cams").glob("*.png"))) == 3


def test_prepare_splits_leaves_hostile_files_out_of_the_layout(hostile, tmp_path):
    root, expected = hostile
    source = root / "WBC_100" / "train" / "data"
    proc = run_script("prepare_splits.py", source, tmp_path / "out", timeout=110)
    assert proc.returncode == 0, proc.stderr
    lines = skipped_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert_named(lines[0], expected)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {os.path.relpath(p, source) for p in manifest["skipped_files"]} == set(expected)
    linked = {os.path.realpath(p) for p in (tmp_path / "out").rglob("*") if p.is_symlink()}
    assert len(linked) == 15 and not any("fifo" in p or "bomb" in p or "zero" in p for p in linked)
