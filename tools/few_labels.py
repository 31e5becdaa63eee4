"""A few labelled images of another lab: what a trained model gains from being fine-tuned on them.

    python tools/few_labels.py runs/WBC_100_seed0/model.h5 ../shared/data/bccd/data --home OUT/WBC_100/val \
        --shots 5 10 --draws 0 1 2 --out runs/few_labels                    # docs/microscopes.md

MODEL is a train_cnn.py run's model.h5 (its args.json beside it); TARGET holds the other lab's labelled images,
one sub-folder per class. For each number of labelled images per class (--shots K) and each draw (--draws D: the
seed of the draw and of the training), TARGET is split: K images of each class, at most half of the class, are the
labelled ones, every other image is the draw's test set (OUT/draws/K{K}_draw{D}/few/, the course layout: train/ =
labelled, val/ = test; mixed/: home and labelled images, the same test). On each draw:

  as_is        MODEL itself, nothing of the target used
  adapt_bn     MODEL with its batch-norm statistics re-estimated on every target image, no labels (--adapt-bn)
  fine_tuned   train_cnn.py --config MODEL's run --init MODEL on the labelled images, every layer at a tenth of
               MODEL's learning rate (the usual fine-tuning step), --epochs E
  fine_tuned_mixed  the same on the labelled images together with MODEL's own training images (its args.json's
               --data and --split), the labelled ones repeated to make half of every epoch: rehearsal, so that
               what the model knew at home is trained on while it learns the new lab
  scratch      the same command without --init: MODEL's recipe from random weights on the labelled images alone

The trainings repeat MODEL's recipe (OUT/recipe.json: its args.json without how it was started, so a model trained
from a self-supervised encoder, frozen or not, is fine-tuned and trained from scratch like any other).

each scored on the draw's test images and on --home (MODEL's own validation set: what fine-tuning costs there).
The trainings keep their last epoch (--holdout 0): nothing is selected on the test images. results.csv (one row per
draw, method and target, with its confusion matrix) and summary.md (mean ± std over draws) go to --out, over every
draw in it; a finished draw (OUT/draws/.../results.json) or run is not redone.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
import cli  # noqa: E402
from runfiles import UserError  # noqa: E402

METHODS = ("as_is", "adapt_bn", "fine_tuned", "fine_tuned_mixed", "scratch")
TRAINED = ("fine_tuned", "fine_tuned_mixed", "scratch")
FINETUNE_LR_FACTOR = 0.1  # the fine-tuning step: a tenth of the model's own rate, as LP-FT's --finetune-lr
# How MODEL's run was started and what it was fed beside its labelled images (an encoder and its frozen epochs, a
# teacher and an unlabeled pool), with the values that switch each off: not part of the recipe the draws repeat.
# fine_tuned starts from MODEL itself and scratch from random weights, both on the labelled images alone, every
# layer learning from the first epoch (a frozen-encoder model's own --freeze-epochs would outlast --epochs).
NOT_THE_RECIPE = {"init": None, "freeze_epochs": 0, "finetune_lr": None, "frozen_blocks": 0, "frozen_bn": False,
                  "teacher": None, "unlabeled": []}
FIELDS = ["shots", "draw", "method", "target", "labelled", "images", "accuracy", "balanced_accuracy", "macro_f1",
          "confusion_matrix", "train_seconds", "run_dir"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="few_labels.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", type=Path, help="a train_cnn.py run's model.h5 (its args.json beside it)")
    parser.add_argument("target", type=Path, help="the other lab's labelled images, one sub-folder per class")
    parser.add_argument("--home", type=Path, required=True,
                        help="the model's own validation images (a folder per class, or WBC_100/val)")
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10], help="labelled images per class")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2], help="draws (seeds) per shot count")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of fine_tuned and scratch")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, required=True, help="folder for the draws, runs and results")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        raise UserError(f"{args.model}: no such model file (expected a train_cnn.py run's model.h5)")
    if not (args.model.parent / "args.json").is_file():
        raise UserError(f"{args.model}: no args.json beside it (expected a train_cnn.py run folder's model.h5: "
                        f"its command is repeated on the labelled images)")
    for folder, what in ((args.target, "target"), (args.home, "--home")):
        if not folder.is_dir():
            raise UserError(f"{what} {folder}: no such folder (expected one sub-folder of images per class)")
    if min(args.shots) < 1 or args.epochs < 1:
        raise UserError("--shots and --epochs: expected numbers >= 1")
    return args


def draw_split(labels, shots: int, seed: int):
    """(labelled, test) indices: `shots` of each class, at most half of it (as many or more stay to test), drawn
    with `seed`; every other image is a test image."""
    import numpy as np
    rng = np.random.default_rng(seed)
    labelled = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        labelled += rng.permutation(members)[:min(shots, len(members) // 2)].tolist()
    labelled = np.sort(np.asarray(labelled, int))
    return labelled, np.setdiff1d(np.arange(len(labels)), labelled)


def _link(source, folder: Path, cls: str, name: str):
    link = folder / "data" / cls / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        os.symlink(Path(source).resolve(), link)


def write_draw(images, labelled, test, folder: Path, home_train=None) -> Path:
    """The draw as a course-layout root (symlinks): few/train/data/<class>/ labelled, few/val/data/<class>/ test;
    with `home_train` (a FileList) also mixed/train/: the home images once and the labelled ones repeated until
    they are as many, mixed/val/ the same test images."""
    for part, rows in (("train", labelled), ("val", test)):
        for i in rows:
            _link(images.paths[i], folder / "few" / part, images.classes[images.y[i]], Path(images.paths[i]).name)
    if home_train is not None:
        for path, y in zip(home_train.paths, home_train.labels):
            _link(path, folder / "mixed" / "train", home_train.classes[y], f"home_{Path(path).name}")
        for r in range(mixed_repeats(len(home_train.paths), len(labelled))):
            for i in labelled:
                _link(images.paths[i], folder / "mixed" / "train", images.classes[images.y[i]],
                      f"target{r}_{Path(images.paths[i]).name}")
        for i in test:
            _link(images.paths[i], folder / "mixed" / "val", images.classes[images.y[i]], Path(images.paths[i]).name)
    return folder


def mixed_repeats(n_home: int, n_labelled: int) -> int:
    """How often each labelled image appears in fine_tuned_mixed's training set: half of it, as in batches drawn
    half from each domain (the usual few-shot domain-adaptation sampling)."""
    return max(1, round(n_home / max(n_labelled, 1)))


def write_recipe(model: Path, out: Path) -> Path:
    """OUT/recipe.json: MODEL's args.json with NOT_THE_RECIPE switched off, the --config of every training run."""
    saved = json.loads((model.parent / "args.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.json"
    path.write_text(json.dumps({**saved, **NOT_THE_RECIPE}, indent=1) + "\n")
    return path


def train_command(args, method: str, draw_root: Path, seed: int, run: Path) -> list[str]:
    saved = json.loads((args.model.parent / "args.json").read_text())
    split = "mixed" if method == "fine_tuned_mixed" else "few"
    recipe = write_recipe(args.model, args.out)
    cmd = [sys.executable, str(PROJECT / "train_cnn.py"), "--config", str(recipe.resolve()),
           "--data", str(draw_root.resolve()), "--split", split, "--epochs", str(args.epochs), "--holdout", "0",
           "--seed", str(seed), "--test", str(args.home.resolve()), "--out", str(run.resolve()), "--quiet"]
    if method in ("fine_tuned", "fine_tuned_mixed"):
        cmd += ["--init", str(args.model.resolve()), "--lr", f"{saved['lr'] * FINETUNE_LR_FACTOR:g}"]
    return cmd + (["--resume"] if run.exists() else [])


def trained_rows(args, method, shots, draw, draw_root, n_labelled) -> list[dict]:
    run = args.out / "runs" / f"K{shots}_draw{draw}_{method}"
    if not (run / "metrics.json").exists():
        cmd = train_command(args, method, draw_root, draw, run)
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=PROJECT)
    m = json.loads((run / "metrics.json").read_text())
    base = {"shots": shots, "draw": draw, "method": method, "labelled": n_labelled,
            "train_seconds": round(m.get("train_seconds") or float("nan"), 1), "run_dir": str(run)}
    return [row(base, "target_test", m), row(base, "home", m["test"])]


def row(base: dict, target: str, m: dict) -> dict:
    """One results row from a metrics dict: a run's metrics.json (its validation = the draw's test images; its
    accuracy is stored as val_accuracy_selected) or its "test" entry / metrics.classification_metrics."""
    accuracy = m["accuracy"] if "accuracy" in m else m["val_accuracy_selected"]
    return {**base, "target": target, "images": int(sum(map(sum, m["confusion_matrix"]))),
            "accuracy": round(accuracy, 4), "balanced_accuracy": round(m["balanced_accuracy"], 4),
            "macro_f1": round(m["macro_f1"], 4), "confusion_matrix": json.dumps(m["confusion_matrix"])}


def model_rows(args, shots, draw, images: dict, test, n_labelled) -> list[dict]:
    """as_is and adapt_bn: MODEL itself on the draw's test images and on --home."""
    import adapt
    import metrics
    import runfiles
    rows = []
    target, home = images["target"], images["home"]
    for method in ("as_is", "adapt_bn"):
        if method not in args.methods:
            continue
        model = runfiles.load_core_model(args.model)
        if method == "adapt_bn" and not adapt.adapt_batchnorm(model, target.x):
            continue  # no batch norm to adapt
        base = {"shots": shots, "draw": draw, "method": method, "labelled": 0,
                "train_seconds": 0.0, "run_dir": "-"}
        for name, x, y in (("target_test", target.x[test], target.y[test]), ("home", home.x, home.y)):
            m = metrics.classification_metrics(y, adapt.predict(model, x), list(target.classes))
            rows.append(row(base, name, m))
    return rows


def summarise(rows: list[dict]) -> list[str]:
    import numpy as np
    groups = {}
    for r in rows:
        groups.setdefault((int(r["shots"]), r["method"], r["target"]), []).append(r)
    lines = ["| shots | method | target | draws | accuracy | balanced acc. | macro-F1 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (shots, method, target), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], METHODS.index(kv[0][1]), kv[0][2] != "target_test")):
        def stat(key):
            v = np.array([float(r[key]) for r in rs])
            return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
        lines.append(f"| {shots} | {method} | {target} | {len(rs)} | {stat('accuracy')} | "
                     f"{stat('balanced_accuracy')} | {stat('macro_f1')} |")
    return lines


def draw_rows(args, shots, draw, images) -> list[dict]:
    """The draw's rows, computed once: kept in OUT/draws/K{shots}_draw{draw}/results.json with what they depend on."""
    import runfiles
    folder = args.out / "draws" / f"K{shots}_draw{draw}"
    saved = folder / "results.json"
    key = {"model": str(args.model.resolve()), "model_mtime_ns": args.model.stat().st_mtime_ns,
           "target": str(args.target.resolve()), "home": str(args.home.resolve()), "epochs": args.epochs,
           "methods": sorted(args.methods)}
    if saved.exists() and json.loads(saved.read_text()).get("key") == key:
        return json.loads(saved.read_text())["rows"]
    labelled, test = draw_split(images["target"].y, shots, draw)
    root = write_draw(images["target"], labelled, test, folder, images.get("home_train"))
    rows = model_rows(args, shots, draw, images, test, len(labelled))
    for method in (m for m in TRAINED if m in args.methods):
        rows += trained_rows(args, method, shots, draw, root, len(labelled))
    runfiles.atomic_write_text(saved, json.dumps({"key": key, "rows": rows}))
    print(f"K={shots} draw {draw}: {len(labelled)} labelled, {len(test)} test images", flush=True)
    return rows


def write_results(out: Path):
    """results.csv and summary.md over every draw under OUT/draws, whichever invocation made it."""
    import io
    import runfiles
    rows = [r for saved in sorted((out / "draws").glob("*/results.json"))
            for r in json.loads(saved.read_text())["rows"]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, FIELDS)
    w.writeheader()
    w.writerows(rows)
    runfiles.atomic_write_text(out / "results.csv", buf.getvalue())
    runfiles.atomic_write_text(out / "summary.md", "\n".join(summarise(rows)) + "\n")


def home_training_files(model: Path):
    """MODEL's own training images, where its args.json says they are (fine_tuned_mixed trains on them again)."""
    import data
    saved = json.loads((model.parent / "args.json").read_text())
    root = Path(saved.get("data") or "")
    if not saved.get("data") or not root.is_dir():
        raise UserError(f"{model.parent / 'args.json'}: its --data {root} is not a folder here (expected the "
                        f"model's training images for fine_tuned_mixed; or leave that method out with --methods)")
    return data.find_split(root, saved.get("split", "WBC_100")).train


def main(argv=None):
    args = parse_args(argv)
    cli.import_keras_quietly()
    import data
    import framing
    import runfiles
    home_train = home_training_files(args.model) if "fine_tuned_mixed" in args.methods else None
    meta = runfiles.read_h5_metadata(args.model)
    classes, share, size = tuple(meta["classes"]), framing.frame_share(meta), meta["image_size"]
    images = {"target": data.load_images(data.scan_class_folders(args.target, classes), size=size, name="target",
                                         verbose=False, frame_share=share),
              "home": data.load_images(data.find_labelled(args.home, classes), size=size, name="home",
                                       verbose=False, frame_share=share),
              "home_train": home_train}
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for shots in args.shots:
        for draw in args.draws:
            draw_rows(args, shots, draw, images)
            write_results(args.out)
    print(f"wrote {args.out}/results.csv and summary.md ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    cli.run_main(main)
