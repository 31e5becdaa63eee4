"""Reliability: broken data, interruptions, unwritable caches, untrusted model files, NaN losses and
determinism. Every case either trains (bad files skipped and counted) or stops with one line and exit 2.

The interruption cases kill a real training process with SIGKILL (tests/faults.py) and resume it: the resumed
run ends with the uninterrupted run's files and numbers."""
import csv
import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PROJECT, Started, start_script
import runfiles

CLASS_FOLDERS = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
TIMING_FIELDS = {"seconds", "train_seconds", "images_per_second"}


pytestmark = pytest.mark.usefixtures("no_hang")


# ----------------------------------------------------------------------------------------------
# Tiny datasets
# ----------------------------------------------------------------------------------------------

def cell(i: int, cls: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(1000 * cls + i)
    arr = rng.integers(0, 60, (size, size, 3)) + np.array([40 * cls, 200 - 40 * cls, 120])
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def course_root(root: Path, train: int = 4, val: int = 2, folders=CLASS_FOLDERS, split="WBC_100") -> Path:
    """ROOT/<split>/{train,val}/data/<Class>/ with a few small PNGs per class."""
    for part, n in (("train", train), ("val", val)):
        for c, name in enumerate(folders):
            d = root / split / part / "data" / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cell(i + (100 if part == "val" else 0), c).save(d / f"{part}{i}.png")
    return root


def tiny_args(root, cache, out, *extra, epochs=3):
    return ["--data", str(root), "--image-size", "16", "--epochs", str(epochs), "--width", "4", "--depth", "1",
            "--dense", "8", "--batch-size", "8", "--quiet", "--precision", "float32", "--cache-dir", str(cache),
            "--out", str(out), *map(str, extra)]


def run_in_process(argv, capsys):
    """train_cnn.py's main as a user runs it (through cli.run_main): (exit status, stdout, stderr)."""
    import cli
    import train_cnn
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda: train_cnn.main(argv))
    out, err = capsys.readouterr()
    return stop.value.code or 0, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    for w in words:
        assert w.lower() in errors[0].lower(), errors[0]


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def add_broken_files(d: Path, folder_for_loops: Path) -> tuple[list[str], list[str]]:
    """Write every kind of odd file into class folder d: returns (names that must be skipped, names kept)."""
    good = cell(7, 4)
    bad = {"truncated.jpg": jpeg_bytes(good)[:300], "empty.jpg": b"", "notes.jpg": b"not an image, just text\n"}
    for name, content in bad.items():
        (d / name).write_bytes(content)
    rgba = good.convert("RGBA")
    rgba.putalpha(Image.new("L", good.size, 0))
    rgba.save(d / "alpha.png")
    Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16)).save(d / "deep16.png")
    good.convert("L").save(d / "gray.jpg")
    good.convert("CMYK").save(d / "cmyk.jpg")
    Image.new("L", (10_000, 10_000), 128).save(d / "huge.jpg", quality=50)
    good.save(d / "Case.png")
    cell(8, 4).save(d / "case.png")  # differs only in case: two distinct files on Linux
    (d / "batch2").mkdir()
    cell(9, 4).save(d / "batch2" / "nested.png")  # an ordinary sub-folder: its images count
    for junk in (".ipynb_checkpoints", "__MACOSX", ".hidden"):
        (d / junk / "deeper").mkdir(parents=True)
        good.save(d / junk / "deeper" / "copy.png")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    good.save(d / "._resource.jpg")  # macOS resource fork: hidden, skipped
    os.symlink(".", d / "loop_self")
    os.symlink("..", d / "loop_parent")  # would re-read every other class as this one
    os.symlink(folder_for_loops, d / "loop_root")
    kept = ["alpha.png", "deep16.png", "gray.jpg", "cmyk.jpg", "huge.jpg", "Case.png", "case.png", "nested.png"]
    try:
        with open(os.path.join(os.fsencode(d), b"caf\xe9-latin1.png"), "wb") as f:  # not valid UTF-8
            good.save(f, "PNG")
        kept.append(os.fsdecode(b"caf\xe9-latin1.png"))
    except OSError:  # a file system that insists on UTF-8 names (macOS): nothing to test there
        pass
    return sorted(bad), kept


