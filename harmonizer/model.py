"""A Keras 3 training wrapper that adds the harmonization loss to any classifier."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import keras
import tensorflow as tf

from harmonizer import layers as hlayers
from harmonizer import losses, metrics, saliency


def _replica_sum(value: tf.Tensor) -> tf.Tensor:
    """Sum ``value`` over the replicas of the current distribution strategy."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


# Modes of `BatchStatisticsReplay`.
_RECORD = "record"
_REPLAY = "replay"


class BatchStatisticsReplay:
    """Reuse the batch moments of one training-mode forward pass in a second pass.

    The saliency sub-batch runs the backbone twice: on the whole batch (for cross-entropy)
    and on k selected examples (for the saliency). Inside `recording`, every
    `ExactBatchNormalization` computes its moments as usual and they are stored. Inside
    `replaying`, each layer normalizes with the stored whole-batch moments instead of the
    sub-batch's own, and the moving averages are restored afterwards, so they move once per
    step, by the whole-batch pass. The stored moments are tensors of the first pass, so
    gradients with respect to the weights flow through them, while a tape that watches only
    the sub-batch images treats them as constants.

    Both contexts act at trace time. While any thread is inside one, each layer's
    `batch_moments` method is shadowed by an instance attribute that dispatches on the
    calling thread's mode, because `MirroredStrategy` traces each replica's step in its own
    thread, interleaved at cross-replica reductions.
    """

    def __init__(self, backbone: keras.Model):
        self._layers = []
        for layer in losses.iter_layers(backbone):
            if isinstance(layer, hlayers.ExactBatchNormalization):
                self._layers.append(layer)
            elif isinstance(layer, keras.layers.BatchNormalization):
                raise ValueError(
                    f"saliency_subbatch > 0 needs batch statistics it can replay, but layer "
                    f"{layer.name!r} is a plain keras.layers.BatchNormalization; build the "
                    "backbone with harmonizer.zoo (ExactBatchNormalization) or set "
                    "saliency_subbatch=0"
                )
        self._thread_state = threading.local()
        self._lock = threading.Lock()
        self._active_contexts = 0

    def _state(self) -> threading.local:
        state = self._thread_state
        if not hasattr(state, "mode"):
            state.mode = None
            state.moments = {}
            state.pending = {}
        return state

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Store the moments each layer computes during the enclosed call."""
        self._state().moments = {id(layer): [] for layer in self._layers}
        with self._mode(_RECORD):
            yield

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Normalize with the recorded moments; undo the moving-average updates on exit."""
        state = self._state()
        state.pending = {key: list(calls) for key, calls in state.moments.items()}
        # Automatic control dependencies order these reads before the layers' updates and
        # the restoring assignments after them, because they share the variables.
        snapshots = [
            (variable, tf.identity(variable.value))
            for layer in self._layers
            for variable in (layer.moving_mean, layer.moving_variance)
        ]
        with self._mode(_REPLAY):
            yield
        for variable, value in snapshots:
            variable.assign(value)

    @contextlib.contextmanager
    def _mode(self, mode: str) -> Iterator[None]:
        state = self._state()
        state.mode = mode
        with self._lock:
            if self._active_contexts == 0:
                for layer in self._layers:
                    # object.__setattr__ keeps the function out of Keras's tracking.
                    object.__setattr__(layer, "batch_moments", self._dispatcher(layer))
            self._active_contexts += 1
        try:
            yield
        finally:
            state.mode = None
            with self._lock:
                self._active_contexts -= 1
                if self._active_contexts == 0:
                    for layer in self._layers:
                        object.__delattr__(layer, "batch_moments")

    def _dispatcher(self, layer: hlayers.ExactBatchNormalization):
        compute = layer.batch_moments

        def batch_moments(inputs, mask=None):
            state = self._state()
            if state.mode == _RECORD:
                moments = compute(inputs, mask)
                state.moments[id(layer)].append(moments)
                return moments
            if state.mode == _REPLAY:
                calls = state.pending.get(id(layer))
                if not calls:
                    raise RuntimeError(
                        f"layer {layer.name!r} has no recorded batch moments to replay; "
                        "call the backbone inside recording() first, with the same layers"
                    )
                return calls.pop(0)
            return compute(inputs, mask)

        return batch_moments


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

    ``saliency_definition`` chooses the channel reduction that the harmonization term trains.
    ``"signed_mean"`` is the paper's loss. It keeps only the positive part of each standardized
    map, so large negative gradients on the background stay free. ``"abs_max"`` (max over
    channels of the absolute gradient) penalizes every large gradient outside the map, whatever
    its sign. On the shortcut benchmark of ``docs/results.md`` (3 seeds), only ``"abs_max"``
    removed the spurious cue: test top-1 rose from 0.26 to 0.72.

    Saliency sub-batch (``saliency_subbatch = k > 0``): cross-entropy still comes from one
    forward pass over the whole batch, but the second-order saliency pass runs only on k
    examples per replica, the mapped ones first (in batch order), padded with unmapped ones
    (flag 0, no loss) when fewer than k are mapped. The harmonization term is the mean over
    the selected mapped examples of all replicas. In the sub-batch pass every
    `ExactBatchNormalization` normalizes with the whole-batch moments of the first pass
    (see `BatchStatisticsReplay`), held constant with respect to the input, so an
    example's saliency is its own input gradient and does not depend on which examples
    share its sub-batch. With ``k = 0`` the saliency is taken through the batch
    statistics, which adds a coupling term between examples of order 1/batch size; models
    without batch normalization get the same loss and gradients either way whenever all
    mapped examples fit in the k. See ``docs/performance.md``.
    """

    def __init__(
        self,
        backbone: keras.Model,
        harmonization_weight: float = 1.0,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
        pyramid_levels: int = losses.DEFAULT_PYRAMID_LEVELS,
        saliency_subbatch: int = 0,
        saliency_definition: str = saliency.SIGNED_MEAN,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if saliency_subbatch < 0:
            raise ValueError(
                f"saliency_subbatch must be >= 0 (0 = whole batch), got {saliency_subbatch}"
            )
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
        self.saliency_subbatch = int(saliency_subbatch)
        if saliency_definition not in saliency.DEFINITIONS:
            raise ValueError(
                f"saliency_definition must be one of {saliency.DEFINITIONS}, "
                f"got {saliency_definition!r}"
            )
        self.saliency_definition = saliency_definition
        # A baseline (weight 0) never runs the sub-batch pass, so any backbone is accepted.
        use_subbatch = self.saliency_subbatch > 0 and self.harmonization_weight > 0
        self._statistics_replay = BatchStatisticsReplay(backbone) if use_subbatch else None

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.cross_entropy_tracker = keras.metrics.Mean(name="cross_entropy")
        self.harmonization_tracker = keras.metrics.Mean(name="harmonization")
        self.weight_decay_tracker = keras.metrics.Mean(name="weight_decay")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self.alignment_tracker = keras.metrics.Mean(name="alignment")
        self.mapped_fraction_tracker = keras.metrics.Mean(name="mapped_fraction")
        # Share of the mapped examples that the saliency sub-batch covered.
        self.subbatch_coverage_tracker = keras.metrics.Mean(name="subbatch_coverage")

    @property
    def metrics(self):
        trackers = [
            self.loss_tracker,
            self.cross_entropy_tracker,
            self.harmonization_tracker,
            self.weight_decay_tracker,
            self.accuracy_tracker,
            self.alignment_tracker,
            self.mapped_fraction_tracker,
        ]
        if self.saliency_subbatch:
            trackers.append(self.subbatch_coverage_tracker)
        return trackers

    def call(self, inputs, training=False):
        images = inputs["image"] if isinstance(inputs, dict) else inputs
        return self.backbone(images, training=training)

    def _decayed_weights(self) -> list[keras.Variable]:
        # Not cached in an attribute: Keras would track the list as this model's own
        # variables, which reorders `trainable_variables` (and so the optimizer's slots in a
        # checkpoint) and raises inside a replica context, where new state is locked.
        return losses.decayed_weights(self.backbone)

    def _forward_and_saliency(self, images, targets):
        """Run the backbone in training mode; also return the saliency when it is trained."""
        if self.harmonization_weight == 0:
            return self.backbone(images, training=True), None
        with tf.GradientTape() as inner_tape:
            inner_tape.watch(images)
            logits = self.backbone(images, training=True)
            target_logits = tf.reduce_sum(tf.cast(logits, tf.float32) * targets)
        gradients = inner_tape.gradient(target_logits, images)
        return logits, saliency.reduce_saliency(gradients, self.saliency_definition)

    def _subbatch_indices(self, has_map: tf.Tensor) -> tf.Tensor:
        """Return the indices of the k examples of the saliency pass, mapped ones first."""
        batch_size = has_map.shape[0]
        if batch_size is None:
            size = tf.minimum(self.saliency_subbatch, tf.shape(has_map)[0])
        else:
            size = min(self.saliency_subbatch, batch_size)
        # top_k is stable, so ties (all mapped, or all unmapped) keep the batch order, which
        # the shuffled input pipeline makes random.
        _, indices = tf.math.top_k(has_map, k=size, sorted=True)
        return indices

    def _forward_and_subbatch_saliency(self, images, targets, has_map):
        """Run the whole batch forward, then the saliency pass on the selected k examples.

        Returns:
            ``(logits [B, K], saliency [k, H, W], indices [k])``.
        """
        with self._statistics_replay.recording():
            logits = self.backbone(images, training=True)
        indices = self._subbatch_indices(has_map)
        sub_images = tf.gather(images, indices)
        sub_targets = tf.gather(targets, indices)
        with tf.GradientTape() as inner_tape:
            inner_tape.watch(sub_images)
            with self._statistics_replay.replaying():
                sub_logits = self.backbone(sub_images, training=True)
            target_logits = tf.reduce_sum(tf.cast(sub_logits, tf.float32) * sub_targets)
        gradients = inner_tape.gradient(target_logits, sub_images)
        return logits, saliency.reduce_saliency(gradients, self.saliency_definition), indices

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
        use_subbatch = self._statistics_replay is not None
        harmonized_maps, harmonized_has_map = maps, has_map

        # Forward pass, saliency and every loss part under the outer tape.
        with tf.GradientTape() as tape:
            if use_subbatch:
                logits, saliency_map, indices = self._forward_and_subbatch_saliency(
                    images, targets, has_map
                )
                harmonized_maps = tf.gather(maps, indices)
                harmonized_has_map = tf.gather(has_map, indices)
            else:
                logits, saliency_map = self._forward_and_saliency(images, targets)
            harmonized_count = _replica_sum(tf.reduce_sum(harmonized_has_map))
            cross_entropy = losses.per_example_cross_entropy(logits, targets, self.label_smoothing)
            cross_entropy_sum = tf.reduce_sum(cross_entropy)
            if saliency_map is None:
                harmonization = tf.constant(0.0)
            else:
                per_example = losses.per_example_harmonization_loss(
                    saliency_map, harmonized_maps, self.pyramid_levels
                )
                harmonization = losses.masked_mean(
                    per_example, harmonized_has_map, harmonized_count
                )
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
        # The weighted term, so that the logged parts add up to the logged loss.
        self.weight_decay_tracker.update_state(self.weight_decay * decay)
        self.accuracy_tracker.update_state(self._top1(logits, targets))
        self.mapped_fraction_tracker.update_state(tf.reduce_mean(has_map))
        if self.saliency_subbatch:
            coverage = tf.math.divide_no_nan(harmonized_count, global_mapped)
            self.subbatch_coverage_tracker.update_state(tf.where(global_mapped > 0, coverage, 1.0))
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
        training_only = (
            self.loss_tracker,
            self.weight_decay_tracker,
            self.subbatch_coverage_tracker,
        )
        return {m.name: m.result() for m in self.metrics if m not in training_only}
