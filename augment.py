"""On-device augmentation: one fused random affine warp per image (rotation, shear, zoom, shift, flips) as a
Keras layer written with keras.ops, and the training wrapper that puts it in front of the core model.

It runs wherever the model runs (compiled into the training step under JAX; the warp XLA-compiled on its own
under TensorFlow) and exists only while training, never in the saved model. Importing this module does not
import Keras: the layer class is built on first use.
"""
from __future__ import annotations

import functools

import numpy as np


def _keras():
    import keras
    return keras


def make_augmentation(rotation=30.0, shear=10.0, horizontal_flip=True, vertical_flip=True,
                      zoom=0.0, shift=0.0, seed=None, warp="auto"):
    """The random affine layer with the report's kind of augmentation (ImageDataGenerator's meanings:
    rotation and shear in degrees, zoom and shift as fractions)."""
    return random_affine_class()(rotation=rotation, shear=shear, horizontal_flip=horizontal_flip,
                        vertical_flip=vertical_flip, zoom=zoom, shift=shift, seed=seed, warp=warp)


@functools.cache
def random_affine_class():
    keras = _keras()
    ops = keras.ops

    @keras.saving.register_keras_serializable(package="wbc")
    class RandomAffine(keras.layers.Layer):
        """One fused random affine warp per image: rotation, shear, flips, optional zoom and shift.

        Takes and returns uint8 RGB batches; active only when training=True. The warp is bilinear with
        edge pixels repeated outside the image (ImageDataGenerator's fill_mode='nearest'): one gather-based
        warp written with keras.ops (warp_images; XLA-compiled under TensorFlow, nearly free on a GPU under
        JAX); warp='builtin' uses Keras' affine_transform instead.
        """

        def __init__(self, rotation=0.0, shear=0.0, horizontal_flip=False, vertical_flip=False,
                     zoom=0.0, shift=0.0, seed=None, warp="auto", **kwargs):
            kwargs.setdefault("dtype", "float32")  # geometry in float32 even under mixed precision
            super().__init__(**kwargs)
            self.rotation, self.shear, self.zoom, self.shift = float(rotation), float(shear), float(zoom), float(shift)
            self.horizontal_flip, self.vertical_flip = bool(horizontal_flip), bool(vertical_flip)
            self.seed = seed
            self.warp = warp
            self.seed_generator = keras.random.SeedGenerator(seed)

        @property
        def is_identity(self):
            return not (self.rotation or self.shear or self.zoom or self.shift
                        or self.horizontal_flip or self.vertical_flip)

        def random_matrices(self, batch, height, width):
            """(B, 2, 3) matrices mapping output (row, col, 1) to input (row, col)."""
            def uniform(low, high):
                return keras.random.uniform((batch,), low, high, seed=self.seed_generator)

            def sign(enabled):
                if not enabled:
                    return ops.ones((batch,))
                return ops.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)

            deg = np.pi / 180.0
            theta = uniform(-self.rotation, self.rotation) * deg
            shear = uniform(-self.shear, self.shear) * deg
            zy = uniform(1.0 - self.zoom, 1.0 + self.zoom)
            zx = uniform(1.0 - self.zoom, 1.0 + self.zoom)
            ty = uniform(-self.shift, self.shift) * height
            tx = uniform(-self.shift, self.shift) * width
            fy, fx = sign(self.vertical_flip), sign(self.horizontal_flip)
            cos, sin = ops.cos(theta), ops.sin(theta)
            # A = rotation @ shear @ zoom @ flip, in (row, col) coordinates around the centre.
            # rotation R = [[c, -s], [s, c]] times shear S = [[1, -sin(sh)], [0, cos(sh)]], as in
            # ImageDataGenerator; zoom and flips scale the columns.
            r_s00, r_s01 = cos, -cos * ops.sin(shear) - sin * ops.cos(shear)
            r_s10, r_s11 = sin, -sin * ops.sin(shear) + cos * ops.cos(shear)
            a00, a01 = r_s00 * zy * fy, r_s01 * zx * fx
            a10, a11 = r_s10 * zy * fy, r_s11 * zx * fx
            cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
            b0 = cy + ty - (a00 * cy + a01 * cx)
            b1 = cx + tx - (a10 * cy + a11 * cx)
            rows = [ops.stack([a00, a01, b0], -1), ops.stack([a10, a11, b1], -1)]
            return ops.stack(rows, 1)

        def call(self, images, training=None):
            if not training or self.is_identity:
                return images
            shape = ops.shape(images)
            matrices = self.random_matrices(shape[0], images.shape[1], images.shape[2])
            return warp_images(images, matrices, self._backend_warp())

        def _backend_warp(self):
            return "gather" if self.warp == "auto" else self.warp

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            config = super().get_config()
            config.update(rotation=self.rotation, shear=self.shear, horizontal_flip=self.horizontal_flip,
                          vertical_flip=self.vertical_flip, zoom=self.zoom, shift=self.shift,
                          seed=self.seed, warp=self.warp)
            return config

    return RandomAffine


