"""What every command-line script shares: argument groups with the same names everywhere, demo-data
defaults, run-folder naming, loading a WBC split, and the rule that a user's mistake ends in one line, exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import augment  # noqa: E402
import devices  # noqa: E402
import recipes  # noqa: E402
from data import DEFAULT_MAX_PIXELS, MASK_FILLS, MASK_MODES  # noqa: E402
from devices import PRECISIONS  # noqa: E402
from runfiles import UserError  # noqa: E402
from semisup import THRESHOLDS  # noqa: E402


def import_keras_quietly(args=None):
    """Called by a script once its arguments are checked, so that --help and a mistyped option answer at once.
    With the script's args: --devices and the multi-host options are applied around the import
    (devices.prepare before, devices.start after).

    Import Keras (and TensorFlow, its default backend) with stderr silenced at the file-descriptor level:
    TensorFlow's C++ start-up lines ('oneDNN custom operations are on', absl notices) ignore
    TF_CPP_MIN_LOG_LEVEL, and a user's terminal or an error line should not start with them."""
    if args is not None:
        devices.prepare(args)
    if "keras" in sys.modules:
        if args is not None:
            devices.start()
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
    if args is not None:
        devices.start()


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
    except BrokenPipeError:
        # The reader went away (`... | head`): nothing is wrong with the run. Python's own advice: point stdout
        # at devnull so the flush at exit does not raise a second time, and exit 1.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code or 0)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (argparse's own code), without the usage dump."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's '(default: X)' after each option's help, except where it would mislead: an option whose
    default is None says in its own help what fills it (the data, the recipe), and a flag (--no-augment,
    --no-batchnorm) is off unless given, whatever argparse stores for it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "(default" in text:
            return text
        return super()._get_help_string(action)


def make_parser(description: str, prog: str | None = None) -> Parser:
    return Parser(description=description, prog=prog, formatter_class=HelpFormatter)


def describe_defaults(parser, texts: dict):
    """Append '(TEXT)' to the help of the option storing each dest in `texts` (its first option only: not
    to the --no-... twin), e.g. {'lr': 'default recipe 0.002, report recipe 0.001'}."""
    seen = set()
    for action in parser._actions:
        if action.dest in texts and action.dest not in seen and action.option_strings:
            seen.add(action.dest)
            action.help = f"{action.help} ({texts[action.dest].replace('%', '%%')})"


def given_options(parser, argv) -> set[str]:
    """The dests the command line sets itself (not by default): parsed again with every default suppressed."""
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)


def parse_run_args(parser, argv=None):
    """parse_args for a training script: remembers which options the command line set (args._given), and
    takes the rest from --config FILE (an earlier run's args.json) where given."""
    args = parser.parse_args(argv)
    args._given = given_options(parser, argv)
    if getattr(args, "config", None) is not None:
        take_config(args, parser)
    return args


# What a run's args.json holds that is not to be copied into another run by --config.
_NOT_FROM_CONFIG = {"out", "resume", "config", "cache_dir", "no_cache"}


def take_config(args, parser):
    """--config FILE: every option the command line leaves unset takes its value from FILE (an args.json, or a
    run folder holding one); the command line wins."""
    path = Path(args.config)
    if path.is_dir():
        path = path / "args.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {args.config}: no such file (expected a run folder or its args.json)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--config {args.config}: not a readable JSON file ({e})") from None
    if not isinstance(saved, dict):
        raise UserError(f"--config {args.config}: expected a JSON object of option values (a run's args.json)")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    for key, value in saved.items():
        if key not in actions or key in args._given or key in _NOT_FROM_CONFIG:
            continue
        if key == "data" and saved.get("demo"):
            continue  # the demo data: found again on this machine
        action = actions[key]
        if isinstance(value, str) and action.type is not None and action.nargs != 0:
            value = action.type(value)
        if action.choices is not None and value is not None and value not in action.choices:
            raise UserError(f"--config {args.config}: {key} {value!r} is not one of {', '.join(map(str, action.choices))}")
        setattr(args, key, value)


