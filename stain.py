"""Stain and colour across microscopes: Reinhard mean/std normalisation to a reference (built into the saved model
from built-in layers, with the same computation in numpy) and a haematoxylin-eosin stain-jitter augmentation.

Reinhard et al. (2001) match each image's per-channel mean and standard deviation to a reference image's in a
decorrelated opponent colour space (their l-alpha-beta, which LAB approximates). The saved model must load with plain
Keras, so the transform has to be built from built-in layers: LAB's and l-alpha-beta's logarithm / cube root are not
among them, so here the opponent axes of l-alpha-beta ((R+G+B)/sqrt3, (R+G-2B)/sqrt6, (R-G)/sqrt2) are applied to
the gamma-encoded RGB values, whose encoding is already close to LAB's perceptual lightness scale. Inside the model:
a fixed 1x1 convolution (RGB -> opponent), GroupNormalization with one group per channel and no learned scale or
offset (each image's own mean and std per channel), a fixed 1x1 convolution (times the reference std, plus the reference
mean, back to RGB) and ReLU(max_value=255). `reinhard_normalise` does exactly that in numpy, for anyone who wants
to see what the model sees. A per-channel gain and offset in the opponent space (a white-balance or stain-strength
change) leaves the normalised image unchanged.

The nucleus view (`--nucleus-view`): the image reduced, inside the model, to the map the cell finder reads (darkness x
chroma), standardised per image; `nucleus_view` is the numpy twin.

Stain jitter (Tellez et al. 2018): optical density -> haematoxylin / eosin / DAB amounts by Ruifrok and Johnston's
colour deconvolution, each amount scaled by U(1-s, 1+s) and shifted by U(-s, s) per image, and back to RGB; a Keras
layer written with keras.ops, used only while training. Keras is imported on first use of a layer.
"""
from __future__ import annotations

import functools

import numpy as np

# Rows: the opponent axes of Reinhard's l-alpha-beta (achromatic, yellow-blue, red-green); orthonormal.
OPPONENT = np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]], np.float64) / np.sqrt([[3.0], [6.0], [2.0]])
# The std floor of the per-image normalisation, in grey levels: a flat image maps to the reference mean colour.
EPSILON = 1.0
# Ruifrok & Johnston's optical densities of haematoxylin, eosin and DAB (rows), as in scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


# ----------------------------------------------------------------------------------------------
# Reinhard normalisation: statistics, the numpy version, the built-in-layer version
# ----------------------------------------------------------------------------------------------

def opponent_stats(images) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean and std of each opponent channel: two (N, 3) arrays (grey levels)."""
    x = np.asarray(images, np.float64).reshape(len(images), -1, 3) @ OPPONENT.T
    return x.mean(1), x.std(1)


def reference_stats(images, max_images: int = 2000, seed: int = 0) -> dict:
    """The reference a set is normalised to: the average of its images' opponent means and stds."""
    images = np.asarray(images) if not hasattr(images, "shape") else images
    rows = np.sort(np.random.default_rng(seed).permutation(len(images))[:max_images])
    means, stds = opponent_stats(images[rows])
    return {"space": "opponent axes of l-alpha-beta on gamma-encoded RGB (grey levels)",
            "mean": means.mean(0).round(4).tolist(), "std": stds.mean(0).round(4).tolist()}


def reinhard_normalise(images, reference: dict) -> np.ndarray:
    """Each image's opponent-channel mean and std matched to the reference's; float32 RGB in [0, 255], what the
    model's built-in normalisation layers compute (up to float rounding). images: (N, H, W, 3) or (H, W, 3)."""
    x = np.asarray(images, np.float64)
    single = x.ndim == 3
    x = x[None] if single else x
    o = x @ OPPONENT.T
    mean = o.mean((1, 2), keepdims=True)
    var = o.var((1, 2), keepdims=True)
    z = (o - mean) / np.sqrt(var + EPSILON)
    out = (z * np.asarray(reference["std"]) + np.asarray(reference["mean"])) @ OPPONENT
    out = np.clip(out, 0.0, 255.0).astype(np.float32)
    return out[0] if single else out


