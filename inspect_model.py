"""Look inside a saved model, evaluate it on a folder of images, predict new images, and explain its decisions.

    python inspect_model.py runs/cnn_WBC_100_seed0/model.h5                    # summary (the default)
    python inspect_model.py MODEL.h5 evaluate ROOT_OR_CLASS_FOLDERS [--out DIR]
    python inspect_model.py MODEL.h5 predict IMAGE_OR_FOLDER... [--out predictions.csv]
    python inspect_model.py MODEL.h5 gradcam IMAGE_OR_FOLDER... --out DIR

Works on every .h5 this project saves (train_cnn.py, train_masked.py, pretrain_resnet.py) and on plain Keras
models that take (N, H, W, 3) images. Models load in Keras' safe mode: nothing in a model file runs code.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import adapt
import cli
from runfiles import UserError
import runfiles

COMMANDS = ("summary", "evaluate", "predict", "gradcam")
CONV_LAYERS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")


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
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser("summary", parents=[common],
                       help="architecture, parameters, input, classes, preprocessing, training metadata (default)",
                       formatter_class=parser.formatter_class)
    p.add_argument("--json", dest="as_json", action="store_true", help="print the summary as JSON")
    p.add_argument("--expand", action="store_true", help="list the layers inside nested models (a backbone)")

    p = sub.add_parser("evaluate", parents=[common],
                       help="accuracy, balanced accuracy, macro-F1, per-class report and confusion matrix",
                       formatter_class=parser.formatter_class)
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

    p = sub.add_parser("predict", parents=[common],
                       help="a CSV of file, predicted class and one probability per class",
                       formatter_class=parser.formatter_class)
    p.add_argument("paths", type=Path, nargs="+", help="images and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, default=None, help="CSV file to write (default: standard output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    adapt.add_arguments(p)

    p = sub.add_parser("gradcam", parents=[common],
                       help="Grad-CAM heatmaps over the input images, as PNGs",
                       formatter_class=parser.formatter_class)
    p.add_argument("paths", type=Path, nargs="+", help="images and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created if needed)")
    p.add_argument("--class", dest="target", default=None,
                   help="explain this class for every image (default: each image's predicted class)")
    p.add_argument("--display-size", type=int, default=None,
                   help="side of the written PNGs in pixels (default: the model's input size, at least 224)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs of the same name")
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
    loaded = load(args.model, args.classes)
    if args.command in ("evaluate", "predict"):
        adapt.apply_arguments(loaded.model, loaded.metadata, loaded.image_size, args)
    return {"summary": cmd_summary, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "gradcam": cmd_gradcam}[args.command](loaded, args)


# ----------------------------------------------------------------------------------------------
# The model and what it says about itself
# ----------------------------------------------------------------------------------------------

class Loaded:
    """A core model with what it needs for use: class names, input side, the metadata stored in the file."""

    def __init__(self, path: Path, model, metadata: dict, classes: list[str], image_size: int):
        self.path, self.model, self.metadata = path, model, metadata
        self.classes, self.image_size = classes, image_size


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
        features = feature_layer(model)
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
    }


def preprocessing(model) -> list[str]:
    """The fixed layers between the image input and the first learned layer: what the model does to pixels."""
    steps = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        learned = layer.trainable and layer.trainable_weights
        if learned or hasattr(layer, "layers"):
            break
        cfg = layer.get_config()
        if kind == "Rescaling":
            steps.append(f"{layer.name}: x * {cfg['scale']:.6g} + {cfg['offset']:.6g}")
        elif kind == "Normalization":
            steps.append(f"{layer.name}: (x - mean) / sqrt(variance), mean {cfg.get('mean')}, "
                         f"variance {cfg.get('variance')}")
        elif kind in CONV_LAYERS:
            k = layer.get_weights()
            bias = k[1].round(3).tolist() if len(k) > 1 else []
            steps.append(f"{layer.name}: fixed {cfg['kernel_size'][0]}x{cfg['kernel_size'][1]} {kind} "
                         f"(channel mix, then + {bias})")
        else:
            steps.append(f"{layer.name}: {kind}")
    return steps


def cmd_summary(loaded: Loaded, args):
    info = describe(loaded)
    if args.as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
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
    if m:
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
    """The labelled files to evaluate: a course root's validation set, or a folder-per-class directory
    (also one holding data/<class>/, like WBC_100/val)."""
    import data
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected one sub-folder per class, or a course-layout root)")
    if data.is_course_root(folder):
        if tuple(classes) == data.WBC_CLASSES:
            return data.find_split(folder, split).val
        cam16 = data.find_cam16(folder)
        part = "val" if "val" in cam16 else "test" if "test" in cam16 else None
        if set(classes) == {"normal", "tumor"} and part:
            return cam16[part]
        raise UserError(f"{folder}: a course-layout root, but no validation set for the classes "
                        f"{', '.join(classes)}; pass a folder with one sub-folder per class")
    if (folder / "data").is_dir() and not any(data.canonical_class(d.name, tuple(classes))
                                              for d in folder.iterdir() if d.is_dir()):
        folder = folder / "data"
    files = data.scan_class_folders(folder, tuple(classes))
    ignored = [d.name for d in folder.iterdir()
               if d.is_dir() and not d.name.startswith(".") and data.canonical_class(d.name, tuple(classes)) is None]
    if ignored:
        print(f"note: ignored folders that name none of the model's classes: {', '.join(sorted(ignored))}")
    return files


def cmd_evaluate(loaded: Loaded, args):
    import data
    import domain
    import metrics
    import report
    import training
    from sklearn.metrics import classification_report

    files = eval_files(args.dir, loaded.classes, args.split)
    images = data.load_images(files, size=loaded.image_size, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                              name=Path(args.dir).name, frame_share=domain.frame_share(loaded.metadata))
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


# ----------------------------------------------------------------------------------------------
# Streaming images: decode a batch at a time, so thousands of images never sit in memory at once
# ----------------------------------------------------------------------------------------------

def collect_images(paths) -> list[Path]:
    import data
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += data.list_images(p)
        elif p.is_file():
            found.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    if not found:
        raise UserError(f"{', '.join(map(str, paths))}: no images found (.jpg, .png, .bmp, .tif, .gif, .webp)")
    return found


def image_batches(files: list[Path], size: int, batch_size: int, skipped: list[str], frame_share: float = 0.0):
    """Yield (paths, uint8 array) per batch, decoded exactly as in training (data.decode_image) by a thread
    pool; unreadable files are appended to `skipped` and left out."""
    import numpy as np
    import data

    def decode(path):
        try:
            return data.decode_image(path, size, frame_share)
        except Exception:  # noqa: BLE001 - any decoding failure means: not a readable image
            return None

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            decoded = list(pool.map(decode, chunk))
            keep = [i for i, img in enumerate(decoded) if img is not None]
            skipped += [str(chunk[i]) for i in range(len(chunk)) if decoded[i] is None]
            if keep:
                yield [chunk[i] for i in keep], np.stack([decoded[i] for i in keep])


@contextlib.contextmanager
def progress(total: int, unit: str):
    """Keras' progress bar on stderr (stdout may carry the CSV); nothing when stderr is not a terminal."""
    import keras
    if not sys.stderr.isatty():
        yield lambda done: None
        return
    with contextlib.redirect_stdout(sys.stderr):
        bar = keras.utils.Progbar(total, unit_name=unit)

    def update(done):
        with contextlib.redirect_stdout(sys.stderr):
            bar.update(done)
    yield update


