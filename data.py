"""Data: find images in the course layout and decode them once into a uint8 cache (ImageSet).

The flow (docs/ARCHITECTURE.md):
    files --scan--> FileList (+ mask pairs) --decode, RGB, resize, mask mode--> uint8 cache on disk
          --> ImageSet(x: uint8 N x H x W x 3, y, classes, paths) --> training.train

numpy and Pillow only; Keras is imported for its progress bar while decoding.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import queue
import re
import stat
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from runfiles import UserError, atomic_write_text

WBC_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
WBC_SPLITS = ("WBC_100", "WBC_50", "WBC_10", "WBC_1")
CAM16_DIR = "CAM16_100cls_10mask"
PRCC_DIR = "pRCC_nolabel"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "__macosx", ".ipynb_checkpoints"}
MASK_MODES = ("none", "only", "replace", "add")
MASK_FILLS = ("black", "mean", "blur")
CACHE_FORMAT = 2  # bump when decoding changes pixels, so old caches are rebuilt

# The most pixels one image may decode to (--max-pixels; docs/reliability.md says why 50 million). JPEGs count
# after libjpeg's reduced-size decoding (1/2 to 1/8), so a 10,000 x 10,000 JPEG decoded for a 224 px model costs
# 1.6 million; a PNG, GIF, TIFF, BMP or WebP is decoded whole and counts every pixel.
DEFAULT_MAX_PIXELS = 50_000_000
# An image that has not been decoded this long after a thread began it is skipped as stalled (a network mount
# that stopped answering, a special file that slipped past the checks); this many stalls in one set stop the run.
STALL_SECONDS = 60.0
STALL_LIMIT = 3
DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))
# Pillow's own decompression-bomb check stays on at its default (an error above twice Image.MAX_IMAGE_PIXELS,
# checked when a header is read) as a backstop behind --max-pixels; its warning below that is silenced because
# --max-pixels decides, and for a JPEG it counts the pixels actually decoded.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# ----------------------------------------------------------------------------------------------
# Scanning: which files, which class
# ----------------------------------------------------------------------------------------------

def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def _is_image_name(name: str) -> bool:
    return not _is_junk(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES


def canonical_class(folder_name: str, classes=WBC_CLASSES) -> str | None:
    """Map a folder name onto one of `classes`: case-insensitive, singular or plural ('Neutrophils')."""
    name = folder_name.strip().lower()
    for cls in classes:
        if name in (cls, cls + "s", cls + "es"):
            return cls
    return None


class SkippedFile(Exception):
    """A file that is left out, and why (the message): not a regular file, over --max-pixels, stalled."""


def file_problem(path) -> str | None:
    """Why `path` (symlinks followed) is not a regular file that may be opened, or None when it is one.

    Only stat() is called: a named pipe, socket or device is never opened (opening a pipe waits for a writer;
    opening some devices has effects)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "dangling link" if os.path.islink(path) else "vanished"
    except OSError as e:
        return "symlink loop" if e.errno == errno.ELOOP else f"unreadable ({e.strerror})"
    return None if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "not a regular file"


def list_images(folder: Path, rejected: list | None = None) -> list[Path]:
    """Every image under `folder`, recursively, sorted; junk files and folders and symlink loops skipped.

    Only regular files (after following symlinks) are returned; an image-named pipe, socket, device file or
    dangling link is appended to `rejected` as (path, reason) instead."""
    found = []
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop: walk each real folder once
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        # A link back to this folder or one above it (`loop -> ..`) would re-read other classes' images
        # under this class: skip it. Links elsewhere are followed.
        dirnames[:] = sorted(d for d in dirnames
                             if not _is_junk(d) and not _is_same_or_above(os.path.join(dirpath, d), real))
        for f in filenames:
            if _is_image_name(f):
                path = Path(dirpath) / f
                problem = file_problem(path)
                if problem is None:
                    found.append(path)
                elif rejected is not None:
                    rejected.append((path, problem))
    if rejected:
        rejected.sort()
    return sorted(found)


def _is_same_or_above(link: str, real_dir: str) -> bool:
    target = os.path.realpath(link)
    return real_dir == target or real_dir.startswith(target.rstrip(os.sep) + os.sep)


@dataclasses.dataclass
class FileList:
    """Image files with integer labels into `classes`, and their mask files where they have one."""
    paths: list[Path]
    labels: np.ndarray
    classes: tuple[str, ...]
    masks: list[Path | None]
    root: Path
    rejected: list = dataclasses.field(default_factory=list)  # (path, reason): special files found, never opened

    def __len__(self):
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}


