"""Train a classifier with the neural harmonizer (or the baseline with --harmonization_weight=0).

Example, on the tiny CPU dataset:

    python -m experiments.train --flagfile=experiments/tiny_cpu.flags \
        --data_dir=runs/tiny/records --model_dir=runs/tiny/harmonized
"""

from __future__ import annotations

from absl import app, flags, logging

from harmonizer import training

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    results = training.train(config)
    logging.info("done: %s", results.get("validation", results["train"]))


if __name__ == "__main__":
    app.run(main)
