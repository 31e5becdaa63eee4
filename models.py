"""Models: the report's dropout CNN and ResNet50. Each core model takes uint8 RGB images and holds its own
preprocessing, built from Keras' built-in layers only, so a saved .h5 loads with plain keras.models.load_model."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from runfiles import UserError, load_core_model, model_file_problem


def image_input(image_size: int) -> keras.KerasTensor:
    return keras.Input((image_size, image_size, 3), dtype="uint8", name="image")


def classifier_head(x, num_classes: int, dense: int = 128, dropout: float = 0.5):
    """Dense + dropout + softmax; the softmax stays float32 under mixed precision for a stable loss."""
    if dense:
        x = layers.Dense(dense, activation="relu", name="head_dense")(x)
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)


# On PBC at 224 px a stride-2 first convolution matched the plain CNN's accuracy (docs/results.md) at about a
# quarter of the operations; below ~160 px halving the working resolution costs detail, so 'auto' keeps stride 1.
STEM_AUTO_MIN_SIZE = 160
NORMS = ("batch", "group", "layer")
POOLINGS = ("flatten", "avg", "blocks")  # build_cnn's ways from the last feature map(s) to the head


def resolve_stem_stride(stem_stride: int | str, image_size: int) -> int:
    if stem_stride == "auto":
        return 2 if image_size >= STEM_AUTO_MIN_SIZE else 1
    if int(stem_stride) not in (1, 2):
        raise ValueError(f"stem_stride must be 1, 2 or 'auto', not {stem_stride!r}")
    return int(stem_stride)


def flat_layers(model, chain=()):
    """(chain of nested models, layer) for every layer, in order, descending into nested models (a backbone, or
    the CNN inside its stain normalisation)."""
    for layer in model.layers:
        if hasattr(layer, "layers") and hasattr(layer, "inputs"):
            yield from flat_layers(layer, chain + (layer,))
        else:
            yield chain, layer


def build_cnn(num_classes: int = 5, image_size: int = 224, width: int = 32, depth: int = 4,
              dropout: float = 0.1, dropout_step: float = 0.1, dense: int = 128, head_dropout: float = 0.5,
              pooling: str = "flatten", batchnorm: bool = False, stem_stride: int | str = 1,
              norm: str = "batch", name: str = "dropout_cnn") -> keras.Model:
    """The report's CNN: `depth` blocks of conv 3x3 + max-pool + dropout, filters doubling and dropout
    rising with depth (dropout + i * dropout_step), then a dense head.

    pooling='flatten' is the report's head; 'avg' (global average pooling) has far fewer parameters; 'blocks'
    concatenates every block's globally averaged output (the early blocks' general features beside the last
    block's specific ones: what a head on a frozen pre-trained encoder can use; DINO's linear evaluation reads
    several blocks too).
    batchnorm=True adds batch normalisation after each convolution. stem_stride=2 makes the first convolution
    strided: every later block works on a quarter of the pixels (about 4x fewer operations at 224 px), while
    the first layer still sees the full-resolution image, unlike simply training at half the size.
    stem_stride='auto' is 2 from STEM_AUTO_MIN_SIZE px up and 1 below (the default recipe's choice).
    norm: which normalisation batchnorm=True adds: 'batch', 'group' (8 groups, fewer where a block has fewer
    filters) or 'layer' (one group: each image's whole feature map, Wu & He's layer norm for convolutions). Group
    and layer norm use no batch statistics, so a batch of another lab's images cannot shift them.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, not {norm!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    stem_stride = resolve_stem_stride(stem_stride, image_size)
    inputs = image_input(image_size)
    x = layers.Rescaling(1.0 / 255.0, name="scale_0_1")(inputs)
    block_outputs = []
    for i in range(depth):
        filters = width * 2 ** i
        x = layers.Conv2D(filters, 3, strides=stem_stride if i == 0 else 1, padding="same",
                          use_bias=not batchnorm, name=f"block{i + 1}_conv")(x)
        if batchnorm and norm == "batch":
            # momentum 0.9: the moving statistics must settle within a few hundred steps on small splits
            x = layers.BatchNormalization(momentum=0.9, name=f"block{i + 1}_bn")(x)
        elif batchnorm:
            groups = 1 if norm == "layer" else min(8, filters)
            x = layers.GroupNormalization(groups, name=f"block{i + 1}_{norm}norm")(x)
        x = layers.Activation("relu", name=f"block{i + 1}_relu")(x)
        x = layers.MaxPooling2D(name=f"block{i + 1}_pool")(x)
        x = layers.Dropout(min(0.9, dropout + i * dropout_step), name=f"block{i + 1}_dropout")(x)
        block_outputs.append(x)
    if pooling == "blocks":
        x = layers.Concatenate(name="gap_blocks")([layers.GlobalAveragePooling2D(name=f"block{i + 1}_gap")(b)
                                                   for i, b in enumerate(block_outputs)])
    else:
        x = layers.Flatten(name="flatten")(x) if pooling == "flatten" else layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = classifier_head(x, num_classes, dense, head_dropout)
    return keras.Model(inputs, outputs, name=name)



# ----------------------------------------------------------------------------------------------
# ResNet50: pre-training on CAM16, fine-tuning on WBC
# ----------------------------------------------------------------------------------------------

# Keras' ImageNet ResNet50 weights expect "caffe" inputs: BGR channel order, ImageNet's per-channel mean
# subtracted, no scaling (keras.applications.resnet50.preprocess_input).
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
# Keras' own download of the ImageNet ResNet50 weights without the top (keras.applications.resnet).
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
IMAGENET_NOTOP_HASH = "4d473c1dd8becc155b73f8504c6f6626"
BACKBONE_NAME = "resnet50_backbone"
FEATURES_NAME = "features"
# Keras' ResNet50 uses batch-norm momentum 0.99: its moving statistics need ~500 steps to forget their start.
# A small CAM16 or WBC split gives tens of steps per epoch, so inference-mode outputs (every validation number)
# lag far behind the trained weights - the report's validation accuracy stuck at 0.5. 0.9 settles in ~50 steps.
RESNET_BN_MOMENTUM = 0.9


def caffe_preprocessing(x):
    """uint8 RGB -> ImageNet 'caffe' inputs, as one fixed, non-trainable 1x1 convolution (a built-in layer,
    so the saved model needs no custom code): output channel j = input channel 2 - j, minus the BGR mean."""
    x = layers.Rescaling(1.0, dtype="float32", name="to_float")(x)
    conv = layers.Conv2D(3, 1, dtype="float32", trainable=False, name="caffe_bgr_mean")
    y = conv(x)
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for j in range(3):
        kernel[0, 0, 2 - j, j] = 1.0
    conv.set_weights([kernel, -np.asarray(IMAGENET_BGR_MEAN, np.float32)])
    return y


def resnet50_init_kind(weights) -> str:
    """'scratch', 'imagenet' or 'file' for build_resnet50's weights argument."""
    if weights in (None, "scratch"):
        return "scratch"
    return "imagenet" if weights == "imagenet" else "file"


def build_resnet50(num_classes: int = 5, image_size: int = 224, weights=None, head_dropout: float = 0.0,
                   bn_momentum: float = RESNET_BN_MOMENTUM, name: str = "resnet50") -> keras.Model:
    """ResNet50 core model: uint8 RGB in, softmax out, preprocessing inside.

    weights: None/'scratch' (random), 'imagenet' (Keras' download) or the path of a local Keras ResNet50 weights
    file without top (e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5). Pre-trained weights get the
    preprocessing they were trained with (ImageNet's caffe-style BGR + mean); from scratch, inputs are scaled
    to [-1, 1]. The backbone is one nested model named `resnet50_backbone`, so it can be frozen as a whole.
    """
    kind = resnet50_init_kind(weights)
    inputs = image_input(image_size)
    if kind == "scratch":
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_minus1_1")(inputs)
    else:
        x = caffe_preprocessing(inputs)
    backbone = keras.applications.ResNet50(include_top=False, weights=None if kind == "scratch" else str(weights),
                                           input_shape=(image_size, image_size, 3), pooling="avg")
    backbone.name = BACKBONE_NAME
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum
    x = backbone(x)
    x = layers.Identity(name=FEATURES_NAME)(x)
    if head_dropout:
        x = layers.Dropout(head_dropout, name="head_dropout")(x)
    outputs = classifier_head(x, num_classes, dense=0)
    return keras.Model(inputs, outputs, name=name)


def resolve_init(init: str):
    """--init (scratch, imagenet or a weights file) as build_resnet50's `weights`: None, or a local file
    (ImageNet's is downloaded once into Keras' cache)."""
    if init == "scratch":
        return None
    if init != "imagenet":
        return str(init)
    try:
        return keras.utils.get_file(IMAGENET_NOTOP_FILE, IMAGENET_URL + IMAGENET_NOTOP_FILE, cache_subdir="models",
                                    file_hash=IMAGENET_NOTOP_HASH)
    except Exception as e:  # noqa: BLE001 - offline, proxy, bad download: all the same advice
        raise UserError(f"--init imagenet: could not download Keras' ImageNet weights ({type(e).__name__}); "
                        f"offline, download {IMAGENET_NOTOP_FILE} from {IMAGENET_URL} elsewhere and pass "
                        f"--init PATH/TO/{IMAGENET_NOTOP_FILE}") from None


def build_from_init(weights, num_classes: int, image_size: int, bn_momentum: float | None = None):
    """build_resnet50 from resolve_init's weights: Keras ResNet50 weights, or a saved encoder of
    `pretrain_ssl.py --model resnet50` (encoder_from_ssl); a file that is neither is one UserError line."""
    if weights is not None and weights != "imagenet" and is_saved_model(weights):
        return encoder_from_ssl(weights, num_classes, image_size, bn_momentum or RESNET_BN_MOMENTUM)
    try:
        return build_resnet50(num_classes, image_size, weights=weights, bn_momentum=bn_momentum or RESNET_BN_MOMENTUM)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"--init {weights}: not a Keras ResNet50 weights file without top "
                        f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})") from None


