"""Reproduce the report's accuracy table (Table 1) in one resumable command, with honest columns and statistics.

    python reproduce_table.py                                       # synthetic demo data, small budget
    python reproduce_table.py --data ROOT --epochs 30 --seeds 3 --out runs/table
    python reproduce_table.py --data ROOT --rows 'WBC_1_*,WBC_10_*' --out runs/table    # a subset of rows
    python reproduce_table.py --out runs/table --report-only        # rebuild the files from finished runs

Every (row, seed) is one run folder, OUT/runs/<row>_seed<k>, trained by the same script a user would run
(train_cnn.py, train_masked.py, pretrain_resnet.py) in its own process with --resume. A complete folder is
skipped, so an interrupted table loses at most the run in progress: rerun the same command to continue.

Rows (names for --rows; shell-style patterns such as 'WBC_100_*' or '*_report' work):
    <split>_<method>_<recipe>  split: WBC_1 WBC_10 WBC_50 WBC_100; method: raw, masked-only (train_masked.py
                               --masks only), merged (--masks replace); recipe: report (the report's CNN and
                               augmentation, no class weights) or default (the project's recipe)
    <split>_resnet-scratch     ResNet50 from random weights, fine-tuned on the split (pretrain_resnet.py)
    <split>_resnet-cam16       ResNet50 pre-trained on CAM16, then fine-tuned
    <split>_resnet-imagenet-cam16   ImageNet weights (--imagenet-weights PATH) -> CAM16 -> fine-tuned
    <split>_ssl_default        the default recipe started from a self-supervised encoder (train_cnn.py --init):
                               pretrain_ssl.py runs once per seed (OUT/runs/ssl_pretrain_seed<k>, pool: WBC_100's
                               training images without labels + ROOT/WBC_unlabeled when present) for every split

Results folder OUT: results.csv (a row per run), table.md (mean +- std across seeds), comparisons.md (paired
McNemar tests and bootstrap intervals on the same validation images), label_efficiency.png.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cli
from runfiles import UserError
import runfiles

PROJECT = Path(__file__).resolve().parent
SPLIT_ORDER = ("WBC_1", "WBC_10", "WBC_50", "WBC_100")  # the report's order, fewest labels first
PERCENT = {"WBC_1": 1, "WBC_10": 10, "WBC_50": 50, "WBC_100": 100}
CNN_METHODS = {"raw": ("train_cnn.py", []),
               "masked-only": ("train_masked.py", ["--masks", "only"]),
               "merged": ("train_masked.py", ["--masks", "replace"])}
CNN_RECIPES = ("report", "default")
RESNET_METHODS = ("resnet-scratch", "resnet-cam16", "resnet-imagenet-cam16")
# Paired comparisons, A minus B, made within each split for every seed where both runs exist.
PAIRS = [(f"{a}_{r}", f"{b}_{r}") for r in CNN_RECIPES
         for a, b in (("masked-only", "raw"), ("merged", "raw"), ("merged", "masked-only"))]
PAIRS += [(f"{m}_default", f"{m}_report") for m in CNN_METHODS]
PAIRS += [("resnet-cam16", "resnet-scratch"), ("resnet-imagenet-cam16", "resnet-cam16"),
          ("resnet-scratch", "raw_report"), ("resnet-cam16", "raw_report")]
PAIRS += [("ssl_default", "raw_default")]
# Settings that change what a finished run means: a results folder keeps one value of each.
CONFIG_KEYS = ("data", "image_size", "epochs", "pretrain_epochs", "batch_size", "holdout", "imagenet_weights",
               "ssl_epochs")
TABLE_METRICS = [("val_accuracy_best", "Best"), ("val_accuracy_mean", "Mean"), ("val_accuracy_last", "Last"),
                 ("val_accuracy_selected", "Selected epoch"), ("balanced_accuracy", "Balanced acc."),
                 ("macro_f1", "Macro-F1"), ("majority_baseline", "Majority baseline")]
# The no-argument demo: the report's 12 rows (Table 1) and the project recipe's raw rows; the ResNet50 rows are
# one --rows away ('WBC_100_resnet-*'): on a 2-core CPU each costs minutes.
DEMO_ROWS = "*_report,*_raw_default"
PLOT_METRICS = {"val_accuracy_selected": "val accuracy (hold-out-selected epoch)",
                "balanced_accuracy": "val balanced accuracy"}


@dataclass
class Row:
    name: str
    split: str
    method: str
    recipe: str  # 'report', 'default' or 'resnet'
    script: str
    script_args: list = field(default_factory=list)
    run_subdir: str = ""  # pretrain_resnet.py writes OUT/pretrain and OUT/finetune; the table reads finetune

    @property
    def label(self) -> str:
        return self.method if self.recipe == "resnet" else f"{self.method} ({self.recipe})"


def all_rows(imagenet_weights: Path | None = None, include_imagenet: bool = False) -> list[Row]:
    """Every row the table knows, in table order. The ImageNet row exists when weights are given
    (or, for --report-only, always, so finished runs of it are reported)."""
    rows = []
    for recipe in CNN_RECIPES:
        for split in SPLIT_ORDER:
            for method, (script, extra) in CNN_METHODS.items():
                rows.append(Row(f"{split}_{method}_{recipe}", split, method, recipe, script,
                                [*extra, "--recipe", recipe]))
    for split in SPLIT_ORDER:
        rows.append(Row(f"{split}_ssl_default", split, "ssl", "default", "train_cnn.py", ["--recipe", "default"]))
    for split in SPLIT_ORDER:
        rows.append(Row(f"{split}_resnet-scratch", split, "resnet-scratch", "resnet", "pretrain_resnet.py",
                        ["--init", "scratch", "--skip-pretrain", "--no-compare"], "finetune"))
        rows.append(Row(f"{split}_resnet-cam16", split, "resnet-cam16", "resnet", "pretrain_resnet.py",
                        ["--init", "scratch", "--no-compare"], "finetune"))
        if imagenet_weights is not None or include_imagenet:
            rows.append(Row(f"{split}_resnet-imagenet-cam16", split, "resnet-imagenet-cam16", "resnet",
                            "pretrain_resnet.py", ["--init", str(imagenet_weights), "--no-compare"], "finetune"))
    return rows


def select_rows(rows: list[Row], patterns: str | None) -> list[Row]:
    """--rows: comma-separated names or shell patterns; each must match at least one row."""
    if not patterns:
        return rows
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in wanted:
        if not any(fnmatch.fnmatchcase(r.name, p) for r in rows):
            hint = "; the ImageNet rows need --imagenet-weights PATH" if "imagenet" in p else ""
            raise UserError(f"--rows {p}: matches no row (e.g. WBC_10_raw_report, 'WBC_1_*', '*_resnet-cam16'; "
                            f"see --help){hint}")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="reproduce_table.py")
    cli.add_data_args(parser, split=False)
    g = parser.add_argument_group("the table")
    g.add_argument("--rows", default=None,
                   help=f"comma-separated row names or patterns (default: every row; on the demo data "
                        f"'{DEMO_ROWS}'; see the list above)")
    g.add_argument("--seeds", type=int, default=None, help="seeds per row, 0..K-1 (default 3; 2 on the demo data)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs per run (default 30; 6 on the demo data)")
    g.add_argument("--pretrain-epochs", type=int, default=None,
                   help="CAM16 pre-training epochs of the ResNet50 rows (default: --epochs; 1 on the demo data)")
    g.add_argument("--ssl-epochs", type=int, default=None,
                   help="pre-training epochs of the ssl rows (pretrain_ssl.py; default 30; 2 on the demo data)")
    g.add_argument("--batch-size", type=int, default=32, help="images per step")
    g.add_argument("--holdout", type=float, default=0.15,
                   help="fraction of each training class held out for model selection")
    g.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"), default="auto",
                   help="passed to every run")
    g.add_argument("--imagenet-weights", default=None, metavar="PATH",
                   help="Keras ResNet50 ImageNet weights without top (.h5 file, or 'imagenet' to let Keras "
                        "download them): adds the ImageNet -> CAM16 rows")
    g.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process: for a GPU (they share its memory) or "
                        "a machine with cores to spare; on a small CPU one at a time is fastest")
    g.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples per comparison")
    o = parser.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None,
                   help="results folder (default runs/table, runs/table_demo on the demo data)")
    o.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild results.csv, table.md, comparisons.md and the plot from finished runs")
    o.add_argument("--resume", action="store_true",
                   help="accepted for symmetry with the other scripts: finished runs are always skipped")
    o.add_argument("--dry-run", action="store_true", help="print the runs that would be trained, train nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        args.demo = args.data is None
        if args.out is None:
            args.out = Path("runs/table_demo" if args.demo else "runs/table")
        return args
    # The demo's small budget: image size 32, 6 epochs, 2 seeds (README, Reproducing the table, says how long).
    cli.resolve_data(args, demo_image_size=32)
    args.data = Path(args.data).resolve()
    if args.seeds is None:
        args.seeds = 2 if args.demo else 3
    if args.epochs is None:
        args.epochs = 6 if args.demo else 30
    if args.pretrain_epochs is None:
        args.pretrain_epochs = 1 if args.demo else args.epochs
    if args.ssl_epochs is None:
        args.ssl_epochs = 2 if args.demo else 30
    if args.rows is None and args.demo:
        args.rows = DEMO_ROWS
    if args.out is None:
        args.out = Path("runs/table_demo" if args.demo else "runs/table")
    cli.check_positive(args, "seeds", "epochs", "pretrain_epochs", "ssl_epochs", "batch_size", "bootstrap", "jobs")
    if args.imagenet_weights not in (None, "imagenet"):
        args.imagenet_weights = Path(args.imagenet_weights).resolve()
        if not args.imagenet_weights.is_file():
            raise UserError(f"--imagenet-weights {args.imagenet_weights}: no such file (expected ResNet50 "
                            f"ImageNet weights, e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5)")
    return args


def is_synthetic(root: Path) -> bool:
    """The demo data, wherever it lives, says so in its manifest: its numbers must be labelled synthetic."""
    try:
        return bool(json.loads((Path(root) / "manifest.json").read_text()).get("synthetic"))
    except (OSError, ValueError, AttributeError):
        return False


def check_config(out: Path, args) -> dict:
    """A results folder holds runs of one setting: refuse to mix, say which setting differs."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in CONFIG_KEYS}
    config["demo"] = args.demo or is_synthetic(args.data)
    path = out / "table_config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"{path}: unreadable (expected the JSON written by reproduce_table.py)") from None
        for key in CONFIG_KEYS:
            if key in old and old[key] != config[key] and not (key == "imagenet_weights" and config[key] is None):
                raise UserError(f"{out} holds runs made with --{key.replace('_', '-')} {old[key]} (now "
                                f"{config[key]}); use another --out, or the same setting to continue them")
        if config["imagenet_weights"] is None:
            config["imagenet_weights"] = old.get("imagenet_weights")
    return config


