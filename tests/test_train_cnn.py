"""train_cnn.py end to end on the synthetic demo data, and its handling of bad input."""
import json

import numpy as np
import pytest

import train_cnn
from runfiles import UserError
from conftest import PROJECT, exit_status, run_script

RUN_FILES = ("args.json", "history.csv", "metrics.json", "model.h5", "val_predictions.csv", "curves.png",
             "confusion.png")


def test_short_demo_run_writes_the_run_folder_and_beats_the_majority_baseline(demo_root, cache_dir, tmp_path,
                                                                                capsys):
    out = tmp_path / "run"
    train_cnn.main(["--data", str(demo_root), "--image-size", "32", "--epochs", "3", "--out", str(out),
                    "--quiet"])
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    required = {"val_accuracy_best", "val_accuracy_mean", "val_accuracy_last", "val_accuracy_selected",
                "balanced_accuracy", "macro_f1", "per_class_recall", "confusion_matrix", "majority_baseline",
                "collapsed_to_majority", "classes", "epochs", "train_images", "seconds", "images_per_second"}
    assert required <= set(m)
    assert m["epochs"] == 3 and np.sum(m["confusion_matrix"]) == 200
    assert m["balanced_accuracy"] > 0.5 and not m["collapsed_to_majority"]
    assert m["val_accuracy_selected"] > m["majority_baseline"]
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 4 and history[0].startswith("epoch,train_loss")
    args = json.loads((out / "args.json").read_text())
    assert args["image_size"] == 32 and args["recipe"] == "default" and "versions" in args

    # tools/bn_recalibration_check.py on this run: three variants, the saved one scoring as metrics.json says.
    import importlib.util
    spec = importlib.util.spec_from_file_location("bn_check", PROJECT / "tools" / "bn_recalibration_check.py")
    bn_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bn_check)
    before = (out / "model.h5").read_bytes()
    capsys.readouterr()  # drop the training run's own summary
    assert bn_check.main([str(out), "--data", str(demo_root), "--split", "WBC_100", "--images", "64"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "macro-F1" in l]
    assert [l.split("  accuracy")[0].strip() for l in lines] == [
        "as saved", "BN statistics from plain training images", "BN statistics from augmented training images"]
    assert f"accuracy {m['val_accuracy_selected']:.3f}" in lines[0]
    assert (out / "model.h5").read_bytes() == before  # nothing written


def test_bad_data_paths_end_in_one_line_and_exit_2(tmp_path, capsys):
    """One in a fresh process (TensorFlow's start-up lines must not reach stderr), the others in this one."""
    (tmp_path / "flat").mkdir()
    done = run_script("train_cnn.py", "--data", tmp_path / "nope", "--out", tmp_path / "r")
    assert done.returncode == 2, done.stderr
    assert "no such folder" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    for argv, fragment in ((["--epochs", "0"], "expected a positive number"),
                           (["--split"], "expected one argument"),
                           (["--data", tmp_path / "flat"], "no WBC_100 folder")):
        assert exit_status(train_cnn.main, [*argv, "--out", tmp_path / "r"]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_class_weights_inverse_frequency_and_its_power():
    """'balanced' weights n / (k * n_c) (scikit-learn), raised to --class-weight-power; absent classes get 1."""
    import training
    labels = [0] * 8 + [1] * 2
    full = training.class_weights(labels, 3)
    assert full[0] == pytest.approx(10 / 16) and full[1] == pytest.approx(10 / 4) and full[2] == 1.0
    root = training.class_weights(labels, 3, power=0.5)
    assert root[0] == pytest.approx((10 / 16) ** 0.5) and root[1] == pytest.approx((10 / 4) ** 0.5)
    assert training.class_weights(labels, 3, power=0.0) == {0: 1.0, 1: 1.0, 2: 1.0}


def test_recipes_fill_what_the_command_line_leaves_unset(demo_root):
    """--recipe default: square-root class weights and 20 steps per epoch; report: none of that; a flag wins."""
    import training
    base = ["--data", str(demo_root)]
    default = training.TrainConfig.from_args(train_cnn.parse_args(base))
    assert default.class_weight and default.class_weight_power == 0.5 and default.min_steps == 20
    assert train_cnn.parse_args(base).stem_stride == "auto"
    assert train_cnn.parse_args(base + ["--recipe", "report"]).stem_stride == 1
    report = training.TrainConfig.from_args(train_cnn.parse_args(base + ["--recipe", "report"]))
    assert not report.class_weight and report.min_steps == 0 and report.lr == 1e-3
    assert report.augment["rotation"] == 20.0 and default.augment["rotation"] == 180.0
    chosen = training.TrainConfig.from_args(train_cnn.parse_args(base + ["--class-weight-power", "1"]))
    assert chosen.class_weight_power == 1.0
    with pytest.raises(UserError, match="--class-weight-power"):
        train_cnn.parse_args(base + ["--class-weight-power", "-1"])
