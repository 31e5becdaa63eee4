"""The built-in SYNTHETIC demo dataset, in the exact course layout, so every script runs with no arguments.

Drawn cells, not real ones: five classes whose nucleus shape, size, texture and granules differ the way real
white blood cells do (multi-lobed neutrophil; bilobed eosinophil with orange-red granules; dark, granular
basophil; lymphocyte with a large round nucleus; monocyte with a kidney-shaped nucleus), with exact 3-level masks
(0 background, 128 cytoplasm, 255 nucleus) for about 10% of the training images, and the course's class
imbalance (61% neutrophils). CAM16-like tissue tiles (normal: dense small lymphocyte nuclei; tumor: large pale
pleomorphic nuclei) and unlabeled pRCC-like tiles complete the layout. Numbers measured on it say the code works,
nothing about real cells.

    python demo_data.py [--out DIR]     # writes (or finds) the demo data and prints its folder
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data import WBC_CLASSES, default_cache_dir
from runfiles import build_folder_atomically

DEMO_VERSION = 2
FOLDER_NAMES = {"basophil": "Basophil", "eosinophil": "Eosinophil", "lymphocyte": "Lymphocyte",
                "monocyte": "Monocyte", "neutrophil": "Neutrophil"}
# The course's WBC_100 class shares.
COURSE_SHARES = {"basophil": 0.021, "eosinophil": 0.073, "lymphocyte": 0.239, "monocyte": 0.055, "neutrophil": 0.612}
TRAIN_IMAGES, VAL_IMAGES, CELL_SIZE, TILE_SIZE = 520, 200, 128, 96


def demo_root() -> Path:
    """Where the demo data lives (in the cache folder), generated or not."""
    return default_cache_dir() / f"demo_v{DEMO_VERSION}"


def ensure_demo_data(root: Path | None = None) -> Path:
    """The demo data's root folder, generated once (atomically) on first use."""
    root = Path(root) if root else demo_root()
    if (root / "manifest.json").exists():
        return root
    print(f"generating the synthetic demo dataset in {root} (once)")

    def fill(tmp):
        manifest = generate(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

    build_folder_atomically(root, fill, prefix=".demo-")
    return root


def course_counts(total: int, shares=COURSE_SHARES) -> dict[str, int]:
    """Split `total` by `shares`, every class getting at least one."""
    counts = {c: max(1, int(round(total * s))) for c, s in shares.items()}
    counts["neutrophil"] += total - sum(counts.values())
    return counts


def generate(root: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root = Path(root)
    manifest = {"synthetic": True, "version": DEMO_VERSION, "splits": {}}
    # WBC_100 train and the shared val set.
    train = []  # (class, stem)
    for cls, n in course_counts(TRAIN_IMAGES).items():
        for i in range(n):
            stem = f"{cls[:3]}_{i:04d}"
            _write_cell(root / "WBC_100" / "train", cls, stem, rng, mask=False)
            train.append((cls, stem))
    for cls, n in course_counts(VAL_IMAGES).items():
        for i in range(n):
            _write_cell(root / "WBC_100" / "val", cls, f"val_{cls[:3]}_{i:04d}", rng, mask=False)
    # Nested subsets: WBC_50 within WBC_100, WBC_10 within WBC_50, WBC_1 within WBC_10; each class kept.
    subsets = {"WBC_100": train}
    current = train
    for name, frac in (("WBC_50", 0.5), ("WBC_10", 0.2), ("WBC_1", 0.1)):
        chosen = []
        for cls in WBC_CLASSES:
            items = [t for t in current if t[0] == cls]
            k = max(1, int(round(len(items) * frac)))
            chosen += [items[j] for j in sorted(rng.choice(len(items), k, replace=False))]
        subsets[name] = current = chosen
    # Masks for ~10% of WBC_100/train, stratified, including two of WBC_1's images so every split has some.
    masked = {t for t in subsets["WBC_1"][:2]}
    for cls in WBC_CLASSES:
        items = [t for t in train if t[0] == cls]
        k = max(1, int(round(0.1 * len(items))))
        masked |= {items[j] for j in rng.choice(len(items), k, replace=False)}
    for name, items in subsets.items():
        for cls, stem in items:
            src = root / "WBC_100" / "train" / "data" / FOLDER_NAMES[cls] / f"{stem}.jpg"
            if name != "WBC_100":
                dst = root / name / "train" / "data" / FOLDER_NAMES[cls] / f"{stem}.jpg"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            if (cls, stem) in masked:
                mask_src = root / "WBC_100" / "train" / ".allmasks" / FOLDER_NAMES[cls] / f"{stem}.png"
                dst = root / name / "train" / "mask" / FOLDER_NAMES[cls] / f"{stem}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(mask_src, dst)
        manifest["splits"][name] = {
            "train": {c: sum(1 for t in items if t[0] == c) for c in WBC_CLASSES},
            "masks": sum(1 for t in items if t in masked)}
    shutil.rmtree(root / "WBC_100" / "train" / ".allmasks")
    manifest["splits"]["val"] = course_counts(VAL_IMAGES)
    # CAM16-like tissue and pRCC-like unlabeled tiles.
    cam = root / "CAM16_100cls_10mask"
    for part, n in (("train", 80), ("val", 20), ("test", 20)):
        for label in ("normal", "tumor"):
            for i in range(n):
                tile, nuclei = draw_tissue(label == "tumor", rng)
                path = cam / part / "data" / label / f"{part}_{label}_{i:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                tile.save(path, quality=90)
                if part == "train" and i % 10 == 0:
                    mpath = cam / part / "mask" / label / f"{part}_{label}_{i:04d}.png"
                    mpath.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(nuclei).save(mpath)
    manifest["splits"]["CAM16_100cls_10mask"] = {"train": 160, "val": 40, "test": 40, "masks": 16}
    for i in range(16):
        tile, _ = draw_tissue(bool(i % 2), rng, papillary=True)
        path = root / "pRCC_nolabel" / f"prcc_{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        tile.save(path, quality=90)
    manifest["splits"]["pRCC_nolabel"] = 16
    return manifest


def _write_cell(split_dir: Path, cls: str, stem: str, rng, mask: bool):
    image, cell_mask = draw_cell(cls, rng)
    path = split_dir / "data" / FOLDER_NAMES[cls] / f"{stem}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=92)
    if split_dir.parent.name == "WBC_100" and split_dir.name == "train":
        # Every training cell's mask is drawn; the generator keeps ~10% of them.
        mpath = split_dir / ".allmasks" / FOLDER_NAMES[cls] / f"{stem}.png"
        mpath.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cell_mask).save(mpath)


def _jitter(rgb, rng, amount=18):
    return tuple(int(np.clip(v + rng.normal(0, amount), 0, 255)) for v in rgb)


def draw_cell(cls: str, rng, size: int = CELL_SIZE) -> tuple[Image.Image, np.ndarray]:
    """One synthetic white blood cell among red cells, and its 3-level mask."""
    s = 4  # draw at 4x and downsample: smooth edges
    big = size * s
    bg = _jitter((232, 214, 222), rng, 10)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    # Red blood cells around the field.
    for _ in range(rng.integers(4, 10)):
        r = rng.uniform(0.09, 0.13) * big
        cx, cy = rng.uniform(0, big, 2)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter((222, 150, 160), rng, 12))
        draw.ellipse([cx - r / 2.2, cy - r / 2.2, cx + r / 2.2, cy + r / 2.2], fill=_jitter((232, 178, 185), rng, 8))
    mask = Image.new("L", (big, big), 0)
    mdraw = ImageDraw.Draw(mask)
    radius = {"lymphocyte": (0.17, 0.23), "neutrophil": (0.24, 0.30), "eosinophil": (0.25, 0.31),
              "basophil": (0.21, 0.27), "monocyte": (0.29, 0.36)}[cls]
    R = rng.uniform(*radius) * big
    cx, cy = big / 2 + rng.uniform(-0.06, 0.06, 2) * big
    cyto = {"lymphocyte": (175, 180, 225), "neutrophil": (222, 196, 214), "eosinophil": (236, 190, 170),
            "basophil": (200, 175, 215), "monocyte": (190, 188, 215)}[cls]
    box = [cx - R, cy - R * rng.uniform(0.88, 1.0), cx + R, cy + R * rng.uniform(0.88, 1.0)]
    draw.ellipse(box, fill=_jitter(cyto, rng, 10))
    mdraw.ellipse(box, fill=128)
    nucleus = _jitter((92, 52, 135), rng, 14)

    def blob(x, y, rx, ry, color=nucleus, level=255):
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=color)
        mdraw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=level)

    def granules(n, color, rmin, rmax, spread=0.85):
        for _ in range(n):
            a, d = rng.uniform(0, 2 * math.pi), R * spread * math.sqrt(rng.uniform())
            r = rng.uniform(rmin, rmax) * big
            gx, gy = cx + d * math.cos(a), cy + d * math.sin(a)
            draw.ellipse([gx - r, gy - r, gx + r, gy + r], fill=_jitter(color, rng, 15))

    angle = rng.uniform(0, 2 * math.pi)
    if cls == "lymphocyte":
        blob(cx + rng.uniform(-0.08, 0.08) * R, cy, R * rng.uniform(0.78, 0.88), R * rng.uniform(0.74, 0.86))
    elif cls == "neutrophil":
        granules(60, (200, 160, 195), 0.003, 0.006)
        lobes = rng.integers(3, 6)
        arc = rng.uniform(1.8, 3.2)
        pts = []
        for k in range(lobes):
            a = angle + arc * (k / (lobes - 1) - 0.5)
            pts.append((cx + 0.45 * R * math.cos(a), cy + 0.45 * R * math.sin(a)))
        draw.line(pts, fill=nucleus, width=int(0.08 * R))
        mdraw.line(pts, fill=255, width=int(0.08 * R))
        for x, y in pts:
            r = R * rng.uniform(0.18, 0.25)
            blob(x, y, r, r * rng.uniform(0.8, 1.0))
    elif cls == "eosinophil":
        granules(140, (225, 110, 70), 0.008, 0.013)
        for sign in (-1, 1):
            x = cx + sign * 0.38 * R * math.cos(angle)
            y = cy + sign * 0.38 * R * math.sin(angle)
            blob(x, y, R * rng.uniform(0.28, 0.34), R * rng.uniform(0.24, 0.3))
        draw.line([(cx - 0.38 * R * math.cos(angle), cy - 0.38 * R * math.sin(angle)),
                   (cx + 0.38 * R * math.cos(angle), cy + 0.38 * R * math.sin(angle))], fill=nucleus,
                  width=int(0.08 * R))
    elif cls == "basophil":
        blob(cx, cy, R * 0.55, R * 0.5, color=_jitter((75, 40, 110), rng, 10))
        granules(120, (45, 20, 75), 0.010, 0.018, spread=0.9)
    elif cls == "monocyte":
        granules(25, (175, 175, 205), 0.006, 0.012)  # faint vacuoles
        rx, ry = R * rng.uniform(0.55, 0.65), R * rng.uniform(0.4, 0.48)
        blob(cx, cy, rx, ry, color=_jitter((120, 85, 150), rng, 12))
        bx, by = cx + 0.75 * rx * math.cos(angle), cy + 0.75 * ry * math.sin(angle)
        br = R * rng.uniform(0.28, 0.34)
        draw.ellipse([bx - br, by - br, bx + br, by + br], fill=_jitter(cyto, rng, 6))
        mdraw.ellipse([bx - br, by - br, bx + br, by + br], fill=128)
    # Rotate, blur, downsample, colour-jitter and add sensor noise.
    turn = rng.uniform(0, 360)
    img = img.rotate(turn, resample=Image.BILINEAR, fillcolor=bg)
    mask = mask.rotate(turn, resample=Image.NEAREST, fillcolor=0)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 4.0))).resize((size, size), Image.LANCZOS)
    mask = mask.resize((size, size), Image.NEAREST)
    arr = np.asarray(img, np.float32) * rng.uniform(0.88, 1.12, 3) + rng.normal(0, 7, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), np.asarray(mask)


