"""Other microscopes: what the domain options (cli.add_domain_args) add to a model and its training, and what a
model remembers about its training images so that `inspect_model.py evaluate` can warn when a folder looks unlike
them (mean colour, the cell's apparent size). docs/microscopes.md has the measurements.

Keras is imported only by the functions that build models.
"""
from __future__ import annotations

import copy
import hashlib

import numpy as np

import framing
import runfiles
import stain

# recorded in the metadata
DOMAIN_OPTIONS = ("norm", "stain_norm", "stain_jitter", "frame_cell", "style_noise", "nucleus_view")
# A folder is flagged when its mean colour lies this many training-image standard deviations away (any channel).
COLOUR_Z_LIMIT = 2.0
# ... or when the median apparent cell size lies outside this quantile range of the training images' sizes.
SIZE_QUANTILES = (0.05, 0.95)
STATS_IMAGES = 256  # images measured per set: the cell finder costs a few ms per image


def wrap_core(core, meta: dict):
    """The core model with Reinhard normalisation and / or the nucleus view in front when `meta` (domain.metadata's)
    asks for them, else the core itself."""
    reference, nucleus = meta.get("stain_normalisation"), bool(meta.get("nucleus_view"))
    return stain.with_normalisation(core, reference, nucleus) if reference or nucleus else core


def training_wrapper(args):
    """training.train's build_train_model hook for --stain-jitter and --style-noise: [augmentation] -> stain jitter
    -> core, with feature-statistics noise inside core's training copy; None when neither is on (training.train
    then builds its standard wrapper). The saved model is core itself, without either."""
    strength = getattr(args, "stain_jitter", 0.0)
    style_noise = getattr(args, "style_noise", 0.0)
    if not strength and not style_noise:
        return None

    def build(core, config, steps_per_epoch):
        import keras
        import augment
        inner = augment.with_style_noise(core, style_noise, config.seed) if style_noise else core
        if strength:
            size = core.input_shape[1]
            inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
            inner = keras.Model(inputs, inner(stain.make_stain_jitter(strength, seed=config.seed + 1)(inputs)),
                                name=f"{core.name}_stain_jitter")
        return augment.with_augmentation(inner, config.augment, config.seed)  # [affine, colour] -> jitter -> core
    return build


def metadata(args, train_x) -> dict:
    """The domain options used, the stain reference (the training images' statistics, or those of the trained
    classifier --init starts from) with --stain-norm reinhard,
    and the framing a user of the saved model must reproduce before calling it."""
    out = {"domain_options": {k: getattr(args, k, None) for k in DOMAIN_OPTIONS}}
    init = getattr(args, "init", None)
    inherited = runfiles.read_h5_metadata(init).get("stain_normalisation") if init else None
    if getattr(args, "stain_norm", "none") == "reinhard" and inherited:
        # --init a trained classifier: its normalisation layers, copied with its weights, carry its reference
        out["stain_normalisation"] = {**inherited, "from_init": str(init)}
    elif getattr(args, "stain_norm", "none") == "reinhard" and len(train_x):  # none: training.train says so
        out["stain_normalisation"] = {"method": "reinhard", "inside_model": True,
                                      **stain.reference_stats(train_x, seed=getattr(args, "seed", 0))}
    if getattr(args, "nucleus_view", False):
        out["nucleus_view"] = {"inside_model": True, "what": "each image replaced by its darkness x chroma map, "
                                                              "standardised per image (stain.nucleus_view)"}
    if getattr(args, "frame_cell", 0.0):
        out["framing"] = {**framing.describe(args.frame_cell),
                          "how": "data.images_for_model(files, model file), or framing.frame_image(full-size RGB "
                                 "image, image_size, share), before the model"}
    return out


# ----------------------------------------------------------------------------------------------
# What the training images looked like, and whether a folder looks like them
# ----------------------------------------------------------------------------------------------

def image_stats(x, max_images: int = STATS_IMAGES, seed: int = 0) -> dict:
    """Per-image mean RGB and apparent cell size of up to max_images images of uint8 (N, H, W, 3) `x`:
    their mean and spread, stored in a model's metadata at training time.

    Remembered for the last few samples measured (_MEASURED): a run trains several times on the same images (the
    --freeze-epochs phases, pretrain_resnet.py's frozen and unfrozen stages, its baselines), and the cell finder
    costs seconds per call. The key is the sampled images' bytes, on which alone the result depends."""
    if len(x) == 0:
        return {}
    rows = np.sort(np.random.default_rng(seed).permutation(len(x))[:max_images])
    sample = np.ascontiguousarray(x[rows])
    key = (hashlib.sha256(sample).hexdigest(), sample.shape, sample.dtype.str)
    if key not in _MEASURED:
        colour = sample.reshape(len(sample), -1, 3).mean(1)
        sizes = np.asarray([framing.apparent_size(img) for img in sample])
        q = np.quantile(sizes, (SIZE_QUANTILES[0], 0.5, SIZE_QUANTILES[1]))
        _MEASURED[key] = {"images": int(len(sample)), "mean_rgb": colour.mean(0).round(2).tolist(),
                          "std_rgb": colour.std(0).round(2).tolist(), "cell_size_low": round(float(q[0]), 4),
                          "cell_size_median": round(float(q[1]), 4), "cell_size_high": round(float(q[2]), 4)}
        while len(_MEASURED) > 4:
            del _MEASURED[next(iter(_MEASURED))]
    return copy.deepcopy(_MEASURED[key])


_MEASURED: dict = {}  # (sha256 of the sampled images, their shape, dtype) -> image_stats' result, oldest first


def ood_warnings(train_stats: dict, x, seed: int = 0) -> list[str]:
    """Reasons (in words) why images `x` look unlike the training images, or [] when they do not (or when the
    model carries no statistics)."""
    if not train_stats or len(x) == 0:
        return []
    now = image_stats(x, seed=seed)
    out = []
    mean, std = np.asarray(train_stats["mean_rgb"]), np.maximum(np.asarray(train_stats["std_rgb"]), 1.0)
    z = np.abs(np.asarray(now["mean_rgb"]) - mean) / std
    if z.max() > COLOUR_Z_LIMIT:
        out.append(f"mean colour RGB {_rgb(now['mean_rgb'])} vs {_rgb(mean)} +/- {_rgb(std)} in training "
                   f"({z.max():.1f} standard deviations away)")
    low, high = train_stats["cell_size_low"], train_stats["cell_size_high"]
    if not low <= now["cell_size_median"] <= high:
        out.append(f"the white cell spans {now['cell_size_median']:.2f} of the frame (median) vs {low:.2f}-{high:.2f} "
                   "in training")
    return out


def _rgb(v) -> str:
    return "(" + ", ".join(f"{float(c):.0f}" for c in v) + ")"


def cnn_builder(args, num_classes: int, meta: dict):
    """build_core for training.train: the dropout CNN of the recipe's shape with --norm, wrapped in the
    normalisation the saved model carries (wrap_core)."""
    def build():
        import models
        import recipes
        core = models.build_cnn(num_classes, args.image_size, norm=args.norm, **recipes.model_kwargs(args))
        return wrap_core(core, meta)
    return build
