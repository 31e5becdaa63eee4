"""Runs a user can trust and steer: start-up without Keras, help with the real defaults (exact resume after
kill -9: test_reliability), refused argument changes, extending a finished run, --config, --test, --tensorboard,
--patience, export, and the small things (no empty folder, CSV only after success, confusion.png, summaries)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PROJECT, exit_status, run_script, shared_data
from test_reliability import assert_one_line_error, course_root, run_in_process, tiny_args

SCRIPTS = ("train_cnn.py", "train_masked.py", "pretrain_resnet.py", "reproduce_table.py", "inspect_model.py",
           "bench.py", "prepare_splits.py")
TIMING = {"seconds", "train_seconds", "images_per_second", "seconds_predict"}


def without_timing(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMING}


def history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# ----------------------------------------------------------------------------------------------
# Start-up: argument errors and --help answer without importing Keras or TensorFlow
# ----------------------------------------------------------------------------------------------

PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import cli, importlib
module = importlib.import_module(sys.argv[2])
try:
    cli.run_main(lambda: module.main(sys.argv[3:]))
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("keras", "tensorflow", "jax") if m in sys.modules)}))
"""


@pytest.mark.parametrize("script, argv", [("train_cnn", ["--epochs", "two"]), ("train_cnn", ["--help"]),
                                          ("train_masked", ["--masks", "sideways"]),
                                          ("pretrain_resnet", ["--lr", "fast"]), ("pretrain_resnet", ["--help"]),
                                          ("inspect_model", ["--help"]), ("reproduce_table", ["--seeds", "x"])])
def test_bad_argument_and_help_answer_without_importing_keras(script, argv):
    done = subprocess.run([sys.executable, "-c", PROBE, str(PROJECT), script, *argv], capture_output=True,
                          text=True, timeout=60, cwd=PROJECT)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == (0 if argv == ["--help"] else 2), done.stderr
    assert result["heavy"] == [], f"{script} {argv} imported {result['heavy']} before checking its arguments"
    if argv != ["--help"]:
        assert len(done.stderr.strip().splitlines()) == 1 and "error:" in done.stderr, done.stderr


# ----------------------------------------------------------------------------------------------
# Help: every option's effective default
# ----------------------------------------------------------------------------------------------

