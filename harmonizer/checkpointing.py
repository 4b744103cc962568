"""Checkpoints, exact resume, NaN stop, progress logs and TensorBoard summaries for long runs.

``fit_resumable`` wraps ``keras.Model.fit`` for a run measured in optimizer steps:

* It restores the latest checkpoint of ``model_dir/checkpoints`` (weights, batch-norm moving
  statistics, optimizer slots and ``optimizer.iterations``). The learning-rate schedule is a
  function of ``optimizer.iterations``, so the rate continues where it stopped.
* It moves the input to the same position: the training dataset must be deterministic (a fixed
  seed and ``deterministic=True`` in ``harmonizer.data``), and it is advanced by the number of
  batches already trained.
* It saves a checkpoint every ``checkpoint_every`` steps and at the end, keeping the newest
  ``max_to_keep``. ``tf.train.CheckpointManager`` writes the checkpoint files first. Only then
  does it replace the ``checkpoint`` state file, atomically on local disks (a temporary file,
  then a rename) and as one object upload on GCS. A process killed during a save therefore
  leaves the state file naming the last complete checkpoint, which ``tests/test_resume.py``
  checks by killing a run at that point.
* It stops at ``total_steps`` even when resumed mid-epoch, raises ``FloatingPointError``
  naming the step when the loss is not finite, logs progress with throughput, and writes
  TensorBoard scalars and saliency-versus-map images.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from absl import logging

from harmonizer import saliency

CHECKPOINT_SUBDIR = "checkpoints"
TENSORBOARD_SUBDIR = "tensorboard"
DEFAULT_MAX_TO_KEEP = 3
DEFAULT_SUMMARY_IMAGES = 4


# TensorBoard plugin names and data classes of summary.proto, written with the core
# ``tf.summary.write`` so that the TensorBoard package is not needed to record a run.
_SCALAR_PLUGIN = "scalars"
_IMAGE_PLUGIN = "images"
_DATA_CLASS_SCALAR = 1
_DATA_CLASS_BLOB_SEQUENCE = 3


def _summary_metadata(plugin_name: str, data_class: int) -> bytes:
    metadata = tf.compat.v1.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin_name
    metadata.data_class = data_class
    return metadata.SerializeToString()


def write_scalar(tag: str, value: float) -> None:
    """Write a scalar at the default writer's step, as ``tf.summary.scalar`` would."""
    tf.summary.write(
        tag,
        tf.constant(value, tf.float32),
        metadata=_summary_metadata(_SCALAR_PLUGIN, _DATA_CLASS_SCALAR),
    )


def write_images(tag: str, images: tf.Tensor) -> None:
    """Write ``[N, H, W, 3]`` images in [0, 1] at the default step, as ``tf.summary.image``."""
    pixels = tf.image.convert_image_dtype(tf.clip_by_value(images, 0.0, 1.0), tf.uint8)
    height, width = pixels.shape[1], pixels.shape[2]
    encoded = tf.map_fn(tf.io.encode_png, pixels, fn_output_signature=tf.string)
    blobs = tf.concat([tf.constant([str(width), str(height)]), encoded], axis=0)
    tf.summary.write(
        tag, blobs, metadata=_summary_metadata(_IMAGE_PLUGIN, _DATA_CLASS_BLOB_SEQUENCE)
    )


def current_step(model: keras.Model) -> int:
    """Return the number of optimizer steps applied so far."""
    return int(model.optimizer.iterations.numpy())


def current_learning_rate(model: keras.Model) -> float:
    """Return the learning rate the next step will use."""
    rate = model.optimizer.learning_rate
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        rate = rate(model.optimizer.iterations)
    return float(keras.ops.convert_to_numpy(rate))


