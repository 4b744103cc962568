"""Long training runs: strategy, precision, mixup, schedule choice, checkpoints and resume.

``run(config, options)`` trains the ``TrainConfig`` of ``harmonizer.training`` the way a
multi-day accelerator job needs. It selects the ``tf.distribute`` strategy, sets the precision
policy, builds the model inside the strategy scope and applies mixup to the training batches.
It trains with ``checkpointing.fit_resumable``, so rerunning the same command after a
preemption continues from the last complete checkpoint. ``local_overrides`` shrinks a run to
a few steps at a small image size so that an accelerator flagfile can be tried on a CPU.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from harmonizer import (
    augment,
    checkpointing,
    data,
    distribute,
    layers,
    schedules,
    training,
    zoo,
)

LR_SCHEDULES = ("cosine", "piecewise")
# The ResNet recipe's step decay: divide the rate by 10 at epochs 30, 50 and 80.
DEFAULT_DECAY_EPOCHS = (30.0, 50.0, 80.0)
DEFAULT_DECAY_FACTOR = 0.1

# Run size under --local: a few steps at an image size every zoo model accepts.
LOCAL_IMAGE_SIZE = 64
LOCAL_BATCH_SIZE = 8
LOCAL_STEPS_PER_EPOCH = 4
LOCAL_EPOCHS = 2.0
LOCAL_WARMUP_EPOCHS = 0.5


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """Options of a long run that ``TrainConfig`` does not cover.

    Attributes:
        tpu: TPU name for ``TPUClusterResolver`` (``"local"`` on a TPU VM); empty for none.
        strategy: One of ``distribute.STRATEGIES``.
        precision: ``"float32"`` or ``"bfloat16"`` (mixed policy).
        mixup_alpha: Mixup concentration; 0 disables mixup.
        lr_schedule: ``"cosine"`` (warm-up then cosine decay) or ``"piecewise"`` (warm-up then
            the rate times ``lr_decay_factor`` at each of ``lr_decay_epochs``).
        lr_decay_epochs: Epochs of the piecewise decays, increasing.
        lr_decay_factor: Factor applied at each piecewise decay.
        checkpoint_every: Steps between checkpoints.
        keep_checkpoints: Newest checkpoints kept.
        log_every: Steps between progress lines and TensorBoard scalars.
        image_every: Steps between TensorBoard saliency images.
        sync_batch_norm: Batch statistics over all replicas instead of per replica.
    """

    tpu: str = ""
    strategy: str = "auto"
    precision: str = "float32"
    mixup_alpha: float = 0.0
    lr_schedule: str = "cosine"
    lr_decay_epochs: tuple[float, ...] = DEFAULT_DECAY_EPOCHS
    lr_decay_factor: float = DEFAULT_DECAY_FACTOR
    checkpoint_every: int = 1000
    keep_checkpoints: int = checkpointing.DEFAULT_MAX_TO_KEEP
    log_every: int = 100
    image_every: int = 1000
    sync_batch_norm: bool = False

    def validate(self, epochs: float) -> None:
        """Raise ValueError naming the first invalid option, given the run's ``epochs``."""
        if self.strategy not in distribute.STRATEGIES:
            raise ValueError(
                f"strategy must be one of {distribute.STRATEGIES}, got {self.strategy!r}."
            )
        if self.precision not in distribute.PRECISIONS:
            raise ValueError(
                f"precision must be one of {sorted(distribute.PRECISIONS)}, got {self.precision!r}."
            )
        if self.mixup_alpha < 0:
            raise ValueError(
                f"mixup_alpha must be >= 0 (0 disables mixup), got {self.mixup_alpha}."
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}."
            )
        if self.lr_schedule == "piecewise":
            decays = list(self.lr_decay_epochs)
            if not decays or decays != sorted(decays) or decays[0] <= 0 or decays[-1] >= epochs:
                raise ValueError(
                    f"lr_decay_epochs must increase within (0, epochs={epochs}), got {decays}."
                )
            if not 0 < self.lr_decay_factor < 1:
                raise ValueError(f"lr_decay_factor must be in (0, 1), got {self.lr_decay_factor}.")
        for name in ("checkpoint_every", "keep_checkpoints", "log_every", "image_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


def local_overrides(
    config: training.TrainConfig, options: LaunchOptions
) -> tuple[training.TrainConfig, LaunchOptions]:
    """Shrink a run for a CPU: same model, loss and recipe, a few steps at 64 px.

    The learning rate is scaled linearly with the batch size (at the full rate a batch of 8
    diverges within a few steps), and the decay epochs by the same factor as the run length.
    """
    scale = LOCAL_EPOCHS / config.epochs
    config = dataclasses.replace(
        config,
        learning_rate=config.learning_rate * LOCAL_BATCH_SIZE / config.batch_size,
        image_size=LOCAL_IMAGE_SIZE,
        batch_size=LOCAL_BATCH_SIZE,
        validation_batch_size=LOCAL_BATCH_SIZE,
        steps_per_epoch=LOCAL_STEPS_PER_EPOCH,
        epochs=LOCAL_EPOCHS,
        warmup_epochs=LOCAL_WARMUP_EPOCHS,
    )
    options = dataclasses.replace(
        options,
        tpu="",
        strategy="default",
        precision="float32",
        lr_decay_epochs=tuple(epoch * scale for epoch in options.lr_decay_epochs),
        checkpoint_every=LOCAL_STEPS_PER_EPOCH,
        log_every=1,
        image_every=LOCAL_STEPS_PER_EPOCH,
    )
    return config, options


def _steps_per_epoch(config: training.TrainConfig) -> int:
    if config.steps_per_epoch:
        return config.steps_per_epoch
    count = data.count_records(os.path.join(config.data_dir, training.TRAIN_PATTERN))
    steps = count // config.batch_size
    if steps < 1:
        raise ValueError(
            f"{count} training examples make no full batch of {config.batch_size}; lower "
            "--batch_size."
        )
    return steps


def _learning_rate_schedule(
    config: training.TrainConfig, options: LaunchOptions, steps_per_epoch: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if options.lr_schedule == "cosine":
        return schedules.WarmupCosine(config.learning_rate, warmup_steps, total_steps)
    boundaries = [round(epoch * steps_per_epoch) for epoch in options.lr_decay_epochs]
    return schedules.WarmupPiecewise(
        config.learning_rate, warmup_steps, boundaries, options.lr_decay_factor
    )


def _build_model(config, options, steps_per_epoch):
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    model = training.build_model(config, total_steps, warmup_steps)
    for layer in zoo.all_layers(model.backbone):
        if isinstance(layer, layers.ExactBatchNormalization):
            layer.synchronized = options.sync_batch_norm
    schedule = _learning_rate_schedule(config, options, steps_per_epoch)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum))
    return model