def warp_images(images, matrices, method="gather"):
    """Warp uint8 (B, H, W, C) images by (B, 2, 3) output->input matrices; bilinear, edges repeated.

    method 'gather': four gathers written with keras.ops. Under TensorFlow that function is compiled with XLA
    on its own (tf.function(jit_compile=True)), inside the otherwise uncompiled training step: timed once on the
    2-core CPU, a batch of 32 at 224 px took 6 ms so, against 26 ms through TF's projective-transform kernel ('builtin',
    Keras' affine_transform) and 150 ms as plain TF ops. Under JAX the whole training step is compiled anyway.
    """
    if method == "gather" and _keras().backend.backend() == "tensorflow":
        return _xla_gather_warp()(images, matrices)
    return _warp(images, matrices, method)


def _warp(images, matrices, method):
    ops = _keras().ops
    height, width = images.shape[1], images.shape[2]
    x = ops.cast(images, "float32")
    if method == "builtin":
        # affine_transform wants [a0 a1 a2 b0 b1 b2 c0 c1] mapping output (x=col, y=row) to input.
        m = matrices
        transform = ops.stack([m[:, 1, 1], m[:, 1, 0], m[:, 1, 2], m[:, 0, 1], m[:, 0, 0], m[:, 0, 2],
                               ops.zeros_like(m[:, 0, 0]), ops.zeros_like(m[:, 0, 0])], -1)
        out = ops.image.affine_transform(x, transform, interpolation="bilinear", fill_mode="nearest")
    else:
        out = _gather_warp(x, matrices, height, width)
    out = ops.clip(ops.round(out), 0, 255)
    return ops.cast(out, images.dtype)


@functools.cache
def _xla_gather_warp():
    import tensorflow as tf  # only reached under the TensorFlow backend, where it is already imported
    return tf.function(functools.partial(_warp, method="gather"), jit_compile=True)


def _gather_warp(x, matrices, height, width):
    ops = _keras().ops
    batch, channels = ops.shape(x)[0], x.shape[3]
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32),
                             indexing="ij")
    grid = ops.convert_to_tensor(np.stack([rows.ravel(), cols.ravel(), np.ones(height * width, np.float32)]))
    src = ops.einsum("bij,jp->bip", matrices, grid)  # (B, 2, H*W)
    sy = ops.clip(src[:, 0], 0.0, height - 1.0)
    sx = ops.clip(src[:, 1], 0.0, width - 1.0)
    y0, x0 = ops.floor(sy), ops.floor(sx)
    wy, wx = sy - y0, sx - x0
    y0, x0 = ops.cast(y0, "int32"), ops.cast(x0, "int32")
    y1, x1 = ops.minimum(y0 + 1, height - 1), ops.minimum(x0 + 1, width - 1)
    flat = ops.reshape(x, (batch, height * width, channels))

    def gather(yi, xi):
        return ops.take_along_axis(flat, ops.expand_dims(yi * width + xi, -1), axis=1)

    wy, wx = ops.expand_dims(wy, -1), ops.expand_dims(wx, -1)
    top = gather(y0, x0) * (1 - wx) + gather(y0, x1) * wx
    bottom = gather(y1, x0) * (1 - wx) + gather(y1, x1) * wx
    return ops.reshape(top * (1 - wy) + bottom * wy, (batch, height, width, channels))


