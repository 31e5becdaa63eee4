"""Semi-supervised training (semisup.py, train_cnn.py --unlabeled): the confidence bar, the unlabeled batches,
the FixMatch and distillation losses, and the script end to end under TensorFlow and JAX."""
import importlib.util
import json

import numpy as np
import pytest

from conftest import JAX_ENV, Started, exit_status, run_script, selected, start_script, table_in_process

TINY = ["--image-size", "16", "--batch-size", "8", "--width", "4", "--no-cache", "--epochs", "1"]


@pytest.fixture(scope="module", autouse=True)
def jax_run(request, tmp_path_factory):
    """test_semi_supervised_training_under_jax's run, started with this module when that test is selected: it
    trains in its own process (on the second core) while the tests before it run here."""
    if importlib.util.find_spec("jax") is None or not selected(request, "test_semi_supervised_training_under_jax"):
        yield None
        return
    demo_root = request.getfixturevalue("demo_root")
    out = tmp_path_factory.mktemp("jax") / "run"
    started = start_script("train_cnn.py", "--data", demo_root, "--split", "WBC_1", *TINY, "--unlabeled",
                           demo_root / "WBC_100" / "train", "--unlabeled-ratio", "2", "--thresholds", "per-class",
                           "--out", out, "--quiet", env=JAX_ENV)
    yield started, out
    started.stop()


def test_confidence_bar_is_the_threshold_of_the_smoothed_target():
    import semisup
    assert semisup.confidence_bar(0.95, 0.0, 5) == pytest.approx(0.95)
    # label smoothing 0.1 over 5 classes asks for 0.92 on the true class at most: 0.95 of it
    assert semisup.confidence_bar(0.95, 0.1, 5) == pytest.approx(0.95 * 0.92)


def _labelled_batches(n=10, batch=4, size=4):
    from feeding import ArrayBatches
    x = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, size, size, 3), np.uint8)
    return ArrayBatches(x, np.eye(5, dtype="float32")[np.arange(n) % 5], batch, seed=0)


def test_each_step_gets_ratio_times_its_size_of_unlabeled_images_reproducibly_across_a_resume():
    import semisup
    from feeding import Endless
    pool = (np.arange(100, dtype=np.uint8) + 100)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    wrap = semisup.with_unlabeled_batches(pool, ratio=3, seed=7)
    stream = Endless(wrap(_labelled_batches()))
    steps = stream.steps_per_epoch
    read = [stream[i] for i in range(3 * steps)]  # three epochs
    for (labelled, unlabeled), y in read:
        assert len(unlabeled) == 3 * len(y) and len(labelled) == len(y)
        ids = unlabeled[:, 0, 0, 0]
        assert len(set(ids)) == len(ids) and ids.min() >= 100  # distinct pool images, never labelled ones
    epoch0 = [u[:, 0, 0, 0].tolist() for (_, u), _ in read[:steps]]
    epoch1 = [u[:, 0, 0, 0].tolist() for (_, u), _ in read[steps:2 * steps]]
    assert epoch0 != epoch1, "every epoch draws other unlabeled images"
    # a resumed run (Endless starting at epoch 2) reads what the uninterrupted one read in its third epoch
    resumed = Endless(wrap(_labelled_batches()), start_epoch=2)
    for i in range(steps):
        (la, ua), ya = resumed[i]
        (lb, ub), yb = read[2 * steps + i]
        assert np.array_equal(la, lb) and np.array_equal(ua, ub) and np.array_equal(ya, yb)


def _fixed_core(probs_of_value):
    """A model whose probabilities depend only on the image's first pixel value v: probs_of_value[v]."""
    import keras
    table = np.asarray(probs_of_value, "float32")

    class Lookup(keras.layers.Layer):
        def call(self, x):
            index = keras.ops.cast(x[:, 0, 0, 0], "int32")
            return keras.ops.take(keras.ops.convert_to_tensor(table), index, axis=0)

        def compute_output_shape(self, shape):
            return (shape[0], table.shape[1])

    inputs = keras.Input((4, 4, 3), dtype="uint8")
    return keras.Model(inputs, Lookup(dtype="float32")(inputs))


