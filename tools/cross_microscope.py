"""Cross-microscope benchmark: train on PBC, test on BCCD (another lab, another microscope), one run per lever.

    python prepare_splits.py ../shared/data/pbc OUT --proportions course
    nice -n 10 python tools/cross_microscope.py --data OUT --out runs/cross_microscope     # docs/microscopes.md
    # the self-supervised encoder's levers (one pretrain_ssl.py encoder per seed), as measured in docs/microscopes.md:
    nice -n 10 python tools/cross_microscope.py --data OUT --out runs/cross_microscope --splits WBC_100 \
        --levers ssl_frozen ssl_lpft ssl_frozen+lpft --seeds 0 1 2 --image-size 96 --epochs 30 --holdout 0 \
        --encoder runs/ssl_mixed/runs/ssl_pretrain_seed{seed}/encoder.h5

For every split (--splits), lever (--levers) and seed it runs train_cnn.py as a user would (run folder under
--out), then evaluates the selected model on the PBC validation images and on every BCCD crop (masks unused; BCCD
is never seen in training, not even unlabeled), plainly, with 8-view test-time augmentation and, separately, with
batch-norm statistics adapted on the BCCD images themselves (adaptation, not part of the targets). It writes
results.csv (one row per run, target and mode, over every run under --out: accuracy, balanced accuracy, macro-F1, confusion matrix, the
out-of-distribution warning the model gives) and summary.md (mean ± std over seeds). BCCD is a test set: levers are chosen on
principle and every one tried is reported; nothing here selects on it. A finished run folder is not retrained.

With --encoder (a pretrain_ssl.py encoder.h5; `{seed}` in it is replaced by the run's seed) three more levers, on
top of the default recipe: ssl_frozen (the encoder frozen throughout: --init E --freeze-epochs EPOCHS), ssl_lpft
(linear probe, then fine-tuning: --init E --freeze-epochs 5 --finetune-lr 2e-4) and ssl_frozen+lpft, which trains
nothing of its own: the seed's ssl_frozen and ssl_lpft models (trained first where they are not finished, in those
levers' folders), their probabilities averaged by tools/ensemble.py into its own run folder, evaluated like any other.
ssl_frozen_blocks (frozen, the head on every block's pooled output), ssl_lpft_frozen_bn (LP-FT with the encoder's
batch norm kept as pre-trained: --frozen-bn) and their ensembles with ssl_lpft / ssl_frozen are the variants measured
after those; ssl_noisy_student (an LP-FT student distilled on PBC's unlabeled pool from the seed's ssl_frozen+lpft
model, colour-jittered: train_cnn.py --teacher) the one after them; ssl_frozen_color (frozen, the head trained on
colour-jittered images) and its ensemble with ssl_lpft the last.
A finished run is reused whatever encoder it started from (its args.json records it): a new encoder, a new --out.
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
    # Feature-statistics noise in the early blocks (DSU, Li et al., ICLR 2022, at its own probability 0.5): style
    # varied inside the network, where the colour levers above vary it only in the pixels.
    "framing+stain+style_noise": ["--frame-cell", "0.5", "--stain-norm", "reinhard", "--stain-jitter", "0.2",
                                  "--style-noise", "0.5"],
    # The model reads only the nucleus map the cell finder uses (darkness x chroma, standardised per image; framing
    # finds the same nucleus under colour changes and blur): shape and granules without the lab's colours.
    "framing+stain+nucleus_view": ["--frame-cell", "0.5", "--stain-norm", "reinhard", "--stain-jitter", "0.2",
                                   "--nucleus-view"],
}
# The levers that start from a self-supervised encoder (--encoder), on the default recipe as the measured runs were
# (docs/microscopes.md): frozen throughout, LP-FT (5 head-only epochs, then everything at a lower rate: Kumar et al.,
# ICLR 2022), and the two averaged (an output ensemble: tools/ensemble.py). Arguments after --init ENCODER.
LPFT_FREEZE_EPOCHS = 5


def _frozen(args) -> list[str]:
    return ["--freeze-epochs", str(args.epochs)]


def _lpft(args) -> list[str]:
    return ["--freeze-epochs", str(LPFT_FREEZE_EPOCHS), "--finetune-lr", "2e-4"]


ENCODER_LEVERS = {
    "ssl_frozen": _frozen,
    "ssl_lpft": _lpft,
    # frozen throughout, the head reading every block's pooled output (models.build_cnn's pooling='blocks')
    "ssl_frozen_blocks": lambda args: [*_frozen(args), "--pooling", "blocks"],
    # LP-FT with the encoder's batch norm kept as pre-trained (the pool's statistics, not one lab's)
    "ssl_lpft_frozen_bn": lambda args: [*_lpft(args), "--frozen-bn"],
    # frozen throughout, the head trained on colour-jittered images (0.5, hue included: the part of the supervised
    # colour jitter that moved BCCD): the encoder's views kept the hue, so its features vary with it, and only a
    # head that sees hue-turned cells can learn to lean on the features that do not
    "ssl_frozen_color": lambda args: [*_frozen(args), "--color-jitter", "0.5"],
}
ENSEMBLES = {"ssl_frozen+lpft": ("ssl_frozen", "ssl_lpft"),  # no training of their own: their members averaged
             "ssl_frozen_blocks+lpft": ("ssl_frozen_blocks", "ssl_lpft"),
             "ssl_frozen+lpft_frozen_bn": ("ssl_frozen", "ssl_lpft_frozen_bn"),
             "ssl_frozen_color+lpft": ("ssl_frozen_color", "ssl_lpft")}
# Noisy Student (Xie et al., CVPR 2020; the distillation of SimCLRv2's third step): a student started as ssl_lpft is
# trained on the PBC pool (ROOT/WBC_unlabeled when present, and WBC_100's training images, labels ignored; never
# BCCD) towards the teacher lever's probabilities on each clean pool image, while it sees them noised: the run's
# augmentation plus colour jitter (0.5, the supervised lever measured here). One pool image per labelled one.
STUDENTS = {"ssl_noisy_student": ("ssl_frozen+lpft", ["--color-jitter", "0.5", "--unlabeled-ratio", "1"])}
NEEDS_ENCODER = [*ENCODER_LEVERS, *ENSEMBLES, *STUDENTS]
ALL_LEVERS = [*LEVERS, *NEEDS_ENCODER]
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
    parser.add_argument("--levers", nargs="+", choices=ALL_LEVERS, default=None,
                        help=f"default: {' '.join(LEVERS)}; with --encoder also {' '.join(NEEDS_ENCODER)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--holdout", type=float, default=None,
                        help="passed to train_cnn.py (the measured encoder runs: 0); default: train_cnn.py's own")
    parser.add_argument("--encoder", default=None, metavar="PATH",
                        help="a pretrain_ssl.py encoder.h5 for the levers " + ", ".join(NEEDS_ENCODER) +
                             "; {seed} in it is replaced by the run's seed (one encoder per seed)")
    parser.add_argument("--tta", type=int, default=8, help="views of the test-time-augmentation rows (1: none)")
    args = parser.parse_args(argv)
    if args.levers is None:
        args.levers = list(LEVERS) + (NEEDS_ENCODER if args.encoder else [])
    return args


def check_args(args):
    """Every refusal that needs no Keras, before any training: one line each."""
    if not args.bccd.is_dir():
        raise cli.UserError(f"--bccd {args.bccd}: no such folder (expected one sub-folder per class)")
    if args.holdout is not None and not 0 <= args.holdout < 1:
        raise cli.UserError(f"--holdout {args.holdout}: expected a fraction from 0 (train on all) to below 1")
    wanting = [lever for lever in args.levers if lever in NEEDS_ENCODER]
    if not wanting:
        return
    if args.encoder is None:
        raise cli.UserError(f"--levers {' '.join(wanting)}: these start from a self-supervised encoder "
                            "(expected --encoder PATH, a pretrain_ssl.py encoder.h5)")
    teachers = [STUDENTS[lever][0] for lever in wanting if lever in STUDENTS]
    trained = {member for lever in [*wanting, *teachers] for member in ENSEMBLES.get(lever, (lever,))}
    lpft = sorted(trained & {"ssl_lpft", "ssl_lpft_frozen_bn"})
    if args.epochs <= LPFT_FREEZE_EPOCHS and lpft:
        raise cli.UserError(f"--epochs {args.epochs}: LP-FT trains {LPFT_FREEZE_EPOCHS} head-only epochs before "
                            f"fine-tuning (expected --epochs above {LPFT_FREEZE_EPOCHS} for {' and '.join(lpft)})")
    for seed in args.seeds:
        path = encoder_path(args, seed)
        if not path.is_file():
            per_seed = f" for seed {seed}, from --encoder {args.encoder}" if "{seed}" in args.encoder else ""
            raise cli.UserError(f"{path}: no such encoder file{per_seed} (expected a pretrain_ssl.py encoder.h5)")


def encoder_path(args, seed: int) -> Path:
    """The seed's encoder: --encoder with {seed} replaced by the seed."""
    return Path(args.encoder.replace("{seed}", str(seed)))