# ----------------------------------------------------------------------------------------------
# Training: one subprocess per run
# ----------------------------------------------------------------------------------------------

def run_folder(out: Path, row: Row, seed: int) -> Path:
    return out / "runs" / f"{row.name}_seed{seed}"


def metrics_folder(out: Path, row: Row, seed: int) -> Path:
    """Where the run's metrics.json and val_predictions.csv are."""
    folder = run_folder(out, row, seed)
    return folder / row.run_subdir if row.run_subdir else folder


def is_complete(out: Path, row: Row, seed: int) -> bool:
    folder = metrics_folder(out, row, seed)
    return runfiles.run_is_complete(folder) and (folder / "val_predictions.csv").exists()


def command(row: Row, seed: int, args, out: Path) -> list[str]:
    """The command line a user would type for this run (the table adds nothing a script doesn't accept)."""
    cmd = [sys.executable, str(PROJECT / row.script), "--data", str(args.data), "--split", row.split,
           *row.script_args, "--epochs", str(args.epochs), "--image-size", str(args.image_size),
           "--batch-size", str(args.batch_size), "--holdout", str(args.holdout), "--precision", args.precision,
           "--seed", str(seed), "--out", str(run_folder(out, row, seed)), "--resume", "--quiet"]
    if row.recipe == "resnet" and "--skip-pretrain" not in row.script_args:
        cmd += ["--pretrain-epochs", str(args.pretrain_epochs)]
    if row.method == "ssl":
        cmd += ["--init", str(ssl_folder(out, seed) / "encoder.h5")]
    if args.cache_dir is not None:
        cmd += ["--cache-dir", str(args.cache_dir)]
    if args.no_cache:
        cmd += ["--no-cache"]
    return cmd