def test_unlabeled_loss_is_the_confident_class_weighted_cross_entropy_and_output_the_labelled_probs():
    import keras
    import semisup
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5) * 0.3, size=8).astype("float32")  # some confident, some not
    core = _fixed_core(probs)
    labelled = np.full((2, 4, 4, 3), 0, np.uint8)
    labelled[1] = 1
    unlabeled = np.arange(2, 8, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    weights = {0: 2.0, 1: 0.5, 2: 1.0, 3: 3.0, 4: 1.5}
    bar, weight = 0.6, 0.7
    no_strong = dict(color_jitter=0.0, grayscale=0.0, blur=0.0)  # the strong view = the image: loss by hand
    model = semisup.fixmatch_model(core, 5, bar, weight, weights, seed=0, strong=no_strong)
    out = keras.ops.convert_to_numpy(model([labelled, unlabeled], training=True))
    assert np.allclose(out, probs[[0, 1]], atol=1e-6)
    p = probs[2:8]
    pseudo = p.argmax(1)
    w = np.array([weights[c] for c in range(5)])[pseudo]
    expected = weight * np.mean((p.max(1) >= bar) * w * -np.log(p[np.arange(6), pseudo]))
    assert (p.max(1) >= bar).any() and not (p.max(1) >= bar).all()  # the mask matters in this example
    assert float(keras.ops.convert_to_numpy(sum(model.losses))) == pytest.approx(expected, rel=1e-5)
    # nothing reaches a bar above every probability: no unlabeled loss
    model = semisup.fixmatch_model(core, 5, 1.01, weight, weights, seed=0, strong=no_strong)
    model([labelled, unlabeled], training=True)
    assert float(keras.ops.convert_to_numpy(sum(model.losses))) == 0.0


def test_per_class_bars_lower_the_bar_of_a_rarely_predicted_class():
    import keras
    import semisup
    # class 0 is rarely predicted on the pool: its one image has top probability 0.5, below the fixed bar 0.874
    probs = np.array([[1, 0, 0, 0, 0]] * 2  # the two labelled images
                     + [[0.5, 0.5 / 4, 0.5 / 4, 0.5 / 4, 0.5 / 4],
                        [0.02, 0.9, 0.04, 0.02, 0.02], [0.02, 0.02, 0.92, 0.02, 0.02],
                        [0.02, 0.85, 0.05, 0.06, 0.02], [0.02, 0.03, 0.03, 0.9, 0.02],
                        [0.02, 0.03, 0.6, 0.3, 0.05]], "float32")
    core = _fixed_core(probs)
    labelled = np.zeros((2, 4, 4, 3), np.uint8)
    labelled[1] = 1
    unlabeled = np.arange(2, 8, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    no_strong = dict(color_jitter=0.0, grayscale=0.0, blur=0.0)
    p = probs[2:]
    ce = -np.log(p[np.arange(6), p.argmax(1)])
    bar = 0.874
    # momentum 0: the class shares are this batch's
    model = semisup.fixmatch_model(core, 5, bar, 1.0, None, seed=0, strong=no_strong, per_class=True, momentum=0.0)
    model([labelled, unlabeled], training=True)
    share = p.mean(0)
    bars = bar * share / share.max()
    confident = p.max(1) >= bars[p.argmax(1)]
    assert confident[0] and p[0].max() < bar, "the rare class's image passes its own, lower bar"
    assert not confident.all(), "an image below its class's bar stays out"
    assert float(keras.ops.convert_to_numpy(sum(model.losses))) == pytest.approx(np.mean(confident * ce), rel=1e-5)
    # the fixed bar leaves the rare class's image out
    fixed = semisup.fixmatch_model(core, 5, bar, 1.0, None, seed=0, strong=no_strong)
    fixed([labelled, unlabeled], training=True)
    kept = p.max(1) >= bar
    assert not kept[0]
    assert float(keras.ops.convert_to_numpy(sum(fixed.losses))) == pytest.approx(np.mean(kept * ce), rel=1e-5)
    # momentum 0.5 from the start values 1/K: the averages are half the start, half this batch's; at the start
    # every class's bar is the fixed one
    model = semisup.fixmatch_model(core, 5, bar, 1.0, None, seed=0, strong=no_strong, per_class=True, momentum=0.5)
    model([labelled, unlabeled], training=True)
    layer = model.get_layer("fixmatch")
    assert float(keras.ops.convert_to_numpy(layer.confidence)) == pytest.approx(0.1 + 0.5 * p.max(1).mean(),
                                                                              rel=1e-6)
    share = 0.1 + 0.5 * p.mean(0)
    assert np.allclose(keras.ops.convert_to_numpy(layer.share), share, atol=1e-6)
    confident = p.max(1) >= (bar * share / share.max())[p.argmax(1)]
    columns = semisup.pool_columns(list("abcde"))(model)
    assert columns["pool_share_a"] == pytest.approx(share[0])
    assert columns["pool_used"] == pytest.approx(0.5 * confident.mean())


def test_distillation_loss_is_the_teachers_class_weighted_soft_cross_entropy_and_the_teacher_never_learns():
    import keras
    import semisup
    rng = np.random.default_rng(0)
    student_probs = rng.dirichlet(np.ones(5) * 0.3, size=8).astype("float32")
    teacher_probs = rng.dirichlet(np.ones(5), size=8).astype("float32")
    labelled = np.zeros((2, 4, 4, 3), np.uint8)
    labelled[1] = 1
    unlabeled = np.arange(2, 8, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    weights = {0: 2.0, 1: 0.5, 2: 1.0, 3: 3.0, 4: 1.5}
    model = semisup.distill_model(_fixed_core(student_probs), _fixed_core(teacher_probs), 5, 0.7, weights,
                                  momentum=0.0)
    out = keras.ops.convert_to_numpy(model([labelled, unlabeled], training=True))
    assert np.allclose(out, student_probs[[0, 1]], atol=1e-6), "the output is the labelled images' probabilities"
    t, p = teacher_probs[2:], student_probs[2:]
    w = np.array([weights[c] for c in range(5)])[t.argmax(1)]
    expected = 0.7 * np.mean(w * -(t * np.log(p)).sum(1))
    assert float(keras.ops.convert_to_numpy(sum(model.losses))) == pytest.approx(expected, rel=1e-5)
    columns = semisup.pool_columns(list("abcde"))(model)
    assert columns["pool_agreement"] == pytest.approx((p.argmax(1) == t.argmax(1)).mean())
    assert columns["pool_share_c"] == pytest.approx(p[:, 2].mean(), rel=1e-5)

    # training moves the student towards the teacher on the pool and leaves the teacher as it was; a control
    # without the distillation loss (weight ~0) stays as far
    def tiny(seed):
        inputs = keras.Input((4, 4, 3), dtype="uint8")
        x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
        return keras.Model(inputs, keras.layers.Dense(5, activation="softmax",
                                                      kernel_initializer=keras.initializers.GlorotUniform(seed))(x))
    pool = rng.integers(0, 255, (64, 4, 4, 3)).astype(np.uint8)

    def gap_after_training(weight):
        student, teacher = tiny(1), tiny(2)
        before = [w.copy() for w in teacher.get_weights()]
        targets = keras.ops.convert_to_numpy(teacher(pool))
        model = semisup.distill_model(student, teacher, 5, weight, None)
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy")
        labels = np.eye(5, dtype="float32")[targets[:8].argmax(1)]  # the teacher's classes: no conflict
        start = np.abs(keras.ops.convert_to_numpy(student(pool[8:])) - targets[8:]).mean()
        for _ in range(100):  # one batch: 8 labelled images, all 64 as the unlabeled ones
            model.train_on_batch([pool[:8], pool], labels)
        assert all(np.array_equal(a, b) for a, b in zip(before, teacher.get_weights())), "the teacher learned"
        return start, np.abs(keras.ops.convert_to_numpy(student(pool[8:])) - targets[8:]).mean()

    start, distilled = gap_after_training(1.0)
    _, control = gap_after_training(1e-6)
    assert distilled < 0.5 * start and distilled < 0.5 * control, (start, distilled, control)


def test_the_moving_averages_span_about_an_epoch():
    import semisup
    assert semisup.ema_momentum(20) == pytest.approx(0.95)
    assert semisup.ema_momentum(1) == 0.5  # never 0: the averages would be one batch's


def test_the_semi_supervised_hook_averages_over_the_fit_s_own_steps_per_epoch():
    import semisup
    import training
    core = _fixed_core(np.full((1, 5), 0.2, "float32"))
    config = training.TrainConfig(holdout=0.15, min_steps=20, batch_size=8)
    hooks = semisup.hooks(training.Hooks(), np.zeros((3, 4, 4, 3), np.uint8), np.arange(10) % 5, list("abcde"),
                          config, ratio=1, weight=1.0, threshold=0.95)
    for steps in (7, 40):  # whatever the fit's stream counts, not an estimate from the split's size
        model = hooks.build_train_model(core, config, steps)
        assert model.get_layer("fixmatch").momentum == pytest.approx(semisup.ema_momentum(steps))


def test_strong_view_differs_from_the_image():
    import keras
    import augment
    import semisup
    x = np.random.default_rng(1).integers(0, 255, (8, 16, 16, 3)).astype(np.uint8)
    layers = augment.photometric_layers(**semisup.STRONG, seed=3)
    out = x
    for layer in layers:
        out = layer(out, training=True)
    assert np.abs(keras.ops.convert_to_numpy(out).astype(int) - x).mean() > 1.0


def test_train_cnn_unlabeled_records_the_pool_and_refuses_validation_images(demo_root, tmp_path, capsys):
    import train_cnn
    from runfiles import read_h5_metadata
    pool = demo_root / "WBC_100" / "train"
    out = tmp_path / "semi"
    code = exit_status(train_cnn.main, ["--data", demo_root, "--split", "WBC_1", *TINY, "--unlabeled", pool,
                                        "--unlabeled-ratio", "2", "--out", out, "--quiet"])
    assert code == 0, capsys.readouterr().err[-2000:]
    # the split's folder holds data/ and mask/: the masks are not cell images and stay out of the pool
    assert (pool / "mask").is_dir()
    n_pool = sum(1 for p in (pool / "data").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".bmp", ".tif"))
    semi = read_h5_metadata(out / "model.h5")["semi_supervised"]
    assert semi["unlabeled_images"] == n_pool and semi["ratio"] == 2
    assert semi["thresholds"] == "fixed"
    assert semi["confidence_bar"] == pytest.approx(0.95 * 0.92)  # the default recipe's label smoothing 0.1
    from test_reliability import history_rows
    history = history_rows(out)
    shares = np.array([[float(r[k]) for k in r if k.startswith("pool_share_")] for r in history])
    assert shares.shape[1] == 5 and np.allclose(shares.sum(1), 1.0, atol=1e-4)  # averages of probabilities
    assert all(0.0 <= float(r["pool_used"]) <= 1.0 for r in history)
    assert json.loads((out / "args.json").read_text())["unlabeled"] == [str(pool)]
    # the validation folder offered as unlabeled images: one line, exit 2, no run folder
    capsys.readouterr()
    code = exit_status(train_cnn.main, ["--data", demo_root, "--split", "WBC_1", *TINY, "--unlabeled",
                                        demo_root / "WBC_100" / "val", "--out", tmp_path / "bad"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --unlabeled")
    assert len(err.strip().splitlines()) == 1 and "validation image" in err
    assert not (tmp_path / "bad" / "model.h5").exists()
    # distillation: the run above as the teacher of another
    student = tmp_path / "student"
    code = exit_status(train_cnn.main, ["--data", demo_root, "--split", "WBC_1", *TINY, "--unlabeled", pool,
                                        "--unlabeled-ratio", "2", "--teacher", out / "model.h5", "--out", student,
                                        "--quiet"])
    assert code == 0, capsys.readouterr().err[-2000:]
    semi = read_h5_metadata(student / "model.h5")["semi_supervised"]
    assert semi["method"] == "distillation" and semi["unlabeled_images"] == n_pool
    from selfsup import file_sha256
    assert semi["teacher"] == {"path": str(out / "model.h5"), "sha256": file_sha256(out / "model.h5")}
    assert all(0.0 <= float(r["pool_agreement"]) <= 1.0 for r in history_rows(student))
    # a teacher of another image size, or without unlabeled images: one line each, exit 2
    for flags, says in ((["--image-size", "24", "--unlabeled", pool], "trained at 16 px, this run at 24 px"),
                        ([], "give them with --unlabeled")):
        capsys.readouterr()
        code = exit_status(train_cnn.main, ["--data", demo_root, "--split", "WBC_1", *TINY, *flags, "--teacher",
                                            out / "model.h5", "--out", tmp_path / "bad", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: --teacher") and says in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "model.h5").exists()
    # a fresh process: the exit status and the one line of a mistake found before Keras starts
    missing = run_script("train_cnn.py", "--unlabeled", tmp_path / "nowhere", timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --unlabeled")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_semi_supervised_training_under_jax(jax_run):
    started, out = jax_run
    result = started.result(timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["backend"] == "jax" and np.isfinite(m["val_accuracy_selected"])
    from runfiles import read_h5_metadata
    semi = read_h5_metadata(out / "model.h5")["semi_supervised"]
    assert semi["thresholds"] == "per-class"
    # the moving averages left their start (1/K) during the epoch: the wrapper's state updates reach the model
    # under JAX's stateless training step
    from test_reliability import history_rows
    assert float(history_rows(out)[-1]["pool_confidence"]) != pytest.approx(0.2, abs=1e-6)



def test_table_semi_rows_train_on_the_pool_and_pair_with_raw(demo_root, tmp_path, capsys):
    import reproduce_table
    result = table_in_process(capsys, "--data", demo_root, "--rows", "WBC_1_semi_default", "--seeds", "1",
                              "--list", "--out", tmp_path / "table")
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert "train_cnn.py" in line and "--split WBC_1" in line
    assert line.split("--unlabeled ")[1].split()[:2] == [str(demo_root / "WBC_100" / "train" / "data"),
                                                         "--unlabeled-ratio"]
    assert line.endswith("--unlabeled-ratio 7 --thresholds fixed")
    assert ("semi_default", "raw_default") in reproduce_table.PAIRS


def test_pool_mix_warning_fires_only_when_the_pools_predicted_mix_is_far_from_the_labelled_one(tmp_path):
    import semisup
    classes = ["a", "b", "c"]
    labels = [0] * 2 + [1] * 2 + [2] * 6  # 0.2 / 0.2 / 0.6

    def history(*shares):
        (tmp_path / "history.csv").write_text("epoch,pool_share_a,pool_share_b,pool_share_c\n"
                                              + "".join(f"{i},{a},{b},{c}\n" for i, (a, b, c) in enumerate(shares)))
    history((0.6, 0.2, 0.2), (0.25, 0.2, 0.55))  # the last epoch counts: 0.05 apart
    assert semisup.pool_mix_warning(tmp_path, labels, classes) is None
    history((0.25, 0.2, 0.55), (0.45, 0.3, 0.25))  # 0.35 apart
    warning = semisup.pool_mix_warning(tmp_path, labels, classes)
    assert "total variation 0.35" in warning and "a 0.45 vs 0.20" in warning
    (tmp_path / "history.csv").write_text("epoch,train_loss\n1,0.5\n")  # a supervised run: nothing to say
    assert semisup.pool_mix_warning(tmp_path, labels, classes) is None


def test_table_semi_pool_is_the_labelled_population_unless_all_and_old_folders_keep_theirs(demo_root, tmp_path):
    import reproduce_table
    from runfiles import UserError
    root = tmp_path / "root"
    root.mkdir()
    (root / "WBC_100").symlink_to(demo_root / "WBC_100")
    (root / "WBC_unlabeled" / "data").mkdir(parents=True)
    train = root / "WBC_100" / "train" / "data"
    assert reproduce_table.unlabeled_pool(root) == [train]
    assert reproduce_table.unlabeled_pool(root, "all") == [train, root / "WBC_unlabeled"]
    args = reproduce_table.parse_args(["--data", str(root), "--rows", "WBC_1_semi_default", "--out", str(tmp_path / "t")])
    assert args.semi_pool == "train"
    # A results folder written before --semi-pool existed trained its semi rows on every folder: continuing it
    # with the new default is refused, not mixed.
    (tmp_path / "t").mkdir()
    old = {k: v for k, v in reproduce_table.check_config(tmp_path / "t", args).items() if k != "semi_pool"}
    (tmp_path / "t" / "table_config.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="--semi-pool all"):
        reproduce_table.check_config(tmp_path / "t", args)
    args.semi_pool = "all"
    assert reproduce_table.check_config(tmp_path / "t", args)["semi_pool"] == "all"


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_semi_supervised_run(tmp_path, capsys):
    """The unlabeled images of each step, the strong views' random state and the pseudo-labels continue exactly
    after a resume: history.csv and metrics.json equal the uninterrupted run's, timing aside."""
    import os
    import signal
    import sys
    from test_reliability import (PROJECT, course_root, history_rows, run_in_process, tiny_args,
                                  without_timing)
    root = course_root(tmp_path / "root", train=6)
    pool = ["--unlabeled", str(root / "WBC_100" / "train" / "data"), "--unlabeled-ratio", "2", "--min-steps", "4"]
    run = tmp_path / "run"
    args = tiny_args(root, tmp_path / "cache", run, *pool)
    # The run to kill starts first, in its own process; the uninterrupted one trains here meanwhile.
    started = Started([sys.executable, PROJECT / "tests" / "faults.py", "epoch", "train_cnn.py", *args],
                      {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    baseline = tmp_path / "baseline"
    code, _, err = run_in_process(tiny_args(root, tmp_path / "cache", baseline, *pool), capsys)
    killed = started.result(timeout=300)
    assert code == 0, err
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    other = tiny_args(root, tmp_path / "cache", run, *pool[:-4], str(root / "WBC_100" / "val" / "data"), *pool[-4:])
    code, _, err = run_in_process(other + ["--resume"], capsys)  # another pool: refused, nothing touched
    assert code == 2 and err.startswith("error:") and "--unlabeled: run has" in err
    code, out, err = run_in_process(args + ["--resume"], capsys)
    assert code == 0, err
    assert "resuming after epoch" in out
    assert history_rows(run) == history_rows(baseline)
    assert without_timing(json.loads((run / "metrics.json").read_text())) == \
        without_timing(json.loads((baseline / "metrics.json").read_text()))



def test_table_distilled_row_is_taught_by_the_seeds_ssl_run_trained_first_and_fails_with_it(demo_root, tmp_path,
                                                                                             monkeypatch, capsys):
    """<split>_ssl-distill_default: --rows brings its teacher row; the teacher's run is trained before the
    student's even when only the student is asked for (reproduce_table.train_rows' teacher_once), and a teacher
    that fails fails its student without launching it. Runs are simulated: launch writes a finished folder."""
    from pathlib import Path
    import reproduce_table
    rows = reproduce_table.select_rows(reproduce_table.all_rows(), "WBC_1_ssl-distill_default")
    assert [r.name for r in rows] == ["WBC_1_ssl_default", "WBC_1_ssl-distill_default"]
    assert ("ssl-distill_default", "ssl_default") in reproduce_table.PAIRS

    def table(out, failing="", code=3):
        launched = []

        def launch(cmd, log, jobs=1):
            folder = Path(cmd[cmd.index("--out") + 1])
            launched.append((folder.name, cmd))
            if folder.name.startswith(failing or "-"):
                return code  # exit 0 here: ended without writing its folder
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("model.h5", "history.csv", "args.json", "val_predictions.csv"):
                (folder / name).write_text("")
            (folder / "metrics.json").write_text(json.dumps({"val_accuracy_selected": 0.5,
                                                             "balanced_accuracy": 0.5}))
            return 0
        monkeypatch.setattr(reproduce_table, "launch", launch)
        args = reproduce_table.parse_args(["--data", str(demo_root), "--seeds", "1", "--out", str(out)])
        student = [r for r in rows if r.method == "ssl-distill"]  # the student alone: its teacher is not listed
        return reproduce_table.train_rows(student, args, out), launched

    failures, launched = table(tmp_path / "t")
    assert failures == []
    assert [name for name, _ in launched] == ["ssl_pretrain_seed0", "WBC_1_ssl_default_seed0",
                                              "WBC_1_ssl-distill_default_seed0"]
    cmd = " ".join(launched[-1][1])
    teacher = tmp_path / "t" / "runs" / "WBC_1_ssl_default_seed0" / "model.h5"
    assert f"--teacher {teacher}" in cmd and "--init " in cmd and "--unlabeled " in cmd
    assert "--thresholds" not in cmd  # FixMatch's option, not the distillation's
    failures, launched = table(tmp_path / "f", failing="WBC_1_ssl_default")
    assert [name for name, _ in launched] == ["ssl_pretrain_seed0", "WBC_1_ssl_default_seed0"]
    assert [(f["row"], f["exit"]) for f in failures] == [("WBC_1_ssl-distill_default", 3)]
    # a teacher that exits 0 without its run folder is not launched again and again
    failures, launched = table(tmp_path / "z", failing="WBC_1_ssl_default", code=0)
    assert [name for name, _ in launched] == ["ssl_pretrain_seed0", "WBC_1_ssl_default_seed0"]
    assert [(f["row"], f["exit"]) for f in failures] == [("WBC_1_ssl-distill_default", 1)]