def draw_tissue(tumor: bool, rng, size: int = TILE_SIZE, papillary: bool = False):
    """A lymph-node-like H&E tile: normal = many small dark round nuclei; tumor = fewer, larger, paler,
    irregular nuclei with nucleoli. Returns the tile and a binary nucleus mask."""
    s = 3
    big = size * s
    img = Image.new("RGB", (big, big), _jitter((235, 190, 215), rng, 12))
    draw = ImageDraw.Draw(img)
    mask = Image.new("L", (big, big), 0)
    mdraw = ImageDraw.Draw(mask)
    if papillary:
        for _ in range(6):
            x0, y0 = rng.uniform(0, big, 2)
            draw.line([(x0, y0), tuple(rng.uniform(0, big, 2))], fill=_jitter((245, 225, 235), rng, 8),
                      width=int(rng.uniform(8, 20)))
    n = rng.integers(28, 40) if tumor else rng.integers(70, 100)
    for _ in range(n):
        x, y = rng.uniform(0, big, 2)
        if tumor:
            rx, ry = rng.uniform(0.035, 0.06, 2) * big
            color = _jitter((130, 80, 160), rng, 18)
        else:
            rx = ry = rng.uniform(0.018, 0.03) * big
            color = _jitter((70, 35, 115), rng, 12)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=color)
        mdraw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
        if tumor:
            r = 0.25 * min(rx, ry)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter((60, 20, 90), rng, 10))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5))).resize((size, size), Image.LANCZOS)
    arr = np.asarray(img, np.float32) * rng.uniform(0.9, 1.1, 3) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), np.asarray(mask.resize((size, size)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="where to write it (default: the cache folder)")
    args = p.parse_args()
    print(ensure_demo_data(args.out))


if __name__ == "__main__":
    main()
