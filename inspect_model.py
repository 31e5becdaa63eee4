"""Look inside a saved model, evaluate it on a folder of images, predict new images, and explain its decisions.

    python inspect_model.py runs/cnn_WBC_100_seed0/model.h5                    # summary (the default)
    python inspect_model.py MODEL.h5 evaluate ROOT_OR_CLASS_FOLDERS [--out DIR]
    python inspect_model.py MODEL.h5 predict IMAGE_OR_FOLDER... [--out predictions.csv]
    python inspect_model.py MODEL.h5 gradcam IMAGE_OR_FOLDER... --out DIR
    python inspect_model.py MODEL.h5 export --format keras|savedmodel|onnx|tflite --out PATH

Works on every .h5 this project saves (train_cnn.py, train_masked.py, pretrain_resnet.py) and on plain Keras
models that take (N, H, W, 3) images. Models load in Keras' safe mode: nothing in a model file runs code.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import adapt
import cli
import data
import gradcam
from runfiles import UserError
import runfiles

COMMANDS = ("summary", "evaluate", "predict", "gradcam", "export")
# --format: Keras' own name for it, and the packages its exporter needs beyond Keras.
EXPORT_FORMATS = {"keras": (None, ()), "savedmodel": ("tf_saved_model", ("tensorflow",)),
                  "onnx": ("onnx", ("tensorflow", "onnx", "tf2onnx")), "tflite": ("litert", ("tensorflow",))}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="inspect_model.py")
    parser.add_argument("model", type=Path, help="a model saved by this project (model.h5) or by Keras")
    parser.set_defaults(command="summary", classes=None, batch_size=64, as_json=False, expand=False)
    common = cli.Parser(add_help=False)  # options every command takes
    common.add_argument("--classes", default=None,
                        help="comma-separated class names, in the model's output order (default: the names "
                             "stored in the model)")
    common.add_argument("--batch-size", type=int, default=64, help="images per prediction step")
    cli.add_max_pixels_arg(common)
    images = cli.Parser(add_help=False)  # what predict and gradcam read
    images.add_argument("paths", type=Path, nargs="+", help="images and/or folders (searched recursively)")
    sub = parser.add_subparsers(dest="command", metavar="command")

    def command(name, help, *parents):
        return sub.add_parser(name, parents=[common, *parents], help=help, formatter_class=parser.formatter_class)

    p = command("summary", "architecture, parameters, input, classes, preprocessing, training metadata (default)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the summary as JSON")
    p.add_argument("--expand", action="store_true", help="list the layers inside nested models (a backbone)")

    p = command("evaluate", "accuracy, balanced accuracy, macro-F1, per-class report and confusion matrix")
    p.add_argument("dir", type=Path, help="a folder with one sub-folder per class, or a course-layout root "
                                          "(then the validation set of --split)")
    p.add_argument("--split", default="WBC_100", help="with a course-layout root: the split whose val/ to use")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for metrics.json, predictions.csv, report.txt, confusion.png "
                        "(default runs/eval_<run>_<dir>, numbered if taken)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where decoded images are cached (default $WBC_CACHE_DIR or ~/.cache/wbc_keras)")
    p.add_argument("--no-cache", action="store_true", help="decode into memory only, write no cache")
    adapt.add_arguments(p)

    p = command("predict", "a CSV of file, predicted class and one probability per class", images)
    p.add_argument("--out", type=Path, default=None, help="CSV file to write (default: standard output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    adapt.add_arguments(p)

    p = command("gradcam", "Grad-CAM heatmaps over the input images, as labelled PNGs (true class when the "
                           "image's folder names one, predicted class, probability, colour bar) and gradcam.csv",
                images)
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created if needed)")
    p.add_argument("--class", dest="target", default=None,
                   help="explain this class for every image (default: each image's predicted class)")
    p.add_argument("--display-size", type=int, default=None,
                   help="side of the heatmap picture in pixels, caption and colour bar around it (default: the "
                        "model's input size, at least 224)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs of the same name")

    p = sub.add_parser("export", parents=[common],
                       help="the model for serving, through Keras' own saving and export",
                       formatter_class=parser.formatter_class)
    p.add_argument("--format", choices=tuple(EXPORT_FORMATS), default="keras",
                   help="keras: a .keras file (keras.models.load_model); savedmodel: a TensorFlow SavedModel "
                        "folder (endpoint 'serve'); onnx: a .onnx file; tflite: a LiteRT .tflite file")
    p.add_argument("--out", type=Path, required=True, help="the file or folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    args.command = args.command or "summary"
    cli.check_positive(args, "batch_size")
    if args.command in ("evaluate", "predict"):
        adapt.check_arguments(args)
    if getattr(args, "display_size", None) is not None and not 8 <= args.display_size <= 4096:
        raise UserError(f"--display-size {args.display_size}: expected a side between 8 and 4096 pixels")
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.import_keras_quietly()
    import framing
    loaded = load(args.model, args.classes)
    warning = framing.version_warning(loaded.metadata)
    if warning and args.command in ("evaluate", "predict", "gradcam"):
        print(warning, file=sys.stderr)
    if args.command in ("evaluate", "predict"):
        adapt.apply_arguments(loaded.model, loaded.metadata, loaded.image_size, args)
    return {"summary": cmd_summary, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "gradcam": cmd_gradcam, "export": cmd_export}[args.command](loaded, args)


# ----------------------------------------------------------------------------------------------
# The model and what it says about itself
# ----------------------------------------------------------------------------------------------

class Loaded:
    """A core model with what it needs for use: class names, input side, the metadata stored in the file."""

    def __init__(self, path: Path, model, metadata: dict, classes: list[str], image_size: int):
        self.path, self.model, self.metadata = path, model, metadata
        self.classes, self.image_size = classes, image_size

    @property
    def frame_share(self) -> float:
        """The framing the model was trained with (0: none): every command decodes its images the same way."""
        import framing
        return framing.frame_share(self.metadata)

    def decode_options(self, args) -> dict:
        """cli.decode_options for this model: its own input side and framing, not the command line's."""
        return cli.decode_options(argparse.Namespace(
            image_size=self.image_size, frame_cell=self.frame_share, cache_dir=args.cache_dir,
            no_cache=args.no_cache, max_pixels=args.max_pixels))