def ssl_folder(out: Path, seed: int) -> Path:
    return out / "runs" / f"ssl_pretrain_seed{seed}"


def ssl_command(seed: int, args, out: Path) -> list[str]:
    """Pre-training for the ssl rows of one seed: WBC_100's training images (labels ignored; the probe uses them)
    and ROOT/WBC_unlabeled (prepare_splits.py --unlabeled) when it exists."""
    cmd = [sys.executable, str(PROJECT / "pretrain_ssl.py"), "--data", str(args.data), "--split", "WBC_100",
           "--image-size", str(args.image_size), "--epochs", str(args.ssl_epochs), "--precision", args.precision,
           "--seed", str(seed), "--out", str(ssl_folder(out, seed)), "--resume", "--quiet"]
    if (Path(args.data) / "WBC_unlabeled").is_dir():
        cmd += ["--unlabeled", str(Path(args.data) / "WBC_unlabeled")]
    if args.cache_dir is not None:
        cmd += ["--cache-dir", str(args.cache_dir)]
    return cmd


def launch(cmd: list[str], log: Path, jobs: int = 1) -> int:
    """Run one training in its own process, output appended to its log; returns the exit status.
    A crash, an out-of-memory kill or a Ctrl-C ends that run only; its finished epochs stay for --resume."""
    env = dict(os.environ)
    if jobs > 1:
        # JAX takes 75% of the GPU's memory per process by default: share the card between the runs.
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / jobs:.3f}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=PROJECT, env=env).returncode