def warn_skipped(skipped: list[str]):
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}", file=sys.stderr)


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
    import domain
    files = collect_images(args.paths)
    if args.out is not None:
        check_writable_file(args.out, args.overwrite)
        # Rows go to a file beside the target, renamed into place at the end: never half a CSV.
        tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
        stream = open(tmp, "w", newline="")
    else:
        tmp, stream = None, sys.stdout
    skipped, n, start = [], 0, time.perf_counter()
    try:
        writer = csv.writer(stream)
        writer.writerow(["file", "predicted"] + [f"p_{c}" for c in loaded.classes])
        with progress(len(files), "image") as update:
            for paths, x in image_batches(files, loaded.image_size, args.batch_size, skipped,
                                          domain.frame_share(loaded.metadata)):
                probs = adapt.predict_batch(loaded.model, x, args.tta)
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
    seconds = time.perf_counter() - start
    warn_skipped(skipped)
    print(f"predicted {n} images in {seconds:.1f}s ({n / seconds:.0f} images/s)"
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# Grad-CAM: find the last convolutional feature map (also inside a nested backbone), split the model there
# into a feature extractor and a head, and weigh each feature channel by the class score's gradient.
# ----------------------------------------------------------------------------------------------

def _flat_layers(model, chain=()):
    """(chain of nested models, layer) for every layer, in order, descending into nested models."""
    for layer in model.layers:
        if hasattr(layer, "layers") and hasattr(layer, "inputs"):
            yield from _flat_layers(layer, chain + (layer,))
        else:
            yield chain, layer


def feature_layer(model):
    """The last convolutional feature map: the last conv layer, followed forward through the layers of the
    same model that keep its spatial shape (batch norm, activation, residual add), so the map is the block's
    output. Returns (chain of nested models, layer)."""
    flat = list(_flat_layers(model))
    convs = [i for i, (_, layer) in enumerate(flat) if type(layer).__name__ in CONV_LAYERS and layer.trainable]
    if not convs:
        convs = [i for i, (_, layer) in enumerate(flat) if type(layer).__name__ in CONV_LAYERS]
    if not convs:
        raise UserError(f"{model.name}: no convolutional layer, so no feature map for Grad-CAM")
    i = convs[-1]
    chain, layer = flat[i]
    shape = tuple(layer.output.shape)
    for next_chain, nxt in flat[i + 1:]:
        try:
            same = next_chain == chain and len(nxt.output.shape) == 4 and tuple(nxt.output.shape)[1:3] == shape[1:3]
        except (AttributeError, ValueError):
            same = False
        if not same:
            break
        layer = nxt
    return chain, layer


def _call_node(model, inner):
    """The node where `model` calls its nested model `inner`: its outer input and output tensors."""
    for nodes in getattr(model, "_nodes_by_depth", {}).values():
        for node in nodes:
            if node.operation is inner:
                return node.input_tensors[0], node.output_tensors[0]
    raise UserError(f"{model.name}: cannot find where the nested model {inner.name} is called")


def _split(model, chain, layer):
    """(feature model: image -> feature map, head: feature map -> probabilities or None) for `layer`, which is
    inside the nested models `chain` of `model`. Keras builds the sub-models from the graph's own tensors."""
    import keras
    x_in, y_out = model.inputs[0], model.outputs[0]
    if not chain:
        t = layer.output
        return keras.Model(x_in, t), (None if t is y_out else keras.Model(t, y_out))
    inner_features, inner_head = _split(chain[0], chain[1:], layer)
    t_in, t_out = _call_node(model, chain[0])
    pre = None if t_in is x_in else keras.Model(x_in, t_in)
    post = None if t_out is y_out else keras.Model(t_out, y_out)
    image = keras.Input(batch_shape=x_in.shape, dtype=x_in.dtype)
    features = inner_features(pre(image) if pre else image)
    feature_in = keras.Input(batch_shape=features.shape, dtype=features.dtype)
    y = inner_head(feature_in) if inner_head else feature_in
    y = post(y) if post else y
    return keras.Model(image, features), keras.Model(feature_in, y)


class GradCam:
    """Grad-CAM (Selvaraju et al. 2017) for a core model, under any Keras backend."""

    def __init__(self, model):
        self.model = model
        self.chain, self.layer = feature_layer(model)
        try:
            self.features, self.head = _split(model, self.chain, self.layer)
        except UserError:
            raise  # already one clear line
        except Exception as e:  # noqa: BLE001 - a graph Keras cannot cut at that layer
            raise UserError(f"{model.name}: cannot split the model at {self.layer.name} for Grad-CAM "
                            f"({str(e).splitlines()[0][:160]})") from None
        self._checked = False

    @property
    def layer_name(self) -> str:
        return "/".join([m.name for m in self.chain] + [self.layer.name])

    def __call__(self, x, class_ids=None):
        """Heatmaps in [0, 1] at the feature map's resolution (N, h, w), the probabilities (N, classes),
        and the explained class of each image (its predicted class unless class_ids is given)."""
        import numpy as np
        import keras
        features = self.features(x, training=False)
        probs = keras.ops.convert_to_numpy(keras.ops.cast(self.head(features, training=False), "float32"))
        if not self._checked:
            # The split must compute exactly what the model computes; otherwise the heatmap explains nothing.
            direct = np.asarray(self.model.predict_on_batch(x), np.float32)
            if not np.allclose(direct, probs, atol=2e-2):
                raise UserError(f"{self.model.name}: feature extractor + head at {self.layer_name} do not "
                                f"reproduce the model's output (max difference {np.abs(direct - probs).max():.3g})")
            self._checked = True
        class_ids = probs.argmax(1) if class_ids is None else np.asarray(class_ids)
        onehot = np.eye(probs.shape[1], dtype=np.float32)[class_ids]
        grads = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(
            class_score_gradients(self.head, features, onehot), "float32")))
        fmap = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(features, "float32")))
        weights = grads.mean(axis=(1, 2))  # one weight per channel: its gradient averaged over the map
        cam = np.maximum(np.einsum("nhwc,nc->nhw", fmap, weights), 0.0)
        top = cam.max(axis=(1, 2), keepdims=True)
        cam = np.where(top > 0, cam / np.where(top > 0, top, 1.0), 0.0)
        return cam.astype(np.float32), probs, class_ids


