"""Compare --masks none, --masks replace and --consistency on real masked images over several seeds.

    python tools/bench_masks.py                             # ../shared/data/bccd, 10% of train masks, seeds 0 1 2
    python tools/bench_masks.py --mask-fraction 1.0         # every training image keeps its mask
    python tools/bench_masks.py --image-size 64 --epochs 30 --out runs/masks_bench

Lays the BCCD crops out in the course layout with prepare_splits.py (symlinks, stratified 5:1 train/val, a
--mask-fraction of each class's training images keeping its mask), runs train_masked.py once per setting and
seed (each run folder under --out), and prints mean +- std (over seeds) of validation accuracy, balanced accuracy
and macro-F1 as a Markdown table, also written to OUT/summary.md.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
import cli  # noqa: E402
SETTINGS = {"none": ["--masks", "none"], "replace": ["--masks", "replace"],
            "consistency": ["--consistency", "1.0"]}


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="tools/bench_masks.py")
    parser.add_argument("--source", type=Path, default=PROJECT.parent / "shared" / "data" / "bccd",
                        help="folder with data/<Class>/ and mask/<Class>/ (same file stems)")
    parser.add_argument("--out", type=Path, default=Path("runs/masks_bench"), help="layout and run folders")
    parser.add_argument("--mask-fraction", type=float, default=0.1, help="share of training images keeping a mask")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--consistency", type=float, default=1.0, help="weight of the consistency setting")
    parser.add_argument("--class-weight-power", type=float, default=None,
                        help="passed to train_masked.py (default: the recipe's; docs/masks.md figures used 1)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cli.import_keras_quietly()
    if not (args.source / "data").is_dir() or not (args.source / "mask").is_dir():
        raise cli.UserError(f"--source {args.source}: expected data/<Class>/ and mask/<Class>/ folders")
    layout = args.out / f"layout_masks{args.mask_fraction:g}"
    if not (layout / "manifest.json").exists():
        subprocess.run([sys.executable, str(PROJECT / "prepare_splits.py"), str(args.source / "data"), str(layout),
                        "--masks", str(args.source / "mask"), "--mask-fraction", str(args.mask_fraction)],
                       check=True)
    results = {}
    for setting in args.settings:
        extra, label = SETTINGS[setting], setting
        if setting == "consistency" and args.consistency != 1.0:
            extra, label = ["--consistency", str(args.consistency)], f"consistency {args.consistency:g}"
        for seed in args.seeds:
            run = args.out / f"runs_masks{args.mask_fraction:g}" / f"{label.replace(' ', '_w')}_seed{seed}"
            if not (run / "metrics.json").exists():
                start = time.perf_counter()
                cmd = [sys.executable, str(PROJECT / "train_masked.py"), "--data", str(layout), "--split", "WBC_100",
                       "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--seed", str(seed),
                       "--quiet", "--out", str(run), *extra]
                if args.class_weight_power is not None:
                    cmd += ["--class-weight-power", str(args.class_weight_power)]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
                print(f"  {time.perf_counter() - start:.0f} s wall", flush=True)
            results.setdefault(label, []).append(json.loads((run / "metrics.json").read_text()))
    table = summarize(results, args)
    print(table)
    (args.out / f"summary_masks{args.mask_fraction:g}.md").write_text(table + "\n")


def summarize(results: dict, args) -> str:
    rows = [f"BCCD, {args.image_size} px, {args.epochs} epochs, {args.mask_fraction:.0%} of train images masked, "
            f"seeds {' '.join(map(str, args.seeds))} (mean ± std over seeds)", "",
            "| setting | accuracy | balanced accuracy | macro-F1 | collapsed runs | seconds per run |",
            "| --- | --- | --- | --- | --- | --- |"]
    for setting, runs in results.items():
        cells = []
        for key in ("val_accuracy_selected", "balanced_accuracy", "macro_f1"):
            v = np.array([r[key] for r in runs])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
        collapsed = sum(bool(r["collapsed_to_majority"]) for r in runs)
        seconds = np.mean([r["seconds"] for r in runs])
        rows.append(f"| {setting} | {' | '.join(cells)} | {collapsed}/{len(runs)} | {seconds:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    cli.run_main(main)