# ----------------------------------------------------------------------------------------------
# Broken data
# ----------------------------------------------------------------------------------------------

def test_broken_files_are_skipped_counted_and_training_finishes(tmp_path, capsys):
    """Every kind of odd file in one dataset: it trains; the three unreadable files are skipped, named in one
    warning line per set and listed in metrics.json; the odd-but-valid ones are used exactly once."""
    root = course_root(tmp_path / "root", folders=("basophil", "EOSINOPHILS", "Lymphocytes", "monocyte",
                                                    "Neutrophils"))
    train_dir = root / "WBC_100" / "train" / "data"
    bad, kept = add_broken_files(train_dir / "Neutrophils", root)
    val_odd = root / "WBC_100" / "val" / "data" / "Neutrophils"
    (val_odd / "zero.jpg").write_bytes(b"")
    with open(os.path.join(os.fsencode(val_odd), b"val-\xff.png"), "wb") as f:
        cell(3, 4).save(f, "PNG")
    (train_dir / "__MACOSX" / "Neutrophil").mkdir(parents=True)  # a junk tree that looks like a class
    cell(0, 4).save(train_dir / "__MACOSX" / "Neutrophil" / "dup.png")

    code, out, err = run_in_process(tiny_args(root, tmp_path / "cache", tmp_path / "run", "--holdout", "0",
                                              epochs=1), capsys)
    assert code == 0, err
    assert "Traceback" not in err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sorted(Path(p).name for p in metrics["skipped_images"]) == sorted(bad + ["zero.jpg"])
    assert metrics["train_counts"] == {"basophil": 4, "eosinophil": 4, "lymphocyte": 4, "monocyte": 4,
                                       "neutrophil": 4 + len(kept)}
    assert metrics["val_images"] == 11
    warnings = [line for line in err.splitlines() if "skipped" in line]
    assert len(warnings) == 2, err  # one line for train, one for val
    assert "skipped 3 unreadable" in warnings[0] and all(b in warnings[0] for b in bad), warnings[0]
    assert "skipped 1 unreadable" in warnings[1] and "zero.jpg" in warnings[1], warnings[1]
    with open(tmp_path / "run" / "val_predictions.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 11  # the non-UTF-8 name is written, escaped


def test_symlink_loops_do_not_duplicate_or_relabel_images(tmp_path):
    import data
    root = course_root(tmp_path / "root", train=2, val=1)
    d = root / "WBC_100" / "train" / "data" / "Neutrophil"
    os.symlink("..", d / "up")
    os.symlink(".", d / "self")
    os.symlink(d, root / "WBC_100" / "train" / "data" / "Basophil" / "sideways")  # a link, not a loop: kept
    files = data.find_split(root).train
    assert files.counts() == {"basophil": 4, "eosinophil": 2, "lymphocyte": 2, "monocyte": 2, "neutrophil": 2}


def test_odd_image_modes_decode_to_the_right_rgb(tmp_path):
    import data
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 0))
    rgba.save(tmp_path / "clear.png")  # fully transparent -> the bright microscope background
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(tmp_path / "white16.png")
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(tmp_path / "mid16.png")
    Image.new("L", (20, 20), 77).save(tmp_path / "gray.jpg", quality=100)
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "red_cmyk.jpg", quality=100)
    assert (data.decode_image(tmp_path / "clear.png", 8) == 255).all()
    assert (data.decode_image(tmp_path / "white16.png", 8) == 255).all()
    assert (data.decode_image(tmp_path / "mid16.png", 8) == 128).all()
    gray = data.decode_image(tmp_path / "gray.jpg", 8).astype(int)
    assert gray.shape == (8, 8, 3) and abs(gray - 77).max() <= 2
    red = data.decode_image(tmp_path / "red_cmyk.jpg", 8).astype(int)
    assert red.shape == (8, 8, 3) and (red[..., 0] > 240).all() and (red[..., 1:] < 15).all()


