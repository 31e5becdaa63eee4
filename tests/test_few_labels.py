"""Fine-tuning a trained classifier on a few labelled images of another lab: train_cnn.py --init MODEL.h5 (its
weights, head and stain reference carried over) and tools/few_labels.py (the draws, the four methods, the results)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

import runfiles
from conftest import exit_status, load_tool

few = load_tool("few_labels")


def test_draws_take_k_of_each_class_at_most_half_and_test_on_the_rest():
    labels = np.array([0] * 3 + [1] * 20 + [2] * 7)
    labelled, test = few.draw_split(labels, 5, seed=0)
    assert np.bincount(labels[labelled]).tolist() == [1, 5, 3]  # at most half of a class: 3 -> 1, 7 -> 3
    assert not set(labelled) & set(test) and len(labelled) + len(test) == len(labels)
    again, _ = few.draw_split(labels, 5, seed=0)
    other, _ = few.draw_split(labels, 5, seed=1)
    assert again.tolist() == labelled.tolist() and other.tolist() != labelled.tolist()


def _core(run, demo_root, *extra):
    """A fresh classifier of the run's shape, as train_cnn.py --config RUN builds it (with `extra` options)."""
    import domain
    import train_cnn
    args = train_cnn.parse_args(["--config", str(run), "--data", str(demo_root), *extra])
    meta = domain.metadata(args, np.zeros((0, 32, 32, 3), np.uint8))
    return domain.cnn_builder(args, 5, meta)(), meta


def test_init_from_a_trained_classifier_copies_every_layer_and_the_head_only_when_asked(cnn_run, demo_root):
    import selfsup
    run, _ = cnn_run
    trained = runfiles.load_core_model(run / "model.h5")
    want = {layer.name: layer.get_weights() for layer in selfsup.weighted_layers(trained)}
    assert "predictions" in want and any(name.startswith("stain_norm") for name in want)
    for head in (True, False):
        core, meta = _core(run, demo_root, "--init", str(run / "model.h5"))
        names = selfsup.load_encoder_weights(core, run / "model.h5", head=head)
        assert ("predictions" in names) == head
        for layer in selfsup.weighted_layers(core):
            same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), want[layer.name]))
            assert same == (head or layer.name not in selfsup.HEAD_LAYERS), layer.name
    # the stain reference the copied layers carry is the one the new model's metadata names
    reference = runfiles.read_h5_metadata(run / "model.h5")["stain_normalisation"]
    assert meta["stain_normalisation"]["mean"] == reference["mean"] and meta["stain_normalisation"]["from_init"]


