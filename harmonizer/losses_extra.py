"""A harmonization loss option that also constrains the absolute input gradient.

The paper's loss trains the channel mean of the *signed* input gradient and keeps only the
positive part of each standardized map, so large negative gradients stay free. On the shortcut
benchmark (``experiments/shortcut.py``, 3 seeds) that loss raised the signed alignment from
0.00 to 0.38, but the model kept reading the spurious cue: its test top-1 stayed at chance.
Feeding the same pyramid loss with the ``abs_max`` saliency (the channel max of
``|gradient|``) makes every large gradient count, whatever its sign, because a pixel outside
the map with a large negative gradient is then above the mean and is penalized. With it, test
top-1 rose from 0.26 to 0.72 and the abs alignment from 0.01 to 0.86.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from harmonizer import saliency
from harmonizer.model import Harmonizer


class SaliencyDefinitionHarmonizer(Harmonizer):
    """`Harmonizer` whose harmonization term compares the maps with a chosen saliency reduction.

    Args:
        backbone: the classifier, raw RGB in [0, 255] to logits.
        saliency_definition: ``"signed_mean"`` (the paper's loss, same as `Harmonizer`) or
            ``"abs_max"`` (the absolute gradient, max over channels).
        **kwargs: the other arguments of `Harmonizer`.

    Raises:
        ValueError: if ``saliency_definition`` is not one of `saliency.DEFINITIONS`.
    """

    def __init__(
        self,
        backbone: keras.Model,
        saliency_definition: str = saliency.SIGNED_MEAN,
        **kwargs,
    ):
        if saliency_definition not in saliency.DEFINITIONS:
            raise ValueError(
                f"saliency_definition must be one of {saliency.DEFINITIONS}, "
                f"got {saliency_definition!r}"
            )
        super().__init__(backbone, **kwargs)
        self.saliency_definition = saliency_definition

    # NOTE: this overrides a private hook of `Harmonizer`; a `saliency_definition` argument of
    # `Harmonizer` itself would make this class unnecessary.
    def _forward_and_saliency(self, images, targets):
        if self.harmonization_weight == 0:
            return self.backbone(images, training=True), None
        with tf.GradientTape() as inner_tape:
            inner_tape.watch(images)
            logits = self.backbone(images, training=True)
            target_logits = tf.reduce_sum(tf.cast(logits, tf.float32) * targets)
        gradients = inner_tape.gradient(target_logits, images)
        return logits, saliency.reduce_saliency(gradients, self.saliency_definition)