def test_odd_masks_are_paired_resized_or_ignored(tmp_path):
    """A mask of another size is resized and applied; a mask without an image and an unreadable mask do no harm;
    class folders spelled differently in data/ and mask/ still pair."""
    import data
    root = course_root(tmp_path / "root", train=3, val=1)
    mask_dir = root / "WBC_100" / "train" / "mask" / "NEUTROPHILS"
    mask_dir.mkdir(parents=True)
    m = np.zeros((50, 30), np.uint8)
    m[10:40, 5:25] = 255
    Image.fromarray(m).save(mask_dir / "train0.png")  # the image is 24 x 24
    Image.fromarray(m).save(mask_dir / "ghost.png")  # no image called ghost
    (mask_dir / "train1.png").write_bytes(b"broken")  # unreadable mask: image kept, unmasked, reported
    files = data.find_split(root).train
    images = data.load_images(files, size=16, mask_mode="replace", use_cache=False, verbose=False)
    assert len(images) == 15 and not images.skipped
    names = [Path(p).parent.name + "/" + Path(p).name for p in images.paths]
    assert images.masked[names.index("Neutrophil/train0.png")]
    assert not images.masked[names.index("Neutrophil/train1.png")]
    assert images.masked.sum() == 1 and [Path(p).name for p in images.mask_problems] == ["train1.png"]
    x = images.x[names.index("Neutrophil/train0.png")]
    assert (x[0] == 0).all() and x[8].any()  # outside the resized mask black, inside the cell kept


