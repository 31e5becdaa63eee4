"""Run files: the project's UserError, atomic writes, the run folder's CSV/JSON files and .h5 save/load.

Every write goes beside its final name and is renamed into place, so a reader (or a resumed run) never sees a
half-written file. Keras is imported only by the functions that save or load models.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

METADATA_ATTR = "wbc_metadata"  # JSON stored in the .h5 file's root attributes


class UserError(Exception):
    """A problem the user can fix (path, layout, file). Scripts print it as one line and exit 2."""


def atomic_write_text(path: Path, text: str):
    """Write beside, fsync, then rename: a reader sees the old file or the whole new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # backslashreplace: a file name that is not valid UTF-8 is written escaped, not a crash at the run's end
    with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_folder_atomically(target: Path, fill, prefix: str = ".build-") -> Path:
    """Create `target` by calling fill(tmp) on a temporary folder beside it, then renaming it into place, so a
    killed build never leaves a half-written folder under the final name. A concurrent builder may win."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target



def write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_history(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_history(path: Path, rows: list[dict], fields: list[str]):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def save_model_h5(model, path: Path, metadata: dict):
    """Save the core model as legacy .h5 with the training metadata inside it; atomic."""
    import h5py
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.h5")
    model.save(tmp)
    with h5py.File(tmp, "a") as f:
        f.attrs[METADATA_ATTR] = json.dumps(metadata, default=_json_default)
    os.replace(tmp, path)


def update_h5_metadata(path: Path, **fields):
    """Merge `fields` into the metadata stored in an .h5, atomically (copy, edit, rename)."""
    import h5py
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.h5")
    shutil.copyfile(path, tmp)
    with h5py.File(tmp, "a") as f:
        meta = json.loads(f.attrs.get(METADATA_ATTR, "{}"))
        meta.update(fields)
        f.attrs[METADATA_ATTR] = json.dumps(meta, default=_json_default)
    os.replace(tmp, path)


def read_h5_metadata(path: Path) -> dict:
    import h5py
    with h5py.File(path, "r") as f:
        raw = f.attrs.get(METADATA_ATTR)
    return json.loads(raw) if raw else {}


def load_core_model(path: Path):
    """Load a saved core model in Keras' safe mode: a model file can never run code here."""
    import keras

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a model file (expected a .h5 saved by this project or Keras)")
    if not path.is_file():
        raise UserError(f"{path}: no such model file (expected a .h5 saved by this project or Keras)")
    problem = model_file_problem(path)
    if problem:
        raise UserError(f"{path}: {problem}")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - every failure here is a bad file, reported in one line
        if "safe_mode" in str(e) or "arbitrary code" in str(e):  # e.g. a Lambda layer: Python code in the file
            raise UserError(f"{path}: refused: the file holds Python code (a Lambda layer or a pickled function) "
                            "that would run on loading; safe mode loads only built-in Keras layers") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a loadable Keras model ({reason[:200]})") from None


# Leading bytes of formats a model file is often confused with, for a message that says what the file is.
_FILE_SIGNATURES = {b"PK\x03\x04": "a zip archive (a Keras 3 .keras model? then name it .keras)",
                    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                    b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip archive"}


def model_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a Keras model file, in words, or None when it looks like one. Checks the bytes,
    not the name: an .h5 must be HDF5 with a model_config (not weights only), a .keras file a zip."""
    import h5py
    import zipfile
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "an empty file (expected a Keras model: .h5 or .keras)"
    if path.suffix.lower() == ".keras":
        return None if zipfile.is_zipfile(path) else "not a .keras archive (not a zip file; truncated?)"
    if not h5py.is_hdf5(path):
        kind = next((what for sig, what in _FILE_SIGNATURES.items() if head.startswith(sig)), None)
        return (f"{kind}, not an HDF5 model file" if kind
                else "not an HDF5 file (expected a Keras .h5 model; is it another format?)")
    try:
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                return ("an HDF5 file without a Keras model in it (weights only, or other data); "
                        "expected a model saved with model.save(...h5)")
    except Exception as e:  # noqa: BLE001 - h5py reports truncation and corruption as assorted errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"a truncated or corrupt HDF5 file ({reason[:160]})"
    return None


def run_is_complete(run_dir: Path) -> bool:
    return all((Path(run_dir) / f).exists() for f in ("metrics.json", "model.h5", "history.csv", "args.json"))