def last_error_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(empty log)"])[-1][:300]


def train_rows(rows: list[Row], args, out: Path) -> list[dict]:
    """Train every unfinished (row, seed); returns the failures. Rows whose script is absent are skipped."""
    missing = sorted({r.script for r in rows if not (PROJECT / r.script).exists()})
    for script in missing:
        names = [r.name for r in rows if r.script == script]
        print(f"note: {script} is not in {PROJECT}; skipping {len(names)} rows ({names[0]} ...)")
    # Seed by seed: an interrupted table still has every row of the first seeds.
    todo = [(r, s) for s in range(args.seeds) for r in rows if r.script not in missing]
    pending = [(r, s) for r, s in todo if not is_complete(out, r, s)]
    print(f"{len(todo)} runs: {len(todo) - len(pending)} finished, {len(pending)} to train -> {out}/runs")
    ssl_seeds = sorted({s for r, s in pending if r.method == "ssl"})
    if args.dry_run:
        for seed in ssl_seeds:
            print(" ".join(ssl_command(seed, args, out)))
        for row, seed in pending:
            print(" ".join(command(row, seed, args, out)))
        return []
    import threading
    ssl_locks = {seed: threading.Lock() for seed in ssl_seeds}

    def run_one(row: Row, seed: int) -> tuple[int, float, Path]:
        folder = run_folder(out, row, seed)
        start = time.perf_counter()
        log = folder.parent / f"{folder.name}.log"
        if row.method == "ssl":
            with ssl_locks[seed]:  # one pre-training per seed, shared by that seed's ssl rows
                encoder = ssl_folder(out, seed)
                if not (encoder / "metrics.json").exists():
                    code = launch(ssl_command(seed, args, out), log, args.jobs)
                    if code != 0:
                        return code, time.perf_counter() - start, log
        code = launch(command(row, seed, args, out), log, args.jobs)
        return code, time.perf_counter() - start, log

    def report(i: int, row: Row, seed: int, code: int, seconds: float, log: Path):
        prefix = f"[{i}/{len(pending)}] {row.name} seed {seed}"
        if code == 0 and is_complete(out, row, seed):
            m = json.loads((metrics_folder(out, row, seed) / "metrics.json").read_text())
            print(f"{prefix}: {seconds:.0f}s  val acc {m['val_accuracy_selected']:.3f}  "
                  f"balanced {m['balanced_accuracy']:.3f}" + ("  COLLAPSED" if m.get("collapsed_to_majority") else ""),
                  flush=True)
            return None
        reason = last_error_line(log)
        print(f"{prefix}: FAILED (exit {code}) after {seconds:.0f}s: {reason}  [log: {log}]", flush=True)
        return {"row": row.name, "seed": seed, "exit": code, "reason": reason, "log": str(log)}

    failures = []
    # --jobs N: N runs at once, each its own process (for a GPU, or a machine with cores to spare).
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, row, seed): (row, seed) for row, seed in pending}
        for i, future in enumerate(as_completed(futures), 1):
            row, seed = futures[future]
            failure = report(i, row, seed, *future.result())
            if failure:
                failures.append(failure)
    return failures


