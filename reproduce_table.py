"""Reproduce the report's accuracy table (Table 1) in one resumable command, with honest columns and statistics.

    python reproduce_table.py                                       # synthetic demo data, small budget
    python reproduce_table.py --data ROOT --epochs 30 --seeds 3 --out runs/table
    python reproduce_table.py --data ROOT --rows 'WBC_1_*,WBC_10_*' --out runs/table    # a subset of rows
    python reproduce_table.py --out runs/table --report-only        # rebuild the files from finished runs
    python reproduce_table.py --data ROOT --out runs/table --shard 0/4   # one of 4 machines (docs/distributed.md)
    python reproduce_table.py --data ROOT --out runs/table --list | xargs -P 2 -I{} sh -c {}   # 2 at once

Every (row, seed) is one run folder, OUT/runs/<row>_seed<k>, trained by the same script a user would run
(train_cnn.py, train_masked.py, pretrain_resnet.py) in its own process with --resume. A complete folder is
skipped, so an interrupted table loses at most the run in progress: rerun the same command to continue.
Several table processes (--shard I/N on several machines sharing OUT, or the same command twice) never train one
run twice: a process claims a run by creating OUT/claims/<run>.claim atomically before training it.

Rows (names for --rows; shell-style patterns such as 'WBC_100_*' or '*_report' work):
    <split>_<method>_<recipe>  split: WBC_1 WBC_10 WBC_50 WBC_100; method: raw, masked-only (train_masked.py
                               --masks only), merged (--masks replace); recipe: report (the report's CNN and
                               augmentation, no class weights) or default (the project's recipe)
    <split>_resnet-scratch     ResNet50 from random weights, fine-tuned on the split (pretrain_resnet.py)
    <split>_resnet-cam16       ResNet50 pre-trained on CAM16, then fine-tuned
    <split>_resnet-imagenet-cam16   ImageNet weights (--imagenet-weights PATH) -> CAM16 -> fine-tuned
    <split>_ssl_default        the default recipe started from a self-supervised encoder (train_cnn.py --init):
                               pretrain_ssl.py runs once per seed (OUT/runs/ssl_pretrain_seed<k>, pool: WBC_100's
                               training images without labels + ROOT/WBC_unlabeled when present + the
                               --ssl-unlabeled folders) for every split
    <split>_semi_default       the default recipe trained semi-supervised (train_cnn.py --unlabeled, FixMatch-style;
                               unlabeled pool: WBC_100's training images, labels ignored; with --semi-pool all
                               also ROOT/WBC_unlabeled when present)
    <split>_ssl-semi_default   both: started from the ssl rows' encoder, then trained semi-supervised on the semi
                               rows' pool
    <split>_ssl-distill_default  started from the ssl rows' encoder and distilled on the semi rows' pool from the
                               same seed's <split>_ssl_default model (train_cnn.py --teacher; that row is trained
                               first when it is not finished)

Results folder OUT: results.csv (a row per run), table.md (mean +- std across seeds), comparisons.md (paired
McNemar tests and bootstrap intervals on the same validation images), label_efficiency.png.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import contextlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cli
import recipes
from devices import PRECISIONS
from runfiles import UserError
import runfiles
from semisup import THRESHOLDS

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
PAIRS += [("ssl_default", "raw_default"), ("semi_default", "raw_default"), ("ssl-semi_default", "ssl_default"),
          ("ssl-semi_default", "semi_default"), ("ssl-distill_default", "ssl_default"),
          ("ssl-distill_default", "raw_default")]
# Settings that change what a finished run means: a results folder keeps one value of each.
CONFIG_KEYS = ("data", "image_size", "epochs", "pretrain_epochs", "batch_size", "holdout", "imagenet_weights",
               "ssl_epochs", "ssl_image_size", "ssl_views", "ssl_unlabeled", "freeze_epochs", "finetune_lr",
               "unlabeled_ratio", "thresholds", "semi_pool", "frozen_blocks", "class_weight_power")
SEMI_POOLS = ("train", "all")
SSL_METHODS = ("ssl", "ssl-semi", "ssl-distill")  # rows that start from the seed's pre-trained encoder
SEMI_METHODS = ("semi", "ssl-semi", "ssl-distill")  # rows trained on the unlabeled pool too
TEACHERS = {"ssl-distill": "ssl"}  # rows distilled from the same split and seed's run of another method
# The ssl rows' two views: pretrain_ssl.py's own (SimCLR's), or those with the stain's hue kept (no hue shift, no
# greyscale): granule colour tells eosinophils and basophils from the rest (docs/ssl.md).
SSL_VIEWS = {"simclr": [], "keep-hue": ["--hue-jitter", "0", "--grayscale", "0"]}
# The no-argument demo: the report's 12 rows (Table 1) and the project recipe's raw rows; the ResNet50 rows are
# one --rows away ('WBC_100_resnet-*'): on a 2-core CPU each costs minutes.
DEMO_ROWS = "*_report,*_raw_default"


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

    @property
    def percent(self) -> int:
        return PERCENT[self.split]


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
        rows.append(Row(f"{split}_semi_default", split, "semi", "default", "train_cnn.py", ["--recipe", "default"]))
    for split in SPLIT_ORDER:
        rows.append(Row(f"{split}_ssl-semi_default", split, "ssl-semi", "default", "train_cnn.py",
                        ["--recipe", "default"]))
    for split in SPLIT_ORDER:
        rows.append(Row(f"{split}_ssl-distill_default", split, "ssl-distill", "default", "train_cnn.py",
                        ["--recipe", "default"]))
    for split in SPLIT_ORDER:
        rows.append(Row(f"{split}_resnet-scratch", split, "resnet-scratch", "resnet", "pretrain_resnet.py",
                        ["--init", "scratch", "--skip-pretrain", "--no-compare"], "finetune"))
        rows.append(Row(f"{split}_resnet-cam16", split, "resnet-cam16", "resnet", "pretrain_resnet.py",
                        ["--init", "scratch", "--no-compare"], "finetune"))
        if imagenet_weights is not None or include_imagenet:
            rows.append(Row(f"{split}_resnet-imagenet-cam16", split, "resnet-imagenet-cam16", "resnet",
                            "pretrain_resnet.py", ["--init", str(imagenet_weights), "--no-compare"], "finetune"))
    return rows


def row_names_text() -> str:
    """The row names for --help, brace-compressed: SPLIT_METHOD_RECIPE and SPLIT_resnet-..."""
    splits = "{" + ",".join(SPLIT_ORDER) + "}"
    unlabeled = ",".join(dict.fromkeys((*SSL_METHODS, *SEMI_METHODS)))
    return (f"{splits}_{{{','.join(CNN_METHODS)}}}_{{{','.join(CNN_RECIPES)}}}, {splits}_{{{unlabeled}}}_default, "
            f"{splits}_{{resnet-scratch,resnet-cam16}}, and with --imagenet-weights {splits}_resnet-imagenet-cam16")


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
    chosen = [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]
    teachers = {teacher_name(r) for r in chosen if r.method in TEACHERS}  # a distilled row brings its teacher's
    return [r for r in rows if r in chosen or r.name in teachers]


def teacher_name(row: Row) -> str:
    """The row whose run of the same seed teaches a distilled row (TEACHERS)."""
    return f"{row.split}_{TEACHERS[row.method]}_{row.recipe}"


def teacher_row(row: Row) -> Row:
    return next(r for r in all_rows() if r.name == teacher_name(row))


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="reproduce_table.py")
    cli.add_data_args(parser, split=False)
    g = parser.add_argument_group("the table")
    g.add_argument("--rows", default=None,
                   help=f"comma-separated row names or patterns (default: every row; on the demo data "
                        f"'{DEMO_ROWS}'). Rows: {row_names_text()}")
    g.add_argument("--seeds", type=int, default=None, help="seeds per row, 0..K-1 (default 3; 2 on the demo data)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs per run (default 30; 6 on the demo data)")
    g.add_argument("--pretrain-epochs", type=int, default=None,
                   help="CAM16 pre-training epochs of the ResNet50 rows (default: --epochs; 1 on the demo data)")
    g.add_argument("--ssl-epochs", type=int, default=None,
                   help="pre-training epochs of the ssl rows (pretrain_ssl.py; default 30; 2 on the demo data)")
    g.add_argument("--ssl-image-size", type=int, default=None, metavar="PX",
                   help="image size of the ssl rows' pre-training (default: --image-size). The encoder is "
                        "convolutional, so a smaller size buys more epochs for the same time; random resized crops "
                        "enlarge the cells, so an encoder trained smaller sees them near the classifier's scale "
                        "(Touvron et al., NeurIPS 2019)")
    g.add_argument("--ssl-views", choices=tuple(SSL_VIEWS), default="simclr",
                   help="two views of the ssl rows' pre-training: simclr = pretrain_ssl.py's defaults (hue shifts, "
                        "20%% grey views); keep-hue = the same without hue shifts or grey views")
    g.add_argument("--ssl-unlabeled", type=Path, nargs="+", default=[], metavar="DIR",
                   help="more folders for the ssl rows' pre-training pool, searched recursively, labels ignored "
                        "(another lab's images, the course's pRCC_nolabel/ or CAM16 folders; default: none)")
    g.add_argument("--freeze-epochs", type=int, default=None, metavar="N",
                   help="first epochs of the ssl rows that train the new head alone, the encoder frozen, within "
                        "--epochs (train_cnn.py's option): a random head's first gradients would otherwise rewrite "
                        "the pre-trained features (default: 5, at most half of --epochs; 0: all trained at once; "
                        "--epochs: the encoder stays frozen, only the head learns)")
    g.add_argument("--finetune-lr", type=float, default=None, metavar="LR",
                   help="learning rate of the ssl rows' epochs after --freeze-epochs (train_cnn.py's option; "
                        "default: the recipe's --lr)")
    g.add_argument("--frozen-blocks", type=int, default=0, metavar="K",
                   help="the ssl rows' first K encoder blocks stay frozen in every epoch (train_cnn.py's option)")
    g.add_argument("--class-weight-power", type=float, default=None, metavar="P",
                   help="every row's class weights (train_cnn.py's option; 1: fully balanced; default: each "
                        "recipe's own)")
    g.add_argument("--unlabeled-ratio", type=int, default=7, metavar="MU",
                   help="unlabeled images per labelled image in each step of the semi rows (train_cnn.py's option)")
    g.add_argument("--semi-pool", choices=SEMI_POOLS, default="train",
                   help="unlabeled pool of the semi rows: train = WBC_100's training images, labels ignored (the "
                        "labelled splits' own population and class mix); all = also ROOT/WBC_unlabeled (the images "
                        "the course proportions leave out: another class mix)")
    g.add_argument("--thresholds", choices=THRESHOLDS, default="fixed",
                   help="pseudo-label bars of the semi rows (train_cnn.py's option)")
    g.add_argument("--batch-size", type=int, default=32, help="images per step")
    g.add_argument("--holdout", type=float, default=0.15,
                   help="fraction of each training class held out for model selection")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="passed to every run")
    g.add_argument("--imagenet-weights", default=None, metavar="PATH",
                   help="Keras ResNet50 ImageNet weights without top (.h5 file, or 'imagenet' to let Keras "
                        "download them): adds the ImageNet -> CAM16 rows (default: none, no such rows)")
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
    c = parser.add_argument_group("several machines (docs/distributed.md)")
    c.add_argument("--list", action="store_true",
                   help="print one command per (row, seed) run, train nothing: for a job array or xargs -P")
    c.add_argument("--shard", default=None, metavar="I/N",
                   help="train only runs I, I+N, I+2N, ... (0 <= I < N) of the table's run list (default: all); "
                        "shards may share OUT and run at the same time")
    args = parser.parse_args(argv)
    args.shard = parse_shard(args.shard)
    if args.report_only:
        args.demo = args.data is None
        if args.out is None:
            args.out = Path("runs/table_demo" if args.demo else "runs/table")
        return args
    # The demo's small budget: image size 32, 6 epochs, 2 seeds.
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
    if args.ssl_image_size is None:
        args.ssl_image_size = args.image_size
    if args.freeze_epochs is None:
        args.freeze_epochs = min(5, args.epochs // 2)
    if args.rows is None and args.demo:
        args.rows = DEMO_ROWS
    if args.out is None:
        args.out = Path("runs/table_demo" if args.demo else "runs/table")
    cli.check_positive(args, "seeds", "epochs", "pretrain_epochs", "ssl_epochs", "batch_size", "bootstrap", "jobs",
                       "unlabeled_ratio")
    cli.check_image_size(args.ssl_image_size, "--ssl-image-size")
    cli.check_non_negative(args, "freeze_epochs", "frozen_blocks", "class_weight_power")
    cli.check_unlabeled_folders(args.ssl_unlabeled, "--ssl-unlabeled")
    args.ssl_unlabeled = [str(folder.resolve()) for folder in args.ssl_unlabeled]
    cli.check_freeze_args(args.freeze_epochs, args.epochs, args.finetune_lr, args.frozen_blocks,
                          recipes.RECIPES["default"]["depth"])
    if args.imagenet_weights not in (None, "imagenet"):
        args.imagenet_weights = Path(args.imagenet_weights).resolve()
        if not args.imagenet_weights.is_file():
            raise UserError(f"--imagenet-weights {args.imagenet_weights}: no such file (expected ResNet50 "
                            f"ImageNet weights, e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5)")
    return args


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N); None -> (0, 1), the whole table."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text}: expected I/N, e.g. 0/4 (this is shard I of N, 0 <= I < N)") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {text}: expected 0 <= I < N")
    return index, count


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
        if "unlabeled_ratio" in old:  # written before --semi-pool existed: its semi rows used every folder
            old.setdefault("semi_pool", "all")
        if "ssl_epochs" in old:  # written before --ssl-views existed: pretrain_ssl.py's own views
            old.setdefault("ssl_views", "simclr")
            old.setdefault("ssl_unlabeled", [])
            old.setdefault("finetune_lr", None)
        old.setdefault("frozen_blocks", 0)  # written before these options existed: neither was passed
        old.setdefault("class_weight_power", None)
        if "image_size" in old:  # written before --ssl-image-size: pre-trained at the table's own size
            old.setdefault("ssl_image_size", old["image_size"])
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
    if row.method in SSL_METHODS:
        cmd += ["--init", str(ssl_folder(out, seed) / "encoder.h5")]
        if args.freeze_epochs:
            cmd += ["--freeze-epochs", str(args.freeze_epochs)]
        if args.finetune_lr is not None:
            cmd += ["--finetune-lr", str(args.finetune_lr)]
        if args.frozen_blocks:
            cmd += ["--frozen-blocks", str(args.frozen_blocks)]
    if args.class_weight_power is not None:
        cmd += ["--class-weight-power", str(args.class_weight_power)]
    if row.method in SEMI_METHODS:
        cmd += ["--unlabeled", *map(str, unlabeled_pool(args.data, args.semi_pool)),
                "--unlabeled-ratio", str(args.unlabeled_ratio)]
        if row.method in TEACHERS:
            cmd += ["--teacher", str(metrics_folder(out, teacher_row(row), seed) / "model.h5")]
        else:
            cmd += ["--thresholds", args.thresholds]
    if args.cache_dir is not None:
        cmd += ["--cache-dir", str(args.cache_dir)]
    if args.no_cache:
        cmd += ["--no-cache"]
    if args.max_pixels != cli.DEFAULT_MAX_PIXELS:
        cmd += ["--max-pixels", str(args.max_pixels)]
    return cmd


def claim_path(out: Path, row: Row, seed: int) -> Path:
    return out / "claims" / f"{row.name}_seed{seed}.claim"


def claim(path: Path) -> bool:
    """Atomically claim one run for this process (O_CREAT | O_EXCL works on local and NFS v3+ filesystems):
    True when claimed; False when another live process holds it. A claim left by a dead process on this host is
    taken over; one from another host is respected (remove the file by hand if that host's job is gone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _stale(path):
                return False
            with contextlib.suppress(FileNotFoundError):  # two processes clearing it: one rename wins
                os.rename(path, path.with_name(f"{path.name}.stale-{holder['host']}-{holder['pid']}"))
                os.unlink(path.with_name(f"{path.name}.stale-{holder['host']}-{holder['pid']}"))
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        return True
    return False


def _stale(path: Path) -> bool:
    """A claim whose process, on this host, no longer runs. An unreadable claim is being written: live."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def unlabeled_pool(root: Path, pool: str = "train") -> list[Path]:
    """The semi rows' unlabeled folders: WBC_100's training images (its masks are left out), and with pool 'all'
    ROOT/WBC_unlabeled (prepare_splits.py --unlabeled) when it exists.

    Why 'train' is the default: FixMatch assumes the unlabeled images come from the labelled ones' population.
    WBC_100's training images do (the smaller splits are drawn from them in the same class shares); WBC_unlabeled
    holds what the course proportions leave out, mostly the rarer classes (16% basophils on PBC against 2% in the
    splits), and its pseudo-labels pulled WBC_1's neutrophils into the rare classes (docs/ssl.md)."""
    import data
    train = data.find_split(root, "WBC_100").train.root
    extra = Path(root) / "WBC_unlabeled"
    return [train] + ([extra] if pool == "all" and extra.is_dir() else [])


def ssl_folder(out: Path, seed: int) -> Path:
    return out / "runs" / f"ssl_pretrain_seed{seed}"


def ssl_command(seed: int, args, out: Path) -> list[str]:
    """Pre-training for the ssl rows of one seed: WBC_100's training images (labels ignored; the probe uses them),
    ROOT/WBC_unlabeled (prepare_splits.py --unlabeled) when it exists, and the --ssl-unlabeled folders."""
    cmd = [sys.executable, str(PROJECT / "pretrain_ssl.py"), "--data", str(args.data), "--split", "WBC_100",
           "--image-size", str(args.ssl_image_size), "--epochs", str(args.ssl_epochs), "--precision", args.precision,
           "--seed", str(seed), "--out", str(ssl_folder(out, seed)), "--resume", "--quiet",
           *SSL_VIEWS[args.ssl_views]]
    pool = [str(Path(args.data) / "WBC_unlabeled")] if (Path(args.data) / "WBC_unlabeled").is_dir() else []
    pool += args.ssl_unlabeled
    if pool:
        cmd += ["--unlabeled", *pool]
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


def table_runs(rows: list[Row], args, missing=()) -> list[tuple[Row, int]]:
    """This process's (row, seed) runs: seed by seed, so an interrupted table has every row of the first seeds;
    with --shard I/N every N-th from the I-th, a share that depends only on the arguments, not on timing."""
    index, count = args.shard
    return [(r, s) for s in range(args.seeds) for r in rows if r.script not in missing][index::count]


def train_rows(rows: list[Row], args, out: Path) -> list[dict]:
    """Train every unfinished (row, seed); returns the failures. Rows whose script is absent are skipped."""
    missing = sorted({r.script for r in rows if not (PROJECT / r.script).exists()})
    for script in missing:
        names = [r.name for r in rows if r.script == script]
        print(f"note: {script} is not in {PROJECT}; skipping {len(names)} rows ({names[0]} ...)")
    todo = table_runs(rows, args, missing)
    index, count = args.shard
    pending = [(r, s) for r, s in todo if not is_complete(out, r, s)]
    share = f" (shard {index}/{count})" if count > 1 else ""
    print(f"{len(todo)} runs{share}: {len(todo) - len(pending)} finished, {len(pending)} to train -> {out}/runs")
    ssl_seeds = sorted({s for r, s in pending if r.method in SSL_METHODS})
    if args.dry_run:
        for seed in ssl_seeds:
            if not (ssl_folder(out, seed) / "metrics.json").exists():  # a finished encoder is reused
                print(" ".join(ssl_command(seed, args, out)))
        for row, seed in pending:
            print(shlex.join(command(row, seed, args, out)))
        return []
    import threading
    ssl_locks = {seed: threading.Lock() for seed in ssl_seeds}

    def run_one(row: Row, seed: int) -> tuple[int | None, float, Path]:
        folder = run_folder(out, row, seed)
        log = folder.parent / f"{folder.name}.log"
        path = claim_path(out, row, seed)
        if not claim(path):
            return None, 0.0, log  # another table process is training it
        try:
            if is_complete(out, row, seed):  # finished by another process since the list was made
                return 0, 0.0, log
            start = time.perf_counter()
            if row.method in SSL_METHODS:
                code = pretrain_once(seed, log)
                if code != 0:
                    return code, time.perf_counter() - start, log
            if row.method in TEACHERS:
                code = teacher_once(teacher_row(row), seed)
                if code != 0:
                    return code, time.perf_counter() - start, log
            code = launch(command(row, seed, args, out), log, args.jobs)
            return code, time.perf_counter() - start, log
        finally:
            path.unlink(missing_ok=True)

    def pretrain_once(seed: int, log: Path) -> int:
        """One pre-training per seed, shared by that seed's ssl rows, in this process and across shards."""
        encoder = ssl_folder(out, seed)
        with ssl_locks[seed]:
            while not (encoder / "metrics.json").exists():
                held = out / "claims" / f"{encoder.name}.claim"
                if claim(held):
                    try:
                        if not (encoder / "metrics.json").exists():
                            return launch(ssl_command(seed, args, out), log, args.jobs)
                    finally:
                        held.unlink(missing_ok=True)
                else:
                    time.sleep(5)  # another table process pre-trains this seed
        return 0

    def teacher_once(teacher: Row, seed: int) -> int:
        """The teacher's run finished before its student starts: trained here, or awaited when another thread or
        table process holds it; its failure is the student's."""
        while not is_complete(out, teacher, seed):
            code, _, _ = run_one(teacher, seed)
            if code is None:
                time.sleep(5)
            elif code != 0:
                return code
            elif not is_complete(out, teacher, seed):
                return 1  # it ended without a finished run folder: never relaunched in a loop
        return 0

    def report(i: int, row: Row, seed: int, code: int | None, seconds: float, log: Path):
        prefix = f"[{i}/{len(pending)}] {row.name} seed {seed}"
        if code is None:
            holder = claim_path(out, row, seed)
            print(f"{prefix}: skipped, claimed by another process ({holder})", flush=True)
            return None
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


# ----------------------------------------------------------------------------------------------
# Writing the results folder
# ----------------------------------------------------------------------------------------------

def write_results(out: Path, rows: list[Row], config: dict, failures: list[dict], n_resamples: int) -> list[dict]:
    """results.csv, table.md, comparisons.md and label_efficiency.png from the finished runs of `rows`."""
    import metrics
    import report
    from runfiles import atomic_write_text
    records = collect(out, rows)
    if not records:
        raise UserError(f"{out}/runs: no finished runs to report (train some first: reproduce_table.py "
                        f"--out {out} ...)")
    atomic_write_text(out / "results.csv", report.results_csv(records))
    atomic_write_text(out / "table.md", report.table_md(records, config, failures, CONFIG_KEYS, SPLIT_ORDER))
    comparisons = metrics.paired_comparisons(records, PAIRS, SPLIT_ORDER, n_resamples)
    atomic_write_text(out / "comparisons.md", report.comparisons_md(comparisons, config, n_resamples, SPLIT_ORDER))
    report.plot_table_label_efficiency(records, out / "label_efficiency.png", config.get("demo", False))
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
    if args.list:
        for row, seed in table_runs([r for r in rows if (PROJECT / r.script).exists()], args):
            print(shlex.join(command(row, seed, args, out.resolve())))
        return 0
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