def __getattr__(name):
    # The Keras layer class is built on first use, so that importing this module does not import Keras.
    if name == "RandomAffine":
        return random_affine_class()
    raise AttributeError(name)


def from_args(args) -> dict | None:
    """make_augmentation's keywords from parsed command-line arguments; None with --no-augment."""
    if getattr(args, "no_augment", False):
        return None
    out = dict(rotation=args.rotation, shear=args.shear, horizontal_flip=not args.no_hflip,
               vertical_flip=not args.no_vflip, zoom=getattr(args, "zoom", None) or 0.0,
               shift=getattr(args, "shift", None) or 0.0)
    return {**out, **photometric_options(args)}


def photometric_options(args) -> dict:
    """The photometric options of parsed arguments that are switched on (differ from PHOTOMETRIC_OFF), by name."""
    values = {key: getattr(args, key, None) for key in PHOTOMETRIC_KEYS}
    return {key: v for key, v in values.items() if v is not None and v != PHOTOMETRIC_OFF[key]}


def photometric_on(args) -> bool:
    """Whether any photometric option makes a layer (hue_jitter 0 alone only takes the hue out of a colour jitter
    that is off)."""
    return any(photometric_options(args).values())


def with_augmentation(core, augment: dict | None, seed: int):
    """[augmentation] -> core. The augmentation layer exists only in this training wrapper, never in model.h5."""
    if not augment:
        return core
    keras = _keras()
    size = core.input_shape[1]
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    affine = {k: v for k, v in augment.items() if k not in PHOTOMETRIC_KEYS}
    photometric = {k: v for k, v in augment.items() if k in PHOTOMETRIC_KEYS}
    layers = photometric_layers(**photometric, seed=seed)
    # The crops first (another lab's cut, then the zoom), then the affine warp, then colour: make_two_views' order.
    crops = [l for l in layers if l.__class__.__name__ in ("RandomTightCrop", "RandomResizedCrop")]
    x = inputs
    for layer in crops + [make_augmentation(**affine, seed=seed)] + [l for l in layers if l not in crops]:
        x = layer(x)
    return keras.Model(inputs, core(x), name=f"{core.name}_train")


# ----------------------------------------------------------------------------------------------
# Photometric and crop augmentation (colour jitter, greyscale, blur, random resized crop) and the two views of
# self-supervised pre-training. Each layer takes and returns uint8 RGB batches, draws from its own seeded
# keras.random.SeedGenerator, is active only when training=True, and is the identity at zero strength.
# ----------------------------------------------------------------------------------------------

# The options with_augmentation passes to photometric_layers rather than to the affine warp, with the value that
# switches each off; each is absent from an augmentation dict unless switched on, so recipes and the other wrappers
# see the dict they knew. Every one but crop_scale (an area share in (0, 1]) is a strength or share in [0, 1].
PHOTOMETRIC_OFF = {"color_jitter": 0.0, "hue_jitter": None, "grayscale": 0.0, "blur": 0.0, "crop_scale": 1.0,
                   "tight_crop": 0.0, "random_conv": 0.0}
PHOTOMETRIC_KEYS = tuple(PHOTOMETRIC_OFF)
# Tight crops: each edge of a chosen image cut by up to this share of the side. A framed image (--frame-cell 0.5)
# holds the nucleus in its middle half, so a cut of at most a quarter never reaches it.
TIGHT_CROP_MAX_CUT = 0.25
# Colour-jitter strength S scales SimCLR's jitter: brightness, contrast and saturation factors in [1-0.8S, 1+0.8S]
# (S=0.5 gives SimCLR's 0.4), hue shifted by up to 0.2S of a full turn (S=0.5: 0.1), applied to 80% of the images.
# A separate hue strength H (hue_jitter) replaces S for the hue alone: H=0 jitters everything but the hue, which
# carries the granule colour that tells eosinophils and basophils from the rest.
JITTER_SCALE = {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2}
# Gaussian blur sigma, as SimCLR draws it at 224 px (0.1 to 2.0 pixels), scaled with the image side.
BLUR_SIGMA_AT_224 = (0.1, 2.0)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)