def scan_class_folders(folder: Path, classes=WBC_CLASSES, mask_folder: Path | None = None) -> FileList:
    """Read a folder-per-class directory. `classes=None` takes the sorted folder names as they are (CAM16)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (expected a folder with one sub-folder per class)")
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not _is_junk(d.name))
    if classes is None:
        classes = tuple(d.name.lower() for d in subdirs)
        mapping = {d: d.name.lower() for d in subdirs}
    else:
        mapping = {d: canonical_class(d.name, classes) for d in subdirs}
        mapping = {d: c for d, c in mapping.items() if c is not None}
    if not mapping:
        expected = ", ".join(classes) if classes else "class names"
        raise UserError(f"{folder}: no class folders found (expected sub-folders named {expected})")
    paths, labels, rejected = [], [], []
    for d, cls in sorted(mapping.items(), key=lambda kv: (classes.index(kv[1]), kv[0].name)):
        files = list_images(d, rejected)
        paths += files
        labels += [classes.index(cls)] * len(files)
    if not paths:
        extra = f" ({len(rejected)} special file(s) named like images: {_shown(rejected[0][0], folder)}, " \
                f"{rejected[0][1]})" if rejected else ""
        raise UserError(f"{folder}: the class folders hold no images (.jpg, .png, .bmp, .tif){extra}")
    masks = pair_masks(paths, folder, mask_folder, rejected) if mask_folder else [None] * len(paths)
    return FileList(paths, np.asarray(labels, np.int32), tuple(classes), masks, folder, rejected)


def pair_masks(paths: list[Path], data_folder: Path, mask_folder: Path,
               rejected: list | None = None) -> list[Path | None]:
    """Each image's mask: same class folder and file stem under `mask_folder`, any image suffix. Special files
    in `mask_folder` are never paired; they are appended to `rejected` as (path, reason)."""
    if not Path(mask_folder).is_dir():
        return [None] * len(paths)
    index = {}
    for m in list_images(Path(mask_folder), rejected):
        rel = m.relative_to(mask_folder)
        key = (tuple(p.lower() for p in rel.parent.parts), m.stem.lower())
        # Prefer lossless masks when one stem has several files.
        if key not in index or m.suffix.lower() == ".png":
            index[key] = m
    # Class folders may be spelled differently in data/ and mask/: compare canonical names too.
    canon = {}
    for (parts, stem), m in index.items():
        if parts:
            cls = canonical_class(parts[0]) or parts[0]
            canon[((cls,) + parts[1:], stem)] = m
    out = []
    for p in paths:
        rel = p.relative_to(data_folder)
        parts = tuple(x.lower() for x in rel.parent.parts)
        m = index.get((parts, p.stem.lower()))
        if m is None and parts:
            cls = canonical_class(parts[0]) or parts[0]
            m = canon.get(((cls,) + parts[1:], p.stem.lower()))
        out.append(m)
    return out


def without_unusable(files: FileList, max_pixels: int = DEFAULT_MAX_PIXELS) -> FileList:
    """`files` less every image that decoding would skip before reading pixels (probe_files: headers only);
    masks that fail the same check are unpaired. Both are added to `rejected` with the reason."""
    bad = probe_files(files.paths, max_pixels)
    paired = [i for i, m in enumerate(files.masks) if m is not None and i not in bad]
    bad_masks = probe_files([files.masks[i] for i in paired], max_pixels)
    masks = list(files.masks)
    for k, why in bad_masks.items():
        masks[paired[k]] = None
    keep = [i for i in range(len(files)) if i not in bad]
    if not keep:
        raise UserError(f"{files.root}: none of the {len(files)} images is usable "
                        f"(e.g. {_shown(files.paths[0], files.root)}: {bad[0]})")
    rejected = files.rejected + [(files.paths[i], why) for i, why in bad.items()] \
        + [(files.masks[paired[k]], why) for k, why in bad_masks.items()]
    return FileList([files.paths[i] for i in keep], files.labels[keep], files.classes, [masks[i] for i in keep],
                    files.root, rejected)


@dataclasses.dataclass
class SplitFiles:
    """Where one WBC split's images are: train (with masks) and the validation set."""
    name: str
    train: FileList
    val: FileList


def is_course_root(root: Path) -> bool:
    return any((Path(root) / s).is_dir() for s in WBC_SPLITS + (CAM16_DIR, PRCC_DIR))


