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