def run_dir(args, split, lever, seed) -> Path:
    return args.out / "runs" / f"{split}_{lever}_seed{seed}"


def train_command(args, split, lever, seed) -> list[str]:
    """train_cnn.py's command line for one run of a training lever (paths absolute: it runs in the project)."""
    run = run_dir(args, split, lever, seed)
    cmd = [sys.executable, str(PROJECT / "train_cnn.py"), "--data", str(args.data.resolve()), "--split", split,
           "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--seed", str(seed),
           "--out", str(run.resolve()), "--quiet"]
    if args.holdout is not None:
        cmd += ["--holdout", str(args.holdout)]
    if lever in ENCODER_LEVERS:
        cmd += ["--init", str(encoder_path(args, seed).resolve()), *ENCODER_LEVERS[lever](args)]
    elif lever in STUDENTS:
        teacher, options = STUDENTS[lever]
        pool = [p for p in (args.data / "WBC_unlabeled", args.data / "WBC_100" / "train" / "data") if p.is_dir()]
        cmd += ["--init", str(encoder_path(args, seed).resolve()), *_lpft(args), *options,
                "--unlabeled", *(str(p.resolve()) for p in pool),
                "--teacher", str((run_dir(args, split, teacher, seed) / "model.h5").resolve())]
    else:
        cmd += LEVERS[lever]
    return cmd + (["--resume"] if run.exists() else [])