def find_split(root: Path, split: str = "WBC_100") -> SplitFiles:
    """Locate a WBC split under a course-layout root. A split's own val/ wins over the shared WBC_100/val."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"--data {root}: no such folder")
    if not root.is_dir():
        raise UserError(f"--data {root}: not a folder (expected the course layout, e.g. ROOT/WBC_100/train/data/<Class>/)")
    split_dir = _child_ci(root, split)
    if split_dir is None:
        present = [s for s in WBC_SPLITS if _child_ci(root, s)]
        hint = f" (found: {', '.join(present)})" if present else \
            " (expected ROOT/WBC_100/train/data/<Class>/ and ROOT/WBC_100/val/data/<Class>/)"
        raise UserError(f"--data {root}: no {split} folder{hint}")
    train_dir = split_dir / "train" / "data"
    if not train_dir.is_dir():
        raise UserError(f"{split_dir}: missing train/data/ (expected {train_dir}/<Class>/*.jpg)")
    val_dir = split_dir / "val" / "data"
    if not val_dir.is_dir():
        shared = _child_ci(root, "WBC_100")
        val_dir = shared / "val" / "data" if shared else val_dir
    if not val_dir.is_dir():
        raise UserError(f"--data {root}: no validation set (expected {split}/val/data/ or WBC_100/val/data/)")
    train = scan_class_folders(train_dir, WBC_CLASSES, split_dir / "train" / "mask")
    val = scan_class_folders(val_dir, WBC_CLASSES)
    return SplitFiles(split, train, val)


def find_labelled(folder: Path, classes=WBC_CLASSES, split: str = "WBC_100") -> FileList:
    """Labelled images to evaluate on: a folder with one sub-folder per class (or one holding data/<class>/,
    like WBC_100/val), or a course-layout root (its validation set of `split`; CAM16's val or test for the
    classes normal and tumor)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected one sub-folder per class, or a course-layout root)")
    if is_course_root(folder):
        if tuple(classes) == WBC_CLASSES:
            return find_split(folder, split).val
        cam16 = find_cam16(folder)
        part = "val" if "val" in cam16 else "test" if "test" in cam16 else None
        if set(classes) == {"normal", "tumor"} and part:
            return cam16[part]
        raise UserError(f"{folder}: a course-layout root, but no validation set for the classes "
                        f"{', '.join(classes)}; pass a folder with one sub-folder per class")
    if (folder / "data").is_dir() and not any(canonical_class(d.name, tuple(classes))
                                              for d in folder.iterdir() if d.is_dir()):
        folder = folder / "data"
    return scan_class_folders(folder, tuple(classes))


def find_cam16(root: Path) -> dict[str, FileList]:
    """CAM16 train/val/test (classes normal, tumor) under a course root, or a folder with train/val/test."""
    root = Path(root)
    base = _child_ci(root, CAM16_DIR) or root
    out = {}
    for part in ("train", "val", "test"):
        d = base / part / "data"
        if d.is_dir():
            out[part] = scan_class_folders(d, ("normal", "tumor"), base / part / "mask")
    if "train" not in out:
        raise UserError(f"--data {root}: no CAM16 training set (expected {CAM16_DIR}/train/data/normal|tumor/)")
    return out


def find_unlabeled(root: Path, rejected: list | None = None) -> list[Path]:
    """The unlabeled renal tissue images (pRCC_nolabel), or [] when absent; special files go to `rejected`."""
    d = _child_ci(Path(root), PRCC_DIR)
    return list_images(d, rejected) if d else []


def _child_ci(folder: Path, name: str) -> Path | None:
    """A child folder of `folder` named `name`, ignoring case."""
    if not folder.is_dir():
        return None
    exact = folder / name
    if exact.is_dir():
        return exact
    for d in folder.iterdir():
        if d.is_dir() and d.name.lower() == name.lower():
            return d
    return None


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

class _PixelBudget:
    """At most `capacity` decoded pixels in flight across all threads; the rest wait, in arrival order (so a
    large image is not starved by a stream of small ones). Memory for originals stays bounded whatever the
    number of threads."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self.cond = threading.Condition()
        self.waiting = collections.deque()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.capacity)
        me = object()
        with self.cond:
            self.waiting.append(me)
            self.cond.wait_for(lambda: self.waiting[0] is me and self.used + pixels <= self.capacity)
            self.waiting.popleft()
            self.used += pixels
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.used -= pixels
                self.cond.notify_all()


_budgets: dict[int, _PixelBudget] = {}
_budgets_lock = threading.Lock()


def _budget(max_pixels: int) -> _PixelBudget:
    """The process-wide budget for one --max-pixels: two originals of the largest allowed size at a time."""
    with _budgets_lock:
        if max_pixels not in _budgets:
            _budgets[max_pixels] = _PixelBudget(2 * max_pixels)
            # Pillow's own check must not refuse what the user explicitly allowed.
            if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
                Image.MAX_IMAGE_PIXELS = max_pixels
        return _budgets[max_pixels]


# glibc serves a buffer freed by one thread from that thread's heap next time, and keeps it: with many decode
# threads each heap would keep an original's worth of memory, whatever the budget. After a large image the
# process returns free heap memory to the system (malloc_trim; a no-op elsewhere).
_TRIM_PIXELS = 1_000_000


def _trim_heap():
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _open_regular(path):
    """A binary file object for `path`, which must be a regular file (symlinks followed). The file is checked
    before opening and opened without blocking (a file swapped for a pipe in between cannot hang the open),
    then checked again on the open descriptor."""
    problem = file_problem(path)
    if problem:
        raise SkippedFile(problem)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SkippedFile(_kind(mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def _open_image(path, size: int, max_pixels: int, draft: str | None = None, load: bool = True):
    """The image at `path` with its header checked against `max_pixels` before any pixel is decoded, then
    decoded (load=True) and kept within the process's pixel budget while the caller uses it.

    draft: for a JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale, no smaller than size x size; the budget
    counts the pixels of that reduced decode."""
    budget = _budget(max_pixels)
    with _open_regular(path) as f:
        try:
            img = Image.open(f)
        except Image.DecompressionBombError as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise SkippedFile(f"over --max-pixels ({int(found.group(1)):,} pixels)" if found
                              else "over --max-pixels") from None
        with img:
            header = img.size
            if draft and img.format == "JPEG":
                img.draft(draft, (size, size))
            w, h = img.size
            if w * h > max_pixels:
                reduced = f", {w}x{h} at reduced JPEG size" if (w, h) != header else ""
                raise SkippedFile(f"over --max-pixels ({header[0]}x{header[1]}{reduced})")
            if not load:
                yield img
                return
            try:
                with budget.hold(w * h):
                    img.load()
                    yield img
            finally:
                if w * h >= _TRIM_PIXELS:
                    img.close()
                    _trim_heap()


def probe_image(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone; SkippedFile when the file would be skipped before decoding
    (special file, over --max-pixels even at libjpeg's smallest scale). Other errors: not an image."""
    with _open_image(path, 1, max_pixels, draft="RGB", load=False) as img:
        return img.size


