"""The neural harmonization loss and its parts.

The harmonization term compares a model's saliency map ``g`` with a human feature-importance map
``phi`` at every level of a Gaussian pyramid:

    sum_i mean_pixels( (z(P_i(g))^+ - z(P_i(phi))^+)^2 )

where ``P_i`` is level ``i`` of the pyramid (level 1 is the map itself, each next level is the
previous one blurred with a 5-tap binomial kernel and subsampled by 2), ``z`` standardizes a map
to zero mean and unit standard deviation, and ``^+`` keeps the positive part. The term is
averaged over the examples that have a map; a batch without maps contributes 0.
"""

from __future__ import annotations

import keras
import tensorflow as tf

DEFAULT_PYRAMID_LEVELS = 5
# Keeps the standardization finite for constant maps (an unmapped example's map is all zeros).
STANDARDIZE_EPSILON = 1e-6
# 5-tap binomial approximation of a Gaussian with sigma = 1, the classic Burt-Adelson kernel.
_BINOMIAL_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)

_NORMALIZATION_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.UnitNormalization,
)
_DECAYED_KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings")


def _blur_kernel(dtype: tf.DType) -> tf.Tensor:
    taps = tf.constant(_BINOMIAL_TAPS, dtype=dtype)
    taps = taps / tf.reduce_sum(taps)
    kernel = taps[:, None] * taps[None, :]
    return kernel[:, :, None, None]


