"""Normalization and preprocessing layers with exact second-order gradients.

The harmonization loss differentiates the input gradient of the model with respect to the
weights, so every layer in a harmonized step must have exact second-order gradients. Keras 3.15
computes the batch and layer moments with ``tf.nn.moments``, which subtracts
``stop_gradient(mean)`` before squaring. The first-order gradient is unchanged because the
dropped term is multiplied by ``sum(x - mean) = 0``, but the derivative of that term is not
zero, so the gradient of any loss built from an input gradient silently loses a term. The
layers here compute ``variance = mean((x - mean(x))**2)`` with the mean left in the graph, on
one replica and, for synchronized batch normalization, across replicas. They use only public
Keras and TensorFlow APIs.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops

SERIALIZATION_PACKAGE = "harmonizer"

# ImageNet channel statistics in RGB order, as ``keras.applications`` uses them.
IMAGENET_MEAN_RGB_UNIT = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB_UNIT = (0.229, 0.224, 0.225)
IMAGENET_MEAN_BGR_255 = (103.939, 116.779, 123.68)
PIXEL_MAX = 255.0

PREPROCESSING_MODES = {
    "tf": "scale RGB from [0, 255] to [-1, 1]",
    "caffe": "convert RGB to BGR and subtract the ImageNet mean per channel, no scaling",
    "torch": "scale RGB to [0, 1], subtract the ImageNet mean and divide by its standard deviation",
    "unit": "scale RGB from [0, 255] to [0, 1]",
}


def _reduction_axes(rank: int, channel_axes: Sequence[int]) -> list[int]:
    return [axis for axis in range(rank) if axis not in channel_axes]


def _positive_axes(axis: int | Sequence[int], rank: int, argument: str) -> list[int]:
    axes = [axis] if isinstance(axis, int) else list(axis)
    positive = []
    for value in axes:
        if not -rank <= value < rank:
            raise ValueError(
                f"{argument}={axis!r} is out of range for inputs of rank {rank}; "
                f"use an axis in [{-rank}, {rank - 1}]."
            )
        positive.append(value % rank)
    return sorted(positive)


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class ExactBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization whose training-mode moments have exact higher-order gradients.

    It behaves as ``keras.layers.BatchNormalization`` (same weights, config, moving-average
    updates and inference path) except in training mode, where the batch variance is
    ``mean((x - mean(x))**2)`` with the mean kept in the graph. With ``synchronized=True``
    under a ``tf.distribute`` strategy with several replicas, the sums are all-reduced across
    replicas in two passes (first the mean, then the squared deviations from the global mean),
    and ``ReplicaContext.all_reduce`` differentiates to another all-reduce, so second-order
    gradients stay exact across replicas too.

    Batch renormalization is not supported, because its corrections are stopped from gradients
    by design.
    """

    def __init__(self, **kwargs):
        if kwargs.get("renorm", False):
            raise ValueError(
                "ExactBatchNormalization does not support renorm=True, because batch "
                "renormalization stops gradients through its corrections. Use renorm=False."
            )
        super().__init__(**kwargs)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)

        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask must have one dimension less than the inputs. Received "
                f"mask.shape={mask.shape} and inputs.shape={inputs.shape}."
            )

        # Statistics in at least float32, as Keras does, so bfloat16 activations do not
        # overflow or lose the variance.
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = ops.cast(inputs, compute_dtype)
        mean, variance = self.batch_moments(inputs, mask)

        momentum = ops.cast(self.momentum, compute_dtype)
        moving_mean = ops.cast(self.moving_mean, compute_dtype)
        moving_variance = ops.cast(self.moving_variance, compute_dtype)
        new_mean = moving_mean * momentum + mean * (1.0 - momentum)
        new_variance = moving_variance * momentum + variance * (1.0 - momentum)
        self.moving_mean.assign(ops.cast(new_mean, self.moving_mean.dtype))
        self.moving_variance.assign(ops.cast(new_variance, self.moving_variance.dtype))

        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None
        outputs = ops.batch_normalization(
            x=inputs,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    def batch_moments(self, inputs: tf.Tensor, mask: tf.Tensor | None = None):
        """Compute the per-channel batch mean and variance without stopped gradients.

        Args:
            inputs: Activations, float32 or float64.
            mask: Optional boolean mask with one dimension less than ``inputs``; masked-out
                positions do not count.

        Returns:
            ``(mean, variance)``, each of shape ``[channels]``.
        """
        rank = len(inputs.shape)
        axes = _reduction_axes(rank, [self.axis % rank])

        if mask is None:
            weights = tf.ones_like(inputs)
        else:
            weights = tf.broadcast_to(tf.cast(mask, inputs.dtype)[..., None], tf.shape(inputs))

        local_sum = tf.reduce_sum(inputs * weights, axis=axes)
        local_count = tf.reduce_sum(weights, axis=axes)
        replica_context = tf.distribute.get_replica_context()
        across_replicas = (
            self.synchronized
            and replica_context is not None
            and replica_context.num_replicas_in_sync > 1
        )

        if across_replicas:
            total_sum, total_count = replica_context.all_reduce(
                tf.distribute.ReduceOp.SUM, [local_sum, local_count]
            )
        else:
            total_sum, total_count = local_sum, local_count
        mean = tf.math.divide_no_nan(total_sum, total_count)

        # Second pass from the (global) mean: more accurate than E[x^2] - E[x]^2 and still
        # differentiable through the mean.
        squared_deviation = tf.reduce_sum(tf.square(inputs - mean) * weights, axis=axes)
        if across_replicas:
            squared_deviation = replica_context.all_reduce(
                tf.distribute.ReduceOp.SUM, squared_deviation
            )
        variance = tf.math.divide_no_nan(squared_deviation, total_count)
        return mean, variance


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class ExactLayerNormalization(keras.layers.LayerNormalization):
    """Layer normalization whose moments have exact higher-order gradients.

    Same weights and config as ``keras.layers.LayerNormalization``. With
    ``rms_scaling=False`` (the default) the variance is computed from a mean that stays in the
    graph. ``rms_scaling=True`` goes to the Keras implementation, which already uses a
    differentiable variance.
    """

    def call(self, inputs):
        if self.rms_scaling:
            return super().call(inputs)

        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, compute_dtype)
        rank = len(x.shape)
        axes = _positive_axes(self.axis, rank, "axis")

        mean = tf.reduce_mean(x, axis=axes, keepdims=True)
        variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
        outputs = (x - mean) * tf.math.rsqrt(variance + self.epsilon)

        broadcast_shape = [1] * rank
        for axis in axes:
            broadcast_shape[axis] = x.shape[axis]
        if self.scale:
            outputs = outputs * tf.reshape(ops.cast(self.gamma, compute_dtype), broadcast_shape)
        if self.center:
            outputs = outputs + tf.reshape(ops.cast(self.beta, compute_dtype), broadcast_shape)
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class ImagePreprocessing(keras.layers.Layer):
    """Map raw RGB pixels in [0, 255] to the input range a backbone expects.

    The ``mode`` is part of the layer config, so a saved ``.keras`` model records how it
    preprocesses its inputs. Modes: ``"tf"`` (to [-1, 1]), ``"caffe"`` (RGB to BGR minus the
    ImageNet mean), ``"torch"`` (ImageNet mean and standard deviation of [0, 1] pixels),
    ``"unit"`` (to [0, 1]).

    Args:
        mode: One of ``PREPROCESSING_MODES``.
        **kwargs: Passed to ``keras.layers.Layer``.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"Unknown preprocessing mode={mode!r}; use one of {sorted(PREPROCESSING_MODES)}."
            )
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / (PIXEL_MAX / 2.0) - 1.0
        if self.mode == "unit":
            return x / PIXEL_MAX
        if self.mode == "caffe":
            bgr = ops.flip(x, axis=-1)
            return bgr - ops.cast(ops.convert_to_tensor(IMAGENET_MEAN_BGR_255), x.dtype)
        mean = ops.cast(ops.convert_to_tensor(IMAGENET_MEAN_RGB_UNIT), x.dtype)
        stddev = ops.cast(ops.convert_to_tensor(IMAGENET_STDDEV_RGB_UNIT), x.dtype)
        return (x / PIXEL_MAX - mean) / stddev

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