def decode_image(path: Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, frame_share: float = 0.0) -> np.ndarray:
    """Any image file as uint8 RGB size x size: EXIF orientation applied, 16-bit scaled, alpha dropped.
    frame_share > 0: cut out a frame centred on the white cell, the cell spanning that share of it (framing.py).

    Raises SkippedFile for a special file or an image over `max_pixels` (checked from the header, nothing
    decoded); other exceptions mean the file is not a readable image."""
    if frame_share:
        return decode_framed(path, size, frame_share, max_pixels=max_pixels)[0]
    with _open_image(path, size, max_pixels, draft="RGB") as img:
        sixteen = img.mode.startswith("I;16")
        img = _shrink(img, size)
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
        img = _to_rgb(img, sixteen)
        img = img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)


def images_for_model(paths, model_file) -> np.ndarray:
    """Image files as a model saved by this project expects them, for a plain Keras model.predict: uint8
    (N, S, S, 3) at its training size, framed on the white cell when it was trained framed (its metadata says so;
    inspect_model.py decodes the same way)."""
    from runfiles import read_h5_metadata
    try:
        meta = read_h5_metadata(Path(model_file))
    except OSError as e:
        raise UserError(f"{model_file}: not a readable .h5 model file ({e})") from None
    if "image_size" not in meta:
        raise UserError(f"{model_file}: no training metadata (expected a model.h5 saved by this project's scripts)")
    import framing
    share = framing.frame_share(meta)
    warning = framing.version_warning(meta)
    if warning:
        print(warning, file=sys.stderr)
    return np.stack([decode_image(Path(p), int(meta["image_size"]), frame_share=share) for p in paths])


def decode_framed(path: Path, size: int, frame_share: float, mask_path: Path | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS):
    """(image, cell mask or None), both cut to the frame centred on the white cell: found by its mask where one
    is given, else by its stain (framing.py)."""
    import framing
    # The frame is a crop: keep more pixels than the output (a JPEG decodes at no less than 4x the side).
    with _open_image(path, 4 * size, max_pixels, draft="RGB") as img:
        sixteen = img.mode.startswith("I;16")
        img = _shrink(img, 4 * size)
        ImageOps.exif_transpose(img, in_place=True)
        image = np.asarray(_to_rgb(img, sixteen))
    cell = decode_mask(mask_path, image.shape[1::-1], max_pixels) if mask_path is not None else None
    box = framing.frame_box(image, frame_share, cell)
    return framing.crop(image, box, size), (None if cell is None else framing.crop(cell, box, size, nearest=True))


def _shrink(img: Image.Image, size: int) -> Image.Image:
    """Right after decoding, average blocks of a large image (Image.reduce) down to about 3x the target side,
    as resize's reducing_gap would, so that orientation and mode conversion copy the small image, not the
    original."""
    fx, fy = img.size[0] // (3 * size), img.size[1] // (3 * size)
    if max(fx, fy) < 2:
        return img
    if img.mode.startswith("I;16"):
        img = img.convert("I")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    try:
        return img.reduce((max(fx, 1), max(fy, 1)))
    except ValueError:  # a mode reduce does not take: convert at full size later, as before
        return img


def _to_rgb(img: Image.Image, sixteen: bool = False) -> Image.Image:
    """`sixteen`: the file held 16-bit samples (the image may since have been converted to 32-bit 'I')."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        top = 65535 if sixteen or img.mode.startswith("I;16") or arr.max() > 255 else 255
        # A lookup table gives the rounding of arr / top * 255 + 0.5 with 1 byte per output pixel, not 8.
        table = np.clip(np.arange(65536) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(table[np.clip(arr, 0, 65535)], "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # microscope background is bright
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_mask(path: Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A mask as a boolean size x size array: the cell is every pixel clearly above background.

    Binary (0/255), JPEG-noisy and 3-level (0 background, 128 cytoplasm, 255 nucleus) masks all give
    the whole cell. Nearest-neighbour resizing keeps the edge crisp. Special files and masks over
    `max_pixels` raise SkippedFile, as in decode_image.
    """
    with _open_image(path, size, max_pixels) as m:
        m = ImageOps.exif_transpose(m)
        if m.mode in ("RGBA", "LA") or (m.mode == "P" and "transparency" in m.info):
            # A transparent background is background: composite on black, not on _to_rgb's white.
            rgba = m.convert("RGBA")
            m = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        # The brightest channel, not luminance: a coloured label (e.g. dark red 128,0,0) is still the cell.
        arr = np.asarray(_to_rgb(m).resize(size if isinstance(size, tuple) else (size, size), Image.NEAREST)).max(-1)
    if arr.max() <= 8:
        return arr > 0  # a label map (0/1 or 0/1/2 values): everything not 0 is the cell
    return arr > 64


