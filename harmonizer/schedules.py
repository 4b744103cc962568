"""Learning-rate schedules of the training recipe."""

from __future__ import annotations

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="harmonizer")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to 0.

    ``lr(s) = peak * s / warmup_steps`` for ``s < warmup_steps``, then
    ``lr(s) = peak * 0.5 * (1 + cos(pi * p))`` with progress
    ``p = clip((s - warmup_steps) / (total_steps - warmup_steps), 0, 1)``; the two pieces meet
    at ``peak`` when ``s = warmup_steps``, and the rate stays 0 after ``total_steps``.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        if peak <= 0:
            raise ValueError(f"peak learning rate must be > 0, got {peak}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps <= warmup_steps:
            raise ValueError(
                f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}); "
                "train for more epochs or shorten the warm-up"
            )
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(self.warmup_steps, tf.float32)
        decay_steps = tf.cast(self.total_steps - self.warmup_steps, tf.float32)
        progress = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        if self.warmup_steps == 0:
            return cosine
        linear = self.peak * step / warmup
        return tf.where(step < warmup, linear, cosine)

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }


@keras.saving.register_keras_serializable(package="harmonizer")
class WarmupPiecewise(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then step decays.

    ``lr(s) = peak * s / warmup_steps`` for ``s < warmup_steps``, then
    ``lr(s) = peak * decay_factor ** k`` with ``k`` the number of ``boundaries`` that are
    ``<= s``. The ResNet recipe's decays at epochs 30, 50 and 80 with factor 0.1 give 0.3, 0.03,
    0.003 and 0.0003 for a peak of 0.3.
    """

    def __init__(
        self,
        peak: float,
        warmup_steps: int,
        boundaries: list[int] | tuple[int, ...],
        decay_factor: float = 0.1,
    ):
        if peak <= 0:
            raise ValueError(f"peak learning rate must be > 0, got {peak}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        boundaries = [int(boundary) for boundary in boundaries]
        if not boundaries or boundaries != sorted(set(boundaries)) or boundaries[0] < warmup_steps:
            raise ValueError(
                f"boundaries must increase strictly from warmup_steps={warmup_steps} on, got "
                f"{boundaries}"
            )
        if not 0 < decay_factor < 1:
            raise ValueError(f"decay_factor must be in (0, 1), got {decay_factor}")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = boundaries
        self.decay_factor = float(decay_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        boundaries = tf.constant(self.boundaries, tf.float32)
        decays = tf.reduce_sum(tf.cast(step >= boundaries, tf.float32))
        decayed = self.peak * tf.pow(self.decay_factor, decays)
        if self.warmup_steps == 0:
            return decayed
        linear = self.peak * step / tf.cast(self.warmup_steps, tf.float32)
        return tf.where(step < self.warmup_steps, linear, decayed)

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "boundaries": self.boundaries,
            "decay_factor": self.decay_factor,
        }