def class_score_gradients(head, features, onehot):
    """d log p(class) / d features for each image. Gradients are backend-specific, so one branch per backend.
    The log-probability, not the probability: its gradient does not vanish when the softmax saturates.
    Summing the scores over the batch gives each image its own gradient (inference mode: images independent)."""
    import keras
    backend = keras.backend.backend()

    def score(probs):
        probs = keras.ops.cast(probs, "float32")
        return keras.ops.sum(keras.ops.log(keras.ops.clip(probs, 1e-7, 1.0)) * onehot)

    if backend == "tensorflow":
        import tensorflow as tf
        f = tf.convert_to_tensor(features)
        with tf.GradientTape() as tape:
            tape.watch(f)
            s = score(head(f, training=False))
        return tape.gradient(s, f)
    if backend == "jax":
        import jax
        trainable = [v.value for v in head.trainable_variables]
        fixed = [v.value for v in head.non_trainable_variables]

        def fn(f):
            probs, _ = head.stateless_call(trainable, fixed, f, training=False)
            return score(probs)
        return jax.grad(fn)(features)
    if backend == "torch":
        f = features.detach().requires_grad_(True)
        score(head(f, training=False)).backward()
        return f.grad
    raise UserError(f"Grad-CAM needs gradients: the {backend} backend is not supported "
                    "(use tensorflow, jax or torch)")