def apply_mask(image: np.ndarray, cell: np.ndarray, fill: str = "black") -> np.ndarray:
    """Keep the cell's pixels; replace the rest by black, the image's mean colour, or a blurred copy."""
    if fill == "black":
        background = np.zeros_like(image)
    elif fill == "mean":
        background = np.broadcast_to(image.reshape(-1, 3).mean(0).round().astype(np.uint8), image.shape)
    elif fill == "blur":
        radius = max(2, image.shape[0] // 16)
        background = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    else:
        raise UserError(f"--mask-fill {fill}: expected one of {', '.join(MASK_FILLS)}")
    return np.where(cell[..., None], image, background)


# ----------------------------------------------------------------------------------------------
# ImageSet and the cache
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageSet:
    """Decoded images: x uint8 (N, H, W, 3), integer labels y, and where each image came from."""
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    paths: list[str]
    masked: np.ndarray  # bool per image: a mask was applied
    skipped: list[str]  # files left out: special files, unreadable, over --max-pixels, stalled
    mask_problems: list[str] = dataclasses.field(default_factory=list)
    skip_reasons: list[str] = dataclasses.field(default_factory=list)  # why, one per skipped file

    def __len__(self):
        return len(self.y)

    def counts(self) -> dict[str, int]:
        return {c: int((self.y == i).sum()) for i, c in enumerate(self.classes)}

    def subset(self, index) -> "ImageSet":
        index = np.asarray(index)
        return dataclasses.replace(self, x=self.x[index], y=self.y[index],
                                   paths=[self.paths[i] for i in index], masked=self.masked[index])


def default_cache_dir() -> Path:
    return Path(os.environ.get("WBC_CACHE_DIR") or Path.home() / ".cache" / "wbc_keras")


def _entries(files: FileList, mask_mode: str) -> list[tuple[Path, Path | None, int]]:
    """(image, mask to apply or None, label) for each output image of a mask mode."""
    raw = [(p, None, int(y)) for p, y in zip(files.paths, files.labels)]
    with_mask = [(p, m, int(y)) for p, m, y in zip(files.paths, files.masks, files.labels) if m is not None]
    if mask_mode == "none":
        return raw
    if mask_mode == "only":
        return with_mask
    if mask_mode == "replace":
        return [(p, m, int(y)) for p, m, y in zip(files.paths, files.masks, files.labels)]
    if mask_mode == "add":
        return raw + with_mask
    raise UserError(f"--masks {mask_mode}: expected one of {', '.join(MASK_MODES)}")


def cache_key(entries, size: int, mask_fill: str, mask_mode: str | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS, frame_share: float = 0.0) -> str:
    """Changes whenever any file (path, size, mtime) or any option that changes pixels changes."""
    # The mode itself is in the key: 'only' and 'replace' have the same entries when every image has a mask,
    # but treat a broken mask differently. --max-pixels decides which images are kept.
    import framing
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, size, mask_fill, max_pixels]
                                  + ([mask_mode] if mask_mode else [])
                                  + ([f"frame{frame_share:g}v{framing.VERSION}"] if frame_share else [])).encode())
    for image, mask, label in entries:
        for p in (image, mask):
            if p is None:
                h.update(b"-")
                continue
            try:
                st = os.stat(p)
                h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}|".encode("utf-8", "surrogateescape"))
            except OSError:
                h.update(f"{os.path.abspath(p)}|missing|".encode("utf-8", "surrogateescape"))
        h.update(str(label).encode())
    return h.hexdigest()[:24]