def pyramid_down(maps: tf.Tensor) -> tf.Tensor:
    """Blur [B, H, W] maps with the binomial kernel (reflect padding) and subsample by 2."""
    pad = len(_BINOMIAL_TAPS) // 2
    padded = tf.pad(maps[..., None], [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    blurred = tf.nn.conv2d(padded, _blur_kernel(maps.dtype), strides=2, padding="VALID")
    return blurred[..., 0]


def min_map_side(levels: int = DEFAULT_PYRAMID_LEVELS) -> int:
    """Return the smallest map side, in pixels, that a ``levels``-level pyramid accepts."""
    return 2 ** (levels - 1) * 2


def gaussian_pyramid(maps: tf.Tensor, levels: int = DEFAULT_PYRAMID_LEVELS) -> list[tf.Tensor]:
    """Return the ``levels`` levels of the Gaussian pyramid of [B, H, W] maps, finest first.

    Raises:
        ValueError: if ``levels`` < 1 or the maps are too small for that many levels.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    height, width = maps.shape[-2], maps.shape[-1]
    min_side = min_map_side(levels)
    if height is not None and width is not None and min(height, width) < min_side:
        raise ValueError(
            f"maps of {height}x{width} pixels are too small for a {levels}-level pyramid; "
            f"use maps of at least {min_side}x{min_side} or fewer levels"
        )
    pyramid = [maps]
    for _ in range(levels - 1):
        pyramid.append(pyramid_down(pyramid[-1]))
    return pyramid


def standardize(maps: tf.Tensor) -> tf.Tensor:
    """Standardize each [B, H, W] map to zero mean and unit standard deviation."""
    mean = tf.reduce_mean(maps, axis=[-2, -1], keepdims=True)
    centered = maps - mean
    std = tf.sqrt(tf.reduce_mean(tf.square(centered), axis=[-2, -1], keepdims=True))
    return centered / (std + STANDARDIZE_EPSILON)


def per_example_harmonization_loss(
    saliency: tf.Tensor, maps: tf.Tensor, levels: int = DEFAULT_PYRAMID_LEVELS
) -> tf.Tensor:
    """Return the pyramid loss of each example, shape [B], for [B, H, W] saliency and maps."""
    saliency = tf.cast(saliency, tf.float32)
    maps = tf.cast(maps, tf.float32)
    losses = []
    for saliency_level, map_level in zip(
        gaussian_pyramid(saliency, levels), gaussian_pyramid(maps, levels), strict=True
    ):
        difference = tf.nn.relu(standardize(saliency_level)) - tf.nn.relu(standardize(map_level))
        losses.append(tf.reduce_mean(tf.square(difference), axis=[-2, -1]))
    return tf.add_n(losses)


def masked_mean(
    values: tf.Tensor, mask: tf.Tensor, denominator: tf.Tensor | None = None
) -> tf.Tensor:
    """Average ``values`` over the entries where ``mask`` is 1; 0 when the mask is all zero.

    Args:
        values: [B] per-example values.
        mask: [B] 0/1 weights.
        denominator: the number of masked entries to divide by, when it differs from
            ``sum(mask)`` (for example the count over all replicas of a distributed batch).
    """
    mask = tf.cast(mask, values.dtype)
    if denominator is None:
        denominator = tf.reduce_sum(mask)
    denominator = tf.cast(denominator, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), denominator)


def harmonization_loss(
    saliency: tf.Tensor,
    maps: tf.Tensor,
    has_map: tf.Tensor,
    levels: int = DEFAULT_PYRAMID_LEVELS,
) -> tf.Tensor:
    """Return the harmonization term averaged over the examples whose ``has_map`` is 1."""
    per_example = per_example_harmonization_loss(saliency, maps, levels)
    return masked_mean(per_example, has_map)


def per_example_cross_entropy(
    logits: tf.Tensor, labels: tf.Tensor, label_smoothing: float = 0.0
) -> tf.Tensor:
    """Return label-smoothed softmax cross-entropy per example, shape [B].

    Args:
        logits: [B, K] unnormalized scores.
        labels: [B, K] one-hot or soft targets that sum to 1.
        label_smoothing: mixes the targets with the uniform distribution over K classes.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.float32)
    if label_smoothing:
        num_classes = tf.cast(tf.shape(labels)[-1], tf.float32)
        labels = labels * (1.0 - label_smoothing) + label_smoothing / num_classes
    return tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def iter_layers(root: keras.layers.Layer):
    """Yield ``root`` and every layer nested in it, each once.

    Keras tracks a sublayer when it is assigned to an attribute (directly or in a list, tuple
    or dict), so walking the attributes reaches the same layers without private APIs.
    """
    seen: set[int] = set()
    stack = [root]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        children = list(getattr(layer, "layers", []) if isinstance(layer, keras.Model) else [])
        for value in vars(layer).values():
            if isinstance(value, keras.layers.Layer):
                children.append(value)
            elif isinstance(value, list | tuple):
                children.extend(item for item in value if isinstance(item, keras.layers.Layer))
            elif isinstance(value, dict):
                children.extend(
                    item for item in value.values() if isinstance(item, keras.layers.Layer)
                )
        stack.extend(reversed(children))


def decayed_weights(model: keras.layers.Layer) -> list[keras.Variable]:
    """Return the trainable kernels of ``model`` that get weight decay.

    Weights are chosen by the type of the layer that owns them: kernels of dense, convolution,
    einsum and embedding layers are decayed; normalization parameters and biases are not.
    """
    weights: list[keras.Variable] = []
    seen: set[int] = set()
    for layer in iter_layers(model):
        if isinstance(layer, _NORMALIZATION_LAYERS):
            continue
        for attribute in _DECAYED_KERNEL_ATTRIBUTES:
            variable = getattr(layer, attribute, None)
            if isinstance(variable, keras.Variable) and variable.trainable:
                if id(variable) not in seen:
                    seen.add(id(variable))
                    weights.append(variable)
    return weights


def weight_decay_loss(weights: list[keras.Variable]) -> tf.Tensor:
    """Return the sum of squares of ``weights`` (the lambda_2 term without its factor)."""
    if not weights:
        return tf.constant(0.0, tf.float32)
    return tf.add_n([tf.reduce_sum(tf.square(tf.cast(w.value, tf.float32))) for w in weights])
