"""What every command-line script shares: argument groups with the same names everywhere, demo-data
defaults, run-folder naming, loading a WBC split, and the rule that a user's mistake ends in one line, exit 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import recipes  # noqa: E402
from data import MASK_FILLS, MASK_MODES  # noqa: E402
from runfiles import UserError  # noqa: E402


def import_keras_quietly():
    """Called by a script once its arguments are checked, so that --help and a mistyped option answer at once.

    Import Keras (and TensorFlow, its default backend) with stderr silenced at the file-descriptor level:
    TensorFlow's C++ start-up lines ('oneDNN custom operations are on', absl notices) ignore
    TF_CPP_MIN_LOG_LEVEL, and a user's terminal or an error line should not start with them."""
    if "keras" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


EXIT_USER_ERROR = 2


def run_main(main):
    """Call main(); a UserError becomes one line on stderr and exit status 2, never a traceback."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: finished epochs are kept; rerun with the same arguments and --resume to continue",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (argparse's own code), without the usage dump."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def make_parser(description: str, prog: str | None = None) -> Parser:
    return Parser(description=description, prog=prog,
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_data_args(parser, split=True, image_size=True, masks=False):
    g = parser.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None,
                   help="dataset root in the course layout (ROOT/WBC_100/train/data/<Class>/...); "
                        "default: the built-in synthetic demo data")
    if split:
        g.add_argument("--split", default="WBC_100", help="training split: WBC_100, WBC_50, WBC_10 or WBC_1")
    if image_size:
        g.add_argument("--image-size", type=int, default=None,
                       help="square side images are resized to (default 224; 64 on the demo data)")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="where decoded images are cached (default $WBC_CACHE_DIR or ~/.cache/wbc_keras)")
    g.add_argument("--no-cache", action="store_true", help="decode into memory only, write no cache")
    if masks:
        g.add_argument("--masks", choices=MASK_MODES, default="replace",
                       help="none: raw images; only: the masked subset alone; replace: masked images replace "
                            "their raw originals (the report's 'merged'); add: masked copies beside the originals")
        g.add_argument("--mask-fill", choices=MASK_FILLS, default="black",
                       help="what replaces the pixels outside the cell")
    return g


def add_training_args(parser, epochs=None, batch_size=32):
    """Options marked 'from --recipe' default to None here and are filled in by recipes.apply_recipe."""
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs (default depends on the data)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per step")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (from --recipe)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="learning-rate schedule over the whole run (from --recipe)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW) when > 0")
    g.add_argument("--label-smoothing", type=float, default=None,
                   help="label smoothing of the cross-entropy (from --recipe)")
    g.add_argument("--seed", type=int, default=0, help="seed for the hold-out split, initialisation, shuffling "
                                                        "and augmentation")
    g.add_argument("--min-steps", type=int, default=None,
                   help="at least this many optimizer steps per epoch: small splits pass over their images "
                        "several times per epoch (0: one pass; from --recipe)")
    g.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="before each epoch's evaluation, recompute batch-norm statistics from N un-augmented "
                        "training images (0: keep the training-time moving averages; from --recipe)")
    g.add_argument("--holdout", type=float, default=0.15,
                   help="fraction of each training class held out for model selection (0: train on all, "
                        "select the last epoch); the validation set is never used to select")
    g.add_argument("--class-weight", dest="class_weight", action="store_const", const=True, default=None,
                   help="weight the loss by inverse class frequency (from --recipe)")
    g.add_argument("--no-class-weight", dest="class_weight", action="store_const", const=False,
                   help="do not weight the loss by inverse class frequency")
    g.add_argument("--class-weight-power", type=float, default=None,
                   help="exponent on the inverse-frequency weights: 1 = fully balanced, 0.5 = square root "
                        "(from --recipe)")
    g.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"), default="auto",
                   help="auto: mixed_bfloat16 on GPUs and bf16-capable CPUs, else float32")
    g.add_argument("--loader", choices=("cached", "generator"), default="cached",
                   help="cached: decode once, augment on the device; generator: the report's "
                        "ImageDataGenerator pipeline, decoding from disk every epoch (TensorFlow only)")
    return g


def add_augmentation_args(parser):
    g = parser.add_argument_group("augmentation (ImageDataGenerator's meanings; applied on the device while "
                                  "training only)")
    g.add_argument("--rotation", type=float, default=None,
                   help="random rotation range, degrees (+/-) (from --recipe)")
    g.add_argument("--shear", type=float, default=None, help="random shear range, degrees (+/-) (from --recipe)")
    g.add_argument("--zoom", type=float, default=None, help="random zoom range, fraction (+/-) (from --recipe)")
    g.add_argument("--shift", type=float, default=None,
                   help="random shift range, fraction of the side (+/-) (from --recipe)")
    g.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    g.add_argument("--no-vflip", action="store_true", help="no random vertical flips")
    g.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    return g


def add_output_args(parser):
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None,
                   help="run folder (default runs/<script>_<split>_seed<seed>, numbered if taken)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (or the newest default run folder) after its last "
                        "finished epoch")
    g.add_argument("--quiet", action="store_true", help="print only the summary")
    return g


def resolve_data(args, demo_image_size: int = 64, real_image_size: int = 224) -> Path:
    """--data, or the demo data (generated on first use); fills in --image-size by which one it is."""
    is_demo = args.data is None
    if is_demo:
        import demo_data
        args.data = demo_data.ensure_demo_data()
    args.demo = is_demo
    if getattr(args, "image_size", "absent") is None:
        args.image_size = demo_image_size if is_demo else real_image_size
    if getattr(args, "image_size", 1) is not None and not 8 <= args.image_size <= 2048:
        raise UserError(f"--image-size {args.image_size}: expected a side between 8 and 2048 pixels")
    return args.data


def resolve_run_dir(args, name: str) -> Path:
    """The run folder: --out as given; else runs/<name>, numbered (-2, -3, ...) so no run is overwritten.
    With --resume and no --out: the newest numbered folder of that name."""
    if args.out is not None:
        return Path(args.out)
    base = Path("runs") / name
    taken = [base] + sorted(base.parent.glob(base.name + "-*"), key=lambda p: _suffix_number(p, base))
    taken = [p for p in taken if p.exists() and _suffix_number(p, base) >= 0]
    if args.resume and taken:
        return taken[-1]
    if not taken:
        return base
    return base.parent / f"{base.name}-{_suffix_number(taken[-1], base) + 1 if taken[-1] != base else 2}"


def _suffix_number(path: Path, base: Path) -> int:
    if path == base:
        return 1
    tail = path.name[len(base.name) + 1:]
    return int(tail) if tail.isdigit() else -1


def load_wbc_split(args, mask_mode: str = "none", mask_fill: str = "black", verbose: bool = True):
    """Find and decode one WBC split: (train ImageSet, val ImageSet). Prints the class counts."""
    import data
    files = data.find_split(args.data, args.split)
    kw = dict(size=args.image_size, cache_dir=args.cache_dir, use_cache=not args.no_cache, verbose=verbose,
              frame_share=getattr(args, "frame_cell", 0.0) or 0.0)
    train = data.load_images(files.train, mask_mode=mask_mode, mask_fill=mask_fill, name=f"{args.split} train", **kw)
    val = data.load_images(files.val, name="val", **kw)
    if verbose:
        print(f"{args.split} train: {len(train)} images {train.counts()}")
        print(f"val: {len(val)} images {val.counts()}")
    return train, val


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a positive number")


def check_non_negative(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a number >= 0")


def args_dict(args) -> dict:
    """Parsed arguments as JSON-friendly values, for args.json and the model's metadata."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def add_cnn_training_args(parser):
    """The options after the data group that every CNN training script shares (train_masked.py too)."""
    recipes.add_cnn_args(parser)
    add_training_args(parser)
    add_augmentation_args(parser)
    add_output_args(parser)