def load(path: Path, classes_arg: str | None = None) -> Loaded:
    model = runfiles.load_core_model(path)
    try:
        metadata = runfiles.read_h5_metadata(path) if Path(path).suffix.lower() != ".keras" else {}
    except (OSError, ValueError):
        metadata = {}  # a plain Keras file, or metadata that is not JSON: the model itself still works
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(f"{path}: a model with {len(model.inputs)} inputs and {len(model.outputs)} outputs "
                        "(expected one image input and one probability output)")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"{path}: input shape {shape} (expected images: (N, H, W, 3))")
    image_size = shape[1] or metadata.get("image_size")
    if not image_size or shape[1] != shape[2]:
        raise UserError(f"{path}: input shape {shape} (expected square images of a fixed size)")
    n_out = int(model.outputs[0].shape[-1])
    if classes_arg:
        classes = [c.strip() for c in classes_arg.split(",") if c.strip()]
        where = "--classes"
    else:
        classes = list(metadata.get("classes") or [f"class_{i}" for i in range(n_out)])
        where = "the class names stored in the model"
    if len(classes) != n_out:
        raise UserError(f"{where}: {len(classes)} names for a model with {n_out} outputs")
    return Loaded(Path(path), model, metadata, classes, int(image_size))


def describe(loaded: Loaded) -> dict:
    """Everything `summary` prints, as one JSON-friendly dict."""
    model, meta = loaded.model, loaded.metadata
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    total = model.count_params()
    try:
        features = gradcam.feature_layer(model)
        feature_map = {"layer": "/".join([m.name for m in features[0]] + [features[1].name]),
                       "shape": list(features[1].output.shape[1:])}
    except UserError as e:
        feature_map = {"layer": None, "why": str(e)}
    return {
        "file": str(loaded.path), "file_mb": round(loaded.path.stat().st_size / 2 ** 20, 2),
        "name": model.name, "model": meta.get("model"),
        "input": {"shape": list(model.inputs[0].shape[1:]), "dtype": str(model.inputs[0].dtype),
                  "image_size": loaded.image_size},
        "classes": loaded.classes,
        "parameters": {"total": int(total), "trainable": int(trainable), "non_trainable": int(total - trainable)},
        "preprocessing": preprocessing(model),
        "gradcam_feature_map": feature_map,
        "layer_dtypes": sorted({layer.dtype_policy.name for layer in model.layers if hasattr(layer, "dtype_policy")}),
        "training": {k: meta[k] for k in ("split", "recipe", "demo_data", "epoch", "precision", "metrics",
                                          "train_images", "holdout_images", "val_images", "train_counts",
                                          "val_counts", "mask_mode", "mask_fill", "mask_counts", "init", "pretrained_from")
                     if k in meta},
        "args": meta.get("args", {}),
        "config": meta.get("config", {}),
        "versions": meta.get("versions", {}),
        "ensemble": meta.get("ensemble"),
    }