def _fixed_conv(x, kernel, bias=None, name: str = ""):
    """A 1x1 convolution with fixed float32 weights: `kernel` (input channels, output channels), optional bias."""
    from keras import layers
    kernel = np.asarray(kernel, np.float32)
    conv = layers.Conv2D(kernel.shape[1], 1, use_bias=bias is not None, trainable=False, dtype="float32", name=name)
    out = conv(x)
    conv.set_weights([kernel.reshape(1, 1, *kernel.shape)] + ([] if bias is None else [np.asarray(bias, np.float32)]))
    return out


def add_normalisation_layers(x, reference: dict, name: str = "stain_norm"):
    """The Reinhard block on a uint8 image tensor, from built-in layers only (a saved model needs no code)."""
    from keras import layers
    x = layers.Rescaling(1.0, dtype="float32", name=f"{name}_float")(x)
    x = _fixed_conv(x, OPPONENT.T, name=f"{name}_opponent")
    # One group per channel: each image's own mean and std per channel (instance normalisation). Not
    # LayerNormalization(axis=[1, 2]): Keras' .h5 loader restores its axis as [-1].
    x = layers.GroupNormalization(groups=3, epsilon=EPSILON, center=False, scale=False, dtype="float32",
                                  name=f"{name}_per_image")(x)
    std, mean = np.asarray(reference["std"], np.float64), np.asarray(reference["mean"], np.float64)
    x = _fixed_conv(x, std[:, None] * OPPONENT, mean @ OPPONENT, name=f"{name}_to_reference_rgb")
    return layers.ReLU(max_value=255.0, dtype="float32", name=f"{name}_clip")(x)


def with_normalisation(core, reference: dict | None, nucleus: bool = False):
    """uint8 RGB -> [Reinhard block] -> [nucleus view] -> core: one saved model, built-in layers only, nested like a
    backbone."""
    import keras
    size = core.input_shape[1]
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = add_normalisation_layers(inputs, reference) if reference else inputs
    if nucleus:
        x = add_nucleus_view_layers(x)
    return keras.Model(inputs, core(x), name=core.name)


# ----------------------------------------------------------------------------------------------
# The nucleus view: what the cell finder sees, as the model's only input
# ----------------------------------------------------------------------------------------------
# Wright-Giemsa stains a white cell's nucleus and granules dark and saturated, the background light and grey, red
# cells light and moderately saturated. framing.nucleus_score (darkness x saturation) finds the same nucleus under
# hue turns, saturation, contrast and brightness changes and blur (tools/framing_check.py); a model that reads only
# such a map, standardised per image, cannot lean on a lab's colours. Inside the model the saturation's division
# by the brightest channel has no built-in layer, so the view is darkness x chroma (max - min channel), which is
# darkness x saturation x brightness; per-image standardisation then removes the stain's overall strength: scaling
# every pixel's distance from white by a factor (a paler or a stronger stain) scales the map by its square and
# leaves the view unchanged.
NUCLEUS_VIEW_SPREAD = 4.0  # standard deviations mapped onto the 0-255 range the CNN's input scaling expects
NUCLEUS_VIEW_EPSILON = 1e-3  # the variance floor, in squared map units (0-255): only a flat image comes near it


def nucleus_view(images) -> np.ndarray:
    """The nucleus view in numpy, as the model computes it: float32 (N, H, W, 3) (or (H, W, 3)), three equal
    channels of each image's standardised darkness x chroma map, 127.5 + z * 255 / NUCLEUS_VIEW_SPREAD."""
    x = np.asarray(images, np.float64)
    single = x.ndim == 3
    x = x[None] if single else x
    score = (255.0 - x.mean(-1)) * (x.max(-1) - x.min(-1)) / 255.0
    mean = score.mean((1, 2), keepdims=True)
    var = score.var((1, 2), keepdims=True)
    z = (score - mean) / np.sqrt(var + NUCLEUS_VIEW_EPSILON)
    out = np.repeat((127.5 + z * 255.0 / NUCLEUS_VIEW_SPREAD)[..., None], 3, -1).astype(np.float32)
    return out[0] if single else out