def test_a_trained_classifier_must_be_fine_tuned_framed_and_normalised_as_it_was_trained(cnn_run, demo_root,
                                                                                         tmp_path, capsys):
    import train_cnn
    run, _ = cnn_run
    base = ["--data", demo_root, "--init", run / "model.h5", "--out", tmp_path / "r"]
    for extra, says in ((["--frame-cell", "0"], "a model trained with --frame-cell 0.5, this run has --frame-cell 0"),
                        (["--stain-norm", "none"], "a model trained with --stain-norm reinhard")):
        assert exit_status(train_cnn.main, [*base, *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "bad.h5").write_bytes(b"not a model")
    assert exit_status(train_cnn.main, ["--data", demo_root, "--init", tmp_path / "bad.h5"]) == 2
    assert "bad.h5: not a readable .h5 model file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_scratch_repeats_the_models_command_and_fine_tuned_adds_init_at_a_tenth_of_its_rate(cnn_run, tmp_path):
    run, _ = cnn_run
    args = few.parse_args([str(run / "model.h5"), str(tmp_path), "--home", str(tmp_path), "--out", str(tmp_path)])
    scratch = few.train_command(args, "scratch", tmp_path / "d", 1, tmp_path / "s")
    tuned = few.train_command(args, "fine_tuned", tmp_path / "d", 1, tmp_path / "t")
    recipe = json.loads(Path(scratch[scratch.index("--config") + 1]).read_text())
    assert recipe["lr"] == json.loads((run / "args.json").read_text())["lr"] and "--init" not in scratch
    assert tuned[tuned.index("--init") + 1] == str((run / "model.h5").resolve())
    lr = json.loads((run / "args.json").read_text())["lr"]
    assert float(tuned[tuned.index("--lr") + 1]) == pytest.approx(lr / 10)
    assert scratch[scratch.index("--holdout") + 1] == "0"  # the last epoch kept: nothing selected on the test images


def test_a_model_trained_from_an_encoder_is_fine_tuned_and_trained_from_scratch_like_any_other(cnn_run, tmp_path):
    # A frozen-encoder model's run (--init ENCODER --freeze-epochs = --epochs) and a distilled one (--teacher):
    # repeated as they were, fine_tuned's 10 epochs would be refused (30 frozen epochs of 10) and scratch would
    # start from the encoder. The draws' recipe trains every layer from the first epoch, on the labelled images.
    import shutil
    import train_cnn
    run, _ = cnn_run
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    shutil.copy(run / "model.h5", frozen / "model.h5")
    saved = json.loads((run / "args.json").read_text())
    saved.update(init=str(tmp_path / "encoder.h5"), freeze_epochs=saved["epochs"], frozen_blocks=1, frozen_bn=True,
                 teacher=str(tmp_path / "teacher.h5"), unlabeled=[str(tmp_path)])
    (frozen / "args.json").write_text(json.dumps(saved))
    args = few.parse_args([str(frozen / "model.h5"), str(tmp_path), "--home", str(tmp_path), "--epochs", "2",
                           "--out", str(tmp_path / "out")])
    (tmp_path / "d").mkdir()
    for method in ("fine_tuned", "scratch"):
        cmd = few.train_command(args, method, tmp_path / "d", 0, tmp_path / method)
        parsed = train_cnn.parse_args(cmd[2:])
        assert (parsed.freeze_epochs, parsed.finetune_lr, parsed.frozen_blocks, parsed.frozen_bn) == (0, None, 0, False)
        assert parsed.teacher is None and not parsed.unlabeled and parsed.epochs == 2
        assert parsed.init == ((frozen / "model.h5").resolve() if method == "fine_tuned" else None)
        assert parsed.image_size == saved["image_size"] and parsed.frame_cell == saved["frame_cell"]


@pytest.mark.slow
def test_few_labels_fine_tunes_the_model_on_each_draw_and_scores_every_method(cnn_run, demo_root, tmp_path,
                                                                               monkeypatch):
    import keras
    import train_cnn
    run, _ = cnn_run
    target = demo_root / "WBC_10" / "train" / "data"
    commands = []

    def in_process(cmd, check, cwd):  # train_cnn.py's command run here: no second TensorFlow start-up
        commands.append(cmd)
        assert cmd[1].endswith("train_cnn.py") and check
        train_cnn.main(cmd[2:])

    monkeypatch.setattr(few.subprocess, "run", in_process)
    policy = keras.mixed_precision.global_policy().name
    argv = [str(run / "model.h5"), str(target), "--home", str(demo_root / "WBC_100" / "val"), "--shots", "2",
            "--draws", "0", "--epochs", "1", "--methods", "as_is", "adapt_bn", "fine_tuned", "fine_tuned_mixed",
            "--out", str(tmp_path / "out")]
    few.main(argv)
    keras.mixed_precision.set_global_policy(policy)
    assert len(commands) == 2  # fine_tuned and fine_tuned_mixed train (scratch not asked for)
    few.main(argv)  # a finished draw is read back, not redone
    assert len(commands) == 2
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["target"]) for r in rows) == sorted(
        (m, t) for m in ("as_is", "adapt_bn", "fine_tuned", "fine_tuned_mixed") for t in ("target_test", "home"))
    draw = tmp_path / "out" / "draws" / "K2_draw0" / "few"
    labelled = {p.name for p in draw.glob("train/data/*/*")}
    tested = {p.name for p in draw.glob("val/data/*/*")}
    assert labelled and tested and not labelled & tested
    assert len(labelled) + len(tested) == sum(1 for _ in target.glob("*/*"))
    test_rows = [r for r in rows if r["target"] == "target_test"]
    assert {int(r["images"]) for r in test_rows} == {len(tested)}
    tuned = tmp_path / "out" / "runs" / "K2_draw0_fine_tuned" / "model.h5"
    meta = runfiles.read_h5_metadata(tuned)
    assert meta["init_encoder"]["kind"] == "classifier" and meta["init_encoder"]["head"] == "copied"
    # the stain layers are fixed: the fine-tuned model's are the trained model's, exactly
    a, b = runfiles.load_core_model(run / "model.h5"), runfiles.load_core_model(tuned)
    for name in ("stain_norm_opponent", "stain_norm_to_reference_rgb"):
        assert all(np.array_equal(x, y) for x, y in zip(a.get_layer(name).get_weights(),
                                                          b.get_layer(name).get_weights()))
    assert "| 2 | fine_tuned | target_test | 1 |" in (tmp_path / "out" / "summary.md").read_text()