def preprocessing(model) -> list[str]:
    """The fixed layers between the image input and the first learned layer: what the model does to pixels."""
    steps = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        if hasattr(layer, "layers"):  # a nested model (the CNN inside its stain normalisation): look inside
            steps += preprocessing(layer)
            break
        if layer.trainable and layer.trainable_weights:
            break
        cfg = layer.get_config()
        if kind == "Rescaling":
            steps.append(f"{layer.name}: x * {cfg['scale']:.6g} + {cfg['offset']:.6g}")
        elif kind == "Normalization":
            steps.append(f"{layer.name}: (x - mean) / sqrt(variance), mean {cfg.get('mean')}, "
                         f"variance {cfg.get('variance')}")
        elif kind in gradcam.CONV_LAYERS:
            k = layer.get_weights()
            bias = k[1].round(3).tolist() if len(k) > 1 else []
            steps.append(f"{layer.name}: fixed {cfg['kernel_size'][0]}x{cfg['kernel_size'][1]} {kind} "
                         f"(channel mix, then + {bias})")
        else:
            steps.append(f"{layer.name}: {kind}")
    return steps


@contextlib.contextmanager
def _columns(width: int | None):
    """Set $COLUMNS (what rich and shutil take as the terminal width) for a while."""
    saved = os.environ.get("COLUMNS")
    if width:
        os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def cmd_summary(loaded: Loaded, args):
    info = describe(loaded)
    if args.as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    # Keras prints through rich, which cuts a table to 80 columns when the output is not a terminal.
    with _columns(120 if not sys.stdout.isatty() else None):
        loaded.model.summary(expand_nested=args.expand, line_length=110)
    p, t = info["parameters"], info["training"]
    print(f"file: {info['file']} ({info['file_mb']} MB)")
    print(f"model: {info['model'] or info['name']}   parameters: {p['total']:,} "
          f"({p['trainable']:,} trainable, {p['non_trainable']:,} fixed)   layer precision: "
          f"{', '.join(info['layer_dtypes'])}")
    print(f"input: {loaded.image_size}x{loaded.image_size} RGB, dtype {info['input']['dtype']} "
          "(images are resized to this side; preprocessing is inside the model)")
    print(f"classes ({len(loaded.classes)}): {', '.join(loaded.classes)}")
    print("preprocessing: " + ("; ".join(info["preprocessing"]) or "none before the first learned layer"))
    fm = info["gradcam_feature_map"]
    print(f"Grad-CAM feature map: {fm['layer']} {tuple(fm['shape'])}" if fm["layer"] else
          f"Grad-CAM feature map: none ({fm['why']})")
    if not loaded.metadata:
        print("training metadata: none stored in this file (not saved by this project's training scripts)")
        return 0
    parts = [f"split {t['split']}" if "split" in t else None, f"recipe {t['recipe']}" if t.get("recipe") else None,
             "SYNTHETIC demo data" if t.get("demo_data") else None,
             f"selected epoch {t['epoch']} of {info['config'].get('epochs', '?')}" if "epoch" in t else None,
             f"precision {t['precision']}" if "precision" in t else None]
    print("trained on: " + (", ".join(p for p in parts if p) or "(not recorded)"))
    if "train_counts" in t:
        print(f"images: train {t.get('train_images')} {t['train_counts']}, hold-out {t.get('holdout_images')}, "
              f"val {t.get('val_images')}")
    if t.get("mask_mode"):
        masked = {c: v.get("masked") if isinstance(v, dict) else v for c, v in (t.get("mask_counts") or {}).items()}
        print(f"masks: --masks {t['mask_mode']} (fill {t.get('mask_fill', '?')}); masked training images: {masked}")
    m = t.get("metrics")
    if info["ensemble"]:
        print(f"ensemble: the {info['ensemble']['rule']}; validation metrics per member (the ensemble's own: "
              "evaluate)")
        for k, member in enumerate(info["ensemble"]["members"]):
            bal = (member.get("metrics") or {}).get("balanced_accuracy")
            print(f"  member {k}: {member['path']}" + (f"  stage {member['stage']}" if member.get("stage") else "")
                  + (f"  balanced accuracy {bal:.4f}" if bal is not None else ""))
    elif m:
        print(f"validation (selected epoch): accuracy {m.get('val_accuracy_selected', float('nan')):.4f}   "
              f"balanced accuracy {m.get('balanced_accuracy', float('nan')):.4f}   macro-F1 "
              f"{m.get('macro_f1', float('nan')):.4f}   majority baseline {m.get('majority_baseline', float('nan')):.4f}"
              + ("   COLLAPSED to one class" if m.get("collapsed_to_majority") else ""))
    else:
        print("validation metrics: not stored (the run did not finish)")
    if info["args"]:
        shown = {k: v for k, v in info["args"].items() if k not in ("quiet", "resume")}
        print("arguments: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    if info["versions"]:
        print("versions: " + " ".join(f"{k} {v}" for k, v in info["versions"].items()))
    return 0


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------

def eval_files(folder: Path, classes: list[str], split: str):
    """The labelled files to evaluate (data.find_labelled), noting class folders the model does not know."""
    files = data.find_labelled(folder, classes, split)
    if not data.is_course_root(Path(folder)):
        ignored = [d.name for d in files.root.iterdir() if d.is_dir() and not d.name.startswith(".")
                   and data.canonical_class(d.name, tuple(classes)) is None]
        if ignored:
            print(f"note: ignored folders that name none of the model's classes: {', '.join(sorted(ignored))}")
    return files


def cmd_evaluate(loaded: Loaded, args):
    import domain
    import metrics
    import report
    import training
    from sklearn.metrics import classification_report

    files = eval_files(args.dir, loaded.classes, args.split)
    images = data.load_images(files, name=Path(args.dir).name, **loaded.decode_options(args))
    if len(images) == 0:
        raise UserError(f"{args.dir}: none of the images could be decoded")
    start = time.perf_counter()
    probs = adapt.predict(loaded.model, images.x, args.batch_size, args.tta)
    seconds = time.perf_counter() - start
    m = metrics.classification_metrics(images.y, probs, loaded.classes)
    args.resume = False
    out = cli.resolve_run_dir(args, f"eval_{loaded.path.parent.name or 'model'}_{Path(args.dir).resolve().name}")
    out.mkdir(parents=True, exist_ok=True)
    labels = list(range(len(loaded.classes)))
    text = classification_report(images.y, probs.argmax(1), labels=labels, target_names=loaded.classes, digits=4,
                                 zero_division=0)
    result = {"model": str(loaded.path), "data": str(args.dir), "images": len(images), "counts": images.counts(),
              "skipped_images": images.skipped, "image_size": loaded.image_size, **m,
              "seconds_predict": seconds}
    runfiles.write_json(out / "metrics.json", result)
    training.write_predictions(out / "predictions.csv", images, probs, loaded.classes)
    runfiles.atomic_write_text(out / "report.txt", text)
    report.plot_confusion(m["confusion_matrix"], loaded.classes, out / "confusion.png",
                          title=f"{loaded.path.name} on {Path(args.dir).name} ({len(images)} images)")
    print(text)
    print(f"{len(images)} images: accuracy {m['accuracy']:.4f}   balanced accuracy {m['balanced_accuracy']:.4f}   "
          f"macro-F1 {m['macro_f1']:.4f}   majority baseline {m['majority_baseline']:.4f} ({m['majority_class']})"
          + ("   COLLAPSED to one class" if m["collapsed_to_majority"] else ""))
    if loaded.metadata.get("demo_data"):
        print("note: this model was trained on the SYNTHETIC demo data")
    for reason in domain.ood_warnings(loaded.metadata.get("image_stats", {}), images.x):
        print(f"warning: these images look unlike the model's training images: {reason}; expect lower accuracy "
              "(docs/microscopes.md)", file=sys.stderr)
    print(f"wrote {out}/: metrics.json, predictions.csv, report.txt, confusion.png")
    return 0


def check_writable_file(path: Path, overwrite: bool):
    if path.exists() and not overwrite:
        raise UserError(f"--out {path}: already exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise UserError(f"--out {path}: a folder (expected a CSV file name)")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: the folder {path.parent} does not exist")


# ----------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------

def cmd_predict(loaded: Loaded, args):
    import numpy as np
    skipped = []
    files = data.images_in(args.paths, skipped)
    if args.out is not None:
        check_writable_file(args.out, args.overwrite)
        # Rows go to a file beside the target, renamed into place at the end: never half a CSV.
        tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
        stream = open(tmp, "w", newline="")
    else:
        # Standard output gets the CSV only once every image is predicted: never a header before an error.
        tmp, stream = None, io.StringIO()
    n, start = 0, time.perf_counter()
    try:
        writer = csv.writer(stream)
        writer.writerow(["file", "predicted"] + [f"p_{c}" for c in loaded.classes])
        with data.progress(len(files) + len(skipped), stream=sys.stderr) as update:
            for paths, x in data.decode_batches(files, loaded.image_size, args.batch_size, skipped, args.max_pixels,
                                                loaded.frame_share):
                probs = adapt.predict(loaded.model, x, len(x), args.tta).astype(np.float64)
                # Low-precision softmax sums to 1 only within rounding: renormalise what we report.
                probs /= np.maximum(probs.sum(1, keepdims=True), 1e-12)
                for path, pr in zip(paths, probs):
                    writer.writerow([str(path), loaded.classes[int(pr.argmax())]] + [f"{v:.6f}" for v in pr])
                n += len(paths)
                update(n + len(skipped))
        if tmp:
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        if tmp:
            stream.close()
            Path(tmp).unlink(missing_ok=True)
        raise
    if tmp:
        stream.close()
        if n == 0:
            Path(tmp).unlink(missing_ok=True)
    if n == 0:
        raise UserError(f"{', '.join(map(str, args.paths))}: none of the {len(files)} files is a readable image")
    if tmp:
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(stream.getvalue())
    seconds = time.perf_counter() - start
    data.warn_skipped_files(skipped)
    print(f"predicted {n} image{'s' if n != 1 else ''} in {seconds:.1f}s ({n / seconds:.0f} images/s)"
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# gradcam
# ----------------------------------------------------------------------------------------------

def cmd_gradcam(loaded: Loaded, args):
    members = (loaded.metadata.get("ensemble") or {}).get("members")
    if members:
        raise UserError(f"{loaded.path}: an ensemble of {len(members)} models, and Grad-CAM explains one network "
                        f"(expected one of its members: {', '.join(m['path'] for m in members)})")
    skipped = []
    files = data.images_in(args.paths, skipped)
    target = None
    if args.target is not None:
        names = [c.lower() for c in loaded.classes]
        if args.target.lower() not in names:
            raise UserError(f"--class {args.target}: not one of the model's classes ({', '.join(loaded.classes)})")
        target = names.index(args.target.lower())
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: a file (expected a folder for the PNGs)")
    args.out.mkdir(parents=True, exist_ok=True)
    size = args.display_size or max(loaded.image_size, 224)
    cam = gradcam.GradCam(loaded.model)
    print(f"Grad-CAM at {cam.layer_name} {tuple(cam.layer.output.shape[1:])}", file=sys.stderr)
    names, rows = set(), []
    with data.progress(len(files) + len(skipped), stream=sys.stderr) as update:
        for paths, x in data.decode_batches(files, loaded.image_size, args.batch_size, skipped, args.max_pixels,
                                            loaded.frame_share):
            heat, probs, ids = cam(x, None if target is None else [target] * len(x))
            for path, h, p, c in zip(paths, heat, probs, ids):
                out = _unique_name(args.out, f"{path.stem}_gradcam_{loaded.classes[c]}.png", names)
                if out.exists() and not args.overwrite:
                    raise UserError(f"{out}: already exists; pass --overwrite to replace it")
                true = data.canonical_class(path.parent.name, tuple(loaded.classes))  # a class folder, if any
                # The picture under the heatmap is decoded like the model's input, only larger.
                gradcam.save_labelled(data.decode_image(path, size, args.max_pixels, loaded.frame_share), h, size,
                                      gradcam.caption(loaded.classes, p, int(c), true), out)
                rows.append([str(path), str(out), true or "", loaded.classes[c], f"{p[c]:.6f}",
                             loaded.classes[int(p.argmax())], f"{p.max():.6f}"])
            update(len(rows) + len(skipped))
    if not rows:
        raise UserError(f"{', '.join(map(str, args.paths))}: none of the {len(files)} files is a readable image")
    data.warn_skipped_files(skipped)
    buf = io.StringIO()
    csv.writer(buf).writerows([["file", "heatmap", "true", "explained_class", "probability", "predicted",
                                "predicted_probability"]] + rows)
    runfiles.atomic_write_text(args.out / "gradcam.csv", buf.getvalue())
    n = len(rows)
    print(f"wrote {n} heatmap{'s' if n != 1 else ''} ({size}x{size} pictures with caption and colour bar, PNG) "
          f"and gradcam.csv to {args.out}/")
    return 0


def _unique_name(folder: Path, name: str, taken: set) -> Path:
    """Images from different folders may share a name: number the later ones."""
    stem, suffix, k = name[:-4], ".png", 2
    while name in taken:
        name = f"{stem}-{k}{suffix}"
        k += 1
    taken.add(name)
    return folder / name


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------

def cmd_export(loaded: Loaded, args):
    """Keras' own writers: model.save for .keras, model.export for the serving formats."""
    import importlib.util
    import shutil
    keras_name, needs = EXPORT_FORMATS[args.format]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format {args.format}: Keras' exporter needs the package{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)}, not installed here (pip install {' '.join(missing)})")
    out = Path(args.out)
    suffix = {"keras": ".keras", "onnx": ".onnx", "tflite": ".tflite"}.get(args.format)
    if suffix and out.suffix.lower() != suffix:
        raise UserError(f"--out {out}: a {args.format} file must end in {suffix}")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out}: already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    # Written beside, then renamed into place: never half an exported model under the final name.
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        if args.format == "keras":
            loaded.model.save(tmp)
        else:
            with contextlib.redirect_stdout(sys.stderr):  # the exporters' own progress lines
                loaded.model.export(str(tmp), format=keras_name, verbose=False)
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - an exporter's failure is reported in one line, not a traceback
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"--format {args.format}: Keras could not export {loaded.path} ({reason})") from None
    finally:
        if Path(tmp).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            Path(tmp).unlink(missing_ok=True)
    print(f"wrote {out} ({args.format}); input: uint8 RGB (N, {loaded.image_size}, {loaded.image_size}, 3); "
          f"outputs in class order: {', '.join(loaded.classes)}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)