def add_nucleus_view_layers(x, name: str = "nucleus_view"):
    """nucleus_view from built-in layers on an RGB tensor in [0, 255] (uint8, or the Reinhard block's output)."""
    from keras import layers
    x = layers.Rescaling(1.0, dtype="float32", name=f"{name}_float")(x)
    r, g, b = (_fixed_conv(x, np.eye(3)[:, k:k + 1], name=f"{name}_{c}") for k, c in enumerate("rgb"))
    chroma = layers.Subtract(dtype="float32", name=f"{name}_chroma")(
        [layers.Maximum(dtype="float32", name=f"{name}_max")([r, g, b]),
         layers.Minimum(dtype="float32", name=f"{name}_min")([r, g, b])])
    darkness = _fixed_conv(x, np.full((3, 1), -1.0 / (3 * 255.0)), [1.0], name=f"{name}_darkness")  # 1 - mean/255
    score = layers.Multiply(dtype="float32", name=f"{name}_score")([darkness, chroma])
    z = layers.GroupNormalization(groups=1, epsilon=NUCLEUS_VIEW_EPSILON, center=False, scale=False, dtype="float32",
                                  name=f"{name}_per_image")(score)
    return _fixed_conv(z, np.full((1, 3), 255.0 / NUCLEUS_VIEW_SPREAD), np.full(3, 127.5), name=f"{name}_rgb")


# ----------------------------------------------------------------------------------------------
# Colour deconvolution and the stain-jitter layer
# ----------------------------------------------------------------------------------------------

def rgb_to_hed(images) -> np.ndarray:
    """Haematoxylin, eosin and DAB amounts (optical-density units) of uint8 RGB images."""
    od = -np.log((np.asarray(images, np.float64) + 1.0) / 256.0)
    return od @ HED_FROM_RGB


def make_stain_jitter(strength: float = 0.05, seed=None):
    return stain_jitter_class()(strength=strength, seed=seed)


@functools.cache
def stain_jitter_class():
    import keras
    ops = keras.ops

    @keras.saving.register_keras_serializable(package="wbc")
    class StainJitter(keras.layers.Layer):
        """Random haematoxylin-eosin stain variation per image (uint8 RGB in and out), active only when
        training=True: each stain's amount scaled by U(1-s, 1+s) and shifted by U(-s, s) optical-density units."""

        def __init__(self, strength=0.05, seed=None, **kwargs):
            kwargs.setdefault("dtype", "float32")
            super().__init__(**kwargs)
            self.strength, self.seed = float(strength), seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, images, training=None):
            if not training or not self.strength:
                return images
            batch = ops.shape(images)[0]
            s = self.strength
            scale = keras.random.uniform((batch, 1, 1, 3), 1.0 - s, 1.0 + s, seed=self.seed_generator)
            shift = keras.random.uniform((batch, 1, 1, 3), -s, s, seed=self.seed_generator)
            od = -ops.log((ops.cast(images, "float32") + 1.0) / 256.0)
            hed = ops.einsum("bhwc,cd->bhwd", od, ops.convert_to_tensor(HED_FROM_RGB.astype(np.float32)))
            od = ops.einsum("bhwc,cd->bhwd", hed * scale + shift,
                            ops.convert_to_tensor(RGB_FROM_HED.astype(np.float32)))
            rgb = 256.0 * ops.exp(-od) - 1.0
            return ops.cast(ops.clip(ops.round(rgb), 0, 255), images.dtype)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "strength": self.strength, "seed": self.seed}

    return StainJitter