def _to_unit(images):
    return _keras().ops.cast(images, "float32") / 255.0


def _to_uint8(x, dtype):
    ops = _keras().ops
    return ops.cast(ops.clip(ops.round(x * 255.0), 0.0, 255.0), dtype)


def _grey(x):
    """Luma of float RGB (B, H, W, 3) -> (B, H, W, 1)."""
    ops = _keras().ops
    return ops.expand_dims(ops.einsum("bhwc,c->bhw", x, ops.convert_to_tensor(_LUMA)), -1)


@functools.cache
def random_layer_class():
    """The base of the random training-only layers: a seeded keras.random.SeedGenerator of its own, float32
    computation, per-image draws, the output shaped as the input."""
    keras = _keras()
    ops = keras.ops

    class RandomLayer(keras.layers.Layer):
        def __init__(self, seed=None, **kwargs):
            kwargs.setdefault("dtype", "float32")
            super().__init__(**kwargs)
            self.seed = seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def uniform(self, batch, low, high):
            return keras.random.uniform((batch,), low, high, seed=self.seed_generator)

        def chosen(self, batch, probability):
            """1.0 for the images (a `probability` share) that get the change, else 0.0, as (B,) float32."""
            return ops.cast(self.uniform(batch, 0.0, 1.0) < probability, "float32")

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "seed": self.seed}

    return RandomLayer


