"""Grad-CAM: where in an image a model looks when it picks a class, as heatmaps and labelled pictures.

Find the last convolutional feature map (also inside a nested backbone), split the model there into a feature
extractor and a head, and weigh each feature channel by the class score's gradient (Selvaraju et al. 2017).
Works under the TensorFlow, JAX and torch backends; Keras is imported by the functions that need it.
"""
from __future__ import annotations

from pathlib import Path

from runfiles import UserError

CMAP = "jet"  # heatmap colours, shared by the overlay and its colour bar
CONV_LAYERS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")


def feature_layer(model):
    """The last convolutional feature map: the last conv layer, followed forward through the layers of the
    same model that keep its spatial shape (batch norm, activation, residual add), so the map is the block's
    output. Returns (chain of nested models, layer)."""
    import models
    flat = list(models.flat_layers(model))
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
    """The image (uint8, size x size) under the heatmap in matplotlib's CMAP colours, as uint8 RGB."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image
    heat = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    colored = colormaps[CMAP](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    alpha = 0.45 * np.clip(heat, 0.0, 1.0)[..., None] + 0.15  # where the model looks, the colour dominates
    return np.clip(image * (1 - alpha) + colored * alpha, 0, 255).astype(np.uint8)


def caption(classes, probs, explained: int, true_class: str | None = None) -> str:
    """The words under a heatmap: the true class when known, the prediction and its probability, and the
    explained class when it is not the predicted one."""
    predicted = int(probs.argmax())
    parts = [f"true: {true_class}"] if true_class else []
    parts.append(f"predicted: {classes[predicted]} (p={probs[predicted]:.3f})")
    if explained != predicted:
        parts.append(f"explained: {classes[explained]} (p={probs[explained]:.3f})")
    return "   ".join(parts)


def save_labelled(image, cam, size: int, text: str, path: Path):
    """The overlay at size x size pixels with its caption and a colour bar; returns where the overlay is in the
    PNG (report.plot_heatmap)."""
    import report
    return report.plot_heatmap(overlay(image, cam, size), text, path, cmap=CMAP)
