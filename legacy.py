"""The original report's input pipeline: Keras' legacy ImageDataGenerator reading every file from disk on every
epoch and augmenting on the CPU. Kept as the measured baseline (bench.py) and behind `--loader generator`."""
from __future__ import annotations

import numpy as np

from runfiles import UserError


# ----------------------------------------------------------------------------------------------

def _legacy_image_module():
    """Keras' legacy ImageDataGenerator module: Keras 3 keeps it under keras.src.legacy (numpy + scipy, any
    backend); tf.keras re-exports the same classes and is the fallback where that private path moves."""
    try:
        from keras.src.legacy.preprocessing import image
    except ImportError:  # pragma: no cover - depends on the Keras version
        from tensorflow.keras.preprocessing import image  # noqa: F811
    return image


def legacy_generator(paths, labels, classes, image_size: int, batch_size: int = 32, rotation: float = 0.0,
                     shear: float = 0.0, horizontal_flip: bool = False, vertical_flip: bool = False,
                     zoom: float = 0.0, shift: float = 0.0, seed: int | None = None, shuffle: bool = True,
                     interpolation: str = "nearest", workers: int = 1):
    """The report's input pipeline: keras' legacy ImageDataGenerator reading every file from disk on every
    epoch. Returns a keras PyDataset of (uint8 RGB batch (B, S, S, 3), one-hot float32 labels).

    Per image it does exactly what ImageDataGenerator.flow_from_directory does (load_img at full size,
    resize to `image_size` with `interpolation`, the report's 'nearest' by default; then a random
    transform with scipy on the CPU), but over an explicit file list, so a training script's hold-out
    images stay out of training. The augmentation parameters mean what they mean for make_augmentation:
    rotation and shear in degrees, zoom and shift as fractions, flips, edge pixels repeated
    (fill_mode='nearest'). No rescaling: the core model takes uint8-range RGB and rescales inside, so the
    batches are rounded to uint8 like the cached pipeline's.
    """
    image = _legacy_image_module()
    generator = image.ImageDataGenerator(
        rotation_range=rotation, shear_range=shear, zoom_range=zoom, width_shift_range=shift,
        height_shift_range=shift, horizontal_flip=horizontal_flip, vertical_flip=vertical_flip,
        fill_mode="nearest", dtype="float32")

    class FileListIterator(image.BatchFromFilesMixin, image.Iterator):
        """flow_from_directory's iterator (DirectoryIterator) with the file list given, not scanned."""

        def __init__(self):
            self.set_processing_attrs(generator, (image_size, image_size), "rgb", "channels_last", None, "",
                                      "png", None, interpolation, False)
            self._filepaths = [str(p) for p in paths]
            self.classes = np.asarray(labels, dtype=np.int32)
            self.class_indices = {c: i for i, c in enumerate(classes)}
            self.class_mode, self.dtype, self.samples = "categorical", "float32", len(self._filepaths)
            super().__init__(self.samples, batch_size, shuffle, seed, workers=workers)

        @property
        def filepaths(self):
            return self._filepaths

        @property
        def labels(self):
            return self.classes

        @property
        def sample_weight(self):
            return None

        def _get_batches_of_transformed_samples(self, index_array):
            x, y = super()._get_batches_of_transformed_samples(index_array)
            return np.clip(np.round(x), 0, 255).astype(np.uint8), y

    if not len(paths):
        raise UserError("the legacy loader got no training images")
    return FileListIterator()


def legacy_training_data(fit_set, config, paired_x=None):
    """--loader generator: the report's ImageDataGenerator pipeline over the training images (hold-out
    excluded), decoding from disk every epoch and augmenting on the CPU; it replaces the augmentation layer.
    Hold-out and validation are still evaluated from the decoded cache by training's per-epoch evaluator."""
    if fit_set.masked.any() or paired_x is not None:
        raise UserError("--loader generator reads the raw image files from disk and cannot apply masks; "
                        "use --loader cached (the default) or --masks none")
    return legacy_generator(fit_set.paths, fit_set.y, fit_set.classes, int(fit_set.x.shape[1]), config.batch_size,
                            **(config.augment or {}), seed=config.seed)