@functools.cache
def photometric_classes():
    """The layer classes, built on first use so that importing this module does not import Keras."""
    keras = _keras()
    ops = keras.ops
    _Random = random_layer_class()

    @keras.saving.register_keras_serializable(package="wbc")
    class RandomColorJitter(_Random):
        """Brightness and contrast factors, saturation factor, hue rotation (YIQ), each drawn per image;
        `probability` of the images are jittered, the rest pass unchanged."""

        def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, probability=1.0, **kwargs):
            super().__init__(**kwargs)
            self.brightness, self.contrast = float(brightness), float(contrast)
            self.saturation, self.hue, self.probability = float(saturation), float(hue), float(probability)

        @property
        def is_identity(self):
            return self.probability <= 0 or not (self.brightness or self.contrast or self.saturation or self.hue)

        def call(self, images, training=None):
            if not training or self.is_identity:
                return images
            batch = ops.shape(images)[0]
            on = self.chosen(batch, self.probability)

            def factor(strength):  # per image, broadcast over (H, W, C); 1 for images not chosen
                f = 1.0 + on * self.uniform(batch, -strength, strength)
                return ops.reshape(f, (-1, 1, 1, 1))

            x = _to_unit(images)
            if self.brightness:
                x = x * factor(self.brightness)
            if self.contrast:
                mean = ops.mean(_grey(x), axis=(1, 2, 3), keepdims=True)
                x = (x - mean) * factor(self.contrast) + mean
            if self.saturation:
                grey = _grey(x)
                x = grey + (x - grey) * factor(self.saturation)
            if self.hue:
                x = self._rotate_hue(ops.clip(x, 0.0, 1.0), on * self.uniform(batch, -self.hue, self.hue))
            return _to_uint8(x, images.dtype)

        @staticmethod
        def _rotate_hue(x, turns):
            # A hue shift is a rotation of the chroma plane (I, Q) of YIQ around the luma axis.
            angle = turns * (2.0 * np.pi)
            cos, sin = ops.cos(angle), ops.sin(angle)
            one, zero = ops.ones_like(cos), ops.zeros_like(cos)
            rot = ops.stack([ops.stack([one, zero, zero], -1), ops.stack([zero, cos, -sin], -1),
                             ops.stack([zero, sin, cos], -1)], 1)  # (B, 3, 3)
            to_yiq = ops.convert_to_tensor(_RGB_TO_YIQ)
            from_yiq = ops.convert_to_tensor(np.linalg.inv(_RGB_TO_YIQ).astype(np.float32))
            matrix = ops.einsum("ij,bjk,kl->bil", from_yiq, rot, to_yiq)
            return ops.einsum("bhwc,bdc->bhwd", x, matrix)

        def get_config(self):
            return {**super().get_config(), "brightness": self.brightness, "contrast": self.contrast,
                    "saturation": self.saturation, "hue": self.hue, "probability": self.probability}

    @keras.saving.register_keras_serializable(package="wbc")
    class RandomGrayscale(_Random):
        """`probability` of the images become grey (luma in all three channels)."""

        def __init__(self, probability=0.0, **kwargs):
            super().__init__(**kwargs)
            self.probability = float(probability)

        def call(self, images, training=None):
            if not training or self.probability <= 0:
                return images
            on = ops.reshape(self.chosen(ops.shape(images)[0], self.probability), (-1, 1, 1, 1))
            x = _to_unit(images)
            x = on * ops.repeat(_grey(x), 3, axis=-1) + (1.0 - on) * x
            return _to_uint8(x, images.dtype)

        def get_config(self):
            return {**super().get_config(), "probability": self.probability}

    @keras.saving.register_keras_serializable(package="wbc")
    class RandomGaussianBlur(_Random):
        """`probability` of the images are blurred with a Gaussian of sigma drawn per image from `sigma`
        (pixels; default SimCLR's 0.1-2.0 at 224 px, scaled to the image side). Separable, edges mirrored."""

        def __init__(self, probability=0.0, sigma=None, **kwargs):
            super().__init__(**kwargs)
            self.probability = float(probability)
            self.sigma = None if sigma is None else tuple(float(s) for s in sigma)

        def call(self, images, training=None):
            if not training or self.probability <= 0:
                return images
            height = images.shape[1]
            low, high = self.sigma or tuple(s * height / 224.0 for s in BLUR_SIGMA_AT_224)
            radius = max(1, int(np.ceil(3.0 * high)))
            batch = ops.shape(images)[0]
            on = self.chosen(batch, self.probability)
            sigma = ops.maximum(self.uniform(batch, low, high), 1e-3)
            offsets = ops.convert_to_tensor(np.arange(-radius, radius + 1, dtype=np.float32))
            weights = ops.exp(-ops.square(offsets)[None, :] / (2.0 * ops.square(sigma)[:, None]))
            weights = weights / ops.sum(weights, axis=1, keepdims=True)
            delta = ops.convert_to_tensor((np.arange(-radius, radius + 1) == 0).astype(np.float32))
            weights = on[:, None] * weights + (1.0 - on[:, None]) * delta[None, :]  # (B, 2r+1)
            x = _to_unit(images)
            x = self._blur_axis(x, weights, radius, axis=1)
            x = self._blur_axis(x, weights, radius, axis=2)
            return _to_uint8(x, images.dtype)

        @staticmethod
        def _blur_axis(x, weights, radius, axis):
            size = x.shape[axis]
            pad = [(0, 0)] * 4
            pad[axis] = (radius, radius)
            padded = ops.pad(x, pad, mode="symmetric")
            out = 0.0
            for k in range(2 * radius + 1):
                window = padded[:, k:k + size] if axis == 1 else padded[:, :, k:k + size]
                out = out + ops.reshape(weights[:, k], (-1, 1, 1, 1)) * window
            return out

        def get_config(self):
            return {**super().get_config(), "probability": self.probability, "sigma": self.sigma}

    @keras.saving.register_keras_serializable(package="wbc")
    class RandomConvolution(_Random):
        """Random convolutions (RandConv, Xu et al., ICLR 2021): `probability` of the images are blended with
        the output of one random convolution per batch, its side drawn from `kernel_sizes` and its weights from
        N(0, 1/(3 k^2)), so colours are re-mixed (k = 1) and local texture and edges re-weighted (k > 1): what
        another lab's stain, optics and camera change while the cell's shape stays. Per image the result is given
        the image's own mean and spread, then blended as a*image + (1-a)*convolved, a ~ U(0, 1). Edges mirrored."""

        def __init__(self, probability=0.0, kernel_sizes=(1, 3, 5), **kwargs):
            super().__init__(**kwargs)
            self.probability = float(probability)
            self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
            if any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
                raise ValueError(f"kernel_sizes {self.kernel_sizes}: expected odd sides >= 1")

        def call(self, images, training=None):
            if not training or self.probability <= 0:
                return images
            largest = max(self.kernel_sizes)
            radius = largest // 2
            # One kernel for the batch: the side k drawn from kernel_sizes, weights outside the middle k x k zero.
            pick = keras.random.randint((), 0, len(self.kernel_sizes), seed=self.seed_generator)
            side = ops.take(ops.convert_to_tensor(np.array(self.kernel_sizes, np.float32)), pick)
            distance = ops.convert_to_tensor(np.abs(np.arange(largest) - radius).astype(np.float32))
            inside = ops.cast(distance <= (side - 1.0) / 2.0, "float32")
            mask = inside[:, None] * inside[None, :]
            weights = keras.random.normal((largest, largest, 3, 3), seed=self.seed_generator)
            weights = weights * mask[:, :, None, None] / ops.sqrt(3.0 * ops.square(side))
            x = _to_unit(images)
            padded = ops.pad(x, [(0, 0), (radius, radius), (radius, radius), (0, 0)], mode="symmetric")
            y = ops.conv(padded, weights, strides=1, padding="valid")
            # Brought to the image's own overall brightness and spread (over all channels together, so that the
            # re-mixed colours stay re-mixed), then clipped into the pixel range.
            mean_x, std_x = ops.mean(x, axis=(1, 2, 3), keepdims=True), ops.std(x, axis=(1, 2, 3), keepdims=True)
            mean_y, std_y = ops.mean(y, axis=(1, 2, 3), keepdims=True), ops.std(y, axis=(1, 2, 3), keepdims=True)
            y = (y - mean_y) / (std_y + 1e-4) * std_x + mean_x
            batch = ops.shape(images)[0]
            keep = 1.0 - self.chosen(batch, self.probability) * (1.0 - self.uniform(batch, 0.0, 1.0))
            keep = ops.reshape(keep, (-1, 1, 1, 1))  # 1 for images not chosen, else the blend's a
            return _to_uint8(keep * x + (1.0 - keep) * y, images.dtype)

        def get_config(self):
            return {**super().get_config(), "probability": self.probability, "kernel_sizes": self.kernel_sizes}

    @keras.saving.register_keras_serializable(package="wbc")
    class RandomResizedCrop(_Random):
        """A crop of `scale` of the image's area (uniform) and aspect ratio in `ratio` (log-uniform), at a
        random place, resized back to the full side (bilinear, through warp_images). scale (1, 1) and ratio
        (1, 1) is the identity."""

        def __init__(self, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), warp="auto", **kwargs):
            super().__init__(**kwargs)
            self.scale, self.ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
            self.warp = warp

        def call(self, images, training=None):
            if not training or (self.scale[0] >= 1.0 and self.ratio == (1.0, 1.0)):
                return images
            batch, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
            area = self.uniform(batch, *self.scale)
            aspect = ops.exp(self.uniform(batch, float(np.log(self.ratio[0])), float(np.log(self.ratio[1]))))
            h = ops.minimum(ops.sqrt(area / aspect), 1.0) * height  # crop side in pixels
            w = ops.minimum(ops.sqrt(area * aspect), 1.0) * width
            top = self.uniform(batch, 0.0, 1.0) * (height - h)
            left = self.uniform(batch, 0.0, 1.0) * (width - w)
            # Output pixel centre (row + 0.5) maps to top + (row + 0.5) * h / height in input pixel units.
            sy, sx = h / height, w / width
            zero = ops.zeros_like(sy)
            rows = [ops.stack([sy, zero, top + 0.5 * sy - 0.5], -1), ops.stack([zero, sx, left + 0.5 * sx - 0.5], -1)]
            return warp_images(images, ops.stack(rows, 1), "gather" if self.warp == "auto" else self.warp)

        def get_config(self):
            return {**super().get_config(), "scale": self.scale, "ratio": self.ratio, "warp": self.warp}

    @keras.saving.register_keras_serializable(package="wbc")
    class RandomTightCrop(_Random):
        """How a framed image of a tightly cropped picture looks: `probability` of the images have each edge
        cut by U(0, max_cut) of the side, and the cut part filled by repeating the edge pixels of what is left,
        as framing.crop fills a frame that leaves the picture (another lab's crops may end just past the
        cell). Geometry stays: no pixel inside the kept box moves. An index gather, so it runs on every backend."""

        def __init__(self, probability=0.0, max_cut=TIGHT_CROP_MAX_CUT, **kwargs):
            super().__init__(**kwargs)
            self.probability, self.max_cut = float(probability), float(max_cut)

        def _kept(self, batch, size, on):
            """Per image, the source index of each output row (or column): clipped into the kept band."""
            first = ops.floor(on * self.uniform(batch, 0.0, self.max_cut) * size)
            last = (size - 1) - ops.floor(on * self.uniform(batch, 0.0, self.max_cut) * size)
            index = ops.arange(size, dtype="float32")[None, :]
            return ops.cast(ops.minimum(ops.maximum(index, first[:, None]), last[:, None]), "int32")  # (B, size)

        def call(self, images, training=None):
            if not training or self.probability <= 0 or self.max_cut <= 0:
                return images
            batch, height, width, channels = ops.shape(images)[0], images.shape[1], images.shape[2], images.shape[3]
            on = self.chosen(batch, self.probability)
            full = (batch, height, width, channels)
            rows = ops.broadcast_to(self._kept(batch, height, on)[:, :, None, None], full)
            images = ops.take_along_axis(images, rows, axis=1)
            cols = ops.broadcast_to(self._kept(batch, width, on)[:, None, :, None], full)
            return ops.take_along_axis(images, cols, axis=2)

        def get_config(self):
            return {**super().get_config(), "probability": self.probability, "max_cut": self.max_cut}

    @keras.saving.register_keras_serializable(package="wbc")
    class TwoViews(keras.layers.Layer):
        """The two-view generator of self-supervised pre-training: the same random pipeline applied twice to a
        batch, each time with fresh random draws, giving (view_a, view_b) of every image."""

        def __init__(self, pipeline, **kwargs):
            super().__init__(**kwargs)
            self.pipeline = list(pipeline)

        def _one(self, images, training):
            for layer in self.pipeline:
                images = layer(images, training=training)
            return images

        def call(self, images, training=None):
            return self._one(images, training), self._one(images, training)

        def compute_output_shape(self, input_shape):
            return input_shape, input_shape

    return {c.__name__: c for c in (RandomColorJitter, RandomGrayscale, RandomGaussianBlur, RandomConvolution,
                                    RandomResizedCrop, RandomTightCrop, TwoViews)}


