"""Build the course's WBC layout from any folder-per-class dataset (PBC, Raabin-WBC, BCCD, ...).

    python prepare_splits.py SOURCE OUT                          # e.g. ../shared/data/pbc OUT
    python prepare_splits.py SOURCE OUT --proportions course     # the course's class balance (61% neutrophil)
    python prepare_splits.py SOURCE/data OUT --masks SOURCE/mask --mask-fraction 0.1

OUT gets WBC_100/{train,val}/data/<Class>/ (stratified 5:1 per class), WBC_50/10/1/train/data/<Class>/ as nested
subsets of WBC_100/train (each class keeps at least one image where it has any), train/mask/<Class>/ for a
fraction of the training images when --masks is given, and manifest.json with the counts per class and split.
Files are symlinks to SOURCE (real images are never duplicated) unless --copy. Same --seed, same splits.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

import cli
from data import (WBC_CLASSES, WBC_SPLITS, UserError, canonical_class, scan_class_folders, skipped_warning,
                  without_unusable)

# The class shares of the course's WBC_100 (Raabin-WBC as the course distributed it).
PROPORTIONS = {
    "course": {"basophil": 0.021, "eosinophil": 0.073, "lymphocyte": 0.239, "monocyte": 0.055, "neutrophil": 0.612},
}
SUBSET_FRACTIONS = {"WBC_100": 1.0, "WBC_50": 0.5, "WBC_10": 0.1, "WBC_1": 0.01}
VAL_FRACTION = 1 / 6  # train:val = 5:1


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="prepare_splits.py")
    parser.add_argument("source", type=Path, help="folder with one sub-folder of images per class")
    parser.add_argument("out", type=Path, help="new folder for the course layout (must not exist or be empty)")
    parser.add_argument("--masks", type=Path, default=None,
                        help="folder of masks laid out like SOURCE (same class folder, same file stem) "
                             "(default: none, no masks)")
    parser.add_argument("--mask-fraction", type=float, default=0.1,
                        help="share of each class's training images that keep their mask (as in the course)")
    parser.add_argument("--proportions", choices=("natural",) + tuple(PROPORTIONS), default="natural",
                        help="natural: every image; course: the largest subset with the course's class shares")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--copy", action="store_true", help="copy the files instead of symlinking them")
    cli.add_max_pixels_arg(parser)
    parser.add_argument("--unlabeled", action="store_true",
                        help="also write the source images that land in no split (never a validation image) to "
                             "OUT/WBC_unlabeled/data/, one flat folder without class names, as a pool for "
                             "self-supervised pre-training (pretrain_ssl.py --unlabeled)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.mask_fraction <= 1.0:
        raise UserError(f"--mask-fraction {args.mask_fraction}: expected a fraction between 0 and 1")
    if args.masks is not None and not args.masks.is_dir():
        raise UserError(f"--masks {args.masks}: not a folder (expected MASKS/<Class>/<same stem as the image>.png)")
    return args


def _count(fraction: float, n: int) -> int:
    """Images a subset of `fraction` keeps from a class of `n`: rounded, at least one where there are any."""
    return 0 if n == 0 else min(n, max(1, int(np.floor(fraction * n + 0.5))))


def proportional_counts(available: dict[str, int], shares: dict[str, float]) -> dict[str, int]:
    """Per class, how many images to draw so the classes have `shares`: the largest total every class can fill."""
    total = min(available[c] / s for c, s in shares.items() if s > 0 and c in available)
    return {c: min(n, max(1, int(np.floor(shares.get(c, 0.0) * total + 0.5)))) if n and shares.get(c, 0.0) > 0 else 0
            for c, n in available.items()}


def plan_splits(labels: np.ndarray, classes, has_mask: np.ndarray, proportions: str = "natural",
                mask_fraction: float = 0.1, seed: int = 0) -> dict:
    """Indices into the source files for every split: {'WBC_100/train': [...], 'WBC_100/val': [...],
    'WBC_50/train': [...], ...} plus 'masked': the training images that keep their mask.

    Every choice is one permutation per class drawn from `seed`, so subsets are nested prefixes."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    plan = {f"{s}/train": [] for s in WBC_SPLITS}
    plan["WBC_100/val"], plan["masked"] = [], []
    available = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    wanted = proportional_counts(available, PROPORTIONS[proportions]) if proportions != "natural" else available
    for i, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == i))[:wanted[cls]]
        n_val = int(np.floor(len(idx) * VAL_FRACTION + 0.5)) if len(idx) >= 2 else 0
        val, train = idx[:n_val], idx[n_val:]
        plan["WBC_100/val"] += val.tolist()
        for split, fraction in SUBSET_FRACTIONS.items():
            plan[f"{split}/train"] += train[:_count(fraction, len(train))].tolist()
        # Masks: a fraction of the class's WBC_100 training images, among those that have one.
        with_mask = rng.permutation(train[has_mask[train]]) if len(train) else train
        n_masks = min(len(with_mask), int(np.floor(mask_fraction * len(train) + 0.5)))
        plan["masked"] += with_mask[:n_masks].tolist()
    return {k: sorted(v) for k, v in plan.items()}


def _link(src: Path, dst: Path, copy: bool):
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(os.path.abspath(src), dst)