def train(args, split, lever, seed) -> Path:
    """The lever's finished run folder: trained here unless it holds metrics.json; an ensemble built from its
    members' runs (each trained first where needed)."""
    if lever in ENSEMBLES:
        return build_ensemble(args, split, lever, seed)
    if lever in STUDENTS:
        train(args, split, STUDENTS[lever][0], seed)  # the teacher first
    run = run_dir(args, split, lever, seed)
    if not (run / "metrics.json").exists():
        cmd = train_command(args, split, lever, seed)
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=PROJECT)
    return run


def build_ensemble(args, split, lever, seed) -> Path:
    """The members' models averaged by tools/ensemble.py (run as a user would) into RUN/model.h5, with a
    metrics.json that says it trained nothing: its train_seconds is the sum of its members'. Rebuilt when a
    member's model.h5 changes."""
    import runfiles
    run = run_dir(args, split, lever, seed)
    members = [train(args, split, member, seed) for member in ENSEMBLES[lever]]
    stamp = [{"lever": m, "model": str((r / "model.h5").resolve()),
              "model_mtime_ns": (r / "model.h5").stat().st_mtime_ns} for m, r in zip(ENSEMBLES[lever], members)]
    saved = run / "metrics.json"
    if saved.exists() and (run / "model.h5").exists() and json.loads(saved.read_text()).get("members") == stamp:
        return run
    run.mkdir(parents=True, exist_ok=True)
    saved.unlink(missing_ok=True)  # written last: an interrupted build is redone
    cmd = [sys.executable, str(PROJECT / "tools" / "ensemble.py"), *(str((r / "model.h5").resolve()) for r in members),
           "--out", str((run / "model.h5").resolve())]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=PROJECT)
    seconds = [json.loads((r / "metrics.json").read_text()).get("train_seconds") for r in members]
    runfiles.atomic_write_text(saved, json.dumps({
        "train_seconds": sum(seconds) if None not in seconds else None,
        "train_seconds_is": "the sum of its members' train_seconds: the ensemble itself trains nothing",
        "members": stamp}, indent=2))
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
                continue  # no trainable batch norm to adapt (group / layer norm; ssl_frozen's encoder is frozen)
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
    order = {lever: i for i, lever in enumerate(ALL_LEVERS)}
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
    check_args(args)
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
