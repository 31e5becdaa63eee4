"""Aggregate run folders named <recipe>_<split>_seed<seed> (tools/pbc_benchmark.sh) into one Markdown table:
accuracy, balanced accuracy and macro-F1 as mean ± std over seeds, collapsed runs, training seconds.

    python tools/summarize_runs.py RUNS_DIR [--csv out.csv]
"""
import argparse
import csv
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from data import WBC_SPLITS, UserError  # noqa: E402

RUN_NAME = re.compile(r"(?P<recipe>\w+?)_(?P<split>WBC_\d+)_seed(?P<seed>\d+)$")
METRICS = (("accuracy", "val_accuracy_selected"), ("balanced accuracy", "balanced_accuracy"), ("macro-F1", "macro_f1"))


def collect(runs_dir: Path) -> dict:
    """{(recipe, split): [metrics.json, ...]} for every finished run folder."""
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: not a folder (expected run folders named <recipe>_<split>_seed<seed>)")
    groups = {}
    for d in sorted(runs_dir.iterdir()):
        m = RUN_NAME.match(d.name)
        if m and (d / "metrics.json").is_file():
            groups.setdefault((m["recipe"], m["split"]), []).append(json.loads((d / "metrics.json").read_text()))
    if not groups:
        raise UserError(f"{runs_dir}: no finished runs (no <recipe>_<split>_seed<seed>/metrics.json)")
    return groups


def summarize(groups: dict) -> list[dict]:
    rows = []
    order = {s: i for i, s in enumerate(reversed(WBC_SPLITS))}  # WBC_1 first
    for (recipe, split), runs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][1], 9), kv[0][0] != "report")):
        row = {"split": split, "recipe": recipe, "seeds": len(runs)}
        for name, key in METRICS:
            v = np.array([r[key] for r in runs], float)
            row[name] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        row["collapsed"] = sum(bool(r["collapsed_to_majority"]) for r in runs)
        row["seconds"] = float(np.mean([r["seconds"] for r in runs]))
        row["majority baseline"] = runs[0]["majority_baseline"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["split", "recipe", "seeds"] + [n for n, _ in METRICS] + ["collapsed", "s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["split"], r["recipe"], str(r["seeds"])] + [f"{r[n][0]:.3f} ± {r[n][1]:.3f}" for n, _ in METRICS]
        lines.append("| " + " | ".join(cells + [str(r["collapsed"]), f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="tools/summarize_runs.py")
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows as CSV")
    args = parser.parse_args(argv)
    rows = summarize(collect(args.runs_dir))
    print(markdown(rows))
    if rows:
        print(f"\nmajority-class baseline (validation): {rows[0]['majority baseline']:.4f}; "
              "± is the standard deviation over seeds")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "recipe", "seeds"] + [f"{n} {s}" for n, _ in METRICS for s in ("mean", "std")]
                       + ["collapsed", "seconds_per_run"])
            for r in rows:
                w.writerow([r["split"], r["recipe"], r["seeds"]] + [f"{x:.4f}" for n, _ in METRICS for x in r[n]]
                           + [r["collapsed"], f"{r['seconds']:.1f}"])
    return 0


if __name__ == "__main__":
    cli.run_main(main)
