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
    return dict(rotation=args.rotation, shear=args.shear, horizontal_flip=not args.no_hflip,
                vertical_flip=not args.no_vflip, zoom=getattr(args, "zoom", None) or 0.0,
                shift=getattr(args, "shift", None) or 0.0)


def with_augmentation(core, augment: dict | None, seed: int):
    """[augmentation] -> core. The augmentation layer exists only in this training wrapper, never in model.h5."""
    if not augment:
        return core
    keras = _keras()
    size = core.input_shape[1]
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = make_augmentation(**augment, seed=seed)(inputs)
    return keras.Model(inputs, core(x), name=f"{core.name}_train")