def photometric_layers(color_jitter=0.0, grayscale=0.0, blur=0.0, crop_scale=1.0, tight_crop=0.0, seed=None,
                       hue_jitter=None, random_conv=0.0) -> list:
    """The layers for the options that are on, in the order tight crop, crop, colour, greyscale, random
    convolution, blur (SimCLR's order after the tight crop, the random convolution after colour as its stands in
    for another lab's stain and optics); each gets its own seed derived from `seed`, so the layers draw
    independently.
    hue_jitter: the hue's strength when it differs from color_jitter's (None: the same). [] when all are off."""
    classes = photometric_classes()
    base = 0 if seed is None else int(seed)
    out = []
    if tight_crop:
        out.append(classes["RandomTightCrop"](tight_crop, seed=base + 105))
    if crop_scale is not None and crop_scale < 1.0:
        out.append(classes["RandomResizedCrop"](scale=(float(crop_scale), 1.0), seed=base + 101))
    hue = color_jitter if hue_jitter is None else hue_jitter
    if color_jitter or hue:
        strengths = {k: v * (hue if k == "hue" else color_jitter) for k, v in JITTER_SCALE.items()}
        out.append(classes["RandomColorJitter"](**strengths, probability=0.8, seed=base + 102))
    if grayscale:
        out.append(classes["RandomGrayscale"](grayscale, seed=base + 103))
    if random_conv:
        out.append(classes["RandomConvolution"](random_conv, seed=base + 106))
    if blur:
        out.append(classes["RandomGaussianBlur"](blur, seed=base + 104))
    return out