# Options that say how a run is watched, stored or fed, not what it trains: --resume may change them.
_RUN_INDEPENDENT = {"out", "resume", "config", "quiet", "cache_dir", "no_cache", "tensorboard", "test", "devices",
                    "epochs", "out_root"}


def check_resume(args, run_dir: Path):
    """--resume: the run's own arguments for every option the command line leaves unset, and one line naming
    each option the command line sets to another value than the run's (nothing is touched then). --epochs may
    grow (the run is extended), never shrink."""
    run_dir = Path(run_dir)
    found = [run_dir / "args.json"] + sorted(run_dir.glob("*/args.json"))
    found = [p for p in found if p.is_file()]
    if not found:
        return  # nothing trained yet: a fresh start
    try:
        saved = json.loads(found[0].read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{found[0]}: unreadable ({e}); cannot check the run's arguments") from None
    current = args_dict(args)
    given = getattr(args, "_given", set())
    problems = []
    for key, value in saved.items():
        if key not in current or key in _RUN_INDEPENDENT - {"epochs"}:
            continue
        asked = current[key]
        if key == "epochs":
            if key in given and value is not None and asked < value:
                problems.append(f"--epochs: run has {value}, asked {asked} (--epochs may grow, not shrink)")
            elif key not in given:
                args.epochs = value
            continue
        current_value = getattr(args, key)
        saved_value = _as_given(value, current_value)
        if saved_value is not value:  # paths: ROOT and ./ROOT are one folder
            same = _resolved(saved_value) == _resolved(current_value)
        else:
            same = asked == value
        if key in given and not (key == "precision" and asked == "auto") and not same:
            problems.append(f"--{key.replace('_', '-')}: run has {_show(value)}, asked {_show(asked)}")
        elif key not in given or asked == "auto":
            setattr(args, key, saved_value)
    if problems:
        raise UserError(f"{run_dir} was trained with other arguments; --resume continues a run as it was "
                        f"started: {'; '.join(problems)}")


def _as_given(value, current):
    """A value read from args.json in the type the parser gives its option: a path (or a list of paths) where
    the current value is one; anything else as it was read."""
    if isinstance(current, Path) and value is not None:
        return Path(value)
    if isinstance(value, list) and isinstance(current, list) and any(isinstance(v, Path) for v in current):
        return [Path(v) for v in value]
    return value


def _resolved(value):
    return [Path(v).resolve() for v in value] if isinstance(value, list) else Path(value).resolve()


def _show(value):
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


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
    add_max_pixels_arg(g)
    if masks:
        g.add_argument("--masks", choices=MASK_MODES, default="replace",
                       help="none: raw images; only: the masked subset alone; replace: masked images replace "
                            "their raw originals (the report's 'merged'); add: masked copies beside the originals")
        g.add_argument("--mask-fill", choices=MASK_FILLS, default="black",
                       help="what replaces the pixels outside the cell")
    return g


def add_max_pixels_arg(group):
    group.add_argument("--max-pixels", type=max_pixels_value, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help="skip any image that would decode to more pixels than this, checked from its header "
                            "before decoding (JPEGs count at libjpeg's reduced decoding size); guards against "
                            "decompression bombs and bounds memory per image")


def max_pixels_value(text: str) -> int:
    try:
        value = int(float(text)) if any(c in text.lower() for c in ".e") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of pixels, e.g. 50000000") from None
    if value < 64:
        raise argparse.ArgumentTypeError(f"{value}: expected at least 64 pixels")
    return value


def add_training_args(parser, epochs="12 on the demo data, 30 otherwise", batch_size=32):
    """Options defaulting to None are filled in later (recipes.apply_recipe, or the script); the script says
    with what through describe_defaults, so that --help shows each effective default."""
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {epochs})")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per step")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="learning-rate schedule over the whole run (cosine: to 1%% of --lr at the last epoch)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW) when > 0")
    g.add_argument("--label-smoothing", type=float, default=None,
                   help="label smoothing of the cross-entropy")
    g.add_argument("--seed", type=int, default=0, help="seed for the hold-out split, initialisation, shuffling "
                                                        "and augmentation")
    g.add_argument("--min-steps", type=int, default=None,
                   help="at least this many optimizer steps per epoch: small splits pass over their images "
                        "several times per epoch (0: one pass)")
    g.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="before each epoch's evaluation, recompute batch-norm statistics from N un-augmented "
                        "training images (0: keep the training-time moving averages)")
    g.add_argument("--holdout", type=float, default=0.15,
                   help="fraction of each training class held out for model selection (0: train on all, "
                        "select the last epoch); the validation set is never used to select")
    g.add_argument("--class-weight", dest="class_weight", action="store_const", const=True, default=None,
                   help="weight the loss by inverse class frequency")
    g.add_argument("--no-class-weight", dest="class_weight", action="store_const", const=False,
                   help="do not weight the loss by inverse class frequency")
    g.add_argument("--class-weight-power", type=float, default=None,
                   help="exponent on the inverse-frequency weights: 1 = fully balanced, 0.5 = square root")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: mixed_bfloat16 on GPUs and bf16-capable CPUs, else float32")
    g.add_argument("--loader", choices=("cached", "generator"), default="cached",
                   help="cached: decode once, augment on the device; generator: the report's "
                        "ImageDataGenerator pipeline, decoding from disk every epoch (TensorFlow only)")
    g.add_argument("--patience", type=int, default=0, metavar="N",
                   help="stop when N epochs pass without a better hold-out epoch (0: train every epoch); "
                        "never looks at the validation set")
    devices.add_device_args(parser.add_argument_group(
        "devices (docs/distributed.md; --batch-size is the global batch over all devices)"))
    return g


