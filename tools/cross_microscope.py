"""Cross-microscope benchmark: train on PBC, test on BCCD (another lab, another microscope), one run per lever.

    python prepare_splits.py ../shared/data/pbc OUT --proportions course
    nice -n 10 python tools/cross_microscope.py --data OUT --out runs/cross_microscope     # docs/microscopes.md

For every split (--splits), lever (--levers) and seed it runs train_cnn.py as a user would (run folder under
--out), then evaluates the selected model on the PBC validation images and on every BCCD crop (masks unused; BCCD
is never seen in training, not even unlabeled), plainly, with 8-view test-time augmentation and, separately, with
batch-norm statistics adapted on the BCCD images themselves (adaptation, not part of the targets). It writes
results.csv (one row per run, target and mode, over every run under --out: accuracy, balanced accuracy, macro-F1, confusion matrix, the
out-of-distribution warning the model gives) and summary.md (mean ± std over seeds). BCCD is a test set: levers are chosen on
principle and every one tried is reported; nothing here selects on it. A finished run folder is not retrained.
"""
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
import cli  # noqa: E402

# Each lever alone on the plain CNN recipe (the default recipe without framing and stain options: the default until
# the numbers here made framing + stain part of it), plus the report's recipe and combinations. Settings are
# taken from their sources, not tuned here: zoom 0.5 makes cells 0.67-2x their size (BCCD's cells are about
# twice PBC's); stain jitter 0.2 is a strong setting in the range Tellez et al. 2019 studied; framing 0.5 = the
# nucleus spans half the frame. Result files written before the change call the `plain` lever `default`.
PLAIN = ["--frame-cell", "0", "--stain-norm", "none", "--stain-jitter", "0"]
LEVERS = {
    "report": ["--recipe", "report"],
    "plain": PLAIN,
    "zoom_wide": [*PLAIN, "--zoom", "0.5"],
    "stain_jitter": [*PLAIN, "--stain-jitter", "0.2"],
    "stain_norm": [*PLAIN, "--stain-norm", "reinhard"],
    "group_norm": [*PLAIN, "--norm", "group"],
    "layer_norm": [*PLAIN, "--norm", "layer"],
    "framing": [*PLAIN, "--frame-cell", "0.5"],
    "framing+stain": ["--frame-cell", "0.5", "--stain-norm", "reinhard", "--stain-jitter", "0.2"],  # the default
    # BCCD's crops are enlarged from 640x480 smear photographs: softer than PBC's. Blur (sigma 0.1-2 px at 224 px,
    # on half the images: SimCLR's setting) is the one difference the two levers above leave.
    "framing+stain+blur": ["--frame-cell", "0.5", "--stain-norm", "reinhard", "--stain-jitter", "0.2",
                           "--blur", "0.5"],
}
FIELDS = ["split", "lever", "seed", "target", "mode", "images", "accuracy", "balanced_accuracy", "macro_f1",
          "collapsed", "ood_warning", "confusion_matrix", "train_seconds", "run_dir"]


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="tools/cross_microscope.py")
    parser.add_argument("--data", type=Path, required=True,
                        help="PBC in the course layout (prepare_splits.py ../shared/data/pbc OUT --proportions course)")
    parser.add_argument("--bccd", type=Path, default=PROJECT.parent / "shared" / "data" / "bccd" / "data",
                        help="the other lab's labelled crops, one folder per class")
    parser.add_argument("--out", type=Path, default=Path("runs/cross_microscope"), help="run folders and results")
    parser.add_argument("--splits", nargs="+", default=["WBC_100", "WBC_10"])
    parser.add_argument("--levers", nargs="+", choices=list(LEVERS), default=list(LEVERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--tta", type=int, default=8, help="views of the test-time-augmentation rows (1: none)")
    return parser.parse_args(argv)


def train(args, split, lever, seed) -> Path:
    run = args.out / "runs" / f"{split}_{lever}_seed{seed}"
    if not (run / "metrics.json").exists():
        cmd = [sys.executable, str(PROJECT / "train_cnn.py"), "--data", str(args.data), "--split", split,
               "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--seed", str(seed),
               "--out", str(run), "--quiet"] + LEVERS[lever] + (["--resume"] if run.exists() else [])
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=PROJECT)
    return run


def evaluate(args, run: Path, split: str, lever: str, seed: int, cache: dict) -> list[dict]:
    """The run's rows, computed once: kept in RUN/cross_microscope.json beside its model."""
    import runfiles
    saved = run / "cross_microscope.json"
    key = {"bccd": str(args.bccd.resolve()), "tta": args.tta, "model_mtime_ns": (run / "model.h5").stat().st_mtime_ns}
    if saved.exists():
        stored = json.loads(saved.read_text())
        if stored.get("key") == key:
            return stored["rows"]
    rows = _evaluate(args, run, split, lever, seed, cache)
    runfiles.atomic_write_text(saved, json.dumps({"key": key, "rows": rows}))
    return rows


def _evaluate(args, run: Path, split: str, lever: str, seed: int, cache: dict) -> list[dict]:
    import adapt
    import data
    import domain
    import framing
    import metrics
    import runfiles
    model_path = run / "model.h5"
    meta = runfiles.read_h5_metadata(model_path)
    share = framing.frame_share(meta)
    classes = tuple(meta["classes"])

    def images(target):
        key = (target, share)
        if key not in cache:
            files = (data.find_split(args.data, split).val if target == "pbc_val"
                     else data.scan_class_folders(args.bccd, classes))
            cache[key] = data.load_images(files, size=args.image_size, name=target, verbose=False, frame_share=share)
        return cache[key]

    train_seconds = json.loads((run / "metrics.json").read_text()).get("train_seconds")
    rows = []
    for target in ("pbc_val", "bccd"):
        s = images(target)
        warning = "; ".join(domain.ood_warnings(meta.get("image_stats", {}), s.x)) or "-"
        modes = [("plain", 1)] + ([(f"tta{args.tta}", args.tta)] if args.tta > 1 else [])
        if target == "bccd":
            modes.append(("adapt_bn", 1))
        for mode, tta in modes:
            model = runfiles.load_core_model(model_path)
            if mode == "adapt_bn" and not adapt.adapt_batchnorm(model, s.x):
                continue  # no batch norm to adapt (group / layer norm)
            probs = adapt.predict(model, s.x, 64, tta)
            m = metrics.classification_metrics(s.y, probs, list(classes))
            rows.append({"split": split, "lever": lever, "seed": seed, "target": target, "mode": mode,
                         "images": len(s), "accuracy": round(m["accuracy"], 4),
                         "balanced_accuracy": round(m["balanced_accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
                         "collapsed": m["collapsed_to_majority"], "ood_warning": warning,
                         "confusion_matrix": json.dumps(m["confusion_matrix"]),
                         "train_seconds": round(train_seconds or float("nan"), 1), "run_dir": str(run)})
            print(f"{split} {lever} seed {seed} {target} {mode}: acc {m['accuracy']:.3f} bal {m['balanced_accuracy']:.3f}"
                  f" F1 {m['macro_f1']:.3f}", flush=True)
    return rows


def all_rows(out: Path) -> list[dict]:
    """Every evaluated run under OUT/runs, whichever invocation trained it: the tables cover them all."""
    rows = []
    for saved in sorted((out / "runs").glob("*/cross_microscope.json")):
        rows += json.loads(saved.read_text())["rows"]
    return rows


def summarise(rows: list[dict]) -> list[str]:
    """Mean +/- standard deviation over seeds for each split, lever, target and mode, with the collapsed runs."""
    import numpy as np
    groups = {}
    for r in rows:
        groups.setdefault((r["split"], r["lever"], r["target"], r["mode"]), []).append(r)
    order = {lever: i for i, lever in enumerate(LEVERS)}
    lines = ["| split | lever | target | mode | seeds | accuracy | balanced acc. | macro-F1 | collapsed runs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (split, lever, target, mode), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], order.get(kv[0][1], 99), kv[0][2], kv[0][3])):
        def stat(key):
            v = np.array([r[key] for r in rs], float)
            return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
        lines.append(f"| {split} | {lever} | {target} | {mode} | {len(rs)} | {stat('accuracy')} | "
                     f"{stat('balanced_accuracy')} | {stat('macro_f1')} | {sum(bool(r['collapsed']) for r in rs)} |")
    return lines


def write_results(out: Path):
    import io
    import runfiles
    rows = all_rows(out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, FIELDS)
    w.writeheader()
    w.writerows(rows)
    runfiles.atomic_write_text(out / "results.csv", buf.getvalue())
    runfiles.atomic_write_text(out / "summary.md", "\n".join(summarise(rows)) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if not args.bccd.is_dir():
        raise cli.UserError(f"--bccd {args.bccd}: no such folder (expected one sub-folder per class)")
    cli.import_keras_quietly()
    args.out.mkdir(parents=True, exist_ok=True)
    cache, start = {}, time.perf_counter()
    for split in args.splits:
        for lever in args.levers:
            for seed in args.seeds:
                run = train(args, split, lever, seed)
                evaluate(args, run, split, lever, seed, cache)
                write_results(args.out)
    print(f"wrote {args.out}/results.csv and summary.md ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    cli.run_main(main)
