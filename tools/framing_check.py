"""Does cell-centred framing find the same cell when an image is cropped, enlarged or recoloured as another lab's
microscope might? A consistency check of framing.find_cell on your own images, no model and no labels involved.

    python tools/framing_check.py ROOT/WBC_100/train/data --images 40

For each image (up to --images per folder, found recursively, grouped by the folder that holds them) the cell is
found once as it is, then again in each variant: a tight crop around the found cell (the cell spanning ~70% of
the frame, as some labs crop), the same crop enlarged 1.7x, a hue turn, less saturation, less contrast, more
brightness, a 2 px blur and a bluer white balance. Prints, per folder and variant, the median ratio of the found
extent to the expected one (1 when framing is consistent), the share of images whose found extent shrank below 0.8
of it (a cell cut down, e.g. a multi-lobed nucleus reduced to one lobe) or grew beyond 1.25, and the share whose
centre moved by more than a quarter of the extent. Nothing is written.
"""
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
import cli  # noqa: E402
from runfiles import UserError  # noqa: E402

TIGHT = 1.4  # the tight crop's side, in found extents: the cell spans ~70% of it
ENLARGE = 1.7


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="tools/framing_check.py")
    parser.add_argument("folder", type=Path, help="a folder of images (class folders are reported one by one)")
    parser.add_argument("--images", type=int, default=40, help="images per folder, the first in name order")
    args = parser.parse_args(argv)
    cli.check_positive(args, "images")
    if not args.folder.is_dir():
        raise UserError(f"{args.folder}: no such folder (expected a folder of images)")
    return args


def variants(image: np.ndarray, cell: tuple[float, float, float]):
    """(name, image, scale): each altered copy of `image` and how much larger the cell should appear in it."""
    from PIL import Image, ImageEnhance, ImageFilter
    import framing
    cy, cx, extent = cell
    side = max(8, int(round(TIGHT * extent)))
    box = (int(round(cy - side / 2)), int(round(cx - side / 2)), side)
    yield "tight crop", framing.crop(image, box, side), 1.0
    yield f"tight crop x{ENLARGE:g}", framing.crop(image, box, int(round(side * ENLARGE))), ENLARGE
    pil = Image.fromarray(image)
    hsv = np.asarray(pil.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + 20) % 256
    yield "hue +28 deg", np.asarray(Image.fromarray(hsv, "HSV").convert("RGB")), 1.0
    yield "saturation x0.6", np.asarray(ImageEnhance.Color(pil).enhance(0.6)), 1.0
    yield "contrast x0.7", np.asarray(ImageEnhance.Contrast(pil).enhance(0.7)), 1.0
    yield "brightness x1.15", np.asarray(ImageEnhance.Brightness(pil).enhance(1.15)), 1.0
    yield "blur 2 px", np.asarray(pil.filter(ImageFilter.GaussianBlur(2))), 1.0
    bluer = image.astype(np.float32) * np.float32([0.85, 1.0, 1.15])
    yield "bluer", np.clip(bluer, 0, 255).astype(np.uint8), 1.0


def check_image(image: np.ndarray) -> dict[str, tuple[float, float]]:
    """variant -> (found extent / expected extent, centre shift / extent) for one RGB image. The tight crops'
    centre is compared with the crop's own centre, where the cell was put."""
    import framing
    cell = framing.find_cell(image)
    cy, cx, extent = cell
    out = {}
    for name, altered, scale in variants(image, cell):
        ay, ax, found = framing.find_cell(altered)
        if name.startswith("tight crop"):
            ey = ex = (altered.shape[0] - 1) / 2
        else:
            ey, ex = cy, cx
        out[name] = (found / (extent * scale), float(np.hypot(ay - ey, ax - ex)) / (extent * scale))
    return out


def summarise(results: list[dict]) -> dict[str, dict[str, float]]:
    table = {}
    for name in results[0]:
        ratio = np.array([r[name][0] for r in results])
        shift = np.array([r[name][1] for r in results])
        table[name] = {"median_ratio": float(np.median(ratio)), "shrank": float(np.mean(ratio < 0.8)),
                       "grew": float(np.mean(ratio > 1.25)), "moved": float(np.mean(shift > 0.25))}
    return table


def main(argv=None):
    args = parse_args(argv)
    from PIL import Image
    import data
    groups = defaultdict(list)
    for path in data.list_images(args.folder):  # regular image files only, junk and symlink loops skipped
        groups[str(path.parent.relative_to(args.folder)) if path.parent != args.folder else "."].append(path)
    if not groups:
        raise UserError(f"{args.folder}: no images found (expected image files such as .png or .jpg)")
    unreadable = 0
    print(f"{'folder':14s} {'variant':22s} {'median extent ratio':>19s} {'shrank <0.8':>11s} "
          f"{'grew >1.25':>10s} {'moved >0.25':>11s}")
    for group, paths in groups.items():
        results = []
        for path in paths[:args.images]:
            try:
                with Image.open(path) as img:
                    image = np.asarray(img.convert("RGB"))
            except (OSError, ValueError):
                unreadable += 1
                continue
            results.append(check_image(image))
        if not results:
            continue
        for name, row in summarise(results).items():
            print(f"{group[:14]:14s} {name:22s} {row['median_ratio']:19.2f} {row['shrank']:11.2f} "
                  f"{row['grew']:10.2f} {row['moved']:11.2f}")
    if unreadable:
        print(f"warning: {unreadable} unreadable image(s) skipped", file=sys.stderr)


if __name__ == "__main__":
    cli.run_main(main)