def add_augmentation_args(parser):
    g = parser.add_argument_group("augmentation (ImageDataGenerator's meanings; applied on the device while "
                                  "training only)")
    g.add_argument("--rotation", type=float, default=None, help="random rotation range, degrees (+/-)")
    g.add_argument("--shear", type=float, default=None, help="random shear range, degrees (+/-)")
    g.add_argument("--zoom", type=float, default=None, help="random zoom range, fraction (+/-)")
    g.add_argument("--shift", type=float, default=None, help="random shift range, fraction of the side (+/-)")
    g.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    g.add_argument("--no-vflip", action="store_true", help="no random vertical flips")
    g.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    g.add_argument("--color-jitter", type=float, default=0.0, metavar="S",
                   help="colour jitter of strength S on 80%% of the images: brightness, contrast and saturation "
                        "x[1-0.8S, 1+0.8S], hue +/-0.2S of a turn (0.5 = SimCLR's; 0: off)")
    g.add_argument("--hue-jitter", type=float, default=None, metavar="H",
                   help="the colour jitter's hue strength alone: hue +/-0.2H of a turn (default: --color-jitter's "
                        "S; 0: brightness, contrast and saturation jittered, the stain's hue kept)")
    g.add_argument("--grayscale", type=float, default=0.0, metavar="P", help="share of images made grey (0: off)")
    g.add_argument("--blur", type=float, default=0.0, metavar="P",
                   help="share of images blurred (Gaussian, sigma 0.1-2 px at 224 px, scaled with the side; 0: off)")
    g.add_argument("--crop-scale", type=float, default=1.0, metavar="MIN",
                   help="random resized crops of MIN to 1 of the image's area, resized back (1: off)")
    g.add_argument("--tight-crop", type=float, default=0.0, metavar="P",
                   help="share of images cut as another lab's tight crop would be: each edge cut by up to a "
                        "quarter of the side and filled with its edge pixels, as framing fills a frame that "
                        "leaves the picture (0: off; docs/microscopes.md)")
    g.add_argument("--random-conv", type=float, default=0.0, metavar="P",
                   help="share of images blended with a random convolution (RandConv: colours re-mixed, texture "
                        "and edges re-weighted, 1-5 px kernels; 0: off; docs/microscopes.md)")
    return g