def load_images(files: FileList, size: int = 224, mask_mode: str = "none", mask_fill: str = "black",
                cache_dir: Path | None = None, use_cache: bool = True, verbose: bool = True,
                name: str = "images", max_pixels: int = DEFAULT_MAX_PIXELS, frame_share: float = 0.0) -> ImageSet:
    """Decode `files` once into a uint8 array; later calls with the same files and options map the cache.
    frame_share > 0 frames each image on its white cell (decode_image).

    Images over `max_pixels` (from the header), special files found while scanning, unreadable files and reads
    that stall are left out, and named in one warning line."""
    entries = _entries(files, mask_mode)
    if not entries:
        raise UserError(f"{files.root}: no images for --masks {mask_mode}"
                        + (" (no image has a mask)" if mask_mode == "only" else ""))
    key = cache_key(entries, size, mask_fill, mask_mode, max_pixels, frame_share)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if use_cache:
        cached = _read_cache(cache_dir, key, files.classes)
        if cached is not None:
            if verbose:
                print(f"{name}: {len(cached)} images from cache {cache_dir / key}.npy")
            cached = _with_rejected(cached, files)
            _warn_skipped(cached, name, mask_mode, files.root)
            return cached
    writable = use_cache and _ensure_writable(cache_dir)
    n = len(entries)
    tmp = None
    if writable:
        _remove_dead_builds(cache_dir, key)
        fd, tmp = tempfile.mkstemp(prefix=f"{key}.{os.getpid()}.", suffix=".npy.part", dir=cache_dir)
        os.close(fd)
        x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        try:
            _reserve_disk(tmp)
        except OSError as e:
            del x
            os.unlink(tmp)
            tmp, writable = None, False
            print(f"warning: cache folder {cache_dir}: no room for {n * size * size * 3 / 1e6:.0f} MB "
                  f"({e.strerror or e}); decoding into memory, no cache", file=sys.stderr)
    if not writable:
        x = np.empty((n, size, size, 3), np.uint8)
    try:
        ok, problems, reasons = _decode_into(x, entries, size, mask_fill, verbose, name, max_pixels, frame_share)
    except BaseException:
        del x
        if tmp:
            os.unlink(tmp)
        raise
    paths = [str(entries[i][0]) for i in range(n)]
    failed = np.flatnonzero(~ok)
    skipped = [paths[i] for i in failed]
    if mask_mode in ("only", "add"):
        # A masked copy whose mask failed would be a raw image (only) or a duplicate (add): leave it out.
        ok[sorted(problems)] = False
    keep = np.flatnonzero(ok)
    meta = {"key": key, "n": n, "size": size, "classes": list(files.classes), "keep": keep.tolist(),
            "labels": [e[2] for e in entries], "paths": paths,
            "masked": [e[1] is not None and i not in problems for i, e in enumerate(entries)],
            "skipped": skipped, "skip_reasons": [reasons[i] for i in failed],
            "mask_problems": [str(entries[i][1]) for i in sorted(problems)]}
    if writable:
        x.flush()
        del x
        # The array is renamed into place first and the JSON last: a reader finds the JSON only
        # when the array beside it is complete, and a key mismatch in either means rebuild.
        os.replace(tmp, cache_dir / f"{key}.npy")
        atomic_write_text(cache_dir / f"{key}.json", json.dumps(meta))
        result = _read_cache(cache_dir, key, files.classes)
    else:
        result = _imageset_from(x, meta, files.classes)
    result = _with_rejected(result, files)
    _warn_skipped(result, name, mask_mode, files.root)
    return result


def _with_rejected(images: ImageSet, files: FileList) -> ImageSet:
    """The special files found while scanning (never entries, so never cached) listed first among the skipped."""
    if not files.rejected:
        return images
    return dataclasses.replace(images, skipped=[str(p) for p, _ in files.rejected] + images.skipped,
                               skip_reasons=[r for _, r in files.rejected] + images.skip_reasons)


def _decode_into(x, entries, size, mask_fill, verbose, name, max_pixels=DEFAULT_MAX_PIXELS, frame_share=0.0):
    """Decode entries into x on DECODE_THREADS threads (Pillow releases the GIL); the pixel budget bounds the
    originals held at once. Returns (ok per entry, entries whose mask failed, skip reason per entry)."""
    n = len(entries)
    ok = np.zeros(n, bool)
    problems = set()
    reasons = {}

    def work(i):
        image, mask, _ = entries[i]
        if mask is None:
            return decode_image(image, size, max_pixels, frame_share), True
        img = None
        try:
            if frame_share:  # framed on the mask's cell, and the mask framed with it
                img, cell = decode_framed(image, size, frame_share, mask, max_pixels)
            else:
                img, cell = decode_image(image, size, max_pixels), decode_mask(mask, size, max_pixels)
            if not cell.any():
                raise ValueError("empty mask")
            return apply_mask(img, cell, mask_fill), True
        except Exception:  # noqa: BLE001 - any mask failure: the image is kept unmasked and reported
            # Framed on its own when the mask failed; an image that cannot be decoded is skipped here.
            return decode_image(image, size, max_pixels, frame_share), False

    if verbose:
        print(f"{name}: decoding {n} images to {size}x{size} (once; cached afterwards)")
    quiet = contextlib.nullcontext(lambda done: None)
    with progress(n) if verbose else quiet as update:
        for i, result, error in map_bounded(work, range(n), name_of=lambda i: entries[i][0]):
            if error is None:
                x[i] = result[0]
                ok[i] = True
                if not result[1]:
                    problems.add(i)
            else:
                reasons[i] = skip_reason(error)
            if (i + 1) % 64 == 0 or i + 1 == n:
                update(i + 1)
    return ok, problems, reasons


class Stalled(Exception):
    """An item that did not finish within STALL_SECONDS."""