def resolve_cnn_args(args):
    """Fill recipe defaults, the data root and the epoch budget (12 on the demo data, 30 otherwise); validate."""
    recipes.apply_recipe(args)
    resolve_data(args)
    if args.epochs is None:
        args.epochs = 12 if args.demo else 30
    check_positive(args, "epochs", "batch_size", "lr")
    check_non_negative(args, "class_weight_power", "bn_recalibrate")
    return args


def add_domain_args(parser):
    """Levers for models that must work on other labs' microscopes (docs/microscopes.md)."""
    g = parser.add_argument_group("other microscopes (docs/microscopes.md)")
    g.add_argument("--norm", choices=("batch", "group", "layer"), default="batch",
                   help="normalisation after each convolution where the recipe has one (the default recipe's: batch); "
                        "group / layer norm use no batch statistics and turn it on with --recipe report too")
    g.add_argument("--stain-norm", choices=("none", "reinhard"), default="none",
                   help="reinhard: each image's colour mean and std matched to the training set's, by built-in "
                        "layers inside the saved model (stain.py)")
    g.add_argument("--stain-jitter", type=float, default=0.0, metavar="S",
                   help="while training, scale each image's haematoxylin / eosin amounts by U(1-S, 1+S) and shift "
                        "them by U(-S, S) (0: off; e.g. 0.05 light, 0.2 strong)")
    g.add_argument("--frame-cell", type=float, default=0.0, metavar="SHARE",
                   help="decode each image as a frame centred on its white cell, the nucleus (found by its stain) "
                        "spanning SHARE of the side, in training and whenever the model is used (0: off)")
    return g


def resolve_domain_args(args):
    """Check add_domain_args' values; --norm group|layer turns normalisation on."""
    if args.norm in ("group", "layer"):
        args.batchnorm = True
    if not 0 <= args.stain_jitter < 1:
        raise UserError(f"--stain-jitter {args.stain_jitter}: expected a strength in [0, 1)")
    if not 0 <= args.frame_cell <= 1:
        raise UserError(f"--frame-cell {args.frame_cell}: expected a share of the frame in (0, 1], or 0 for off")
    return args
