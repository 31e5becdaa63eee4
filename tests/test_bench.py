"""bench.py and the legacy ImageDataGenerator loader. Tiny images; no timing is asserted here:
speed numbers come from bench.py runs recorded in docs/performance.md."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import JAX_ENV, PROJECT, Started, selected

import bench
import data
import legacy
import runfiles


def _split(demo_root):
    return data.find_split(demo_root, "WBC_100")


def test_legacy_generator_yields_uint8_batches_like_flow_from_directory(demo_root):
    files = _split(demo_root).train
    paths, labels = files.paths[:10], files.labels[:10]
    gen = legacy.legacy_generator(paths, labels, files.classes, 16, batch_size=4, shuffle=False)
    assert len(gen) == 3
    x, y = gen[0]
    assert x.shape == (4, 16, 16, 3) and x.dtype == np.uint8
    assert y.shape == (4, 5) and np.array_equal(y.argmax(1), labels[:4]) and np.all(y.sum(1) == 1)
    # No augmentation and no rescaling: exactly the file resized the way flow_from_directory does ('nearest'),
    # in the 0..255 range the core model expects.
    for i in range(4):
        with Image.open(paths[i]) as im:
            expected = np.asarray(im.convert("RGB").resize((16, 16), Image.NEAREST))
        assert np.array_equal(x[i], expected)
    assert gen[2][0].shape == (2, 16, 16, 3)  # the last, partial batch


def test_legacy_generator_flips_mean_what_they_mean_in_the_default_pipeline(demo_root):
    files = _split(demo_root).train
    plain = legacy.legacy_generator(files.paths[:8], files.labels[:8], files.classes, 16, batch_size=8,
                                  shuffle=False)[0][0]
    flipped = legacy.legacy_generator(files.paths[:8], files.labels[:8], files.classes, 16, batch_size=8,
                                    shuffle=False, vertical_flip=True, seed=3)[0][0]
    same = [np.array_equal(f, p) for f, p in zip(flipped, plain)]
    upside_down = [np.array_equal(f, p[::-1]) for f, p in zip(flipped, plain)]
    assert all(s or u for s, u in zip(same, upside_down)) and any(upside_down) and any(same)
    # A 90-degree rotation range leaves values in range and changes the images.
    rotated = legacy.legacy_generator(files.paths[:8], files.labels[:8], files.classes, 16, batch_size=8,
                                    shuffle=False, rotation=90, shear=10, seed=1)[0][0]
    assert rotated.dtype == np.uint8 and not np.array_equal(rotated, plain)


def test_generator_loader_trains_one_epoch_through_training_train(demo_root, cache_dir, tmp_path):
    import train_cnn
    out = tmp_path / "run"
    train_cnn.main(["--data", str(demo_root), "--image-size", "16", "--epochs", "1", "--batch-size", "32",
                    "--loader", "generator", "--out", str(out), "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    args = json.loads((out / "args.json").read_text())
    assert args["resolved_config"]["loader"] == "generator"
    assert metrics["epochs"] == 1 and metrics["holdout_images"] > 0  # the hold-out still selects
    assert metrics["train_images"] + metrics["holdout_images"] == len(_split(demo_root).train)
    assert (out / "model.h5").exists()


def test_generator_loader_refuses_masked_images(demo_root, cache_dir):
    import training
    train = data.load_images(_split(demo_root).train, 16, mask_mode="replace", verbose=False)
    assert train.masked.any()
    with pytest.raises(runfiles.UserError, match="cannot apply masks"):
        legacy.legacy_training_data(train, training.TrainConfig())


def test_bench_writes_bench_json_with_every_pipeline_and_ratio(demo_root, tmp_path, cache_dir):
    out = tmp_path / "bench"
    assert bench.main(["--data", str(demo_root), "--image-size", "16", "--batch-size", "8", "--epochs", "2",
                       "--steps", "2", "--precision", "float32", "--in-process",
                       "--pipelines", "legacy,cached,arrays,ssl", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    for key in ("machine", "backend", "precision", "pipelines", "ratios", "cache_build", "data"):
        assert key in result
    assert result["precision"] == "float32" and result["machine"]["cores"] >= 1
    pipelines = result["pipelines"]
    assert {"legacy", "cached", "arrays", "ssl"} <= set(pipelines)
    for name, entry in pipelines.items():
        assert entry["images_per_second"] > 0 and entry["peak_rss_mb"] > 0, name
        # (d) feeds the same 2 x 8 images, two views of each through the network
        assert entry["images_per_epoch"] == (32 if name == "ssl" else 16) and entry["repeats"] == 1
        assert len(entry["epoch_seconds"]) == 2  # one round of two epochs (rounds pooled: the test below)
    assert pipelines["legacy"]["cache_build_images_per_second"] is None  # it decodes every epoch instead
    assert pipelines["cached"]["cache_build_images_per_second"] == result["cache_build"]["images_per_second"] > 0
    ratios = result["ratios"]
    assert set(ratios) == {"cached_vs_legacy", "cached_vs_model_bound", "default_vs_report", "ssl_vs_model_bound"}
    ips = {k: v["images_per_second"] for k, v in pipelines.items()}
    assert ratios["ssl_vs_model_bound"] == pytest.approx(ips["ssl"] / ips["arrays"])
    assert ratios["cached_vs_legacy"] == pytest.approx(ips["cached"] / ips["legacy"])
    assert ratios["cached_vs_model_bound"] == pytest.approx(ips["cached"] / ips["arrays"])
    default_key, report_key = result["ratio_inputs"]["default_vs_report"]
    # The report's setup is (a) here (legacy, float32, --recipe report); the project's defaults are measured on
    # their own: cached, auto precision, the default recipe's model and augmentation.
    assert report_key == "legacy" and pipelines["legacy"]["recipe"] == "report"
    assert default_key == "defaults" and pipelines["defaults"]["recipe"] == "default"
    assert pipelines["defaults"]["precision"] == result["default_precision"]
    assert ratios["default_vs_report"] == pytest.approx(ips[default_key] / ips[report_key])


def test_repeats_pool_every_timed_epoch_into_one_median():
    """--repeats R: R runs of one measurement become one entry; images/s from the median of all timed epochs."""
    runs = [{"images_per_epoch": 100, "epoch_seconds": s, "epoch_images_per_second": [100 / x for x in s],
             "images_per_second": 100 / sorted(s[1:])[len(s[1:]) // 2], "first_epoch_timed": False,
             "peak_rss_mb": rss, "pipeline": "cached"}
            for s, rss in (([9.0, 1.0, 1.0, 1.0], 500.0), ([9.0, 2.0, 2.0, 4.0], 700.0))]
    pooled = bench.pool_repeats(runs)
    # timed epochs 1, 1, 1, 2, 2, 4: median 1.5 s -> 66.7 images/s; the first (compiling) epochs are left out
    assert pooled["images_per_second"] == pytest.approx(100 / 1.5)
    assert pooled["repeats"] == 2 and pooled["peak_rss_mb"] == 700.0
    assert pooled["epoch_seconds"] == [runs[0]["epoch_seconds"], runs[1]["epoch_seconds"]]
    assert bench.pool_repeats(runs[:1])["images_per_second"] == runs[0]["images_per_second"]


def test_bench_rejects_bad_pipelines_and_paths_in_one_line(tmp_path, capsys):
    import cli
    for argv, expected in ((["--pipelines", "legacy,fast"], "--pipelines legacy,fast"),
                           (["--data", str(tmp_path / "missing")], "no such folder")):
        with pytest.raises(SystemExit) as exit_info:
            cli.run_main(lambda: bench.main([*argv, "--out", str(tmp_path / "b")]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "b" / "bench.json").exists()


def test_large_demo_copy_writes_big_jpegs_in_the_course_layout(demo_root):
    big = bench.large_demo_copy(demo_root, 40)
    split = _split(big)
    assert len(split.train) == len(_split(demo_root).train) and len(split.val) == len(_split(demo_root).val)
    with Image.open(split.train.paths[0]) as im:
        assert im.size == (40, 40) and im.format == "JPEG"


@pytest.fixture(scope="module", autouse=True)
def jax_run(request, tmp_path_factory):
    """test_default_path_runs_under_jax_without_tensorflow's run, started with this module when that test is
    selected: it runs in its own process (on the second core) while the tests before it run here."""
    if importlib.util.find_spec("jax") is None or not selected(request,
                                                               "test_default_path_runs_under_jax_without_tensorflow"):
        yield None
        return
    demo_root = request.getfixturevalue("demo_root")
    tmp = tmp_path_factory.mktemp("jax")
    out = tmp / "bench"
    started = Started([sys.executable, PROJECT / "bench.py", "--data", demo_root, "--image-size", "16", "--batch-size",
                       "8", "--epochs", "2", "--steps", "2", "--pipelines", "cached,arrays", "--in-process",
                       "--out", out], {**os.environ, **JAX_ENV, "WBC_CACHE_DIR": str(tmp / "cache")})
    yield started, out
    started.stop()


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed (the GPU check uses it)")
def test_default_path_runs_under_jax_without_tensorflow(jax_run):
    """The GPU machine has JAX and no TensorFlow: TensorFlow's import blocked (conftest.JAX_ENV), the default path
    runs (jax_run)."""
    started, out = jax_run
    proc = started.result(timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["backend"] == "jax" and result["pipelines"]["cached"]["warp"] == "gather"
    assert result["ratios"]["cached_vs_model_bound"] > 0
    assert not any(e["tensorflow_imported"] for e in result["pipelines"].values())


def test_bench_trains_the_recipes_model_with_its_stain_layers():
    """The default recipe's model as train_cnn.py builds it: stain normalisation inside the model in every
    pipeline, stain jitter and the affine warp only where augmentation runs on the device (cached)."""
    import types
    import models
    rng = np.random.default_rng(0)
    train = types.SimpleNamespace(classes=["a", "b", "c", "d", "e"],  # the stain reference needs images only
                                  x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    spec = {"model": "cnn", "recipe": "default", "image_size": 32, "seed": 0}

    def layer_kinds(model):
        return {layer.__class__.__name__ for _, layer in models.flat_layers(model)}, \
            {layer.name for _, layer in models.flat_layers(model)}

    kinds, names = layer_kinds(bench.build_training_model(spec, train, bench.recipe_augmentation("default")))
    assert {"StainJitter", "RandomAffine"} <= kinds and "stain_norm_opponent" in names
    kinds, names = layer_kinds(bench.build_training_model(spec, train, None))
    assert not {"StainJitter", "RandomAffine"} & kinds and "stain_norm_opponent" in names
    kinds, names = layer_kinds(bench.build_training_model({**spec, "recipe": "report"}, train,
                                                          bench.recipe_augmentation("report")))
    assert "StainJitter" not in kinds and "stain_norm_opponent" not in names and "RandomAffine" in kinds