# ----------------------------------------------------------------------------------------------
# Collecting finished runs
# ----------------------------------------------------------------------------------------------

def collect(out: Path, rows: list[Row]) -> list[dict]:
    """One record per complete run folder of the given rows, any seed."""
    records = []
    for row in rows:
        for folder in sorted((out / "runs").glob(f"{row.name}_seed*")):
            seed = folder.name[len(row.name) + len("_seed"):]
            if not seed.isdigit() or not folder.is_dir() or not is_complete(out, row, int(seed)):
                continue
            mdir = metrics_folder(out, row, int(seed))
            records.append({"row": row, "seed": int(seed), "dir": mdir,
                            "metrics": json.loads((mdir / "metrics.json").read_text())})
    return records


def flatten(metrics: dict) -> dict:
    """metrics.json as CSV columns: dicts become key_subkey columns, lists become JSON text."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        elif isinstance(value, list):
            flat[key] = json.dumps(value)
        else:
            flat[key] = value
    return flat


def results_csv(records: list[dict]) -> str:
    ids = ["row", "split", "label_percent", "method", "recipe", "seed"]
    flats = [flatten(r["metrics"]) for r in records]
    columns = []
    for flat in flats:
        columns += [k for k in flat if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ids + columns + ["run_dir"], restval="")
    w.writeheader()
    for rec, flat in zip(records, flats):
        row = rec["row"]
        w.writerow({"row": row.name, "split": row.split, "label_percent": PERCENT[row.split], "method": row.method,
                    "recipe": row.recipe, "seed": rec["seed"], **flat, "run_dir": str(rec["dir"])})
    return buf.getvalue()


def _mean_std(values) -> tuple[float, float]:
    import numpy as np
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _fmt(values) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


# ----------------------------------------------------------------------------------------------
# table.md, label_efficiency.png
# ----------------------------------------------------------------------------------------------

SECTIONS = [("report", "The report's recipe (its CNN with a flatten head, its augmentation, no class weights)"),
            ("default", "The project's default recipe (README, Results)"),
            ("resnet", "ResNet50 (pretrain_resnet.py)")]


def table_md(records: list[dict], config: dict, failures: list[dict]) -> str:
    import report
    by_row = defaultdict(list)
    for rec in records:
        by_row[rec["row"].name].append(rec)
    lines = ["# Validation accuracy table", ""]
    if config.get("demo"):
        lines += ["**Synthetic demo data** (drawn cells): these numbers show that the code runs, nothing about "
                  "real blood cells.", ""]
    lines += [f"Settings: {', '.join(f'{k} {config.get(k)}' for k in CONFIG_KEYS if config.get(k) is not None)}.",
              "", "Best / Mean / Last: the report's columns, over the epochs of a run (Best and Mean look at the "
              "validation set, so they are optimistic). Selected epoch: validation accuracy of the epoch chosen on "
              "a hold-out of the training split, the honest number. Each cell: mean ± standard deviation across "
              "seeds. ⚠ marks rows where a run predicted one class for ≥ 95% of the images (it collapsed, usually to "
              "the majority class); compare those with the majority baseline.", ""]
    for recipe, title in SECTIONS:
        section = [r for r in _row_order(by_row) if by_row[r][0]["row"].recipe == recipe]
        if not section:
            continue
        body = []
        for name in section:
            recs = sorted(by_row[name], key=lambda r: r["seed"])
            row = recs[0]["row"]
            collapsed = sum(bool(r["metrics"].get("collapsed_to_majority")) for r in recs)
            body.append([row.split, row.method + (" ⚠" if collapsed else ""),
                         *[_fmt([r["metrics"][k] for r in recs]) for k, _ in TABLE_METRICS],
                         len(recs), f"{collapsed}/{len(recs)}"])
        headers = ["Split", "Method", *[h for _, h in TABLE_METRICS], "Seeds", "Collapsed"]
        lines += [f"## {title}", "", report.markdown_table(headers, body)]
    if failures:
        lines += ["## Runs that failed", "", report.markdown_table(
            ["Row", "Seed", "Exit", "Reason", "Log"],
            [[f["row"], f["seed"], f["exit"], f["reason"], f["log"]] for f in failures])]
    return "\n".join(lines)


def _row_order(by_row) -> list[str]:
    order = {r.name: i for i, r in enumerate(all_rows(include_imagenet=True))}
    return sorted(by_row, key=lambda n: (SPLIT_ORDER.index(by_row[n][0]["row"].split), order.get(n, 0)))


def plot_label_efficiency(records: list[dict], path: Path, demo: bool):
    import report
    values = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # label -> metric -> percent -> [v]
    for rec in records:
        for key in PLOT_METRICS:
            values[rec["row"].label][key][PERCENT[rec["row"].split]].append(rec["metrics"][key])
    series = {label: {key: [(p, *_mean_std(v)) for p, v in by_pct.items()] for key, by_pct in by_metric.items()}
              for label, by_metric in values.items()}
    # What a model that always answers the majority class scores: accuracy = its share, balanced = 1 / classes.
    first = records[0]["metrics"]
    references = {"val_accuracy_selected": (first["majority_baseline"], "majority-class baseline"),
                  "balanced_accuracy": (1 / len(first["classes"]), "one-class baseline")}
    report.plot_label_efficiency(series, path, PLOT_METRICS, references=references,
                                 title=("synthetic demo data; " if demo else "") + "mean ± std across seeds")


# ----------------------------------------------------------------------------------------------
# comparisons.md: paired tests on the same validation images
# ----------------------------------------------------------------------------------------------

def read_correctness(run_dir: Path) -> dict[str, int]:
    with open(run_dir / "val_predictions.csv", newline="") as f:
        return {r["path"]: int(r["correct"]) for r in csv.DictReader(f)}


def comparisons(records: list[dict], n_resamples: int) -> list[dict]:
    """Per split and pair of rows: one comparison per shared seed, and one on correctness averaged over seeds."""
    import numpy as np
    import metrics
    runs = {(r["row"].name, r["seed"]): r for r in records}
    out = []
    for split in SPLIT_ORDER:
        for a_suffix, b_suffix in PAIRS:
            a_name, b_name = f"{split}_{a_suffix}", f"{split}_{b_suffix}"
            seeds = sorted(s for (n, s) in runs if n == a_name and (b_name, s) in runs)
            if not seeds:
                continue
            per_seed_a, per_seed_b = [], []
            for seed in seeds:
                ca, cb = read_correctness(runs[a_name, seed]["dir"]), read_correctness(runs[b_name, seed]["dir"])
                if ca.keys() != cb.keys():
                    out.append({"split": split, "a": a_name, "b": b_name, "seed": seed,
                                "note": "different validation images; not compared"})
                    continue
                images = sorted(ca)
                a = np.array([ca[p] for p in images]); b = np.array([cb[p] for p in images])
                per_seed_a.append(a); per_seed_b.append(b)
                out.append({"split": split, "a": a_name, "b": b_name, "seed": seed,
                            **metrics.mcnemar_exact(a, b),
                            **metrics.paired_bootstrap_difference(a, b, n_resamples, seed=seed)})
            if len(per_seed_a) > 1:
                # Each image's correctness averaged over seeds, then the paired bootstrap over images.
                a, b = np.mean(per_seed_a, 0), np.mean(per_seed_b, 0)
                out.append({"split": split, "a": a_name, "b": b_name, "seed": "mean",
                            "images": len(a), **metrics.paired_bootstrap_difference(a, b, n_resamples, seed=0)})
    tested = [c for c in out if "p_value" in c]
    for c, p in zip(tested, metrics.adjust_p_values([c["p_value"] for c in tested])):
        c["p_adjusted"] = p
    return out


def comparisons_md(results: list[dict], config: dict, n_resamples: int) -> str:
    import report
    lines = ["# Paired comparisons on the same validation images", ""]
    if config.get("demo"):
        lines += ["**Synthetic demo data**: these numbers show that the code runs, nothing about real cells.", ""]
    lines += ["A − B: accuracy of A minus accuracy of B at each run's hold-out-selected epoch, with a paired "
              f"bootstrap 95% interval ({n_resamples} resamples of the validation images, seeded). "
              "Only A / only B: images one model gets right and the other wrong; McNemar's exact test asks whether "
              "that split is lopsided beyond chance (two-sided). BH p: Benjamini-Hochberg adjusted over every test "
              "in this file. Seed 'mean': each image's correctness averaged over the seeds, then bootstrapped, so "
              "the interval reflects the validation images, not the spread between training runs "
              "(see table.md for that).", ""]
    if not results:
        return "\n".join(lines + ["No pair of rows has finished runs with a shared seed yet.", ""])
    for split in SPLIT_ORDER:
        body = []
        for c in (c for c in results if c["split"] == split):
            if "note" in c:
                body.append([c["a"], c["b"], c["seed"], "", "", "", "", "", "", "", c["note"]])
                continue
            tested = "p_value" in c
            body.append([c["a"].removeprefix(split + "_"), c["b"].removeprefix(split + "_"), c["seed"], c["images"],
                         f"{c['accuracy_a']:.3f}", f"{c['accuracy_b']:.3f}",
                         f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]",
                         f"{c['only_a']} / {c['only_b']}" if tested else "",
                         f"{c['p_value']:.3g}" if tested else "", f"{c['p_adjusted']:.3g}" if tested else "",
                         _verdict(c)])
        if body:
            lines += [f"## {split}", "", report.markdown_table(
                ["A", "B", "Seed", "Images", "Acc. A", "Acc. B", "A − B [95% CI]", "Only A / only B",
                 "McNemar p", "BH p", "Reading"], body)]
    return "\n".join(lines)


def _verdict(c: dict) -> str:
    if "p_value" in c:
        return "differ (BH p < 0.05)" if c["p_adjusted"] < 0.05 else "no clear difference"
    return "interval excludes 0" if c["low"] > 0 or c["high"] < 0 else "interval includes 0"


# ----------------------------------------------------------------------------------------------
# Writing the results folder
# ----------------------------------------------------------------------------------------------

def write_results(out: Path, rows: list[Row], config: dict, failures: list[dict], n_resamples: int) -> list[dict]:
    from runfiles import atomic_write_text
    records = collect(out, rows)
    if not records:
        raise UserError(f"{out}/runs: no finished runs to report (train some first: reproduce_table.py "
                        f"--out {out} ...)")
    atomic_write_text(out / "results.csv", results_csv(records))
    atomic_write_text(out / "table.md", table_md(records, config, failures))
    atomic_write_text(out / "comparisons.md", comparisons_md(comparisons(records, n_resamples), config, n_resamples))
    plot_label_efficiency(records, out / "label_efficiency.png", config.get("demo", False))
    return records


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        if not (out / "runs").is_dir():
            raise UserError(f"{out}: no runs/ folder (expected a results folder written by reproduce_table.py)")
        config_path = out / "table_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {"demo": args.demo}
        rows = select_rows(all_rows(include_imagenet=True), args.rows)
        records = write_results(out, rows, config, [], args.bootstrap)
        print(f"{len(records)} finished runs -> {out}/results.csv, table.md, comparisons.md, label_efficiency.png")
        return 0
    rows = select_rows(all_rows(args.imagenet_weights), args.rows)
    # Check the data once, here, so a wrong --data is one line instead of a failure in every run.
    import data
    for split in sorted({r.split for r in rows}, key=SPLIT_ORDER.index):
        data.find_split(args.data, split)
    config = check_config(out, args)
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        runfiles.write_json(out / "table_config.json", config)
    failures = []
    try:
        failures = train_rows(rows, args, out)
    finally:
        # Also after Ctrl-C: the files show every run finished so far.
        if not args.dry_run and collect(out, rows):
            write_results(out, rows, config, failures, args.bootstrap)
            print(f"results: {out}/table.md, comparisons.md, results.csv, label_efficiency.png")
    if failures:
        print(f"{len(failures)} runs failed (listed in {out}/table.md); rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run_main(main)
