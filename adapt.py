"""Using a trained model on another lab's images: test-time augmentation (flips and rotations averaged) and
batch-norm adaptation (statistics re-estimated on a folder of that lab's unlabeled images; no labels, no weights
changed), for inspect_model.py evaluate / predict; and weight-space interpolation between a fine-tuned model and
the frozen-encoder model it started from (WiSE-FT, tools/wise_ft.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from runfiles import UserError

# The eight symmetries of a square, most different first after the identity: a cell has no up, down, left or
# right on a slide, so each is a plausible view of the same cell.
DIHEDRAL = ("identity", "flip_lr", "flip_ud", "rot180", "rot90", "rot270", "transpose", "antitranspose")
MAX_TTA = len(DIHEDRAL)


def dihedral(x: np.ndarray, name: str) -> np.ndarray:
    """One symmetry of a batch of images (N, H, W, C)."""
    ops = {"identity": lambda a: a, "flip_lr": lambda a: a[:, :, ::-1], "flip_ud": lambda a: a[:, ::-1],
           "rot180": lambda a: a[:, ::-1, ::-1], "rot90": lambda a: np.rot90(a, 1, (1, 2)),
           "rot270": lambda a: np.rot90(a, 3, (1, 2)), "transpose": lambda a: a.transpose(0, 2, 1, 3),
           "antitranspose": lambda a: np.rot90(a, 2, (1, 2)).transpose(0, 2, 1, 3)}
    return np.ascontiguousarray(ops[name](x))


def check_tta(n: int) -> int:
    if not 1 <= n <= MAX_TTA:
        raise UserError(f"--tta {n}: expected 1 to {MAX_TTA} views (1: no test-time augmentation)")
    return n


def predict(model, x, batch_size: int = 64, tta: int = 1) -> np.ndarray:
    """Class probabilities of uint8 images x (N, H, W, 3), each averaged over its first `tta` symmetric views
    (1: the plain image); feeding.predict does the batching (x may be memory-mapped)."""
    import feeding
    views = None if tta == 1 else [functools.partial(dihedral, name=name) for name in DIHEDRAL[:tta]]
    return feeding.predict(model, x, batch_size, views)


def unlabeled_images(folder: Path, size: int, frame_share: float = 0.0, cache_dir=None, use_cache: bool = True,
                     max_pixels: int | None = None, option: str = "--adapt-bn"):
    """Every image under `folder` (any sub-folders, labels ignored), decoded as the model's inputs are; one over
    `max_pixels` (--max-pixels; None: data.DEFAULT_MAX_PIXELS) is skipped and named in a warning. `option` names
    the folder's source in the one-line errors."""
    import data
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{option} {folder}: no such folder (expected a folder of unlabeled images)")
    paths = data.list_images(folder)
    if len(paths) < 2:
        raise UserError(f"{option} {folder}: {len(paths)} image(s) found; batch-norm statistics need at least 2")
    files = data.FileList(paths, np.zeros(len(paths), np.int32), ("unlabeled",), [None] * len(paths), folder)
    return data.load_images(files, size=size, cache_dir=cache_dir, use_cache=use_cache, name=folder.name,
                            frame_share=frame_share, max_pixels=max_pixels or data.DEFAULT_MAX_PIXELS).x


def adapt_batchnorm(model, images, batch_size: int = 64, seed: int = 0) -> int:
    """Replace every batch-norm layer's moving mean and variance by those of `images` (all of them); the
    learned weights stay. Returns the number of images used; 0 when the model has no batch norm."""
    import feeding
    return feeding.recalibrate_batchnorm(model, images, len(images), batch_size, seed)


def save_adapted(model, path: Path, metadata: dict, folder: Path, n_images: int):
    """The adapted model as an .h5 beside its metadata, recording what it was adapted on."""
    import runfiles
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"--save-adapted {path}: the folder {path.parent} does not exist")
    runfiles.save_model_h5(model, path, {**metadata, "adapted_batchnorm": {"folder": str(folder),
                                                                             "images": int(n_images)}})


# ----------------------------------------------------------------------------------------------
# The command-line options of inspect_model.py evaluate / predict
# ----------------------------------------------------------------------------------------------

def add_arguments(parser):
    parser.add_argument("--tta", type=int, default=1, metavar="N",
                        help=f"average the predictions over N symmetric views of each image (flips, rotations; "
                             f"1 to {MAX_TTA}; 1: the image alone)")
    parser.add_argument("--adapt-bn", type=Path, default=None, metavar="DIR",
                        help="first re-estimate the batch-norm statistics on the unlabeled images in DIR (e.g. your "
                             "own microscope's; no labels used, no weights changed; default: the statistics as saved)")
    parser.add_argument("--save-adapted", type=Path, default=None, metavar="PATH",
                        help="with --adapt-bn: also save the adapted model as this .h5 (default: not saved)")


def check_arguments(args):
    check_tta(args.tta)
    if args.save_adapted is not None and args.adapt_bn is None:
        raise UserError("--save-adapted: needs --adapt-bn DIR (there is nothing adapted to save)")


def apply_arguments(model, metadata: dict, image_size: int, args):
    """--adapt-bn and --save-adapted on a loaded model, in place."""
    import sys
    import framing
    if args.adapt_bn is None:
        return
    x = unlabeled_images(args.adapt_bn, image_size, framing.frame_share(metadata),
                         getattr(args, "cache_dir", None), not getattr(args, "no_cache", False),
                         getattr(args, "max_pixels", None))
    n = adapt_batchnorm(model, x, args.batch_size)
    if not n:
        print("warning: --adapt-bn: the model has no batch-norm layers (or too few images); nothing adapted",
              file=sys.stderr)
        return
    print(f"batch-norm statistics re-estimated on {n} images of {args.adapt_bn}", file=sys.stderr)
    if args.save_adapted is not None:
        save_adapted(model, args.save_adapted, metadata, args.adapt_bn, n)
        print(f"wrote the adapted model to {args.save_adapted}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Weight-space interpolation (WiSE-FT, Wortsman et al., CVPR 2022)
# ----------------------------------------------------------------------------------------------

def interpolate_weights(start, end, alpha: float):
    """Set `end`'s weights to (1 - alpha) * start + alpha * end, layer by layer: alpha 0 is `start`, 1 is `end`.
    The two models must be of one form (the same weights, in the same shapes); one line names the first that
    differs. Batch-norm statistics are interpolated too: recalibrate them afterwards."""
    a, b = start.get_weights(), end.get_weights()
    shapes_a, shapes_b = [w.shape for w in a], [w.shape for w in b]
    if shapes_a != shapes_b:
        first = next((k for k, (x, y) in enumerate(zip(shapes_a, shapes_b)) if x != y), min(len(a), len(b)))
        raise UserError(f"the two models differ in form (weight {first}: "
                        f"{shapes_a[first] if first < len(a) else 'none'} against "
                        f"{shapes_b[first] if first < len(b) else 'none'}); expected a fine-tuned model and the "
                        f"frozen-encoder model it started from")
    end.set_weights([(1.0 - alpha) * x + alpha * y for x, y in zip(a, b)])
    return end