class TrainingCheckpoint:
    """The model, its optimizer and the step counter, saved by a ``tf.train.CheckpointManager``.

    Args:
        model: A compiled model; its optimizer is checkpointed with it.
        directory: Where checkpoints are written (a local path or a ``gs://`` URL).
        max_to_keep: Number of newest checkpoints kept; older ones are deleted.
        options: Optional ``tf.train.CheckpointOptions`` for every save.
    """

    def __init__(
        self,
        model: keras.Model,
        directory: str,
        max_to_keep: int = DEFAULT_MAX_TO_KEEP,
        options: tf.train.CheckpointOptions | None = None,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        if model.optimizer is None:
            raise ValueError("The model has no optimizer; compile it before checkpointing.")
        self.model = model
        self.options = options
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            directory,
            max_to_keep=max_to_keep,
            step_counter=model.optimizer.iterations,
        )

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest complete checkpoint, or None."""
        return self.manager.latest_checkpoint

    def restore_latest(self) -> int:
        """Restore the newest complete checkpoint, if any, and return its step (0 if none).

        Raises:
            ValueError: When the checkpoint was written by another model or optimizer (for
                example a run of another ``--model`` in the same ``model_dir``).
        """
        path = self.latest
        if path is None:
            return 0
        # The optimizer creates its slots lazily; build them so they restore now.
        self.model.optimizer.build(self.model.trainable_variables)
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError) as error:
            name = getattr(self.model, "backbone", self.model).name
            raise ValueError(
                f"checkpoint {path} does not match this model ({name}): "
                "it was written by another model or optimizer; use a new --model_dir, or "
                "delete that one to start over"
            ) from error
        step = current_step(self.model)
        logging.info("Restored %s at step %d.", path, step)
        return step

    def save(self) -> str:
        """Save a checkpoint numbered by the current step, unless that step is saved already."""
        step = current_step(self.model)
        latest = self.latest
        if latest is not None and latest.endswith(f"-{step}"):
            return latest
        path = self.manager.save(checkpoint_number=step, options=self.options)
        logging.info("Saved checkpoint %s.", path)
        return path


class PeriodicCheckpoint(keras.callbacks.Callback):
    """Save a ``TrainingCheckpoint`` every ``every_steps`` optimizer steps and at the end."""

    def __init__(self, checkpoint: TrainingCheckpoint, every_steps: int):
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"checkpoint every_steps must be >= 1, got {every_steps}.")
        self.checkpoint = checkpoint
        self.every_steps = every_steps

    def on_train_batch_end(self, batch, logs=None):
        if current_step(self.model) % self.every_steps == 0:
            self.checkpoint.save()

    def on_train_end(self, logs=None):
        self.checkpoint.save()


class StopAtStep(keras.callbacks.Callback):
    """Stop training once ``optimizer.iterations`` reaches ``total_steps``."""

    def __init__(self, total_steps: int):
        super().__init__()
        self.total_steps = total_steps

    def on_train_batch_end(self, batch, logs=None):
        if current_step(self.model) >= self.total_steps:
            self.model.stop_training = True


class StopOnNaN(keras.callbacks.Callback):
    """Raise ``FloatingPointError`` naming the step when a logged loss is NaN or infinite.

    Raising, unlike ``keras.callbacks.TerminateOnNaN``, makes the process exit with an error,
    so a scheduler does not mistake the run for a finished one, and no checkpoint of the
    diverged weights is written after it.
    """

    def __init__(self, keys: Sequence[str] = ("loss",)):
        super().__init__()
        self.keys = tuple(keys)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        for key in self.keys:
            if key in logs and not math.isfinite(float(logs[key])):
                step = current_step(self.model)
                raise FloatingPointError(
                    f"{key} is {float(logs[key])} at step {step} (the step that just ran); "
                    "resume from the last checkpoint with a lower --learning_rate or check "
                    "the input data."
                )


class ProgressLog(keras.callbacks.Callback):
    """Log step, epoch, learning rate, every logged value and throughput.

    Args:
        global_batch_size: Images per step over all replicas.
        steps_per_epoch: Steps in one epoch, for the epoch column.
        total_steps: Steps of the whole run, for the remaining-time estimate.
        every_steps: Log every this many steps.
    """

    def __init__(
        self, global_batch_size: int, steps_per_epoch: int, total_steps: int, every_steps: int
    ):
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"progress every_steps must be >= 1, got {every_steps}.")
        self.global_batch_size = global_batch_size
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.every_steps = every_steps
        self._window_start_time = 0.0
        self._window_start_step = 0

    def on_train_begin(self, logs=None):
        self._window_start_time = time.perf_counter()
        self._window_start_step = current_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = current_step(self.model)
        if step % self.every_steps and step != self.total_steps:
            return
        now = time.perf_counter()
        steps = step - self._window_start_step
        seconds = max(now - self._window_start_time, 1e-9)
        images_per_second = steps * self.global_batch_size / seconds
        remaining = (self.total_steps - step) * seconds / max(steps, 1)
        values = " ".join(
            f"{key}={float(value):.4g}" for key, value in sorted((logs or {}).items())
        )
        logging.info(
            "step %d/%d epoch %.2f lr %.5g | %s | %.1f images/s, %.3f s/step, %.0f s left",
            step,
            self.total_steps,
            step / self.steps_per_epoch,
            current_learning_rate(self.model),
            values,
            images_per_second,
            seconds / max(steps, 1),
            remaining,
        )
        self._window_start_time = now
        self._window_start_step = step


class ScalarSummaries(keras.callbacks.Callback):
    """Write every logged value and the learning rate to TensorBoard every ``every_steps``.

    The logged values of ``Harmonizer`` are the loss parts (``cross_entropy``,
    ``harmonization``, ``weight_decay``), the total ``loss``, ``accuracy`` and
    ``mapped_fraction``; validation values (``val_*``, alignment included) are written at the
    end of each epoch.
    """

    def __init__(self, log_dir: str, every_steps: int):
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"summary every_steps must be >= 1, got {every_steps}.")
        self.every_steps = every_steps
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
        self.validation_writer = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))

    def on_train_batch_end(self, batch, logs=None):
        step = current_step(self.model)
        if step % self.every_steps:
            return
        with self.writer.as_default(step=step):
            for key, value in (logs or {}).items():
                write_scalar(key, float(value))
            write_scalar("learning_rate", current_learning_rate(self.model))

    def on_epoch_end(self, epoch, logs=None):
        validation = {k[len("val_") :]: v for k, v in (logs or {}).items() if k.startswith("val_")}
        if not validation:
            return
        with self.validation_writer.as_default(step=current_step(self.model)):
            for key, value in validation.items():
                write_scalar(key, float(value))

    def on_train_end(self, logs=None):
        self.writer.flush()
        self.validation_writer.flush()


def saliency_panels(backbone: keras.Model, features: dict, labels: tf.Tensor) -> tf.Tensor:
    """Return ``[B, H, 3W, 3]`` images of (input, saliency, map), each scaled to [0, 1].

    The saliency is the channel-mean input gradient of the label's logit with the model in
    inference mode, the map the one the batch carries (zeros when ``has_map`` is 0).
    """
    images = tf.cast(features["image"], tf.float32)
    maps = saliency.saliency_maps(backbone, images, labels, saliency.SIGNED_MEAN)

    def to_unit(values):
        low = tf.reduce_min(values, axis=[1, 2], keepdims=True)
        high = tf.reduce_max(values, axis=[1, 2], keepdims=True)
        return tf.math.divide_no_nan(values - low, high - low)

    def gray(values):
        return tf.repeat(to_unit(values)[..., None], 3, axis=-1)

    human = tf.cast(features["map"], tf.float32)
    return tf.concat([images / 255.0, gray(maps), gray(human)], axis=2)


class SaliencySummaries(keras.callbacks.Callback):
    """Write (input | saliency | map) images of a fixed batch to TensorBoard.

    Args:
        log_dir: TensorBoard directory.
        batch: ``(features, labels)`` of the images to show; the first ``max_images`` are used.
        every_steps: Write every this many steps, and at the end of training.
        max_images: Number of images shown.
    """

    def __init__(
        self,
        log_dir: str,
        batch: tuple[dict, tf.Tensor],
        every_steps: int,
        max_images: int = DEFAULT_SUMMARY_IMAGES,
    ):
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"image every_steps must be >= 1, got {every_steps}.")
        features, labels = batch
        self.features = {key: value[:max_images] for key, value in features.items()}
        self.labels = labels[:max_images]
        self.every_steps = every_steps
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "images"))

    def _write(self):
        # NOTE: this runs the model eagerly outside the replica context; tested on CPU only.
        backbone = getattr(self.model, "backbone", self.model)
        panels = saliency_panels(backbone, self.features, self.labels)
        with self.writer.as_default(step=current_step(self.model)):
            write_images("input_saliency_map", panels)
        self.writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        if current_step(self.model) % self.every_steps == 0:
            self._write()

    def on_train_end(self, logs=None):
        self._write()


@dataclasses.dataclass(frozen=True)
class RunSchedule:
    """Length and cadence of a run, in optimizer steps.

    Attributes:
        total_steps: Steps of the whole run.
        steps_per_epoch: Steps per epoch (the epochs of ``fit`` and of validation).
        global_batch_size: Images per step over all replicas.
        checkpoint_every: Steps between checkpoints.
        max_to_keep: Newest checkpoints kept.
        log_every: Steps between progress lines and scalar summaries.
        image_every: Steps between saliency image summaries.
    """

    total_steps: int
    steps_per_epoch: int
    global_batch_size: int
    checkpoint_every: int
    max_to_keep: int = DEFAULT_MAX_TO_KEEP
    log_every: int = 100
    image_every: int = 1000

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in (
            "total_steps",
            "steps_per_epoch",
            "global_batch_size",
            "checkpoint_every",
            "max_to_keep",
            "log_every",
            "image_every",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")


def fit_resumable(
    model: keras.Model,
    train_data: tf.data.Dataset | Callable[[int], tf.data.Dataset],
    model_dir: str,
    schedule: RunSchedule,
    validation_data: tf.data.Dataset | None = None,
    image_batch: tuple[dict, tf.Tensor] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    checkpoint_options: tf.train.CheckpointOptions | None = None,
) -> tuple[keras.callbacks.History | None, int]:
    """Train ``model`` to ``schedule.total_steps``, resuming from ``model_dir`` if possible.

    Call it inside the ``scope()`` of the model's distribution strategy, because restoring
    builds the optimizer's slot variables.

    Args:
        model: A compiled model whose learning rate depends only on ``optimizer.iterations``.
        train_data: The repeated, deterministic training dataset, or a function
            ``skip_batches -> dataset`` that starts the same stream after ``skip_batches``
            batches (a pipeline can skip raw records before decoding, which is cheaper).
        model_dir: Run directory; checkpoints go to ``checkpoints/``, summaries to
            ``tensorboard/``.
        schedule: Run length and cadence.
        validation_data: Evaluated at the end of every epoch when given.
        image_batch: ``(features, labels)`` whose saliency images go to TensorBoard.
        callbacks: More callbacks, run after the built-in ones.
        checkpoint_options: Passed to every checkpoint save.

    Returns:
        ``(history, start_step)``: the ``fit`` history (None when the run was already
        complete) and the step the run resumed from (0 for a fresh run).
    """
    schedule.validate()
    checkpoint = TrainingCheckpoint(
        model,
        os.path.join(model_dir, CHECKPOINT_SUBDIR),
        max_to_keep=schedule.max_to_keep,
        options=checkpoint_options,
    )
    start_step = checkpoint.restore_latest()
    if start_step >= schedule.total_steps:
        logging.info("The run in %s is complete at step %d.", model_dir, start_step)
        return None, start_step
    logging.info(
        "Training from step %d to %d, learning rate %.6g.",
        start_step,
        schedule.total_steps,
        current_learning_rate(model),
    )

    if callable(train_data):
        dataset = train_data(start_step)
    else:
        # NOTE: skip() still produces (reads and decodes) the skipped batches; pass a function
        # that skips raw records instead when that matters.
        dataset = train_data.skip(start_step)

    log_dir = os.path.join(model_dir, TENSORBOARD_SUBDIR)
    built_in = [
        StopOnNaN(),
        StopAtStep(schedule.total_steps),
        PeriodicCheckpoint(checkpoint, schedule.checkpoint_every),
        ProgressLog(
            schedule.global_batch_size,
            schedule.steps_per_epoch,
            schedule.total_steps,
            schedule.log_every,
        ),
        ScalarSummaries(log_dir, schedule.log_every),
    ]
    if image_batch is not None:
        built_in.append(SaliencySummaries(log_dir, image_batch, schedule.image_every))

    # Epoch e covers steps [e * steps_per_epoch, (e + 1) * steps_per_epoch); a run resumed
    # mid-epoch runs whole epochs from there and StopAtStep ends it at total_steps.
    history = model.fit(
        dataset,
        epochs=math.ceil(schedule.total_steps / schedule.steps_per_epoch),
        initial_epoch=start_step // schedule.steps_per_epoch,
        steps_per_epoch=schedule.steps_per_epoch,
        validation_data=validation_data,
        callbacks=[*built_in, *callbacks],
        verbose=0,
    )
    return history, start_step