def overlay(image, cam, size: int):
    """The image (uint8, size x size) under the heatmap in matplotlib's 'jet' colours, as uint8 RGB."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image
    heat = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    colored = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    alpha = 0.45 * np.clip(heat, 0.0, 1.0)[..., None] + 0.15  # where the model looks, the colour dominates
    return np.clip(image * (1 - alpha) + colored * alpha, 0, 255).astype(np.uint8)


def cmd_gradcam(loaded: Loaded, args):
    import data
    import domain
    from PIL import Image
    files = collect_images(args.paths)
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
    cam = GradCam(loaded.model)
    print(f"Grad-CAM at {cam.layer_name} {tuple(cam.layer.output.shape[1:])}", file=sys.stderr)
    names, skipped, rows = set(), [], []
    with progress(len(files), "image") as update:
        for paths, x in image_batches(files, loaded.image_size, args.batch_size, skipped,
                                      domain.frame_share(loaded.metadata)):
            heat, probs, ids = cam(x, None if target is None else [target] * len(x))
            for path, h, p, c in zip(paths, heat, probs, ids):
                out = _unique_name(args.out, f"{path.stem}_gradcam_{loaded.classes[c]}.png", names)
                if out.exists() and not args.overwrite:
                    raise UserError(f"{out}: already exists; pass --overwrite to replace it")
                # The picture under the heatmap is decoded like the model's input, only larger.
                Image.fromarray(overlay(data.decode_image(path, size, domain.frame_share(loaded.metadata)), h, size)).save(out)
                rows.append([str(path), str(out), loaded.classes[c], f"{p[c]:.6f}",
                             loaded.classes[int(p.argmax())]])
            update(len(rows) + len(skipped))
    if not rows:
        raise UserError(f"{', '.join(map(str, args.paths))}: none of the {len(files)} files is a readable image")
    warn_skipped(skipped)
    import io
    buf = io.StringIO()
    csv.writer(buf).writerows([["file", "heatmap", "explained_class", "probability", "predicted"]] + rows)
    runfiles.atomic_write_text(args.out / "gradcam.csv", buf.getvalue())
    print(f"wrote {len(rows)} heatmaps ({size}x{size} PNG) and gradcam.csv to {args.out}/")
    return 0


def _unique_name(folder: Path, name: str, taken: set) -> Path:
    """Images from different folders may share a name: number the later ones."""
    stem, suffix, k = name[:-4], ".png", 2
    while name in taken:
        name = f"{stem}-{k}{suffix}"
        k += 1
    taken.add(name)
    return folder / name


if __name__ == "__main__":
    cli.run_main(main)
