"""Hostile and odd files for tests/test_hostile_files.py: special files named like images, and decompression bombs
written without ever holding their pixels (zlib is fed one row at a time, or only the header is written).

    python tests/hostile.py make bombs|large|many FOLDER
    python tests/hostile.py measure FOLDER [--max-pixels N] [--threads N] [--size N]

`make` writes the folders the memory tests use (bombs: one per format; large: a 6000 x 6000 RGB PNG; many: 16
PNGs of 2500 x 2500 RGB). `measure` decodes every image under FOLDER with data.load_images (no cache) in this fresh process and prints one JSON line:
the peak resident memory before and after (resource.getrusage, bytes), the images kept and the files skipped
with their reasons. The memory tests run it in a subprocess so that nothing else in the process counts.
"""
import io
import json
import os
import socket
import struct
import sys
import zlib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


# ----------------------------------------------------------------------------------------------
# Special files
# ----------------------------------------------------------------------------------------------

def make_special_files(folder: Path, prefix: str = "") -> dict[str, str]:
    """A named pipe, a Unix socket, a dangling link and a link to /dev/zero, each named like an image, in
    `folder`: {file name: the reason the scan must give}."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {f"{prefix}fifo.jpg": "named pipe", f"{prefix}sock.png": "socket",
             f"{prefix}gone.png": "dangling link", f"{prefix}zero.jpg": "device file"}
    os.mkfifo(folder / f"{prefix}fifo.jpg")
    here = os.getcwd()
    os.chdir(folder)  # a socket path is limited to ~100 bytes: bind by a relative name
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(f"{prefix}sock.png")
    finally:
        os.chdir(here)
    os.symlink(folder / "no-such-file.png", folder / f"{prefix}gone.png")
    os.symlink("/dev/zero", folder / f"{prefix}zero.jpg")
    return names


# ----------------------------------------------------------------------------------------------
# Decompression bombs
# ----------------------------------------------------------------------------------------------

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(path: Path, width: int, height: int, channels: int = 1) -> Path:
    """A valid PNG of width x height black pixels (8-bit gray or RGB): about 1/1000 of its pixel bytes."""
    color = {1: 0, 3: 2}[channels]
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + width * channels)  # filter byte 0, then the row
    parts = [comp.compress(row) for _ in range(height)]
    data = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def tiff_bomb(path: Path, width: int, height: int) -> Path:
    """A valid deflate-compressed 8-bit gray TIFF of width x height black pixels, in one strip."""
    comp = zlib.compressobj(9)
    row = b"\0" * width
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, height), (279, 4, len(data))]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + data)
    return path


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A small real JPEG whose frame header (SOF0) claims width x height: the header of a bomb."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(buf, "JPEG", quality=90)
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(raw))
    return path


def gif_claiming(path: Path, width: int, height: int) -> Path:
    """A GIF whose screen and first frame claim width x height, with a two-colour palette and an empty image."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x01\x2c\x00"
    path.write_bytes(header + frame + b"\x3b")
    return path


def make_bombs(folder: Path) -> dict[str, str]:
    """One bomb per format in `folder`: {file name: what it claims}. Every one is over the default --max-pixels
    (50 million); decoding any of them would take at least 81 MB."""
    folder.mkdir(parents=True, exist_ok=True)
    png_bomb(folder / "bomb.png", 12_000, 12_000)        # 144 M pixels of real data, 140 kB on disk
    tiff_bomb(folder / "bomb.tif", 9_000, 9_000)         # 81 M pixels of real data
    gif_claiming(folder / "bomb.gif", 9_000, 9_000)      # 81 M pixels claimed
    jpeg_claiming(folder / "bomb.jpg", 65_535, 65_535)   # the largest JPEG: 4.3 G pixels, 268 M at 1/8 scale
    return {"bomb.png": "12000x12000", "bomb.tif": "9000x9000", "bomb.gif": "9000x9000",
            "bomb.jpg": "65535x65535"}


# ----------------------------------------------------------------------------------------------
# Measuring a decode in a fresh process
# ----------------------------------------------------------------------------------------------

def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports kB, macOS bytes)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure(folder: Path, max_pixels: int | None, threads: int | None, size: int) -> dict:
    import numpy as np
    import data
    from PIL import Image
    # Pillow, numpy and the decoders' libraries loaded and touched once before the baseline.
    data.decode_image(_warm_up_file(), size)
    if threads:
        data.DECODE_THREADS = threads
    paths = data.list_images(folder)
    files = data.FileList(paths, np.zeros(len(paths), np.int32), ("any",), [None] * len(paths), folder)
    before = peak_rss()
    images = data.load_images(files, size, use_cache=False, verbose=False,
                              max_pixels=max_pixels or data.DEFAULT_MAX_PIXELS)
    after = peak_rss()
    del Image
    return {"peak_before": before, "peak_after": after, "kept": [Path(p).name for p in images.paths],
            "skipped": {Path(p).name: r for p, r in zip(images.skipped, images.skip_reasons)}}


def _warm_up_file() -> Path:
    import tempfile
    from PIL import Image
    path = Path(tempfile.mkdtemp()) / "warm.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    return path


def make(kind: str, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "bombs":
        make_bombs(folder)
    elif kind == "large":
        png_bomb(folder / "slide.png", 6000, 6000, channels=3)
    else:
        for i in range(16):
            png_bomb(folder / f"img{i:02d}.png", 2500, 2500, channels=3)


def main():
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("kind", choices=["bombs", "large", "many"])
    p.add_argument("folder", type=Path)
    p = sub.add_parser("measure")
    p.add_argument("folder", type=Path)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    if args.command == "make":
        make(args.kind, args.folder)
    else:
        print(json.dumps(measure(args.folder, args.max_pixels, args.threads, args.size)))


if __name__ == "__main__":
    main()
