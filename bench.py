"""Training speed: whole-epoch images/s of one model fed three ways, and its self-supervised step.

    (a) legacy  the report's ImageDataGenerator pipeline: decodes every file on every epoch, augments on the CPU
    (b) cached  the default: the memory-mapped uint8 cache and the random affine warp on the device
    (c) arrays  the same model on in-memory arrays without augmentation: the model-bound ceiling
    (d) ssl     pretrain_ssl.py's step on the cached images: two augmented views of each through the encoder, the
                projector and SimCLR's loss; its images/s counts views, so d/c compares the same number of images
                through the network (not in the default --pipelines)

plus cache building (images/s, peak RSS). Prints a table with b/a and b/c and writes --out/bench.json.

    python bench.py                               # synthetic demo data (128 px files), dropout CNN at 224
    python bench.py --demo-size 575               # the demo cells re-encoded as 575x575 JPEGs, like Raabin-WBC
    python bench.py --data ROOT --split WBC_100   # your data
    KERAS_BACKEND=jax python bench.py --model resnet50 --batch-size 128 --pipelines cached,arrays --steps 40
    python bench.py --recipe default --batch-size 128 --pipelines arrays,ssl   # self-supervised vs model-bound

Each measurement runs in its own process (a fresh model, a clean peak RSS); the first epoch (tracing and
compilation) is not timed unless it is the only one.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import cli
from devices import PRECISIONS
import recipes
from runfiles import UserError
import augment
import legacy
import runfiles

PIPELINES = ("legacy", "cached", "arrays", "ssl")
ALIASES = {"a": "legacy", "b": "cached", "c": "arrays", "d": "ssl"}
DESCRIPTIONS = {"legacy": "(a) ImageDataGenerator, decode every epoch", "cached": "(b) cache + on-device affine",
                "arrays": "(c) in-memory arrays, no augmentation",
                "ssl": "(d) self-supervised, two views (views/s)"}
SSL_VIEWS_PER_IMAGE = 2


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="bench.py")
    g = parser.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None,
                   help="dataset root in the course layout; default: the built-in synthetic demo data")
    g.add_argument("--split", default="WBC_100", help="training split to read")
    g.add_argument("--demo-size", type=int, default=None,
                   help="re-encode the demo data's WBC_100 as SIZE x SIZE JPEGs first (575: like Raabin-WBC "
                        "files), so decoding costs what real files cost; the cells are still synthetic "
                        "(default: the demo images as generated)")
    g.add_argument("--image-size", type=int, default=224, help="side the images are resized to")
    g = parser.add_argument_group("model and training")
    g.add_argument("--model", choices=("cnn", "resnet50"), default="cnn", help="dropout CNN or ResNet50 (random init)")
    g.add_argument("--recipe", choices=sorted(recipes.RECIPES), default="report",
                   help="the CNN's shape and the augmentation (rotation, shear; flips on) come from this recipe")
    g.add_argument("--stem-stride", choices=("auto", "1", "2"), default=None,
                   help="override the recipe's first-convolution stride for (a), (b) and (c) "
                        "(default: the recipe's)")
    g.add_argument("--batch-size", type=int, default=32, help="images per step")
    g.add_argument("--epochs", type=int, default=3, help="epochs per pipeline; the first is not timed")
    g.add_argument("--steps", type=int, default=None,
                   help="batches per epoch (the training images repeated or cut to steps x batch size); "
                        "default: one pass over the training split")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="precision of (a), (b) and (c); the report's setup (legacy, float32) and the project's "
                        "defaults (cached, auto) are measured too when they differ")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation")
    g.add_argument("--repeats", type=int, default=1,
                   help="run every measurement this many times, interleaved, each in a fresh process; images/s "
                        "is the median over all their timed epochs (for machines whose speed varies)")
    g = parser.add_argument_group("benchmark")
    g.add_argument("--pipelines", default="legacy,cached,arrays",
                   help="comma-separated subset of legacy,cached,arrays,ssl (or a,b,c,d); the legacy loader needs "
                        "scipy and reads files, skip it where only the device path matters")
    g.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for bench.json")
    g.add_argument("--in-process", action="store_true",
                   help="run every measurement in this process (faster start; peak RSS is then the process's "
                        "peak so far, not each pipeline's)")
    args = parser.parse_args(argv)
    cli.check_positive(args, "batch_size", "epochs", "steps", "demo_size", "repeats")
    names = [ALIASES.get(p.strip().lower(), p.strip().lower()) for p in args.pipelines.split(",") if p.strip()]
    bad = [n for n in names if n not in PIPELINES]
    if bad or not names:
        raise UserError(f"--pipelines {args.pipelines}: expected a comma-separated subset of {', '.join(PIPELINES)}")
    args.pipelines = [p for p in PIPELINES if p in names]
    if args.data is not None and args.demo_size:
        raise UserError("--demo-size re-encodes the demo data; it cannot be combined with --data")
    return args


# ----------------------------------------------------------------------------------------------
# Data: the demo set, optionally re-encoded as large JPEGs
# ----------------------------------------------------------------------------------------------

def resolve_bench_data(args) -> dict:
    """The dataset to read and how to describe it in bench.json."""
    import data
    is_demo = args.data is None
    root = cli.resolve_data(args)  # generates the demo data on first use; keeps args.image_size
    kind = "demo (synthetic cells)"
    if is_demo and args.demo_size:
        root = large_demo_copy(root, args.demo_size)
        kind = f"demo re-encoded as {args.demo_size}x{args.demo_size} JPEGs (synthetic cells)"
    files = data.find_split(root, args.split)
    from PIL import Image
    with Image.open(files.train.paths[0]) as im:
        file_size = list(im.size)
    return {"kind": kind if is_demo else "user data", "root": str(root), "split": args.split,
            "train_images": len(files.train), "val_images": len(files.val), "first_file_size": file_size}


def large_demo_copy(demo_root: Path, size: int) -> Path:
    """WBC_100 of the demo data as size x size JPEGs (bicubic upscale + sensor-like noise, quality 90), written
    once beside the demo data. Upscaled drawings alone would compress (and decode) unrealistically fast."""
    target = demo_root.parent / f"{demo_root.name}_wbc100_{size}px"
    if (target / "done").exists():
        return target
    import data
    from PIL import Image
    split = data.find_split(demo_root, "WBC_100")
    print(f"writing the demo WBC_100 as {size}x{size} JPEGs to {target} (once)")

    def fill(tmp):
        def convert(job):
            i, src = job
            dst = tmp / src.relative_to(demo_root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                big = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32)
            noise = np.random.default_rng(i).normal(0.0, 4.0, big.shape)
            Image.fromarray(np.clip(big + noise + 0.5, 0, 255).astype(np.uint8)).save(dst, quality=90)

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(convert, enumerate(split.train.paths + split.val.paths)))
        (tmp / "done").write_text("ok\n")

    runfiles.build_folder_atomically(target, fill, prefix=".large-")
    return target


# ----------------------------------------------------------------------------------------------
# Measurements (each in a fresh process unless --in-process)
# ----------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def machine_info() -> dict:
    import keras
    import devices
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "keras": keras.__version__, "backend": keras.backend.backend(), "gpu": None}
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    if devices.has_gpu():
        if info["backend"] == "jax":
            import jax
            info["gpu"] = ", ".join(sorted({d.device_kind for d in jax.devices() if d.platform == "gpu"}))
        elif info["backend"] == "tensorflow":
            import tensorflow as tf
            gpus = tf.config.list_physical_devices("GPU")
            info["gpu"] = ", ".join(tf.config.experimental.get_device_details(g).get("device_name", "GPU")
                                    for g in gpus)
    return info


def job_cache(spec: dict) -> dict:
    """Machine facts, the resolved precisions, and cache building from scratch: images/s and peak RSS."""
    import data
    import devices
    info = machine_info()
    precision = {p: devices.resolve_precision(p) for p in ("auto", spec["precision"])}
    files = data.find_split(spec["root"], spec["split"])
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    train = data.load_images(files.train, spec["image_size"], cache_dir=spec["cache_dir"], name="train")
    val = data.load_images(files.val, spec["image_size"], cache_dir=spec["cache_dir"], name="val")
    seconds = time.perf_counter() - start
    n = len(train) + len(val)
    return {"machine": info, "precision": precision, "images": n, "seconds": seconds,
            "images_per_second": n / seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before,
            "workers": min(8, os.cpu_count() or 1)}


def recipe_args(name: str, **settings):
    """A recipe's options, as parsed arguments that leave everything to --recipe (flips on), plus `settings`."""
    import argparse
    args = argparse.Namespace(recipe=name, no_augment=False, no_hflip=False, no_vflip=False, **settings)
    return recipes.apply_recipe(args)