def check_augmentation_args(args):
    """The photometric options: strengths and shares within their ranges; the legacy loader has none of them."""
    for name in augment.PHOTOMETRIC_KEYS:
        value = getattr(args, name, None)
        if name != "crop_scale" and value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a number between 0 and 1")
    if not 0.0 < getattr(args, "crop_scale", 1.0) <= 1.0:
        raise UserError(f"--crop-scale {args.crop_scale}: expected a fraction of the area in (0, 1]")
    if augment.photometric_on(args) and getattr(args, "loader", "cached") == "generator":
        raise UserError(f"{photometric_option_names()} run on the device: use --loader cached (the default), not "
                        "--loader generator")


def photometric_option_names(conjunction: str = "and") -> str:
    names = [f"--{key.replace('_', '-')}" for key in augment.PHOTOMETRIC_KEYS]
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


def add_output_args(parser, supervised: bool = True):
    """The run folder's options. supervised=False (pretrain_ssl.py): no --config, --test or --tensorboard, and
    --resume keeps a finished run but starts an unfinished one again."""
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None,
                   help="run folder (default runs/<script>_<split>_seed<seed>, numbered if taken)")
    if not supervised:
        g.add_argument("--resume", action="store_true",
                       help="keep the run in --out when it is finished; an unfinished one is trained again")
        g.add_argument("--quiet", action="store_true", help="print only the summary")
        return g
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (or the newest default run folder) after its last "
                        "finished epoch, with the run's own arguments (a different value for one of them is "
                        "refused); a larger --epochs extends a finished run")
    g.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="take every option not on the command line from FILE, an earlier run's args.json (or "
                        "its run folder), to repeat or vary that run (default: none)")
    g.add_argument("--test", type=Path, default=None, metavar="DIR",
                   help="evaluate the selected model once at the end on DIR (a folder per class, or a "
                        "course-layout root: its validation set of --split) into metrics.json under \"test\" "
                        "and test_predictions.csv (default: none)")
    g.add_argument("--tensorboard", action="store_true",
                   help="write TensorBoard logs to the run folder's tensorboard/: scalars per epoch, the "
                        "confusion matrix at the end (tensorboard --logdir RUN/tensorboard)")
    g.add_argument("--quiet", action="store_true", help="print only the summary")
    return g


def resolve_data(args, demo_image_size: int = 64, real_image_size: int = 224, generate: bool = True) -> Path:
    """--data, or the demo data (generated on first use; generate=False leaves that to ensure_data, called once
    every argument is checked); fills in --image-size by which one it is."""
    is_demo = args.data is None
    if is_demo:
        import demo_data
        args.data = demo_data.ensure_demo_data() if generate else demo_data.demo_root()
    elif not Path(args.data).exists():  # answered before Keras is imported, not seconds later
        raise UserError(f"--data {args.data}: no such folder")
    args.demo = is_demo
    if getattr(args, "image_size", "absent") is None:
        args.image_size = demo_image_size if is_demo else real_image_size
    if getattr(args, "image_size", None) is not None:
        check_image_size(args.image_size)
    return args.data


def check_image_size(side: int, flag: str = "--image-size"):
    if not 8 <= side <= 2048:
        raise UserError(f"{flag} {side}: expected a side between 8 and 2048 pixels")


def ensure_data(args):
    """The demo data generated on first use (a minute on a small CPU), once every argument is checked: a mistyped
    option answers at once on a fresh machine too."""
    if getattr(args, "demo", False):
        import demo_data
        demo_data.ensure_demo_data(args.data)


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


def decode_options(args) -> dict:
    """data.load_images' keywords for a run's images: its size, cache, pixel bound and framing."""
    return dict(size=args.image_size, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                max_pixels=getattr(args, "max_pixels", DEFAULT_MAX_PIXELS),
                frame_share=getattr(args, "frame_cell", 0.0) or 0.0)


def load_wbc_split(args, mask_mode: str = "none", mask_fill: str = "black", verbose: bool = True):
    """Find and decode one WBC split: (train ImageSet, val ImageSet). Prints the class counts."""
    import data
    files = data.find_split(args.data, args.split)
    kw = dict(decode_options(args), verbose=verbose)
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
    def plain(v):
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v
    return {k: plain(v) for k, v in vars(args).items() if not k.startswith("_")}