def map_bounded(fn, items, workers: int | None = None, timeout: float | None = None, name_of=str):
    """Yield (item, fn(item), None) or (item, None, exception) for each item, in order, computed on daemon
    threads, a few items ahead of the consumer.

    An item not finished `timeout` seconds (STALL_SECONDS) after a thread began it yields a Stalled error; its
    thread is abandoned and replaced. A read stuck in the kernel cannot be cancelled, but a daemon thread does
    not keep the process from exiting. The STALL_LIMIT-th stall raises UserError naming the file."""
    items = list(items)
    workers = workers or DECODE_THREADS
    timeout = STALL_SECONDS if timeout is None else timeout
    todo = queue.Queue()
    cond = threading.Condition()
    state = [{"started": None, "done": False, "result": None, "error": None} for _ in items]

    def worker():
        while True:
            k = todo.get()
            if k is None:
                return
            job = state[k]
            with cond:
                job["started"] = time.monotonic()
            try:
                job["result"] = fn(items[k])
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which decides
                job["error"] = e
            with cond:
                job["done"] = True
                cond.notify_all()

    threads = workers
    for _ in range(workers):
        threading.Thread(target=worker, daemon=True, name="decode").start()
    ahead, queued, stalls = 2 * workers, 0, 0
    try:
        for k, item in enumerate(items):
            while queued < min(len(items), k + ahead + 1):
                todo.put(queued)
                queued += 1
            job = state[k]
            with cond:
                while not job["done"]:
                    started = job["started"]
                    left = timeout if started is None else started + timeout - time.monotonic()
                    if left <= 0:
                        break
                    cond.wait(min(left, 1.0))
                done = job["done"]
            if done:
                yield item, job["result"], job["error"]
                continue
            stalls += 1
            if stalls >= STALL_LIMIT:
                raise UserError(f"{name_of(item)}: no image after {timeout:g} s; {stalls} files stalled like this "
                                "(a network mount that stopped answering?)")
            threads += 1
            threading.Thread(target=worker, daemon=True, name="decode").start()
            yield item, None, Stalled(f"stalled (no image after {timeout:g} s)")
    finally:
        for _ in range(threads):
            todo.put(None)


def skip_reason(error: BaseException) -> str:
    """A few words on why a file was left out, for the warning line."""
    if isinstance(error, (SkippedFile, Stalled)):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return "vanished"
    return "unreadable"


def decode_each(paths, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, frame_share: float = 0.0):
    """Yield (path, uint8 RGB size x size or None, skip reason or None) for each path in order, decoded on
    DECODE_THREADS threads within the pixel budget, stalls bounded (map_bounded)."""
    for path, img, error in map_bounded(lambda p: decode_image(p, size, max_pixels, frame_share), paths):
        yield path, img, None if error is None else skip_reason(error)


