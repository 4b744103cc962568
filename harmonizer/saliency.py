"""Input-gradient saliency maps.

A model's saliency for an image is the gradient of its true-class logit with respect to the
input pixels (Simonyan et al., 2014). Two reductions over the colour channels are offered:

* ``signed_mean``: the mean over channels of the signed gradient. The harmonization loss trains
  this map.
* ``abs_max``: the maximum over channels of the absolute gradient, the usual saliency of
  explainability libraries and of the original ClickMe evaluation.

The loss keeps only the positive part of the standardized map, so a model can align its signed
saliency while large negative gradients remain on the background; the two definitions can then
disagree, so evaluations report both.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

SIGNED_MEAN = "signed_mean"
ABS_MAX = "abs_max"
DEFINITIONS = (SIGNED_MEAN, ABS_MAX)


def target_weights(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Return [B, K] weights of the logits whose gradient is the saliency.

    Integer labels [B] give one-hot rows (the true-class logit); soft labels [B, K] (after
    mixup) weight each class's logit by its share of the label.
    """
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 1:
        return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    return tf.cast(labels, tf.float32)


def reduce_saliency(gradients: tf.Tensor, definition: str = SIGNED_MEAN) -> tf.Tensor:
    """Reduce [B, H, W, C] input gradients over channels to [B, H, W] maps.

    Raises:
        ValueError: if ``definition`` is not one of `DEFINITIONS`.
    """
    if definition == SIGNED_MEAN:
        return tf.reduce_mean(gradients, axis=-1)
    if definition == ABS_MAX:
        return tf.reduce_max(tf.abs(gradients), axis=-1)
    raise ValueError(f"saliency definition must be one of {DEFINITIONS}, got {definition!r}")


def input_gradients(
    model: Callable[..., tf.Tensor],
    images: tf.Tensor,
    labels: tf.Tensor,
    training: bool = False,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Return (gradients [B, H, W, C], logits [B, K]) of the labels' logits w.r.t. the images.

    Each example's gradient is that of its own target logit. In training mode a BatchNorm
    layer couples the examples of a batch through its statistics, so the gradient also
    carries that coupling, as the training loss does.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = tf.cast(model(images, training=training), tf.float32)
        weights = target_weights(labels, logits.shape[-1])
        target = tf.reduce_sum(logits * weights)
    return tape.gradient(target, images), logits


def saliency_maps(
    model: Callable[..., tf.Tensor],
    images: tf.Tensor,
    labels: tf.Tensor,
    definition: str = SIGNED_MEAN,
    training: bool = False,
) -> tf.Tensor:
    """Return [B, H, W] saliency maps of ``model`` for the given labels."""
    gradients, _ = input_gradients(model, images, labels, training=training)
    return reduce_saliency(gradients, definition)