def load_test_set(args, classes):
    """--test DIR decoded like the training images (None without --test)."""
    if getattr(args, "test", None) is None:
        return None
    import data
    files = data.find_labelled(args.test, tuple(classes), getattr(args, "split", "WBC_100"))
    return data.load_images(files, name="test", verbose=not args.quiet, **decode_options(args))


def add_cnn_training_args(parser):
    """The options after the data group that every CNN training script shares (train_masked.py too)."""
    recipes.add_cnn_args(parser)
    add_training_args(parser)
    add_augmentation_args(parser)
    g = parser.add_argument_group("start from a pre-trained encoder")
    g.add_argument("--init", type=Path, default=None, metavar="ENCODER",
                   help="an encoder.h5 written by pretrain_ssl.py --model cnn, or a model.h5 written by "
                        "train_cnn.py (fine-tuned on this run's images; its head kept where the classes are the "
                        "same): its layers' weights, exactly, replace the fresh ones of the same names (default: "
                        "random initialisation)")
    g.add_argument("--freeze-epochs", type=int, default=0, metavar="N",
                   help="with --init: the first N of --epochs train the head alone, the encoder frozen "
                        "(written to RUN/head_frozen/); the rest train everything. N = --epochs: the encoder "
                        "stays frozen throughout, only the head learns (for a handful of labels)")
    g.add_argument("--finetune-lr", type=float, default=None, metavar="LR",
                   help="with --freeze-epochs: the learning rate of the epochs after the head-only ones, the "
                        "encoder trainable (default: --lr; smaller keeps the pre-trained features closer to what "
                        "they were: LP-FT, docs/microscopes.md)")
    g.add_argument("--frozen-blocks", type=int, default=0, metavar="K",
                   help="with --init: the encoder's first K convolution blocks stay frozen in every epoch (batch "
                        "norm included); the later blocks and the head learn (docs/microscopes.md)")
    g.add_argument("--frozen-bn", action="store_true",
                   help="with --init: the encoder's batch-norm layers stay as pre-trained in every epoch (statistics, "
                        "scale and offset): images are normalised as on the pre-training pool, not on this split's "
                        "(docs/microscopes.md)")
    add_output_args(parser)
    describe_defaults(parser, recipes.default_texts())


def resolve_cnn_args(args):
    """Fill recipe defaults, the data root and the epoch budget (12 on the demo data, 30 otherwise); validate."""
    recipes.apply_recipe(args)
    resolve_data(args, generate=False)  # generated by ensure_data, once the other scripts' checks passed too
    if args.epochs is None:
        args.epochs = 12 if args.demo else 30
    check_positive(args, "epochs", "batch_size", "lr")
    check_non_negative(args, "class_weight_power", "bn_recalibrate", "patience", "freeze_epochs", "frozen_blocks")
    check_augmentation_args(args)
    for option in ("freeze_epochs", "frozen_blocks", "frozen_bn"):
        value = getattr(args, option)
        if value and args.init is None:
            given = f"--{option.replace('_', '-')}" + ("" if value is True else f" {value}")
            raise UserError(f"{given}: needs --init ENCODER (a fresh encoder has nothing worth freezing)")
    check_freeze_args(args.freeze_epochs, args.epochs, args.finetune_lr, args.frozen_blocks, args.depth,
                      args.frozen_bn)
    if args.init is not None and not Path(args.init).is_file():
        raise UserError(f"--init {args.init}: no such file (expected an encoder.h5 written by pretrain_ssl.py or "
                        f"a model.h5 written by train_cnn.py)")
    return args