def parsers_of(script: str, monkeypatch) -> list:
    """The argparse parsers a script builds (with inspect_model's sub-command parsers), caught at parse time."""
    import importlib

    import cli
    caught = []

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise Caught

    monkeypatch.setattr(cli.Parser, "parse_args", catch)
    module = importlib.import_module(Path(script).stem)
    with pytest.raises(Caught):
        module.parse_args(["x", "y"] if script == "prepare_splits.py" else ["m.h5"])
    parser = caught[0]
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return [parser] + [p for s in subs for p in s.choices.values()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_options_effective_default(script, monkeypatch):
    for parser in parsers_of(script, monkeypatch):
        text = parser.format_help()
        assert "default: None" not in text, f"{script}: {text}"
        assert "(default: True)" not in text and "(default: False)" not in text, f"{script}: {text}"
        for action in parser._actions:
            if action.option_strings and action.default is None and action.nargs != 0 and not action.required:
                assert "default" in (action.help or "").lower(), \
                    f"{script} {'/'.join(action.option_strings)}: help does not say its default: {action.help!r}"


def wide_help(script):
    """--help on one line per option (a wide terminal), whitespace collapsed."""
    return " ".join(run_script(script, "--help", timeout=60, env={"COLUMNS": "400"}).stdout.split())


def test_help_names_each_recipes_value_and_the_table_rows():
    flat = wide_help("train_cnn.py")
    assert "Adam learning rate (default recipe 0.002, report recipe 0.001)" in flat
    assert "random rotation range, degrees (+/-) (default recipe 180, report recipe 20)" in flat
    assert "(default recipe 512, report recipe 0)" in flat and "(default recipe 20, report recipe 0)" in flat
    assert "--no-batchnorm no batch normalisation --stem-stride" in flat  # no "(default: True)"
    resnet = wide_help("pretrain_resnet.py")
    assert "from --recipe" not in resnet and "Adam learning rate (default 0.0001)" in resnet
    assert "--no-compare train only the --init path training:" in resnet  # no "(default: True)"
    table = wide_help("reproduce_table.py")
    assert "see the list above" not in table
    assert "Rows: {WBC_1,WBC_10,WBC_50,WBC_100}_{raw,masked-only,merged}_{report,default}" in table
    assert "{WBC_1,WBC_10,WBC_50,WBC_100}_{resnet-scratch,resnet-cam16}" in table
    assert "{WBC_1,WBC_10,WBC_50,WBC_100}_{ssl,ssl-semi,ssl-distill,semi}_default" in table


# ----------------------------------------------------------------------------------------------
# Resume: the run's own arguments; a changed one is refused; --epochs extends
# ----------------------------------------------------------------------------------------------

def folder_state(run: Path) -> dict:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished 2-epoch run with the default recipe (cosine, augmentation, hold-out, BN recalibration)."""
    base = tmp_path_factory.mktemp("finished")
    root = course_root(base / "root", train=6, val=2)
    args = tiny_args(root, base / "cache", base / "run", "--min-steps", "4", epochs=2)
    import cli
    import train_cnn
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda: train_cnn.main(args))
    assert stop.value.code in (0, None)
    return root, base / "cache", base / "run"


def test_resume_with_changed_arguments_is_refused_naming_each_and_touching_nothing(tmp_path, finished_run, capsys):
    import shutil
    root, cache, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = folder_state(run)
    argv = tiny_args(root, cache, run, "--min-steps", "4", epochs=3)
    argv[argv.index("--image-size") + 1] = "24"
    code, _, err = run_in_process(argv + ["--resume", "--lr", "0.01"], capsys)
    assert_one_line_error(code, err, "--image-size: run has 16, asked 24", "--lr: run has 0.002, asked 0.01")
    code, _, err = run_in_process(tiny_args(root, cache, run, "--min-steps", "4", epochs=1) + ["--resume"], capsys)
    assert_one_line_error(code, err, "--epochs: run has 2, asked 1")
    assert folder_state(run) == before


def test_resume_takes_the_runs_arguments_and_a_larger_epochs_extends_a_finished_run(tmp_path, finished_run, capsys):
    """Resumed with only --out and --epochs 4: the run's own image size, model and recipe; epochs 1-2 untouched,
    epochs 3-4 trained from the kept training state, the learning rate on the longer cosine from where the run
    stopped (the rule in docs/usage.md)."""
    import shutil
    root, cache, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    rows_before = (run / "history.csv").read_text().splitlines()
    code, out, err = run_in_process(["--data", str(root), "--cache-dir", str(cache), "--out", str(run), "--resume",
                                     "--epochs", "4", "--quiet"], capsys)
    assert code == 0, err
    assert "resuming after epoch 2 of 4" in out
    rows = (run / "history.csv").read_text().splitlines()
    assert rows[:3] == rows_before and len(rows) == 5
    assert metrics(run)["epochs"] == 4
    args = json.loads((run / "args.json").read_text())
    assert args["epochs"] == 4 and args["image_size"] == 16 and args["width"] == 4 and args["min_steps"] == 4
    lrs = [float(r["lr"]) for r in history(run)]
    # Cosine to 1% of 0.002: the 2-epoch run ended at the floor; extended to 4 epochs, the lr after epoch 3
    # (three quarters of the steps) is where the 4-epoch cosine stands there, and after epoch 4 the floor again.
    floor = 0.002 * 0.01
    assert lrs[1] == pytest.approx(floor, rel=1e-3)
    assert lrs[2] == pytest.approx(0.002 * (0.99 * 0.5 * (1 + np.cos(0.75 * np.pi)) + 0.01), rel=1e-3)
    assert lrs[3] == pytest.approx(floor, rel=1e-3)
    code, out, err = run_in_process(["--data", str(root), "--cache-dir", str(cache), "--out", str(run), "--resume",
                                     "--quiet"], capsys)
    assert code == 0 and "nothing to do" in out, err


# ----------------------------------------------------------------------------------------------
# --config, --test, --tensorboard, --patience
# ----------------------------------------------------------------------------------------------

def test_config_repeats_a_run_exactly_and_flags_override_it(tmp_path, finished_run, capsys):
    import train_cnn
    root, cache, finished = finished_run
    again = tmp_path / "again"
    code, _, err = run_in_process(["--config", str(finished / "args.json"), "--cache-dir", str(cache),
                                   "--out", str(again)], capsys)
    assert code == 0, err
    assert history(again) == history(finished)
    assert without_timing(metrics(again)) == without_timing(metrics(finished))
    saved = json.loads((finished / "args.json").read_text())
    repeated = json.loads((again / "args.json").read_text())
    for key in ("image_size", "width", "depth", "lr", "lr_schedule", "rotation", "min_steps", "seed", "epochs"):
        assert repeated[key] == saved[key], key
    varied = train_cnn.parse_args(["--config", str(finished), "--lr", "0.005", "--recipe", "report"])
    assert varied.lr == 0.005 and varied.recipe == "report" and varied.image_size == 16
    assert varied.rotation == saved["rotation"]  # from the file, not the report recipe: the file is explicit
    code, _, err = run_in_process(["--config", str(tmp_path / "nope.json")], capsys)
    assert_one_line_error(code, err, "--config", "nope.json", "args.json")


def write_class_folders(folder: Path, per_class: int = 2):
    from test_reliability import CLASS_FOLDERS, cell
    for c, name in enumerate(CLASS_FOLDERS):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cell(500 + i, c).save(folder / name / f"t{i}.png")


def test_test_folder_tensorboard_and_the_confusion_plot(tmp_path, capsys, monkeypatch):
    """--test DIR is evaluated once with the selected model (metrics.json "test"); --tensorboard writes scalars
    per epoch (hold-out and validation too) and the confusion matrix image; confusion.png's title names the run
    and each cell shows its row percentage."""
    import report
    import runfiles
    import feeding
    root = course_root(tmp_path / "root", train=4, val=2)
    write_class_folders(tmp_path / "test", per_class=3)
    drawn = {}
    real_plot = report.plot_confusion

    def spy(matrix, classes, path, title=""):
        drawn["title"] = title
        import matplotlib.axes
        texts = []
        real_text = matplotlib.axes.Axes.text
        monkeypatch.setattr(matplotlib.axes.Axes, "text",
                            lambda self, x, y, s, *a, **k: (texts.append(s), real_text(self, x, y, s, *a, **k))[1])
        real_plot(matrix, classes, path, title)
        drawn["cells"] = texts
    monkeypatch.setattr(report, "plot_confusion", spy)
    run = tmp_path / "myrun"
    code, _, err = run_in_process(tiny_args(root, tmp_path / "cache", run, "--test", tmp_path / "test",
                                            "--tensorboard", "--no-augment", epochs=2), capsys)
    assert code == 0, err
    m = metrics(run)
    test = m["test"]
    assert test["images"] == 15 and test["counts"] == {c: 3 for c in m["classes"]}
    with open(run / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 and test["accuracy"] == pytest.approx(np.mean([int(r["correct"]) for r in rows]))
    # the selected model (model.h5), not the last epoch's weights
    import data
    images = data.load_images(data.find_labelled(tmp_path / "test"), size=16, use_cache=False, verbose=False)
    probs = feeding.predict(runfiles.load_core_model(run / "model.h5"), images.x)
    assert test["accuracy"] == pytest.approx(float((probs.argmax(1) == images.y).mean()))

    assert drawn["title"].startswith("myrun: validation, epoch ")
    assert all("\n" in s and s.endswith("%") for s in drawn["cells"]), drawn["cells"]
    assert sum(int(s.split("\n")[0]) for s in drawn["cells"]) == 10

    import tensorflow as tf
    tags = {}
    for events in (run / "tensorboard").rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                tags.setdefault(events.parent.name, set()).add(value.tag)
    assert {"epoch_loss", "epoch_accuracy", "epoch_holdout_accuracy", "epoch_holdout_loss"} <= tags["train"], tags
    assert {"epoch_loss", "epoch_accuracy", "confusion_matrix"} <= tags["validation"], tags

    course = tmp_path / "course_test"
    code, _, err = run_in_process(tiny_args(root, tmp_path / "cache", course, "--test", root, "--no-augment",
                                            epochs=1), capsys)
    assert code == 0, err
    assert metrics(course)["test"]["images"] == 10  # a course root: its validation set of --split


def test_early_stopping_watches_the_holdout_never_the_validation_set(tmp_path, capsys):
    import training
    rows = [{"epoch": 1, "holdout_accuracy": 0.5, "holdout_loss": 1.0, "val_accuracy": 0.5},
            {"epoch": 2, "holdout_accuracy": 0.5, "holdout_loss": 1.1, "val_accuracy": 0.9},
            {"epoch": 3, "holdout_accuracy": 0.4, "holdout_loss": 1.2, "val_accuracy": 0.95}]
    assert training.early_stop_due(rows, 2, True)  # validation improved every epoch: no matter
    assert not training.early_stop_due(rows, 3, True)
    better = rows[:2] + [{**rows[2], "holdout_accuracy": 0.6, "val_accuracy": 0.1}]
    assert not training.early_stop_due(better, 1, True)  # a better hold-out epoch, validation worse
    assert not training.early_stop_due(rows, 2, False)

    # Weights that cannot move (learning rate 1e-30): the hold-out never improves after epoch 1.
    root = course_root(tmp_path / "root", train=4, val=2)
    run = tmp_path / "run"
    code, out, err = run_in_process(tiny_args(root, tmp_path / "cache", run, "--patience", "2", "--lr", "1e-30",
                                              "--no-batchnorm", "--bn-recalibrate", "0", "--no-augment",
                                              epochs=8) + ["--quiet"], capsys)
    assert code == 0, err
    m = metrics(run)
    assert m["stopped_early"] and m["epochs"] == 3 and m["selected_epoch"] == 1
    assert [int(r["epoch"]) for r in history(run)] == [1, 2, 3]
    code, out, _ = run_in_process(tiny_args(root, tmp_path / "cache", run, "--patience", "2", "--lr", "1e-30",
                                            "--no-batchnorm", "--bn-recalibrate", "0", "--no-augment", epochs=8)
                                  + ["--resume"], capsys)
    assert code == 0 and "stopped early" in out

    code, _, err = run_in_process(tiny_args(root, tmp_path / "cache", tmp_path / "r2", "--patience", "2",
                                            "--holdout", "0", epochs=2), capsys)
    assert_one_line_error(code, err, "--patience", "hold-out")
    assert not (tmp_path / "r2").exists()


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_images():
    """Two real PBC images per class at 32 px, as uint8 (N, 32, 32, 3)."""
    import data
    pbc = shared_data("pbc")
    paths = [p for d in sorted(pbc.iterdir()) if d.is_dir() for p in sorted(d.iterdir())[:2]]
    return np.stack([data.decode_image(p, 32) for p in paths])


@pytest.fixture(scope="module")
def h5_model(tmp_path_factory):
    import keras

    import models
    import runfiles
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(1)
    core = models.build_cnn(5, 32, width=4, depth=2, dense=8, batchnorm=True)
    path = tmp_path_factory.mktemp("export") / "model.h5"
    runfiles.save_model_h5(core, path, {"classes": ["basophil", "eosinophil", "lymphocyte", "monocyte",
                                                    "neutrophil"], "image_size": 32})
    return path


def export(model, fmt, out):
    import cli
    import inspect_model
    with pytest.raises(SystemExit) as done:
        cli.run_main(lambda: inspect_model.main([str(model), "export", "--format", fmt, "--out", str(out)]))
    return done.value.code or 0


def test_exported_models_predict_what_the_h5_predicts_on_real_images(tmp_path, h5_model, real_images, capsys):
    import keras
    import tensorflow as tf

    import runfiles
    expected = np.asarray(runfiles.load_core_model(h5_model).predict_on_batch(real_images))
    assert export(h5_model, "keras", tmp_path / "m.keras") == 0
    assert export(h5_model, "keras", tmp_path / "m.keras") == 2  # exists: refused in one line
    assert "--overwrite" in capsys.readouterr().err
    got = keras.models.load_model(tmp_path / "m.keras", compile=False).predict_on_batch(real_images)
    np.testing.assert_allclose(got, expected, atol=1e-5)

    assert export(h5_model, "savedmodel", tmp_path / "saved") == 0
    saved = tf.saved_model.load(str(tmp_path / "saved"))  # held: its variables live as long as it does
    served = saved.serve(tf.constant(real_images))
    np.testing.assert_allclose(np.asarray(served), expected, atol=1e-5)

    assert export(h5_model, "tflite", tmp_path / "m.tflite") == 0
    if not hasattr(getattr(tf, "lite", None), "Interpreter"):  # TensorFlow's copy of the LiteRT interpreter
        return
    interpreter = tf.lite.Interpreter(model_path=str(tmp_path / "m.tflite"))
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], real_images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], real_images.astype(inp["dtype"]))
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(outp["index"]), expected, atol=1e-4)



def test_export_to_onnx_without_its_packages_names_them(tmp_path, h5_model, capsys):
    import importlib.util
    if importlib.util.find_spec("tf2onnx") and importlib.util.find_spec("onnx"):
        pytest.skip("onnx and tf2onnx are installed: nothing missing to report")
    code = export(h5_model, "onnx", tmp_path / "m.onnx")
    assert_one_line_error(code, capsys.readouterr().err, "--format onnx", "tf2onnx", "pip install")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Small things
# ----------------------------------------------------------------------------------------------

def test_a_failed_start_leaves_no_folder(tmp_path, capsys):
    root = course_root(tmp_path / "root", train=2, val=1)
    for f in (root / "WBC_100" / "val" / "data").rglob("*.png"):
        f.write_bytes(b"")
    out = tmp_path / "new" / "deeper" / "run"
    code, _, err = run_in_process(tiny_args(root, tmp_path / "cache", out, epochs=1), capsys)
    assert_one_line_error(code, err, "image")
    assert not (tmp_path / "new").exists()


def test_predict_prints_the_csv_only_after_success(tmp_path, h5_model, capsys):
    import inspect_model
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"not an image")
    code = exit_status(inspect_model.main, [h5_model, "predict", tmp_path / "bad"])
    out = capsys.readouterr().out
    assert code == 2 and out == "", out
    Image.new("RGB", (40, 40), (200, 100, 150)).save(tmp_path / "bad" / "b.png")
    code = exit_status(inspect_model.main, [h5_model, "predict", tmp_path / "bad"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0].startswith("file,predicted,p_basophil") and len(out.splitlines()) == 2


def test_predict_names_a_model_framed_by_another_framing_version(tmp_path, h5_model, capsys):
    import shutil
    import framing
    import inspect_model
    import runfiles
    model = shutil.copy(h5_model, tmp_path / "framed.h5")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 40), (200, 100, 150)).save(tmp_path / "imgs" / "b.png")
    runfiles.update_h5_metadata(model, framing=framing.describe(0.5))
    assert exit_status(inspect_model.main, [model, "predict", tmp_path / "imgs"]) == 0
    assert "framing version" not in capsys.readouterr().err
    runfiles.update_h5_metadata(model, framing={"share": 0.5, "version": framing.VERSION + 1})
    assert exit_status(inspect_model.main, [model, "predict", tmp_path / "imgs"]) == 0
    out, err = capsys.readouterr()
    assert f"framing version {framing.VERSION + 1}" in err and out.startswith("file,predicted")


def test_model_summary_is_full_width_when_piped(h5_model):
    done = run_script("inspect_model.py", h5_model, timeout=120, env={"COLUMNS": ""})
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith(("┃", "│"))]
    assert table and max(len(line) for line in table) > 100
    assert "…" not in done.stdout
