"""Data: find images in the course layout and decode them once into a uint8 cache (ImageSet).

The flow (docs/ARCHITECTURE.md):
    files --scan--> FileList (+ mask pairs) --decode, RGB, resize, mask mode--> uint8 cache on disk
          --> ImageSet(x: uint8 N x H x W x 3, y, classes, paths) --> training.train

numpy and Pillow only; Keras is imported for its progress bar while decoding.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
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
CACHE_FORMAT = 1  # bump when decoding changes pixels, so old caches are rebuilt

# A 10,000 x 10,000 scan is a legitimate (if silly) input; refuse only real decompression bombs.
Image.MAX_IMAGE_PIXELS = 400_000_000


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


def list_images(folder: Path) -> list[Path]:
    """Every image under `folder`, recursively, sorted; junk files and folders and symlink loops skipped."""
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
        found += [Path(dirpath) / f for f in filenames if _is_image_name(f)]
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
    paths, labels = [], []
    for d, cls in sorted(mapping.items(), key=lambda kv: (classes.index(kv[1]), kv[0].name)):
        files = list_images(d)
        paths += files
        labels += [classes.index(cls)] * len(files)
    if not paths:
        raise UserError(f"{folder}: the class folders hold no images (.jpg, .png, .bmp, .tif)")
    masks = pair_masks(paths, folder, mask_folder) if mask_folder else [None] * len(paths)
    return FileList(paths, np.asarray(labels, np.int32), tuple(classes), masks, folder)


def pair_masks(paths: list[Path], data_folder: Path, mask_folder: Path) -> list[Path | None]:
    """Each image's mask: same class folder and file stem under `mask_folder`, any image suffix."""
    if not Path(mask_folder).is_dir():
        return [None] * len(paths)
    index = {}
    for m in list_images(Path(mask_folder)):
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


def find_unlabeled(root: Path) -> list[Path]:
    """The unlabeled renal tissue images (pRCC_nolabel), or [] when absent."""
    d = _child_ci(Path(root), PRCC_DIR)
    return list_images(d) if d else []


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

def decode_image(path: Path, size: int, frame_share: float = 0.0) -> np.ndarray:
    """Any image file as uint8 RGB size x size: EXIF orientation applied, 16-bit scaled, alpha dropped.
    frame_share > 0: cut out a frame centred on the white cell, the cell spanning that share of it (framing.py)."""
    if frame_share:
        return decode_framed(path, size, frame_share)[0]
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # let libjpeg decode at 1/2, 1/4, 1/8 scale: big speed-up
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img = img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)


def decode_framed(path: Path, size: int, frame_share: float, mask_path: Path | None = None):
    """(image, cell mask or None), both cut to the frame centred on the white cell: found by its mask where one
    is given, else by its stain (framing.py)."""
    import framing
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (4 * size, 4 * size))  # the frame is a crop: keep more pixels than the output
        image = np.asarray(_to_rgb(ImageOps.exif_transpose(img)))
    cell = decode_mask(mask_path, image.shape[1::-1]) if mask_path is not None else None
    box = framing.frame_box(image, frame_share, cell)
    return framing.crop(image, box, size), (None if cell is None else framing.crop(cell, box, size, nearest=True))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # microscope background is bright
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def decode_mask(path: Path, size) -> np.ndarray:
    """A mask as a boolean size x size array: the cell is every pixel clearly above background.

    Binary (0/255), JPEG-noisy and 3-level (0 background, 128 cytoplasm, 255 nucleus) masks all give
    the whole cell. Nearest-neighbour resizing keeps the edge crisp. size: a side, or (width, height).
    """
    with Image.open(path) as m:
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
    skipped: list[str]  # files that could not be decoded
    mask_problems: list[str] = dataclasses.field(default_factory=list)

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