def make_two_views(crop_scale=0.2, color_jitter=0.5, grayscale=0.2, blur=0.5, rotation=180.0, seed=None,
                   hue_jitter=None):
    """The two-view layer for self-supervised pre-training: random resized crop, rotation and flips (one affine
    warp), colour jitter, greyscale, blur; every view drawn independently. The defaults are SimCLR's view recipe
    with the rotations and flips a cell image allows (a cell has no up or left)."""
    pipeline = photometric_layers(crop_scale=crop_scale, seed=seed)
    pipeline.append(make_augmentation(rotation=rotation, shear=0.0, horizontal_flip=True, vertical_flip=True,
                                      seed=None if seed is None else int(seed) + 100))
    pipeline += photometric_layers(color_jitter, grayscale, blur, seed=seed, hue_jitter=hue_jitter)
    return photometric_classes()["TwoViews"](pipeline, name="two_views")


# ----------------------------------------------------------------------------------------------
# Feature-statistics noise (--style-noise): another lab's stain, optics and camera change the per-channel mean and
# spread of a CNN's early feature maps (what style transfer calls an image's style). DSU (Li et al., ICLR 2022)
# treats those statistics as uncertain while training: each is redrawn around its own value with the spread the
# batch's images show for it, so the later blocks learn to read the cell whatever its style.
# ----------------------------------------------------------------------------------------------