def test_mixed_draw_holds_the_home_images_once_and_the_labelled_ones_until_they_are_as_many(tmp_path):
    from types import SimpleNamespace
    files = []
    for i in range(12):
        files.append(tmp_path / "src" / f"img{i}.png")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_bytes(b"")
    classes = ("a", "b")
    target = SimpleNamespace(paths=files[:6], y=np.array([0, 0, 0, 1, 1, 1]), classes=classes)
    home = SimpleNamespace(paths=files[6:], labels=np.array([0, 0, 0, 0, 1, 1]), classes=classes)
    labelled, test = np.array([0, 3]), np.array([1, 2, 4, 5])
    few.write_draw(target, labelled, test, tmp_path / "draw", home)
    train = sorted(p.relative_to(tmp_path / "draw" / "mixed" / "train" / "data").as_posix()
                   for p in (tmp_path / "draw" / "mixed" / "train" / "data").glob("*/*"))
    assert few.mixed_repeats(6, 2) == 3
    assert train == sorted([f"a/home_img{i}.png" for i in (6, 7, 8, 9)] + ["b/home_img10.png", "b/home_img11.png"]
                           + [f"a/target{r}_img0.png" for r in range(3)] + [f"b/target{r}_img3.png" for r in range(3)])
    assert all(p.resolve() in [f.resolve() for f in files]
               for p in (tmp_path / "draw" / "mixed" / "train" / "data").glob("*/*"))
    tested = {p.name for p in (tmp_path / "draw" / "mixed" / "val" / "data").glob("*/*")}
    assert tested == {p.name for p in (tmp_path / "draw" / "few" / "val" / "data").glob("*/*")} == \
        {f"img{i}.png" for i in test}
    assert few.mixed_repeats(10, 100) == 1  # never fewer than once


def test_mixed_method_fine_tunes_on_the_mixed_split_and_needs_the_models_training_images(cnn_run, tmp_path,
                                                                                        capsys):
    run, _ = cnn_run
    args = few.parse_args([str(run / "model.h5"), str(tmp_path), "--home", str(tmp_path), "--out", str(tmp_path)])
    mixed = few.train_command(args, "fine_tuned_mixed", tmp_path / "d", 1, tmp_path / "m")
    assert mixed[mixed.index("--split") + 1] == "mixed" and "--init" in mixed
    assert len(few.home_training_files(run / "model.h5")) > 0
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "model.h5").write_bytes((run / "model.h5").read_bytes())
    saved = json.loads((run / "args.json").read_text())
    (moved / "args.json").write_text(json.dumps({**saved, "data": str(tmp_path / "gone")}))
    argv = [str(moved / "model.h5"), str(tmp_path), "--home", str(tmp_path), "--out", str(tmp_path / "o")]
    assert exit_status(few.main, argv) == 2
    err = capsys.readouterr().err
    assert "its --data" in err and "gone is not a folder here" in err and len(err.strip().splitlines()) == 1, err
