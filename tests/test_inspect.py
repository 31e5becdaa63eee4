"""inspect_model.py: summary, evaluate and predict on a freshly trained tiny CNN, and one clear line with exit 2
for every kind of bad model file (Grad-CAM: tests/test_gradcam.py)."""
import csv
import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

import keras
from keras import layers

import inspect_model
from conftest import exit_status, run_script
import runfiles

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


@pytest.fixture
def run(cnn_run):
    return cnn_run


def call(argv):
    return exit_status(inspect_model.main, argv)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_summary_describes_the_model_and_its_training(run, capsys):
    run_dir, _ = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert call([run_dir / "model.h5"]) == 0  # summary is the default command
    text = capsys.readouterr().out
    assert "input: 32x32 RGB" in text and "classes (5): " + ", ".join(CLASSES) in text
    # the default recipe's stain normalisation, then the CNN's own scaling inside it
    pre = next(line for line in text.splitlines() if line.startswith("preprocessing: "))
    assert pre.startswith("preprocessing: stain_norm_float") and "stain_norm_per_image: GroupNormalization" in pre
    assert pre.endswith("scale_0_1: x * 0.00392157 + 0")
    assert "split WBC_100, recipe default" in text
    assert f"accuracy {metrics['val_accuracy_selected']:.4f}" in text
    assert "Grad-CAM feature map: dropout_cnn/block2_relu (16, 16, 16)" in text

    assert call([run_dir / "model.h5", "summary", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = runfiles.load_core_model(run_dir / "model.h5")
    assert info["parameters"]["total"] == model.count_params()
    assert info["training"]["epoch"] == metrics["selected_epoch"]
    assert info["args"]["image_size"] == 32 and info["args"]["width"] == 8
    assert info["training"]["metrics"]["macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert {"keras", "tensorflow"} <= set(info["versions"])


def test_evaluate_agrees_with_the_runs_own_validation_metrics(run, demo_root, tmp_path, capsys):
    run_dir, cache = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "eval"
    # The run predicted in batches of 32; the same batch size keeps low-precision sums in the same order.
    assert call([run_dir / "model.h5", "evaluate", demo_root, "--out", out, "--cache-dir", cache,
                 "--batch-size", 32]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"] == 200
    assert m["accuracy"] == metrics["val_accuracy_selected"]
    assert m["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"], abs=1e-12)
    assert m["macro_f1"] == pytest.approx(metrics["macro_f1"], abs=1e-12)
    assert m["confusion_matrix"] == metrics["confusion_matrix"]
    assert (out / "confusion.png").stat().st_size > 0 and "macro avg" in (out / "report.txt").read_text()
    ours = {r["path"]: r["predicted"] for r in read_csv(out / "predictions.csv")}
    theirs = {r["path"]: r["predicted"] for r in read_csv(run_dir / "val_predictions.csv")}
    assert ours == theirs
    # A plain folder-per-class directory (here WBC_100/val, which holds data/<Class>/) gives the same numbers.
    out2 = tmp_path / "eval2"
    assert call([run_dir / "model.h5", "evaluate", demo_root / "WBC_100" / "val", "--out", out2,
                 "--cache-dir", cache, "--batch-size", 32]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    capsys.readouterr()


def test_images_for_model_give_plain_keras_the_probabilities_the_run_recorded(run, demo_root):
    """The README's plain-Keras recipe: data.images_for_model decodes (and, for a framed model, frames) the files
    as training did, so keras' own predict gives the run's recorded validation probabilities."""
    import keras
    import data
    run_dir, _ = run
    assert runfiles.read_h5_metadata(run_dir / "model.h5")["framing"]["share"] == 0.5  # the default recipe frames
    files = sorted((demo_root / "WBC_100" / "val" / "data" / "Monocyte").iterdir())[:4]
    model = keras.models.load_model(run_dir / "model.h5", compile=False)
    probs = model.predict(data.images_for_model(files, run_dir / "model.h5"), verbose=0)
    recorded = {r["path"]: [float(r[f"p_{c}"]) for c in CLASSES] for r in read_csv(run_dir / "val_predictions.csv")}
    assert np.allclose(probs, [recorded[str(f)] for f in files], atol=2e-3)
    unframed = model.predict(np.stack([data.decode_image(f, 32) for f in files]), verbose=0)
    assert not np.allclose(unframed, probs, atol=2e-3)  # plain resizing would not have matched


def test_predict_writes_one_row_per_readable_image_with_probabilities_summing_to_1(run, demo_root, tmp_path,
                                                                                    capsys):
    run_dir, _ = run
    val = demo_root / "WBC_100" / "val" / "data"
    folder = tmp_path / "new"
    shutil.copytree(val / "Basophil", folder / "a")
    one = sorted((val / "Monocyte").iterdir())[0]
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    expected = len(list((folder / "a").iterdir())) + len(list((val / "Eosinophil").iterdir())) + 1
    out = tmp_path / "pred.csv"
    # batch size 7: several batches and a partial last one
    assert call([run_dir / "model.h5", "predict", folder, val / "Eosinophil", one, "--out", out,
                 "--batch-size", 7]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image" in err and "broken.jpg" in err
    rows = read_csv(out)
    assert len(rows) == expected
    assert list(rows[0]) == ["file", "predicted"] + [f"p_{c}" for c in CLASSES]
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5) and (probs >= 0).all()
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in probs.argmax(1)]
    # Decoded as in training: the same probabilities the run recorded for the validation images.
    recorded = {r["path"]: [float(r[f"p_{c}"]) for c in CLASSES] for r in read_csv(run_dir / "val_predictions.csv")}
    same = [(probs[i], recorded[r["file"]]) for i, r in enumerate(rows) if r["file"] in recorded]
    assert len(same) == len(list((val / "Eosinophil").iterdir())) + 1
    assert np.allclose([a for a, _ in same], [b for _, b in same], atol=2e-3)
    # Nothing already written is lost.
    assert call([run_dir / "model.h5", "predict", one, "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err and len(read_csv(out)) == expected


def bad_model_files(folder, good_h5):
    """Every kind of file that is not a usable model, each as {name: (path, words the message must have)}."""
    folder.mkdir()
    data = good_h5.read_bytes()
    (folder / "truncated.h5").write_bytes(data[:len(data) // 2])
    Image.new("RGB", (8, 8)).save(folder / "image.h5", format="PNG")
    (folder / "notes.h5").write_text("not a model\n")
    (folder / "empty.h5").write_bytes(b"")
    (folder / "a_folder.h5").mkdir()
    tiny = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    tiny.save(folder / "real.keras")
    shutil.copyfile(folder / "real.keras", folder / "keras_zip.h5")
    tiny.save_weights(folder / "w.weights.h5")
    (folder / "w.weights.h5").rename(folder / "weights_only.h5")
    with zipfile.ZipFile(folder / "broken.keras", "w") as z:
        z.writestr("config.json", "{not json")
    keras.Sequential([keras.Input((4,)), layers.Lambda(lambda t: t * 2)]).save(folder / "lambda.h5")
    return {"truncated": (folder / "truncated.h5", "truncated or corrupt HDF5"),
            "png": (folder / "image.h5", "a PNG image, not an HDF5 model file"),
            "text": (folder / "notes.h5", "not an HDF5 file"),
            "empty": (folder / "empty.h5", "an empty file"),
            "folder": (folder / "a_folder.h5", "a folder, not a model file"),
            "missing": (folder / "missing.h5", "no such model file"),
            "keras_zip": (folder / "keras_zip.h5", "zip archive"),
            "weights_only": (folder / "weights_only.h5", "without a Keras model"),
            "broken_keras": (folder / "broken.keras", "not a loadable Keras model"),
            "lambda_code": (folder / "lambda.h5", "Lambda")}


def test_each_kind_of_bad_model_file_gives_one_line_and_exit_2(run, tmp_path, capsys):
    run_dir, _ = run
    cases = bad_model_files(tmp_path / "bad", run_dir / "model.h5")
    capsys.readouterr()
    for name, (path, words) in cases.items():
        for command in ([], ["predict", run_dir / "curves.png"]):
            assert call([path, *command]) == 2, name
            captured = capsys.readouterr()
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in captured.err, (name, captured.err)
            assert lines[0].startswith(f"error: {path}: ") and words in lines[0], (name, lines[0])


def test_usage_errors_give_one_line_and_exit_2(run, tmp_path, capsys):
    run_dir, _ = run
    model = run_dir / "model.h5"
    for argv, words in (([model, "evaluate", tmp_path / "nope"], "no such folder"),
                        ([model, "evaluate", tmp_path], "no class folders found"),
                        ([model, "predict", tmp_path / "nope.jpg"], "no such file or folder"),
                        ([model, "predict", run_dir / "history.csv"], "none of the 1 files is a readable image"),
                        ([model, "gradcam", run_dir / "curves.png", "--out", run_dir / "args.json"],
                         "a file (expected a folder"),
                        ([model, "gradcam", run_dir / "curves.png", "--out", tmp_path / "c", "--class", "x"],
                         "not one of the model's classes"),
                        ([model, "explain"], "invalid choice")):
        assert call(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (argv, lines)


def test_a_bad_model_file_in_a_fresh_process_prints_only_the_error(run, tmp_path):
    run_dir, _ = run
    (tmp_path / "cell.h5").write_bytes((run_dir / "curves.png").read_bytes())
    done = run_script("inspect_model.py", tmp_path / "cell.h5", "predict", run_dir / "curves.png")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'cell.h5'}: a PNG image, not an HDF5 model file"]
