"""Cell-centred framing: find the white cell by its stain and crop so that it fills a fixed share of the frame.

Labs crop their cells differently (in PBC the white cell spans about a third of the frame among red cells; in BCCD
it fills most of it). The nucleus is the darkest, most saturated thing in a blood smear, so the cell is found as the
largest blob of high nucleus score (darkness times saturation, thresholded by Otsu's method, small lobes merged by a
morphological closing); with a mask, only inside the mask's cell. A frame centred on that blob, its side the
blob's extent divided by `share`, is cut out (edge pixels repeated where it leaves the image) and resized.

Applied at decode time (data.decode_image's `frame_share`), so training, evaluation and prediction see the same
framing; the saved model records the share in its metadata ("framing"), and `frame_image` is the function a plain
Keras user applies before calling the model. numpy, scipy and Pillow only.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

# Bumped whenever find_cell or the crop changes which pixels a framed image holds: the decode cache's key and a
# model's metadata carry it, so a cache is never reused across framings and a model framed by another version is
# named as such.
VERSION = 1


def nucleus_score(image) -> np.ndarray:
    """Darkness x saturation per pixel, in [0, 1]: high on a stained nucleus, low on background and red cells."""
    # Channel by channel: numpy's reductions over a length-3 last axis are ~20x slower, for the same numbers.
    r, g, b = (np.asarray(image)[..., k].astype(np.float32) / np.float32(255.0) for k in range(3))
    top, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    saturation = (top - low) / np.maximum(top, np.float32(1e-6))
    return (np.float32(1.0) - (r + g + b) / np.float32(3.0)) * saturation


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a histogram."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def find_cell(image, mask=None) -> tuple[float, float, float]:
    """(row, col, extent) of the white cell's nucleus in pixels: its centre and the larger side of its bounding
    box. With a mask (nonzero = cell) the nucleus is looked for inside the mask only (the mask itself when no
    nucleus shows there), so that the extent means the same with and without masks. An image with no clear blob
    gives its centre and half its side."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    # Smoothed first: a nucleus's granular texture must not break it into specks.
    score = ndimage.gaussian_filter(nucleus_score(image), sigma=max(0.5, min(h, w) / 100))
    inside = np.ones((h, w), bool) if mask is None else np.asarray(mask) > 0
    blob = (score > max(otsu_threshold(score[inside] if inside.any() else score), 0.05)) & inside
    radius = max(1, round(min(h, w) / 50))
    blob = ndimage.binary_opening(blob, iterations=radius)
    blob = ndimage.binary_closing(blob, iterations=2 * radius)  # merges a neutrophil's lobes
    if mask is not None and not blob.any():
        blob = inside
    labels, n = ndimage.label(blob)
    if n == 0:
        return (h - 1) / 2.0, (w - 1) / 2.0, min(h, w) / 2.0
    sizes = ndimage.sum(blob, labels, index=np.arange(1, n + 1))
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    return float(rows.mean()), float(cols.mean()), float(extent)


def apparent_size(image, mask=None) -> float:
    """The cell's extent as a fraction of the image side (the out-of-distribution check compares these)."""
    image = np.asarray(image)
    return find_cell(image, mask)[2] / min(image.shape[:2])


def frame_box(image, share: float, mask=None) -> tuple[int, int, int]:
    """(top, left, side) of the square frame centred on the cell, the cell's extent `share` of its side."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    cy, cx, extent = find_cell(image, mask)
    # Bounds: a speck must not blow up into the whole frame, a failed detection must not shrink the image to a dot.
    side = float(np.clip(extent / share, 0.25 * min(h, w), 2.0 * max(h, w)))
    return int(round(cy - side / 2)), int(round(cx - side / 2)), int(round(side))


def crop(array, box: tuple[int, int, int], size: int, nearest: bool = False) -> np.ndarray:
    """The box of an image (H, W, 3) or mask (H, W) resized to size x size; edge pixels repeated outside."""
    array = np.asarray(array)
    top, left, side = box
    h, w = array.shape[:2]
    pad = max(0, -top, -left, top + side - h, left + side - w)
    if pad:
        array = np.pad(array, ((pad, pad), (pad, pad)) + ((0, 0),) * (array.ndim - 2), mode="edge")
        top, left = top + pad, left + pad
    part = Image.fromarray(np.ascontiguousarray(array[top:top + side, left:left + side]))
    if nearest:
        return np.asarray(part.resize((size, size), Image.NEAREST))
    return np.asarray(part.resize((size, size), Image.BILINEAR, reducing_gap=3.0), dtype=np.uint8)


def frame_share(meta: dict) -> float:
    """The framing a saved model expects its images in (0.0: none), from its metadata."""
    return float((meta.get("framing") or {}).get("share", 0.0))


def describe(share: float) -> dict | None:
    """What a model's metadata records of its framing (None: unframed)."""
    return {"share": float(share), "version": VERSION} if share else None


def version_warning(meta: dict) -> str | None:
    """One line when a saved model was framed by another version of find_cell than this one (metadata without
    a version: version 1, the first)."""
    framed = meta.get("framing") or {}
    if not framed.get("share"):
        return None
    version = int(framed.get("version", 1))
    if version == VERSION:
        return None
    return (f"warning: this model was trained on images framed by framing version {version}; this code frames "
            f"with version {VERSION}, so its images may be cut slightly differently from the training images")


def frame_image(image, size: int, share: float, mask=None) -> np.ndarray:
    """A size x size uint8 crop centred on the cell, the cell's extent `share` of the side (bilinear resize):
    what a model trained with --frame-cell SHARE expects, from a full-size RGB image."""
    return crop(image, frame_box(image, share, mask), size)