def recipe_augmentation(name: str) -> dict:
    """The augmentation a recipe trains with (make_augmentation keywords)."""
    return augment.from_args(recipe_args(name))


def build_training_model(spec: dict, train, augmentation: dict | None):
    """The model fit trains, built as train_cnn.py builds it for the recipe: the CNN inside the recipe's stain
    normalisation (part of the saved model), and in front of it, when `augmentation` is given (on the device),
    the augmentation and the recipe's stain jitter. ResNet50: random init, augmentation only."""
    import types
    import domain
    import models
    num_classes = len(train.classes)
    if spec["model"] == "resnet50":
        return augment.with_augmentation(models.build_resnet50(num_classes, spec["image_size"], weights=None),
                                         augmentation, spec["seed"])
    args = recipe_args(spec["recipe"], image_size=spec["image_size"], norm="batch", seed=spec["seed"],
                       **spec.get("model_overrides", {}))
    core = domain.cnn_builder(args, num_classes, domain.metadata(args, train.x))()
    jitter = domain.training_wrapper(args) if augmentation else None
    if jitter is None:
        return augment.with_augmentation(core, augmentation, spec["seed"])
    return jitter(core, types.SimpleNamespace(seed=spec["seed"], augment=augmentation), None)


def job_pipeline(spec: dict) -> dict:
    """Train spec['epochs'] epochs fed by one pipeline; time each epoch from its first to its last batch."""
    import keras
    import data
    import devices
    import feeding
    pipeline, batch = spec["pipeline"], spec["batch_size"]
    precision = devices.set_precision(spec["precision"])
    devices.seed_everything(spec["seed"])
    files = data.find_split(spec["root"], spec["split"])
    train = data.load_images(files.train, spec["image_size"], cache_dir=spec["cache_dir"], verbose=False)
    n = len(train)
    index = np.resize(np.arange(n), spec["steps"] * batch) if spec["steps"] else np.arange(n)
    augmentation = spec["augment"]
    if pipeline == "ssl":
        model, batches = ssl_training(spec, train.x[index])
        # a pool is cut to whole batches; two views of each image go through the network
        images = len(batches) * batch * SSL_VIEWS_PER_IMAGE
    else:
        images = len(index)
        y = keras.utils.to_categorical(train.y[index], len(train.classes)).astype("float32")
        with devices.distribution_scope():
            model = build_training_model(spec, train, augmentation if pipeline == "cached" else None)
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                          metrics=["accuracy"])
        if pipeline == "legacy":
            batches = legacy.legacy_generator([train.paths[i] for i in index], train.y[index], train.classes,
                                            spec["image_size"], batch, **augmentation, seed=spec["seed"])
        else:
            if pipeline == "arrays":
                x = np.array(train.x[index])  # in memory
            else:
                x = train.x if spec["steps"] is None else train.x[index]  # the decoded cache's images
            batches = feeding.ArrayBatches(x, y, batch, spec["seed"])
    timer = EpochTimer()
    # Every pipeline feeds fit the way training.train does: one endless stream, one epoch per pass.
    stream = feeding.Endless(batches)
    model.fit(stream, steps_per_epoch=stream.steps_per_epoch, epochs=spec["epochs"], callbacks=[timer], verbose=0,
              shuffle=False)
    ips = [images / s for s in timer.seconds]
    warp = None
    if pipeline == "cached" and augmentation:
        layer = next(l for l in model.layers if l.__class__.__name__ == "RandomAffine")
        warp = layer._backend_warp()
    entry = {"pipeline": pipeline, "precision": precision, "images_per_epoch": images, "batch_size": batch,
             "epoch_seconds": timer.seconds, "epoch_images_per_second": ips,
             "first_epoch_timed": len(timer.seconds) == 1, "peak_rss_mb": peak_rss_mb(), "warp": warp,
             "backend": keras.backend.backend(), "tensorflow_imported": "tensorflow" in sys.modules}
    if pipeline == "ssl":
        entry["views_per_image"] = SSL_VIEWS_PER_IMAGE
    entry["images_per_second"] = images / statistics.median(timed_seconds(entry))
    return entry