def cache_key(entries, size: int, mask_fill: str, mask_mode: str | None = None, frame_share: float = 0.0) -> str:
    """Changes whenever any file (path, size, mtime) or any option that changes pixels changes."""
    # The mode itself is in the key: 'only' and 'replace' have the same entries when every image has a mask,
    # but treat a broken mask differently.
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, size, mask_fill] + ([mask_mode] if mask_mode else [])
                                  + ([f"frame{frame_share:g}"] if frame_share else [])).encode())
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
                name: str = "images", frame_share: float = 0.0) -> ImageSet:
    """Decode `files` once into a uint8 array; later calls with the same files and options map the cache.
    frame_share > 0 frames each image on its white cell (decode_image)."""
    entries = _entries(files, mask_mode)
    if not entries:
        raise UserError(f"{files.root}: no images for --masks {mask_mode}"
                        + (" (no image has a mask)" if mask_mode == "only" else ""))
    key = cache_key(entries, size, mask_fill, mask_mode, frame_share)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if use_cache:
        cached = _read_cache(cache_dir, key, files.classes)
        if cached is not None:
            if verbose:
                print(f"{name}: {len(cached)} images from cache {cache_dir / key}.npy")
            _warn_skipped(cached, name, mask_mode)
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
        ok, problems = _decode_into(x, entries, size, mask_fill, verbose, name, frame_share)
    except BaseException:
        del x
        if tmp:
            os.unlink(tmp)
        raise
    paths = [str(entries[i][0]) for i in range(n)]
    skipped = [paths[i] for i in np.flatnonzero(~ok)]
    if mask_mode in ("only", "add"):
        # A masked copy whose mask failed would be a raw image (only) or a duplicate (add): leave it out.
        ok[sorted(problems)] = False
    keep = np.flatnonzero(ok)
    meta = {"key": key, "n": n, "size": size, "classes": list(files.classes), "keep": keep.tolist(),
            "labels": [e[2] for e in entries], "paths": paths,
            "masked": [e[1] is not None and i not in problems for i, e in enumerate(entries)],
            "skipped": skipped, "mask_problems": [str(entries[i][1]) for i in sorted(problems)]}
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
    _warn_skipped(result, name, mask_mode)
    return result


def _decode_into(x, entries, size, mask_fill, verbose, name, frame_share=0.0):
    """Decode entries into x with a thread pool (Pillow releases the GIL), a chunk at a time."""
    import keras  # only for its progress bar
    n = len(entries)
    ok = np.zeros(n, bool)
    problems = set()

    def work(i):
        image, mask, _ = entries[i]
        try:
            img = decode_image(image, size, frame_share)
        except Exception:
            return i, None, False
        if mask is not None:
            try:
                if frame_share:  # framed on the mask's cell, and the mask framed with it
                    img, cell = decode_framed(image, size, frame_share, mask)
                else:
                    cell = decode_mask(mask, size)
                if not cell.any():
                    raise ValueError("empty mask")
                img = apply_mask(img, cell, mask_fill)
            except Exception:
                return i, img, False
        return i, img, True

    bar = keras.utils.Progbar(n, unit_name="image") if verbose and sys.stdout.isatty() else None
    if verbose:
        print(f"{name}: decoding {n} images to {size}x{size} (once; cached afterwards)")
    workers = max(1, min(8, os.cpu_count() or 1))
    chunk = 64  # at most a chunk of full-size originals is held at a time
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, n, chunk):
            for i, img, mask_ok in pool.map(work, range(start, min(n, start + chunk))):
                if img is not None:
                    x[i] = img
                    ok[i] = True
                    if not mask_ok:
                        problems.add(i)
            if bar:
                bar.update(min(n, start + chunk))
    return ok, problems


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


def _warn_skipped(images: ImageSet, name: str, mask_mode: str = "replace"):
    if images.skipped:
        shown = ", ".join(Path(p).name for p in images.skipped[:3])
        more = f" and {len(images.skipped) - 3} more" if len(images.skipped) > 3 else ""
        print(f"warning: {name}: skipped {len(images.skipped)} unreadable image(s): {shown}{more}", file=sys.stderr)
    if images.mask_problems:
        shown = ", ".join(Path(p).name for p in images.mask_problems[:3])
        more = f" and {len(images.mask_problems) - 3} more" if len(images.mask_problems) > 3 else ""
        action = "masked copies left out" if mask_mode in ("only", "add") else "images kept unmasked"
        print(f"warning: {name}: {len(images.mask_problems)} unreadable or empty mask(s), {action}: "
              f"{shown}{more}", file=sys.stderr)