def probe_files(paths, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[int, str]:
    """{index: reason} for the paths that training would skip before decoding (special files, headers that
    are not an image, over --max-pixels at the smallest JPEG scale); headers only, stalls bounded."""
    return {i: skip_reason(error) for i, (_, _, error) in
            enumerate(map_bounded(lambda p: probe_image(p, max_pixels), paths)) if error is not None}


def _imageset_from(x, meta, classes) -> ImageSet:
    keep = np.asarray(meta["keep"], dtype=np.int64)
    all_kept = len(keep) == meta["n"]
    return ImageSet(
        x=x if all_kept else x[keep],
        y=np.asarray(meta["labels"], np.int32)[keep],
        classes=tuple(classes),
        paths=[meta["paths"][i] for i in keep],
        masked=np.asarray(meta["masked"], bool)[keep],
        skipped=list(meta["skipped"]),
        mask_problems=list(meta["mask_problems"]),
        skip_reasons=list(meta.get("skip_reasons") or ["unreadable"] * len(meta["skipped"])),
    )


def _read_cache(cache_dir: Path, key: str, classes) -> ImageSet | None:
    try:
        meta = json.loads((cache_dir / f"{key}.json").read_text())
        x = np.load(cache_dir / f"{key}.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or x.shape != (meta["n"], meta["size"], meta["size"], 3) or x.dtype != np.uint8:
        return None
    return _imageset_from(x, meta, classes)


def _reserve_disk(path):
    """Allocate the cache file's blocks now: a full disk then fails here with ENOSPC, instead of killing the
    process with SIGBUS when a page of the memory map is first written."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # unsupported: write as before
            raise
    finally:
        os.close(fd)


def _remove_dead_builds(cache_dir: Path, key: str):
    """Delete temp arrays (<key>.<pid>.*.npy.part) left by a build of this key whose process was killed."""
    for part in cache_dir.glob(f"{key}.*.npy.part"):
        pid = part.name.split(".")[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            part.unlink(missing_ok=True)
        except OSError:  # alive (owned by another user): leave it
            pass


def _ensure_writable(cache_dir: Path) -> bool:
    """True when the cache folder can be written; otherwise warn once and decode into memory."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
        return True
    except OSError as e:
        print(f"warning: cache folder {cache_dir} is not writable ({e.strerror}); decoding into memory, no cache",
              file=sys.stderr)
        return False


def _shown(path, root=None) -> str:
    """A path as a warning shows it: relative to the data folder `root` (or the folder above it, which holds
    mask/ beside data/), so that files of the same name in different folders stay distinguishable."""
    if root is not None:
        if Path(path).is_relative_to(root):
            return str(Path(path).relative_to(root))
        if Path(path).is_relative_to(Path(root).parent):
            return os.path.relpath(path, root)
    return str(path)


def skipped_warning(name: str | None, skipped, reasons, root=None, limit: int = 12) -> str | None:
    """One warning line for the skipped files: how many, grouped by why, the first `limit` named relative to
    `root` (e.g. '... in ROOT: 2 unreadable (Basophil/a.jpg, Monocyte/a.jpg), 1 named pipe (Neutrophil/p.jpg)').
    None when nothing was skipped."""
    if not skipped:
        return None
    reasons = list(reasons) + ["unreadable"] * (len(skipped) - len(reasons))
    groups: dict[str, list[str]] = {}
    for path, reason in zip(skipped, reasons):
        kind, _, detail = reason.partition(" (")
        groups.setdefault(kind, []).append(_shown(path, root) + (f": {detail[:-1]}" if detail else ""))
    where = f" in {root}" if root is not None else ""
    if list(groups) == ["unreadable"]:
        names = groups["unreadable"]
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        text = f"skipped {len(skipped)} unreadable image(s){where}: {', '.join(names[:limit])}{more}"
    else:
        parts, left = [], limit
        for kind, names in groups.items():
            shown = names[:max(left, 1)]
            left -= len(shown)
            more = f", and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
            parts.append(f"{len(names)} {kind} ({', '.join(shown)}{more})")
        text = f"skipped {len(skipped)} file(s){where}: " + ", ".join(parts)
    return "warning: " + (f"{name}: " if name else "") + text


def _warn_skipped(images: ImageSet, name: str, mask_mode: str = "replace", root=None):
    line = skipped_warning(name, images.skipped, images.skip_reasons, root)
    if line:
        print(line, file=sys.stderr)
    if images.mask_problems:
        shown = ", ".join(_shown(p, root) for p in images.mask_problems[:3])
        more = f" and {len(images.mask_problems) - 3} more" if len(images.mask_problems) > 3 else ""
        action = "masked copies left out" if mask_mode in ("only", "add") else "images kept unmasked"
        print(f"warning: {name}: {len(images.mask_problems)} unreadable or empty mask(s), {action}: "
              f"{shown}{more}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Streaming images without labels (inspect_model.py predict and gradcam): a batch at a time, so thousands of
# images never sit in memory at once; decoded exactly as for training
# ----------------------------------------------------------------------------------------------

def images_in(paths, skipped: list | None = None) -> list[Path]:
    """The image files named by `paths`: files as given, folders searched recursively (list_images). Special
    files (pipes, sockets, devices, dangling links) are appended to `skipped` as (path, reason), never opened."""
    found = []
    for p in map(Path, paths):
        problem = file_problem(p)
        if p.is_dir():
            found += list_images(p, skipped)
        elif problem is None:
            found.append(p)
        elif problem != "vanished" and skipped is not None:
            skipped.append((p, problem))
        else:
            raise UserError(f"{p}: no such file or folder")
    if not found:
        special = f"; skipped {skipped[0][0]} ({skipped[0][1]})" if skipped else ""
        raise UserError(f"{', '.join(map(str, paths))}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})"
                        f"{special}")
    return found


def decode_batches(files: list[Path], size: int, batch_size: int, skipped: list,
                   max_pixels: int = DEFAULT_MAX_PIXELS, frame_share: float = 0.0):
    """Yield (paths, uint8 array) per batch, decoded as in training (decode_each: threads, pixel budget, stalls
    bounded); files left out are appended to `skipped` as (path, reason)."""
    for start in range(0, len(files), batch_size):
        decoded = list(decode_each(files[start:start + batch_size], size, max_pixels, frame_share))
        skipped += [(path, why) for path, img, why in decoded if img is None]
        keep = [(path, img) for path, img, _ in decoded if img is not None]
        if keep:
            yield [path for path, _ in keep], np.stack([img for _, img in keep])


@contextlib.contextmanager
def progress(total: int, unit: str = "image", stream=None):
    """Keras' progress bar on `stream` (default stdout; stderr where stdout carries a CSV), as an update(done)
    function; a no-op when the stream is not a terminal (logs, CI)."""
    stream = stream or sys.stdout
    if not stream.isatty():
        yield lambda done: None
        return
    import keras  # only for its progress bar
    with contextlib.redirect_stdout(stream):
        bar = keras.utils.Progbar(total, unit_name=unit)

    def update(done):
        with contextlib.redirect_stdout(stream):
            bar.update(done)
    yield update


def warn_skipped_files(skipped: list, name: str | None = None):
    """One warning line on stderr for (path, reason) pairs left out while streaming."""
    line = skipped_warning(name, [p for p, _ in skipped], [why for _, why in skipped])
    if line:
        print(line, file=sys.stderr)