def _names(paths: list[Path], labels) -> list[str]:
    """A file name per image, unique within its class (sub-folders may repeat names); the stem pairs its mask."""
    seen, out = set(), []
    for p, y in zip(paths, labels):
        name, k = p.name, 1
        while (y, name.lower()) in seen:
            k += 1
            name = f"{p.stem}_{k}{p.suffix}"
        seen.add((y, name.lower()))
        out.append(name)
    return out


def write_layout(out: Path, files, plan: dict, copy: bool) -> dict:
    """Write every split's files into `out`; returns the counts per split and class for the manifest."""
    names = _names(files.paths, files.labels)
    masked = set(plan["masked"])
    folder = {c: c.capitalize() for c in files.classes}  # the course spells classes 'Neutrophil'
    counts, mask_counts = {}, {}
    for key, idx in plan.items():
        if key == "masked":
            continue
        split, part = key.split("/")
        counts[key] = {c: 0 for c in files.classes}
        mask_counts[key] = {c: 0 for c in files.classes}
        for i in idx:
            cls = files.classes[files.labels[i]]
            counts[key][cls] += 1
            _link(files.paths[i], out / split / part / "data" / folder[cls] / names[i], copy)
            if part == "train" and i in masked:
                mask = files.masks[i]
                _link(mask, out / split / part / "mask" / folder[cls] / (Path(names[i]).stem + mask.suffix), copy)
                mask_counts[key][cls] += 1
    return {"counts": counts, "mask_counts": mask_counts}


def unlabeled_indices(n_files: int, plan: dict) -> list[int]:
    """The source images in no split: neither WBC_100/train (which holds every smaller split) nor WBC_100/val."""
    used = set(plan["WBC_100/train"]) | set(plan["WBC_100/val"])
    return [i for i in range(n_files) if i not in used]


def write_unlabeled(out: Path, files, plan: dict, copy: bool) -> int:
    """OUT/WBC_unlabeled/data/<file>: one flat folder, names made unique across classes."""
    idx = unlabeled_indices(len(files.paths), plan)
    names = _names([files.paths[i] for i in idx], [0] * len(idx))
    for i, name in zip(idx, names):
        _link(files.paths[i], out / "WBC_unlabeled" / "data" / name, copy)
    return len(idx)


def main(argv=None):
    args = parse_args(argv)
    # Files training would skip (special files, unreadable headers, over --max-pixels) stay out of the layout.
    files = without_unusable(scan_class_folders(args.source, WBC_CLASSES, args.masks), args.max_pixels)
    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder (choose a new OUT; nothing was written)")
    if out.resolve().is_relative_to(args.source.resolve()):
        raise UserError(f"{out}: is inside SOURCE {args.source} (choose a folder outside it)")
    has_mask = np.array([m is not None for m in files.masks], bool)
    if args.masks is not None and not has_mask.any():
        raise UserError(f"--masks {args.masks}: no mask matches an image of {args.source} "
                        "(expected MASKS/<Class>/<same stem as the image>.png)")
    plan = plan_splits(files.labels, files.classes, has_mask, args.proportions, args.mask_fraction, args.seed)
    ignored = sorted(d.name for d in args.source.iterdir()
                     if d.is_dir() and not d.name.startswith(".") and canonical_class(d.name) is None)

    # Build beside OUT and rename at the end, so an interrupted run never leaves half a layout behind.
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        written = write_layout(tmp, files, plan, args.copy)
        if args.unlabeled:
            written["unlabeled_images"] = write_unlabeled(tmp, files, plan, args.copy)
        manifest = {"source": str(args.source.resolve()), "masks": str(args.masks.resolve()) if args.masks else None,
                    "proportions": args.proportions, "proportion_shares": PROPORTIONS.get(args.proportions),
                    "mask_fraction": args.mask_fraction, "val_fraction": VAL_FRACTION, "seed": args.seed,
                    "files": "copies" if args.copy else "symlinks", "source_counts": files.counts(),
                    "ignored_folders": ignored, "max_pixels": args.max_pixels,
                    "skipped_files": {str(p): why for p, why in files.rejected}, **written,
                    "command": "python prepare_splits.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        hint = " (try --copy where symlinks are not allowed)" if not args.copy else ""
        raise UserError(f"{out}: cannot write the layout: {e.strerror or e}{hint}") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out} ({manifest['files']}; seed {args.seed}; proportions {args.proportions})")
    for key in ("WBC_100/train", "WBC_100/val", "WBC_50/train", "WBC_10/train", "WBC_1/train"):
        c = written["counts"][key]
        print(f"  {key:14s} {sum(c.values()):5d}  " + "  ".join(f"{k} {v}" for k, v in c.items()))
    if args.unlabeled:
        print(f"  WBC_unlabeled  {written['unlabeled_images']:5d}  (no labels; no validation image)")
    if args.masks:
        print(f"  masks (WBC_100/train) {sum(written['mask_counts']['WBC_100/train'].values())}")
    if ignored:
        print(f"  ignored folders (not a WBC class): {', '.join(ignored)}")
    line = skipped_warning(None, [p for p, _ in files.rejected], [why for _, why in files.rejected], args.source)
    if line:
        print(line + " (listed in manifest.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