@pytest.mark.parametrize("case", ["empty_split", "all_train_unreadable", "all_val_unreadable"])
def test_nothing_to_train_on_stops_with_one_line(tmp_path, capsys, case):
    root = course_root(tmp_path / "root", train=2, val=1)
    split = "WBC_100"
    if case == "empty_split":
        split = "WBC_10"
        for name in CLASS_FOLDERS:
            (root / split / "train" / "data" / name).mkdir(parents=True)
    else:
        part = "train" if case == "all_train_unreadable" else "val"
        for f in (root / "WBC_100" / part / "data").rglob("*.png"):
            f.write_bytes(b"")
    code, _, err = run_in_process(tiny_args(root, tmp_path / "cache", tmp_path / "run", "--split", split,
                                            epochs=1), capsys)
    assert_one_line_error(code, err, "image")
    assert not (tmp_path / "run" / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------
# The cache: unwritable folder, full disk, half-written files
# ----------------------------------------------------------------------------------------------

def test_unwritable_cache_folder_warns_and_trains_without_cache(tmp_path, capsys):
    """A cache folder that cannot be created, even by root (its parent is a regular file)."""
    root = course_root(tmp_path / "root", train=2, val=1)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = blocker / "cache"
    with pytest.raises(OSError):  # the premise: this path really cannot be written, whoever runs the test
        cache.mkdir(parents=True)
    code, _, err = run_in_process(tiny_args(root, cache, tmp_path / "run", epochs=1), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "not writable" in line]
    assert warnings and str(cache) in warnings[0], err
    assert (tmp_path / "run" / "metrics.json").exists()


def test_full_disk_while_reserving_the_cache_falls_back_to_memory(tmp_path, monkeypatch, capsys):
    import data
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    files = data.find_split(course_root(tmp_path / "root", train=2, val=1)).train

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    images = data.load_images(files, size=16, cache_dir=tmp_path / "cache", verbose=False)
    assert len(images) == 10 and images.x.shape == (10, 16, 16, 3)
    assert "no space left" in capsys.readouterr().err.lower()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # no partial file left behind


@pytest.mark.parametrize("damage", ["truncate_npy", "truncate_json", "npy_without_json", "garbage_npy"])
def test_half_written_cache_is_never_read(tmp_path, damage):
    import data
    files = data.find_split(course_root(tmp_path / "root", train=2, val=1)).train
    cache = tmp_path / "cache"
    first = np.array(data.load_images(files, size=16, cache_dir=cache, verbose=False).x)
    npy, js = next(cache.glob("*.npy")), next(cache.glob("*.json"))
    if damage == "truncate_npy":
        with open(npy, "r+b") as f:
            f.truncate(npy.stat().st_size // 2)
    elif damage == "truncate_json":
        js.write_text(js.read_text()[:40])
    elif damage == "npy_without_json":
        js.unlink()
    else:
        npy.write_bytes(b"\x93NUMPY garbage")
    again = data.load_images(files, size=16, cache_dir=cache, verbose=False)
    np.testing.assert_array_equal(np.asarray(again.x), first)


# ----------------------------------------------------------------------------------------------
# Interruptions: kill -9, then --resume
# ----------------------------------------------------------------------------------------------

def run_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


def history_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # a complete row: every field present
        assert all(v not in (None, "") for v in row.values()), row
    return [int(r["epoch"]) for r in rows]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_FIELDS}


def history_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return [without_timing(row) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def interrupt_setup(tmp_path_factory):
    """The dataset and an uninterrupted 3-epoch run of it with every random stream in use (augmentation,
    dropout, shuffling over several passes per epoch, the hold-out split, BN recalibration, cosine schedule,
    label smoothing): what every resumed run must end up like, file for file and number for number."""
    base = tmp_path_factory.mktemp("interrupt")
    root = course_root(base / "root", train=6)
    args = tiny_args(root, base / "cache", base / "baseline", "--min-steps", "4")
    import cli
    import train_cnn
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda: train_cnn.main(args))
    assert stop.value.code in (0, None)
    return root, base / "baseline", base / "cache"


KILL_POINTS = ["cache", "epoch", "model", "backup", "finish"]


@pytest.fixture(scope="module")
def killed_runs(interrupt_setup, tmp_path_factory, request):
    """The runs to kill (tests/faults.py), one per selected point, started at once, each in its own process and
    folder: {point: (Started process, its arguments, run folder, cache folder)}. They run side by side while the
    tests resume them one by one."""
    root, _, baseline_cache = interrupt_setup
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    points = {item.callspec.params["point"] for item in request.session.items
              if item.originalname == "test_kill_9_then_resume_ends_like_an_uninterrupted_run"}
    runs = {}
    for point in (p for p in KILL_POINTS if p in points):
        base = tmp_path_factory.mktemp(f"killed_{point}")
        cache = base / "cache" if point == "cache" else baseline_cache
        args = tiny_args(root, cache, base / "run", "--min-steps", "4")
        runs[point] = (Started([sys.executable, PROJECT / "tests" / "faults.py", point, "train_cnn.py", *args], env),
                       args, base / "run", cache)
    yield runs
    for started, *_ in runs.values():
        started.stop()


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_then_resume_ends_like_an_uninterrupted_run(capsys, interrupt_setup, killed_runs, point):
    """Killed while the decode cache is built, mid-epoch 2, while model.h5 is written, while the backup is
    written, while the finished run's folder is written: what the killed run left is whole or absent, and the
    resumed run ends with the uninterrupted run's files, history.csv and metrics.json, timing aside."""
    _, baseline, baseline_cache = interrupt_setup
    started, args, run, cache = killed_runs[point]
    killed = started.result(timeout=110)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # What the killed run left is either complete or absent, never half-written.
    if (run / "history.csv").exists():
        done = history_epochs(run)
        assert done == list(range(1, len(done) + 1))
    for name in ("args.json", "metrics.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    if (run / "model.h5").exists():
        runfiles.load_core_model(run / "model.h5")
    if point == "finish":
        history_before = (run / "history.csv").read_text()

    code, out, err = run_in_process(args + ["--resume"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert run_files(run) == run_files(baseline)
    assert history_epochs(run) == [1, 2, 3]
    assert history_rows(run) == history_rows(baseline)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    assert without_timing(metrics) == without_timing(json.loads((baseline / "metrics.json").read_text()))
    if point in ("epoch", "model", "backup"):
        assert "resuming after epoch" in out
    if point == "finish":  # all epochs were done: the resumed run finishes the folder and trains nothing again
        assert (run / "history.csv").read_text() == history_before
    assert not list(cache.glob("*.part")), "a killed cache build left its temp file"
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in baseline_cache.iterdir())


# ----------------------------------------------------------------------------------------------
# Untrusted model files
# ----------------------------------------------------------------------------------------------

def test_model_with_a_lambda_layer_is_refused_without_running_it(tmp_path, capsys):
    import keras

    import cli
    marker = tmp_path / "code_ran"
    inputs = keras.Input((4,))
    mark = str(marker)
    outputs = keras.layers.Lambda(lambda x: (open(mark, "w").close(), x)[1] * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "crafted.h5")
    marker.unlink()  # building the model above ran the lambda once; loading must not run it again
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda: runfiles.load_core_model(tmp_path / "crafted.h5"))
    assert_one_line_error(stop.value.code, capsys.readouterr().err, "crafted.h5", "lambda", "safe mode")
    assert not marker.exists(), "loading the crafted model ran its code"


def test_a_file_that_is_not_a_model_is_refused_in_one_line(tmp_path, capsys):
    import cli
    (tmp_path / "text.h5").write_text("not a model")
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda: runfiles.load_core_model(tmp_path / "text.h5"))
    assert_one_line_error(stop.value.code, capsys.readouterr().err, "text.h5", "HDF5")


# ----------------------------------------------------------------------------------------------
# NaN loss
# ----------------------------------------------------------------------------------------------

def test_nan_loss_from_a_huge_learning_rate_stops_with_advice(tmp_path, capsys):
    root = course_root(tmp_path / "root", train=4, val=1)
    code, _, err = run_in_process(tiny_args(root, tmp_path / "cache", tmp_path / "run", "--lr", "1e30",
                                            "--no-augment", epochs=2), capsys)
    assert_one_line_error(code, err, "NaN", "epoch 1", "lower --lr")
    assert not (tmp_path / "run" / "backup").exists()


def test_nan_loss_keeps_the_last_good_model(tmp_path):
    """A loss that turns NaN in the middle of epoch 2: the message names epoch 2, and model.h5 is epoch 1's."""
    import keras

    import data
    import models
    import training
    files = data.find_split(course_root(tmp_path / "root", train=4, val=1))
    train_set = data.load_images(files.train, size=16, use_cache=False, verbose=False)
    val_set = data.load_images(files.val, size=16, use_cache=False, verbose=False)
    config = training.TrainConfig(epochs=3, batch_size=8, holdout=0, precision="float32", verbose=0)

    def compile_poisoned(model, optimizer, config):
        cross_entropy = keras.losses.CategoricalCrossentropy()

        def loss(y_true, y_pred):  # NaN from the 5th step on: epoch 2 of 3 steps per epoch
            poison = keras.ops.where(optimizer.iterations >= 4, float("nan"), 1.0)
            return cross_entropy(y_true, y_pred) * poison
        model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])

    run = tmp_path / "run"
    with pytest.raises(training.TrainingDiverged) as diverged:
        training.train(run, lambda: models.build_cnn(5, 16, width=4, depth=1, dense=8), train_set, val_set,
                       config, hooks=training.Hooks(compile_model=compile_poisoned))
    message = str(diverged.value)
    assert "epoch 2" in message and "model.h5 keeps epoch 1" in message and "--lr" in message
    assert runfiles.read_h5_metadata(run / "model.h5")["epoch"] == 1
    runfiles.load_core_model(run / "model.h5")
    assert history_epochs(run) == [1]
    assert not (run / "backup").exists()  # a resume must never start from NaN weights


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------