STYLE_NOISE_EPS = 1e-6


@functools.cache
def style_noise_class():
    keras = _keras()
    ops = keras.ops

    @keras.saving.register_keras_serializable(package="wbc")
    class StyleNoise(random_layer_class()):
        """For a `probability` share of the images of a training batch, each channel's spatial mean and standard
        deviation are replaced by draws from normals around them, whose spreads are the standard deviations of
        those statistics over the batch; the feature map is normalised with the old statistics and re-scaled with
        the new. Computed in float32; the identity outside training and at probability 0."""

        def __init__(self, probability=0.5, **kwargs):
            super().__init__(**kwargs)
            self.probability = float(probability)

        def call(self, x, training=None):
            if not training or self.probability <= 0:
                return x
            mean = ops.mean(x, axis=(1, 2), keepdims=True)                      # (B, 1, 1, C)
            std = ops.sqrt(ops.var(x, axis=(1, 2), keepdims=True) + STYLE_NOISE_EPS)
            mean_spread = ops.sqrt(ops.var(mean, axis=0, keepdims=True) + STYLE_NOISE_EPS)
            std_spread = ops.sqrt(ops.var(std, axis=0, keepdims=True) + STYLE_NOISE_EPS)
            new_mean = mean + keras.random.normal(ops.shape(mean), seed=self.seed_generator) * mean_spread
            new_std = std + keras.random.normal(ops.shape(std), seed=self.seed_generator) * std_spread
            restyled = (x - mean) / std * new_std + new_mean
            on = ops.reshape(self.chosen(ops.shape(x)[0], self.probability), (-1, 1, 1, 1))
            return ops.where(on > 0, restyled, x)

        def get_config(self):
            return {**super().get_config(), "probability": self.probability}

    return StyleNoise


def style_noise_after(depth: int) -> list[str]:
    """The CNN layers StyleNoise follows: every block's output but the last's (models.build_cnn's names). The last
    block's statistics carry the class more than the style (MixStyle, Zhou et al., ICLR 2021, found the last block
    the wrong place), so it is left alone."""
    return [f"block{i + 1}_dropout" for i in range(depth - 1)]


def with_style_noise(core, probability: float, seed: int):
    """A training copy of `core` (possibly nested: stain normalisation in front of the CNN) with StyleNoise after
    every block's output but the last's. Its layers are core's own: training it trains core, and core, the model
    that is saved, never holds the noise."""
    import models
    keras = _keras()
    names = [layer.name for _, layer in models.flat_layers(core)]
    after = style_noise_after(sum(1 for name in names if name.startswith("block") and name.endswith("_conv")))
    if not after or not set(after) <= set(names):
        raise ValueError(f"{core.name}: no convolution blocks named as build_cnn names them for --style-noise")
    layer_class = style_noise_class()

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if layer.name in after:
            out = layer_class(probability, seed=int(seed) + 110 + after.index(layer.name),
                              name=f"{layer.name}_style_noise")(out)
        return out

    return keras.models.clone_model(core, clone_function=lambda layer: layer, call_function=call, recursive=True)