def run(config: training.TrainConfig, options: LaunchOptions) -> dict:
    """Train ``config`` with ``options``, resuming from ``config.model_dir`` when possible.

    Returns:
        The results written to ``model_dir/results.json``: config, options, steps, the last
        training logs and, when validation shards exist, the validation metrics.
    """
    config.validate()
    options.validate(config.epochs)
    strategy = distribute.select_strategy(options.strategy, options.tpu or None)
    distribute.per_replica_batch_size(config.batch_size, strategy)
    distribute.set_precision(options.precision)
    keras.utils.set_random_seed(config.seed)
    tf.io.gfile.makedirs(config.model_dir)

    steps_per_epoch = _steps_per_epoch(config)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    train_data, validation_data = training.build_datasets(config)
    if options.mixup_alpha > 0:
        train_data = augment.mixup_dataset(
            train_data, options.mixup_alpha, config.num_classes, config.seed
        )
    image_batch = next(iter(validation_data if validation_data is not None else train_data))

    schedule = checkpointing.RunSchedule(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        global_batch_size=config.batch_size,
        checkpoint_every=options.checkpoint_every,
        max_to_keep=options.keep_checkpoints,
        log_every=options.log_every,
        image_every=options.image_every,
    )
    # Restoring builds the optimizer's slot variables, which must be created in the scope too.
    with strategy.scope():
        model = _build_model(config, options, steps_per_epoch)
        history, start_step = checkpointing.fit_resumable(
            model,
            train_data,
            config.model_dir,
            schedule,
            validation_data=validation_data,
            image_batch=image_batch,
        )

    results = {
        "config": dataclasses.asdict(config),
        "options": dataclasses.asdict(options),
        "steps": total_steps,
        "resumed_from_step": start_step,
    }
    if history is not None:
        results["train"] = {key: float(values[-1]) for key, values in history.history.items()}
    training.finish_run(model, config, validation_data, results)
    return results