def ssl_training(spec: dict, x):
    """(d): pretrain_ssl.py's model and step (its default views, SimCLR, AdamW) and its batches of images only (a
    pool has no labels)."""
    import keras
    import devices
    import selfsup
    with devices.distribution_scope():
        encoder = selfsup.build_encoder(spec["model"], spec["image_size"], recipes.recipe_model_kwargs(spec["recipe"]))
        model = selfsup.JointEmbedding(encoder, augment.make_two_views(seed=spec["seed"]), name="ssl")
        model.compile(optimizer=keras.optimizers.AdamW(2e-3, weight_decay=1e-4))
    return model, selfsup.PoolBatches(x, spec["batch_size"], spec["seed"])


def timed_seconds(entry: dict) -> list[float]:
    """The epochs that count: all but the first (tracing, compilation) unless only one ran."""
    return entry["epoch_seconds"] if entry["first_epoch_timed"] else entry["epoch_seconds"][1:]


def pool_repeats(results: list[dict]) -> dict:
    """One entry from R runs of the same measurement: images/s from the median over every timed epoch of every
    run; epochs listed per run; the highest peak RSS."""
    first = results[0]
    if len(results) == 1:
        return {**first, "repeats": 1}
    timed = [s for r in results for s in timed_seconds(r)]
    return {**first, "repeats": len(results),
            "epoch_seconds": [r["epoch_seconds"] for r in results],
            "epoch_images_per_second": [r["epoch_images_per_second"] for r in results],
            "images_per_second_per_repeat": [r["images_per_second"] for r in results],
            "images_per_second": first["images_per_epoch"] / statistics.median(timed),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}