def check_freeze_args(freeze_epochs: int, epochs: int, finetune_lr: float | None, frozen_blocks: int = 0,
                      depth: int | None = None, frozen_bn: bool = False):
    """--freeze-epochs within --epochs (equal: the encoder frozen throughout); --finetune-lr only where epochs
    follow the head-only ones; --frozen-blocks fewer than the model's blocks (all of them: --freeze-epochs);
    --frozen-blocks and --frozen-bn only where the encoder trains at all."""
    if depth is not None and frozen_blocks >= depth:
        raise UserError(f"--frozen-blocks {frozen_blocks}: expected fewer than the model's {depth} blocks (to keep "
                        "the whole encoder frozen: --freeze-epochs equal to --epochs)")
    partly_frozen = [given for given, on in ((f"--frozen-blocks {frozen_blocks}", frozen_blocks),
                                             ("--frozen-bn", frozen_bn)) if on]
    if partly_frozen and freeze_epochs >= epochs:
        raise UserError(f"{partly_frozen[0]}: the encoder is frozen throughout already (--freeze-epochs "
                        f"{freeze_epochs} of --epochs {epochs})")
    if freeze_epochs > epochs:
        raise UserError(f"--freeze-epochs {freeze_epochs}: expected at most --epochs {epochs} (equal: the encoder "
                        "stays frozen throughout)")
    if finetune_lr is not None and not (finetune_lr > 0 and 0 < freeze_epochs < epochs):
        raise UserError(f"--finetune-lr {finetune_lr}: expected a learning rate > 0 for the epochs after "
                        "--freeze-epochs N (0 < N < --epochs)")


def add_semisup_args(parser):
    """Semi-supervised training on unlabeled images (semisup.py, docs/ssl.md)."""
    g = parser.add_argument_group("semi-supervised: learn from unlabeled images too (FixMatch-style pseudo-labels or "
                                  "a teacher's, docs/ssl.md)")
    g.add_argument("--unlabeled", type=Path, nargs="+", default=[], metavar="DIR",
                   help="folders of unlabeled images (searched recursively, folder names ignored); with them each "
                        "step also trains on confident pseudo-labels of unlabeled images; best drawn from the "
                        "labelled images' own population, in about their class shares (default: none)")
    g.add_argument("--unlabeled-ratio", type=int, default=7, metavar="MU",
                   help="unlabeled images per labelled image in each step; FixMatch's mu")
    g.add_argument("--unlabeled-weight", type=float, default=1.0, metavar="W",
                   help="weight of the unlabeled loss against the labelled one; FixMatch's lambda_u")
    g.add_argument("--threshold", type=float, default=0.95, metavar="T",
                   help="a pseudo-label needs a top probability of T x the largest target of the loss (with label "
                        "smoothing 0.1 and 5 classes: p >= 0.874 at 0.95)")
    g.add_argument("--teacher", type=Path, default=None, metavar="MODEL",
                   help="instead of pseudo-labels, distil: a trained model.h5 of the same classes and image size "
                        "(e.g. this split's run from a pretrain_ssl.py encoder) gives its probabilities on each "
                        "unlabeled image as the soft target (SimCLRv2's third step; the teacher never learns; "
                        "default: none, FixMatch's pseudo-labels)")
    g.add_argument("--thresholds", choices=THRESHOLDS, default="fixed",
                   help="fixed = that bar for every class (FixMatch); per-class = the bar scaled down for the "
                        "classes the model rarely predicts on the pool, by their running share of the predictions "
                        "over the largest class's (FreeMatch's class-wise scaling)")
    return g


def check_unlabeled_folders(folders, option="--unlabeled"):
    """--unlabeled DIR ... (train_cnn.py, pretrain_ssl.py; reproduce_table.py's --ssl-unlabeled): each must be a
    folder."""
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"{option} {folder}: not a folder (expected a folder of images, searched recursively)")


def resolve_semisup_args(args):
    """Check add_semisup_args' values."""
    check_unlabeled_folders(args.unlabeled)
    check_positive(args, "unlabeled_ratio", "unlabeled_weight", "threshold")
    if args.threshold > 1:
        raise UserError(f"--threshold {args.threshold}: expected a share in (0, 1]")
    if args.teacher is not None and not args.unlabeled:
        raise UserError(f"--teacher {args.teacher}: distils on unlabeled images; give them with --unlabeled DIR")
    if args.unlabeled and args.loader == "generator":
        raise UserError("--unlabeled needs --loader cached (the default), not --loader generator")
    return args