def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_FIELDS}


@pytest.mark.slow
def test_same_seed_same_metrics_in_process_and_in_a_fresh_process(tmp_path, capsys):
    """With augmentation and a hold-out split, so every random number generator is involved."""
    root = course_root(tmp_path / "root", train=6, val=2)
    second = tiny_args(root, tmp_path / "cache", tmp_path / "b", "--seed", "3", epochs=2)
    fresh = start_script("train_cnn.py", *second)  # trains while the in-process run below does
    first = tiny_args(root, tmp_path / "cache", tmp_path / "a", "--seed", "3", epochs=2)
    code, _, err = run_in_process(first, capsys)
    r = fresh.result(timeout=120)
    assert code == 0, err
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert _without_timing(a) == _without_timing(b)
    drop = {"seconds", "images_per_second"}
    rows = [[{k: v for k, v in row.items() if k not in drop}
             for row in csv.DictReader(open(tmp_path / x / "history.csv", newline=""))] for x in "ab"]
    assert rows[0] == rows[1]


def test_a_reader_that_goes_away_ends_the_script_without_a_traceback():
    """`script | head`: once head exits, the next write raises BrokenPipeError; cli.run_main ends quietly."""
    talker = ("import sys; sys.path.insert(0, %r); import cli\n"
              "def main():\n"
              "    for i in range(200000):\n"
              "        print('line', i)\n"
              "cli.run_main(main)\n") % str(PROJECT)
    proc = subprocess.Popen([sys.executable, "-c", talker], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()  # the reader goes away, as head does after its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