def _epoch_timer_class():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self._start = [], None

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer


def EpochTimer():  # noqa: N802 - a class built on first use, so that --help does not import Keras
    return _epoch_timer_class()()


JOBS = {"cache": job_cache, "pipeline": job_pipeline}


def run_job(spec: dict, in_process: bool, workdir: Path, env: dict | None = None) -> dict:
    if in_process:
        return JOBS[spec["job"]](spec)
    spec_path = workdir / f"spec-{spec['name']}.json"
    result_path = workdir / f"result-{spec['name']}.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0 or not result_path.exists():
        raise SystemExit(f"bench: the {spec['name']} measurement failed (exit status {proc.returncode}); "
                         f"its output is above")
    return json.loads(result_path.read_text())


def worker(spec_path: Path) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = JOBS[spec["job"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------
# The run: which measurements, the table, bench.json
# ----------------------------------------------------------------------------------------------

def ratio(a, b):
    return a / b if a and b else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker(Path(argv[1]))
    args = parse_args(argv)
    cli.import_keras_quietly()
    dataset = resolve_bench_data(args)
    augmentation = recipe_augmentation(args.recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="wbc-bench-"))
    overrides = {"stem_stride": args.stem_stride} if args.stem_stride else {}
    base = {"root": dataset["root"], "split": args.split, "image_size": args.image_size, "model": args.model,
            "recipe": args.recipe, "batch_size": args.batch_size, "epochs": args.epochs, "steps": args.steps,
            "seed": args.seed, "augment": augmentation, "model_overrides": overrides, "cache_dir": str(workdir / "cache")}
    try:
        # The cache is built from scratch in a private folder, so its speed is measured every time. Under JAX
        # this process must not grab the GPU's memory before the training processes run.
        cache = run_job({**base, "job": "cache", "name": "cache", "precision": args.precision}, args.in_process,
                        workdir, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
        resolved, default = cache["precision"][args.precision], cache["precision"]["auto"]
        runs = [(p, p, args.precision, {}) for p in ("arrays", "cached", "legacy", "ssl") if p in args.pipelines]
        # The two ends of default_vs_report, each with its own recipe's model and augmentation: the report's
        # setup (legacy loader, float32, --recipe report) and the project's defaults (cached, auto precision,
        # --recipe default, no overrides). Measured separately unless (a) or (b) already is exactly that.
        report_setup = dict(recipe="report", augment=recipe_augmentation("report"), model_overrides={})
        defaults = dict(recipe="default", augment=recipe_augmentation("default"), model_overrides={})
        same_as_a = args.recipe == "report" and resolved == "float32" and not overrides
        same_as_b = args.recipe == "default" and resolved == default and not overrides
        if args.model == "cnn" and "legacy" in args.pipelines and not same_as_a:
            runs.append(("report_setup", "legacy", "float32", report_setup))
        if args.model == "cnn" and "cached" in args.pipelines and not same_as_b:
            runs.append(("defaults", "cached", "auto", defaults))
        # --repeats: the whole round (every measurement, each in a fresh process) is run R times, interleaved,
        # so a slow spell of a shared machine hits all pipelines alike; the median pools every timed epoch.
        measured = {name: [] for name, *_ in runs}
        for repeat in range(args.repeats):
            for name, pipeline, precision, changes in runs:
                label = f" (round {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""
                print(f"bench: {name}: {DESCRIPTIONS[pipeline]}, {precision}{label} ...", flush=True)
                measured[name].append(run_job({**base, **changes, "job": "pipeline", "name": name,
                                               "pipeline": pipeline, "precision": precision},
                                              args.in_process, workdir))
        entries = {}
        for name, pipeline, precision, changes in runs:
            r = pool_repeats(measured[name])
            r["cache_build_images_per_second"] = cache["images_per_second"] if pipeline != "legacy" else None
            r["recipe"] = changes.get("recipe", args.recipe)
            entries[name] = r
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ips = {k: v["images_per_second"] for k, v in entries.items()}
    report_key = "report_setup" if "report_setup" in entries else "legacy"
    default_key = "defaults" if "defaults" in entries else "cached"
    result = {
        "machine": cache["machine"], "backend": cache["machine"]["backend"], "precision": resolved,
        "default_precision": default, "model": args.model, "recipe": args.recipe if args.model == "cnn" else None,
        "model_overrides": overrides,
        "image_size": args.image_size, "batch_size": args.batch_size, "epochs": args.epochs, "steps": args.steps,
        "repeats": args.repeats,
        "augmentation": augmentation, "data": dataset, "argv": ["bench.py", *argv], "in_process": args.in_process,
        "cache_build": {k: cache[k] for k in ("images", "seconds", "images_per_second", "peak_rss_mb",
                                              "rss_before_mb", "workers")},
        "pipelines": entries,
        "ratios": {"cached_vs_legacy": ratio(ips.get("cached"), ips.get("legacy")),
                   "cached_vs_model_bound": ratio(ips.get("cached"), ips.get("arrays")),
                   "default_vs_report": ratio(ips.get(default_key), ips.get(report_key)),
                   "ssl_vs_model_bound": ratio(ips.get("ssl"), ips.get("arrays"))},
        "ratio_inputs": {"cached_vs_legacy": ["cached", "legacy"], "cached_vs_model_bound": ["cached", "arrays"],
                         "default_vs_report": [default_key, report_key], "ssl_vs_model_bound": ["ssl", "arrays"]},
    }
    path = args.out / "bench.json"
    tmp = path.with_name(f".bench.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print_table(result)
    print(f"\nwrote {path}")
    return 0


def print_table(result: dict):
    m = result["machine"]
    where = m["gpu"] or f"{m['cores']}-core {m['cpu']} CPU"
    print(f"\n{result['model']} at {result['image_size']}x{result['image_size']}, batch {result['batch_size']}, "
          f"{where}, Keras {m['keras']} / {m['backend']}; data: {result['data']['kind']} "
          f"(files {result['data']['first_file_size'][0]} px)")
    c = result["cache_build"]
    print(f"cache building: {c['images_per_second']:.0f} images/s ({c['images']} images, {c['workers']} threads), "
          f"peak RSS {c['peak_rss_mb']:.0f} MB")
    print(f"{'pipeline':<14} {'what':<44} {'recipe':<8} {'precision':<15} {'images/s':>9} {'peak RSS MB':>12}")
    for name, e in result["pipelines"].items():
        print(f"{name:<14} {DESCRIPTIONS[e['pipeline']]:<44} {e.get('recipe') or '':<8} {e['precision']:<15} "
              f"{e['images_per_second']:>9.1f} {e['peak_rss_mb']:>12.0f}")
    r = result["ratios"]

    def show(v):
        return f"{v:.2f}" if v else "n/a"
    print(f"b/a  cached vs legacy, same precision:        {show(r['cached_vs_legacy'])}")
    print(f"b/c  cached vs model-bound:                    {show(r['cached_vs_model_bound'])}")
    print(f"defaults (cached, auto, --recipe default) vs report (legacy, float32, --recipe report): "
          f"{show(r['default_vs_report'])}")
    if "ssl" in result["pipelines"]:
        print(f"d/c  self-supervised views vs model-bound images: {show(r['ssl_vs_model_bound'])}")


if __name__ == "__main__":
    cli.run_main(main)