def is_saved_model(path) -> bool:
    """Whether `path` holds a whole Keras model (not weights only): runfiles.model_file_problem finds none."""
    return model_file_problem(Path(path)) is None


def encoder_from_ssl(path, num_classes: int, image_size: int, bn_momentum: float = RESNET_BN_MOMENTUM):
    """A ResNet50 classifier whose backbone holds a self-supervised encoder's weights (pretrain_ssl.py --model
    resnet50 saves preprocessing + backbone + pooled features). Built fresh at `image_size` with the encoder's
    [-1, 1] preprocessing and a new head: convolution weights do not depend on the input side."""
    saved = load_core_model(path)
    names = {layer.name for layer in saved.layers}
    if BACKBONE_NAME not in names or "scale_minus1_1" not in names:
        raise UserError(f"--init {path}: a Keras model, but not a ResNet50 encoder of pretrain_ssl.py --model "
                        f"resnet50 (expected layers {BACKBONE_NAME} and scale_minus1_1; a CAM16 stage model goes "
                        f"to --pretrained)")
    core = build_resnet50(num_classes, image_size, weights=None, bn_momentum=bn_momentum)
    core.get_layer(BACKBONE_NAME).set_weights(saved.get_layer(BACKBONE_NAME).get_weights())
    return core


def replace_head(core: keras.Model, num_classes: int, head_dropout: float = 0.0, name: str | None = None):
    """The same preprocessing and backbone (shared weights) with a new, freshly initialised softmax head."""
    x = core.get_layer(FEATURES_NAME).output
    if head_dropout:
        x = layers.Dropout(head_dropout, name="head_dropout")(x)
    outputs = classifier_head(x, num_classes, dense=0)
    return keras.Model(core.input, outputs, name=name or core.name)


def set_backbone_trainable(core: keras.Model, trainable: bool):
    """Freeze or unfreeze the nested backbone. Keras 3 runs a non-trainable BatchNormalization layer in
    inference mode (moving statistics, not batch ones), so a frozen backbone's outputs and weights stay exactly
    as they are. Fixed preprocessing layers (the caffe 1x1 conv) stay frozen either way."""
    core.get_layer(BACKBONE_NAME).trainable = trainable
    return core
