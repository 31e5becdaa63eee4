"""Mask consistency: a training-only wrapper that shows the model each image and its masked copy under the same
random augmentation and penalises the difference between the two predictions (train_masked.py --consistency)."""
from __future__ import annotations

import keras
from keras import ops

import augment


def consistency_model(core, augmentation: dict | None, weight: float, seed: int):
    """Training-only wrapper: [raw, masked] uint8 -> the raw image's probabilities, with the penalty added.

    Both copies get the SAME random affine (warped once as one 6-channel image, then split) and go through the
    core model as one batch of 2B, so their predictions differ only by the mask (and dropout)."""
    class MaskConsistency(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.core = core
            self.augment = augment.make_augmentation(**augmentation, seed=seed) if augmentation else None

        def call(self, inputs, training=None):
            raw, masked = inputs
            # Images without a mask arrive twice unchanged: their penalty is zero by construction, not just
            # small (dropout alone would otherwise make the two predictions differ).
            has_mask = ops.cast(ops.any(ops.not_equal(raw, masked), axis=(1, 2, 3)), "float32")
            if self.augment is not None:
                both = self.augment(ops.concatenate([raw, masked], axis=-1), training=training)
                raw, masked = both[..., :3], both[..., 3:]
            n = ops.shape(raw)[0]
            probs = ops.cast(self.core(ops.concatenate([raw, masked], axis=0), training=training), "float32")
            p, q = probs[:n], probs[n:]
            log_p = ops.log(ops.clip(p, 1e-7, 1.0))
            log_q = ops.log(ops.clip(q, 1e-7, 1.0))
            sym_kl = 0.5 * ops.sum((p - q) * (log_p - log_q), axis=-1)
            self.add_loss(weight * ops.mean(has_mask * sym_kl))
            return p

        def compute_output_shape(self, input_shapes):
            return core.output_shape

    size = core.input_shape[1]
    raw = keras.Input((size, size, 3), dtype="uint8", name="image")
    masked = keras.Input((size, size, 3), dtype="uint8", name="masked_image")
    return keras.Model([raw, masked], MaskConsistency(name="mask_consistency", dtype="float32")([raw, masked]),
                       name=f"{core.name}_consistency")