def add_domain_args(parser):
    """Levers for models that must work on other labs' microscopes (docs/microscopes.md); framing and the stain
    options default from --recipe."""
    g = parser.add_argument_group("other microscopes (docs/microscopes.md)")
    g.add_argument("--norm", choices=("batch", "group", "layer"), default="batch",
                   help="normalisation after each convolution where the recipe has one (the default recipe's: batch); "
                        "group / layer norm use no batch statistics and turn it on with --recipe report too")
    g.add_argument("--stain-norm", choices=("none", "reinhard"), default=None,
                   help="reinhard: each image's colour mean and std matched to the training set's, by built-in "
                        "layers inside the saved model (stain.py)")
    g.add_argument("--stain-jitter", type=float, default=None, metavar="S",
                   help="while training, scale each image's haematoxylin / eosin amounts by U(1-S, 1+S) and shift "
                        "them by U(-S, S) (0: off)")
    g.add_argument("--frame-cell", type=float, default=None, metavar="SHARE",
                   help="decode each image as a frame centred on its white cell, the nucleus (found by its stain) "
                        "spanning SHARE of the side, in training and whenever the model is used (0: off)")
    g.add_argument("--nucleus-view", action="store_true",
                   help="the model reads each image only as its nucleus map (darkness x chroma, standardised per "
                        "image, after --stain-norm), computed by built-in layers inside the saved model: shape "
                        "and granules without the lab's colours (docs/microscopes.md)")
    g.add_argument("--style-noise", type=float, default=0.0, metavar="P",
                   help="while training, for a share P of the images, redraw each early block's per-channel feature "
                        "mean and spread around their values (DSU: the CNN learns to ignore the image's style; "
                        "0: off; docs/microscopes.md)")
    texts = recipes.default_texts()
    describe_defaults(parser, {k: texts[k] for k in ("stain_norm", "stain_jitter", "frame_cell")})
    return g


def resolve_domain_args(args):
    """Check add_domain_args' values; --norm group|layer turns normalisation on."""
    if args.norm in ("group", "layer"):
        args.batchnorm = True
    if not 0 <= args.stain_jitter < 1:
        raise UserError(f"--stain-jitter {args.stain_jitter}: expected a strength in [0, 1)")
    if not 0 <= args.style_noise <= 1:
        raise UserError(f"--style-noise {args.style_noise}: expected a share of the images in [0, 1]")
    check_frame_cell(args.frame_cell)
    check_init_classifier(args)
    return args


def init_metadata(path) -> dict:
    """The metadata of an --init file, or one line saying it is not a model file."""
    from runfiles import read_h5_metadata
    try:
        return read_h5_metadata(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--init {path}: not a readable .h5 model file ({e.__class__.__name__}; expected an "
                        f"encoder.h5 of pretrain_ssl.py or a model.h5 of train_cnn.py)") from None


def check_init_classifier(args):
    """A trained classifier given to --init is fine-tuned as it was trained: framed alike (its weights learned
    cells at that scale) and with its stain normalisation (its layers carry its reference; domain.metadata)."""
    init = getattr(args, "init", None)
    meta = init_metadata(init) if init is not None else {}
    if "classes" not in meta:
        return
    share = float((meta.get("framing") or {}).get("share", 0.0))
    if share != args.frame_cell:
        raise UserError(f"--init {init}: a model trained with --frame-cell {share:g}, this run has "
                        f"--frame-cell {args.frame_cell:g} (expected the model's framing: --frame-cell {share:g})")
    stain_norm = "reinhard" if meta.get("stain_normalisation") else "none"
    if stain_norm != args.stain_norm:
        raise UserError(f"--init {init}: a model trained with --stain-norm {stain_norm}, this run has "
                        f"--stain-norm {args.stain_norm} (expected the model's: --stain-norm {stain_norm})")
    nucleus = bool(meta.get("nucleus_view"))
    if nucleus != bool(getattr(args, "nucleus_view", False)):
        said = "with" if nucleus else "without"
        raise UserError(f"--init {init}: a model trained {said} --nucleus-view, this run "
                        f"{'without' if nucleus else 'with'} it (expected the model's: {said} --nucleus-view)")


def check_frame_cell(share: float):
    if not 0 <= share <= 1:
        raise UserError(f"--frame-cell {share}: expected a share of the frame in (0, 1], or 0 for off")
