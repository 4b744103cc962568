"""Build and run a training job from a validated configuration.

`experiments/train.py` turns flags into a `TrainConfig` and runs it through `harmonizer.launch`,
which adds distribution, checkpoints and resume. The demo and the tests call `train` or
`train_model` here, a single-device run without checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import keras
import tensorflow as tf
from absl import logging

from harmonizer import data, export, losses, zoo
from harmonizer.model import Harmonizer
from harmonizer.schedules import WarmupCosine

NUM_IMAGENET_CLASSES = 1000
TRAIN_PATTERN = "train-*"
VALIDATION_PATTERN = "val-*"
# About this many progress lines per run (at least one per epoch).
PROGRESS_LINES = 20


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; `validate` checks them before anything is built."""

    data_dir: str
    model_dir: str
    model: str = "small_cnn"
    num_classes: int = NUM_IMAGENET_CLASSES
    image_size: int = 224
    batch_size: int = 512
    epochs: float = 90.0
    steps_per_epoch: int = 0
    learning_rate: float = 0.3
    warmup_epochs: float = 5.0
    momentum: float = 0.9
    label_smoothing: float = 0.1
    harmonization_weight: float = 1.0
    weight_decay: float = 5e-5
    saliency_subbatch: int = 0
    seed: int = 0
    deterministic: bool = False
    validation_batch_size: int = 0
    export: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option and its valid range."""
        zoo.spec_of(self.model)
        checks = [
            (self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (
                self.steps_per_epoch >= 0,
                f"steps_per_epoch must be >= 0 (0 = count the records), got {self.steps_per_epoch}",
            ),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (
                0 <= self.warmup_epochs < self.epochs,
                (
                    f"warmup_epochs must be in [0, epochs={self.epochs}), got "
                    f"{self.warmup_epochs}; pass a smaller --warmup_epochs with a short --epochs"
                ),
            ),
            (
                self.image_size >= losses.min_map_side(),
                (
                    f"image_size must be >= {losses.min_map_side()} pixels for the "
                    f"{losses.DEFAULT_PYRAMID_LEVELS}-level pyramid of the harmonization loss "
                    f"(also computed at validation), got {self.image_size}"
                ),
            ),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (
                0 <= self.label_smoothing < 1,
                f"label_smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (
                self.harmonization_weight >= 0,
                (
                    f"harmonization_weight must be >= 0 (0 trains the baseline), "
                    f"got {self.harmonization_weight}"
                ),
            ),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                self.saliency_subbatch >= 0,
                (f"saliency_subbatch must be >= 0 (0 = whole batch), got {self.saliency_subbatch}"),
            ),
            (
                self.validation_batch_size >= 0,
                (
                    f"validation_batch_size must be >= 0 (0 = batch_size), "
                    f"got {self.validation_batch_size}"
                ),
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        train_files = tf.io.gfile.glob(os.path.join(self.data_dir, TRAIN_PATTERN))
        if not train_files:
            raise ValueError(
                f"no training shards {TRAIN_PATTERN!r} in data_dir={self.data_dir!r}; build "
                "them with `python -m tfrecords.build` or point --data_dir at them"
            )


def _steps_per_epoch(config: TrainConfig) -> int:
    if config.steps_per_epoch:
        return config.steps_per_epoch
    count = data.count_records(os.path.join(config.data_dir, TRAIN_PATTERN))
    steps = count // config.batch_size
    if steps < 1:
        raise ValueError(
            f"{count} training examples make no full batch of {config.batch_size}; "
            "lower --batch_size"
        )
    return steps


def build_datasets(config: TrainConfig) -> tuple[tf.data.Dataset, tf.data.Dataset | None]:
    """Return the repeated training dataset and the validation dataset (None if absent)."""
    train = data.build_dataset(
        data.PipelineConfig(
            file_pattern=os.path.join(config.data_dir, TRAIN_PATTERN),
            batch_size=config.batch_size,
            image_size=config.image_size,
            training=True,
            seed=config.seed,
            deterministic=config.deterministic,
        )
    )
    validation_pattern = os.path.join(config.data_dir, VALIDATION_PATTERN)
    validation = None
    if tf.io.gfile.glob(validation_pattern):
        validation = data.build_dataset(
            data.PipelineConfig(
                file_pattern=validation_pattern,
                batch_size=config.validation_batch_size or config.batch_size,
                image_size=config.image_size,
                training=False,
            )
        )
    return train, validation


def build_model(config: TrainConfig, total_steps: int, warmup_steps: int) -> Harmonizer:
    """Build the backbone, wrap it in a `Harmonizer` and compile it with SGD + momentum."""
    backbone = zoo.build(config.model, num_classes=config.num_classes, image_size=config.image_size)
    model = Harmonizer(
        backbone,
        harmonization_weight=config.harmonization_weight,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        saliency_subbatch=config.saliency_subbatch,
    )
    schedule = WarmupCosine(config.learning_rate, warmup_steps, total_steps)
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum)
    model.compile(optimizer=optimizer)
    return model


class ProgressLogger(keras.callbacks.Callback):
    """Log step, epoch, learning rate, loss parts and throughput; stop on a NaN loss."""

    def __init__(self, batch_size: int, steps_per_epoch: int, every_steps: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps or max(1, steps_per_epoch)
        self._start = time.time()
        self._step = 0

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        logs = logs or {}
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True
            raise FloatingPointError(
                f"loss became {loss} at step {self._step}; lower the learning rate or check "
                "the input data"
            )
        if self._step % self.every_steps == 0:
            elapsed = time.time() - self._start
            learning_rate = float(self.model.optimizer.learning_rate)
            parts = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(logs.items()))
            logging.info(
                "step %d epoch %.1f lr %.4g | %s | %.1f images/s, %.0f s elapsed",
                self._step,
                self._step / self.steps_per_epoch,
                learning_rate,
                parts,
                self._step * self.batch_size / max(elapsed, 1e-9),
                elapsed,
            )


def train(config: TrainConfig) -> dict:
    """Train, evaluate on the validation shards if present, export, and return the results."""
    return train_model(config)[1]


def train_model(config: TrainConfig) -> tuple[Harmonizer, dict]:
    """Like `train`, but also return the trained `Harmonizer`."""
    config.validate()
    keras.utils.set_random_seed(config.seed)
    tf.io.gfile.makedirs(config.model_dir)

    steps_per_epoch = _steps_per_epoch(config)
    total_steps = max(1, int(round(config.epochs * steps_per_epoch)))
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    logging.info(
        "training %s for %d steps (%d per epoch, %d warm-up), harmonization_weight=%g",
        config.model,
        total_steps,
        steps_per_epoch,
        warmup_steps,
        config.harmonization_weight,
    )
    train_data, validation_data = build_datasets(config)
    model = build_model(config, total_steps, warmup_steps)

    history = model.fit(
        train_data,
        epochs=int(math.ceil(total_steps / steps_per_epoch)),
        steps_per_epoch=steps_per_epoch,
        callbacks=[
            ProgressLogger(
                config.batch_size,
                steps_per_epoch,
                every_steps=max(steps_per_epoch, total_steps // PROGRESS_LINES),
            )
        ],
        verbose=0,
        # The pipeline shuffles; Keras cannot shuffle a tf.data.Dataset and would warn.
        shuffle=False,
    )
    results = {"config": dataclasses.asdict(config), "steps": total_steps}
    results["train"] = {k: float(v[-1]) for k, v in history.history.items()}
    finish_run(model, config, validation_data, results)
    return model, results


def finish_run(
    model: Harmonizer, config: TrainConfig, validation_data: tf.data.Dataset | None, results: dict
) -> None:
    """Add validation metrics to ``results``, export the backbone and write results.json."""
    if validation_data is not None:
        evaluated = model.evaluate(validation_data, verbose=0, return_dict=True)
        results["validation"] = {key: float(value) for key, value in evaluated.items()}
        logging.info("validation: %s", results["validation"])
    if config.export:
        export.export_model(
            model.backbone,
            os.path.join(config.model_dir, "export"),
            extra_info={"harmonization_weight": config.harmonization_weight},
        )
    with tf.io.gfile.GFile(os.path.join(config.model_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


def read_flagfile(path: str) -> dict[str, str]:
    """Return the ``--name=value`` lines of an absl flagfile as a dict (comments skipped)."""
    values: dict[str, str] = {}
    with tf.io.gfile.GFile(path) as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith("--") or "=" not in line:
                raise ValueError(f"{path}:{number}: expected --name=value, got {line!r}")
            name, value = line[2:].split("=", 1)
            values[name] = value
    return values


def config_from_flagfile(path: str, **overrides) -> TrainConfig:
    """Build a `TrainConfig` from a flagfile of `experiments.train` flags plus overrides.

    Raises:
        ValueError: for a flag that is not a `TrainConfig` field or a value of the wrong type.
    """
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    kwargs: dict = {}
    for name, text in read_flagfile(path).items():
        if name not in fields:
            raise ValueError(f"{path}: unknown flag --{name}; valid flags are {sorted(fields)}")
        default = getattr(_FIELD_DEFAULTS, name)
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                kwargs[name] = text.lower() in ("true", "1")
            else:
                kwargs[name] = type(default)(text)
        except ValueError as error:
            raise ValueError(
                f"{path}: --{name}={text!r} is not a valid {type(default).__name__}"
            ) from error
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


_FIELD_DEFAULTS = TrainConfig(data_dir="", model_dir="")
