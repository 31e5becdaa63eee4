"""Models: the report's dropout CNN and ResNet50. Each core model takes uint8 RGB images and holds its own
preprocessing, built from Keras' built-in layers only, so a saved .h5 loads with plain keras.models.load_model."""
from __future__ import annotations

import keras
from keras import layers


def image_input(image_size: int) -> keras.KerasTensor:
    return keras.Input((image_size, image_size, 3), dtype="uint8", name="image")


def classifier_head(x, num_classes: int, dense: int = 128, dropout: float = 0.5):
    """Dense + dropout + softmax; the softmax stays float32 under mixed precision for a stable loss."""
    if dense:
        x = layers.Dense(dense, activation="relu", name="head_dense")(x)
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)


def build_cnn(num_classes: int = 5, image_size: int = 224, width: int = 32, depth: int = 4,
              dropout: float = 0.1, dropout_step: float = 0.1, dense: int = 128, head_dropout: float = 0.5,
              pooling: str = "flatten", batchnorm: bool = False, name: str = "dropout_cnn") -> keras.Model:
    """The report's CNN: `depth` blocks of conv 3x3 + max-pool + dropout, filters doubling and dropout
    rising with depth (dropout + i * dropout_step), then a dense head.

    pooling='flatten' is the report's head; 'avg' (global average pooling) has far fewer parameters.
    batchnorm=True adds batch normalisation after each convolution.
    """
    if pooling not in ("flatten", "avg"):
        raise ValueError(f"pooling must be 'flatten' or 'avg', not {pooling!r}")
    inputs = image_input(image_size)
    x = layers.Rescaling(1.0 / 255.0, name="scale_0_1")(inputs)
    for i in range(depth):
        filters = width * 2 ** i
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not batchnorm, name=f"block{i + 1}_conv")(x)
        if batchnorm:
            # momentum 0.9: the moving statistics must settle within a few hundred steps on small splits
            x = layers.BatchNormalization(momentum=0.9, name=f"block{i + 1}_bn")(x)
        x = layers.Activation("relu", name=f"block{i + 1}_relu")(x)
        x = layers.MaxPooling2D(name=f"block{i + 1}_pool")(x)
        x = layers.Dropout(min(0.9, dropout + i * dropout_step), name=f"block{i + 1}_dropout")(x)
    x = layers.Flatten(name="flatten")(x) if pooling == "flatten" else layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = classifier_head(x, num_classes, dense, head_dropout)
    return keras.Model(inputs, outputs, name=name)

