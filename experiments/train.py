"""Train a classifier with the neural harmonizer (or the baseline with --harmonization_weight=0).

Example, on the tiny CPU dataset:

    python -m experiments.train --flagfile=experiments/tiny_cpu.flags \
        --data_dir=runs/tiny/records --model_dir=runs/tiny/harmonized

The paper's runs on a Cloud TPU v4-8 have one flagfile each (`experiments/<model>_harmonized.flags`
and `_baseline.flags`); WORKSPACE.md describes the workspace. Rerunning a command with the same
--model_dir resumes from its newest checkpoint, and a finished run returns at once. --local
shrinks any flagfile to a few steps at 64 px on a CPU.
"""

from __future__ import annotations

from absl import app, flags, logging

from harmonizer import distribute, launch, training

FLAGS = flags.FLAGS
_DEFAULTS = training.TrainConfig(data_dir="", model_dir="")

flags.DEFINE_string("data_dir", None, "Directory of train-*/val-* TFRecord shards.", required=True)
flags.DEFINE_string(
    "model_dir", None, "Directory for results, checkpoints and exports.", required=True
)
flags.DEFINE_string("model", _DEFAULTS.model, "Model name from the zoo registry.")
flags.DEFINE_integer("num_classes", _DEFAULTS.num_classes, "Number of output classes.")
flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Side of the square input, in pixels.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Global batch size.")
flags.DEFINE_float("epochs", _DEFAULTS.epochs, "Training length in epochs.")
flags.DEFINE_integer(
    "steps_per_epoch", _DEFAULTS.steps_per_epoch, "Steps per epoch; 0 counts the training records."
)
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak learning rate.")
flags.DEFINE_float("warmup_epochs", _DEFAULTS.warmup_epochs, "Linear warm-up length, in epochs.")
flags.DEFINE_float("momentum", _DEFAULTS.momentum, "SGD momentum.")
flags.DEFINE_float("label_smoothing", _DEFAULTS.label_smoothing, "Label smoothing factor.")
flags.DEFINE_float(
    "harmonization_weight",
    _DEFAULTS.harmonization_weight,
    "lambda_1, weight of the harmonization term; 0 trains the baseline.",
)
flags.DEFINE_float(
    "weight_decay", _DEFAULTS.weight_decay, "lambda_2, weight of the sum of squared kernels."
)
flags.DEFINE_integer(
    "saliency_subbatch",
    _DEFAULTS.saliency_subbatch,
    "Examples per replica in the second-order saliency pass, mapped ones first; 0 runs it on "
    "the whole batch. Set it a few standard deviations above the expected mapped count.",
)
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of weights, data order and augmentation.")
flags.DEFINE_bool(
    "deterministic", _DEFAULTS.deterministic, "Keep the input order deterministic (slower)."
)
flags.DEFINE_bool("export", _DEFAULTS.export, "Export .keras and SavedModel at the end.")

_LAUNCH = launch.LaunchOptions()

flags.DEFINE_string(
    "tpu", _LAUNCH.tpu, "TPU name for TPUStrategy: 'local' on a TPU VM; empty for no TPU."
)
flags.DEFINE_enum(
    "strategy",
    _LAUNCH.strategy,
    list(distribute.STRATEGIES),
    "Distribution strategy; 'auto' picks TPU (with --tpu), multi-worker (TF_CONFIG), "
    "mirrored (several GPUs) or the default strategy.",
)
flags.DEFINE_enum(
    "precision",
    _LAUNCH.precision,
    sorted(distribute.PRECISIONS),
    "Compute precision; bfloat16 sets the mixed_bfloat16 policy (for TPUs).",
)
flags.DEFINE_float("mixup_alpha", _LAUNCH.mixup_alpha, "Mixup Beta(alpha, alpha); 0 disables.")
flags.DEFINE_enum(
    "lr_schedule",
    _LAUNCH.lr_schedule,
    list(launch.LR_SCHEDULES),
    "After the warm-up: 'cosine' decay to 0, or 'piecewise' decays at --lr_decay_epochs.",
)
flags.DEFINE_list(
    "lr_decay_epochs",
    [f"{epoch:g}" for epoch in _LAUNCH.lr_decay_epochs],
    "Epochs at which the piecewise schedule multiplies the rate by --lr_decay_factor.",
)
flags.DEFINE_float(
    "lr_decay_factor", _LAUNCH.lr_decay_factor, "Factor of each piecewise learning-rate decay."
)
flags.DEFINE_integer("checkpoint_every", _LAUNCH.checkpoint_every, "Steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", _LAUNCH.keep_checkpoints, "Newest checkpoints kept.")
flags.DEFINE_integer(
    "log_every", _LAUNCH.log_every, "Steps between progress lines and TensorBoard scalars."
)
flags.DEFINE_integer(
    "image_every", _LAUNCH.image_every, "Steps between TensorBoard saliency-vs-map images."
)
flags.DEFINE_bool(
    "sync_batch_norm",
    _LAUNCH.sync_batch_norm,
    "Compute batch-norm statistics over all replicas instead of per replica.",
)
flags.DEFINE_bool(
    "local",
    False,
    "Shrink the run for a CPU: 64 px, batch 8, a few steps, default strategy, float32.",
)


def config_from_flags() -> training.TrainConfig:
    """Return the `TrainConfig` the flags describe."""
    return training.TrainConfig(
        data_dir=FLAGS.data_dir,
        model_dir=FLAGS.model_dir,
        model=FLAGS.model,
        num_classes=FLAGS.num_classes,
        image_size=FLAGS.image_size,
        batch_size=FLAGS.batch_size,
        epochs=FLAGS.epochs,
        steps_per_epoch=FLAGS.steps_per_epoch,
        learning_rate=FLAGS.learning_rate,
        warmup_epochs=FLAGS.warmup_epochs,
        momentum=FLAGS.momentum,
        label_smoothing=FLAGS.label_smoothing,
        harmonization_weight=FLAGS.harmonization_weight,
        weight_decay=FLAGS.weight_decay,
        saliency_subbatch=FLAGS.saliency_subbatch,
        seed=FLAGS.seed,
        deterministic=FLAGS.deterministic,
        export=FLAGS.export,
    )


def options_from_flags() -> launch.LaunchOptions:
    """Return the `LaunchOptions` the flags describe."""
    try:
        decay_epochs = tuple(float(epoch) for epoch in FLAGS.lr_decay_epochs)
    except ValueError as error:
        raise app.UsageError(
            f"--lr_decay_epochs must be numbers, got {FLAGS.lr_decay_epochs}"
        ) from error
    return launch.LaunchOptions(
        tpu=FLAGS.tpu,
        strategy=FLAGS.strategy,
        precision=FLAGS.precision,
        mixup_alpha=FLAGS.mixup_alpha,
        lr_schedule=FLAGS.lr_schedule,
        lr_decay_epochs=decay_epochs,
        lr_decay_factor=FLAGS.lr_decay_factor,
        checkpoint_every=FLAGS.checkpoint_every,
        keep_checkpoints=FLAGS.keep_checkpoints,
        log_every=FLAGS.log_every,
        image_every=FLAGS.image_every,
        sync_batch_norm=FLAGS.sync_batch_norm,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    options = options_from_flags()
    if FLAGS.local:
        config, options = launch.local_overrides(config, options)
    # Invalid flags end with a one-line message, without a traceback or the flag help.
    try:
        config.validate()
        options.validate(config.epochs)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    results = launch.run(config, options)
    logging.info("done: %s", results.get("validation", results.get("train")))


if __name__ == "__main__":
    app.run(main)
