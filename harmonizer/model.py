"""A Keras 3 training wrapper that adds the harmonization loss to any classifier."""

from __future__ import annotations

import keras
import tensorflow as tf

from harmonizer import losses, metrics, saliency


def _replica_sum(value: tf.Tensor) -> tf.Tensor:
    """Sum ``value`` over the replicas of the current distribution strategy."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


class Harmonizer(keras.Model):
    """Train a classifier with cross-entropy, the harmonization term and weight decay.

    The wrapped ``backbone`` maps raw RGB images in [0, 255] to logits; it is the model that
    gets saved and exported. Batches are ``(features, labels)`` with ``features`` a dict of
    ``image`` [B, H, W, 3], ``map`` [B, H, W] and ``has_map`` [B], and ``labels`` integer
    classes [B] or soft targets [B, K].

    Each step computes the saliency (the input gradient of the target logit, averaged over
    channels) under an inner `tf.GradientTape`, and the gradient of the total loss, saliency
    term included, under an outer one. With ``harmonization_weight == 0`` the inner tape is
    skipped and the step is plain cross-entropy training (the baseline).

    Losses are scaled for distribution: cross-entropy is summed over the replica's examples
    and divided by the global batch size, the harmonization term is divided by the number of
    mapped examples over all replicas, and weight decay by the number of replicas, so that the
    gradients summed over replicas equal those of one device on the global batch.
    """

    def __init__(
        self,
        backbone: keras.Model,
        harmonization_weight: float = 1.0,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
        pyramid_levels: int = losses.DEFAULT_PYRAMID_LEVELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if harmonization_weight < 0:
            raise ValueError(f"harmonization_weight must be >= 0, got {harmonization_weight}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.backbone = backbone
        self.harmonization_weight = float(harmonization_weight)
        self.weight_decay = float(weight_decay)
        self.label_smoothing = float(label_smoothing)
        self.pyramid_levels = int(pyramid_levels)
        self.num_classes = int(backbone.output_shape[-1])

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.cross_entropy_tracker = keras.metrics.Mean(name="cross_entropy")
        self.harmonization_tracker = keras.metrics.Mean(name="harmonization")
        self.weight_decay_tracker = keras.metrics.Mean(name="weight_decay")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self.alignment_tracker = keras.metrics.Mean(name="alignment")
        self.mapped_fraction_tracker = keras.metrics.Mean(name="mapped_fraction")

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.cross_entropy_tracker,
            self.harmonization_tracker,
            self.weight_decay_tracker,
            self.accuracy_tracker,
            self.alignment_tracker,
            self.mapped_fraction_tracker,
        ]

    def call(self, inputs, training=False):
        images = inputs["image"] if isinstance(inputs, dict) else inputs
        return self.backbone(images, training=training)

    def _decayed_weights(self) -> list[keras.Variable]:
        if not hasattr(self, "_decayed_weight_list"):
            self._decayed_weight_list = losses.decayed_weights(self.backbone)
        return self._decayed_weight_list

    def _forward_and_saliency(self, images, targets):
        """Run the backbone in training mode; also return the saliency when it is trained."""
        if self.harmonization_weight == 0:
            return self.backbone(images, training=True), None
        with tf.GradientTape() as inner_tape:
            inner_tape.watch(images)
            logits = self.backbone(images, training=True)
            target_logits = tf.reduce_sum(tf.cast(logits, tf.float32) * targets)
        gradients = inner_tape.gradient(target_logits, images)
        return logits, saliency.reduce_saliency(gradients, saliency.SIGNED_MEAN)

    def train_step(self, data):
        features, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        images = tf.cast(features["image"], tf.float32)
        maps = tf.cast(features["map"], tf.float32)
        has_map = tf.cast(features["has_map"], tf.float32)
        targets = saliency.target_weights(labels, self.num_classes)

        num_replicas = _num_replicas()
        local_batch = tf.cast(tf.shape(images)[0], tf.float32)
        global_batch = local_batch * num_replicas
        global_mapped = _replica_sum(tf.reduce_sum(has_map))
        decayed = self._decayed_weights()
        variables = self.trainable_variables

        # Forward pass, saliency and every loss part under the outer tape.
        with tf.GradientTape() as tape:
            logits, saliency_map = self._forward_and_saliency(images, targets)
            cross_entropy = losses.per_example_cross_entropy(logits, targets, self.label_smoothing)
            cross_entropy_sum = tf.reduce_sum(cross_entropy)
            if saliency_map is None:
                harmonization = tf.constant(0.0)
            else:
                per_example = losses.per_example_harmonization_loss(
                    saliency_map, maps, self.pyramid_levels
                )
                harmonization = losses.masked_mean(per_example, has_map, global_mapped)
            decay = losses.weight_decay_loss(decayed)
            scaled_loss = (
                cross_entropy_sum / global_batch
                + self.harmonization_weight * harmonization
                + self.weight_decay * decay / num_replicas
            )
            if self.backbone.losses:
                scaled_loss += tf.add_n(self.backbone.losses) / num_replicas

        # Gradients; the optimizer sums them over replicas.
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)

        # Metrics, as the values one device would compute on the global batch.
        mean_cross_entropy = _replica_sum(cross_entropy_sum) / global_batch
        harmonization_total = _replica_sum(harmonization)
        total = (
            mean_cross_entropy
            + self.harmonization_weight * harmonization_total
            + self.weight_decay * decay
        )
        self.loss_tracker.update_state(total)
        self.cross_entropy_tracker.update_state(mean_cross_entropy)
        self.harmonization_tracker.update_state(harmonization_total)
        self.weight_decay_tracker.update_state(decay)
        self.accuracy_tracker.update_state(self._top1(logits, targets))
        self.mapped_fraction_tracker.update_state(tf.reduce_mean(has_map))
        return {m.name: m.result() for m in self.metrics if m is not self.alignment_tracker}

    @staticmethod
    def _top1(logits, targets):
        correct = tf.equal(tf.argmax(logits, axis=-1), tf.argmax(targets, axis=-1))
        return tf.cast(correct, tf.float32)

    def test_step(self, data):
        features, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        images = tf.cast(features["image"], tf.float32)
        maps = tf.cast(features["map"], tf.float32)
        has_map = tf.cast(features["has_map"], tf.float32)
        targets = saliency.target_weights(labels, self.num_classes)

        # Inference-mode saliency: BatchNorm uses its moving statistics, as users get it.
        gradients, logits = saliency.input_gradients(self.backbone, images, targets)
        saliency_map = saliency.reduce_saliency(gradients, saliency.SIGNED_MEAN)
        cross_entropy = losses.per_example_cross_entropy(logits, targets, self.label_smoothing)
        per_example = losses.per_example_harmonization_loss(saliency_map, maps, self.pyramid_levels)
        rho, valid = metrics.spearman(saliency_map, maps)
        scored = has_map * tf.cast(valid, tf.float32)

        self.cross_entropy_tracker.update_state(cross_entropy)
        self.harmonization_tracker.update_state(per_example, sample_weight=has_map)
        self.accuracy_tracker.update_state(self._top1(logits, targets))
        self.alignment_tracker.update_state(
            rho / metrics.HUMAN_CEILING_CLICKME, sample_weight=scored
        )
        self.mapped_fraction_tracker.update_state(has_map)
        return {
            m.name: m.result()
            for m in self.metrics
            if m not in (self.loss_tracker, self.weight_decay_tracker)
        }
