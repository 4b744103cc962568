"""Score a model's alignment with human feature-importance maps and human decisions.

Examples:

    # A model exported by experiments.train, on the project's records.
    python -m experiments.evaluate --model_path=runs/tiny/harmonized/export \
        --data_pattern='runs/tiny/records/val-*' --output=runs/tiny/harmonized/eval.json

    # A released Keras 2 file on ClickMe validation shards, with figures.
    python -m experiments.evaluate --model_path=resnet50v2_harmonized.h5 \
        --clickme_pattern='clickme/val-*.tfrecords' --figures_dir=figures/

    # A foreign SavedModel needs its preprocessing; a PyTorch model an explainer function.
    python -m experiments.evaluate --model_path=exported/ --preprocessing=torch ...
    python -m experiments.evaluate --explainer=my_module:explain --predict=my_module:logits ...

Alignment is the per-image Spearman correlation between the model's saliency and the human map,
divided by the human inter-rater ceiling (0.65753 for ClickMe), averaged over every example
with a non-constant map. Both saliency definitions are scored by default (`signed_mean` as
trained, `abs_max` as explainability libraries compute it), beside model-free baselines: the
leave-one-out mean map (center bias), a centered Gaussian and darkness. The psychophysics test
(`--psychophysics_images_dir`) needs a human curve CSV for the distance to humans; none ships
with the project. See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import json
import sys

import tensorflow as tf
from absl import app, flags, logging

from harmonizer import metrics
from harmonizer import saliency as hsaliency
from harmonizer.evaluation import figures, models, psychophysics, scoring
from harmonizer.evaluation.run import DEFAULT_BATCH_SIZE, EvaluationConfig, run_evaluation

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model_path",
    None,
    "Model to score: .keras file, export directory, SavedModel directory, Keras 2 .h5 file or "
    "zoo name.",
)
flags.DEFINE_string(
    "explainer",
    None,
    "module:function (images, labels) -> maps, for models of "
    "other frameworks; replaces --model_path.",
)
flags.DEFINE_string("predict", None, "module:function images -> logits, used with --explainer.")
flags.DEFINE_enum(
    "preprocessing",
    None,
    list(models.PREPROCESSING_CHOICES),
    "Input preprocessing of a model that does not record it: "
    + "; ".join(f"{name}: {text}" for name, text in models.PREPROCESSING_CHOICES.items()),
)
flags.DEFINE_string(
    "architecture",
    None,
    "Architecture of a .h5 file that is not a released "
    f"one: {sorted(models.APPLICATIONS)} or zoo:<name>.",
)
flags.DEFINE_string("weights_path", None, "Weights file for a zoo model.")
flags.DEFINE_string("data_pattern", None, "Glob of the project's TFRecord shards to score.")
flags.DEFINE_string("clickme_pattern", None, "Glob of ClickMe shards in their released schema.")
flags.DEFINE_string("images_dir", None, "Folder of images paired with --maps_dir.")
flags.DEFINE_string("maps_dir", None, "Folder of PNG maps named like the images.")
flags.DEFINE_string("labels_csv", None, "CSV with file and label (or class_index) columns.")
flags.DEFINE_bool("clickme_blur", True, "Blur ClickMe maps as the ClickMe evaluation does.")
flags.DEFINE_integer(
    "batch_size", DEFAULT_BATCH_SIZE, "Evaluation batch size (the last partial batch is scored)."
)
flags.DEFINE_integer("image_size", 0, "Input side in pixels; 0 reads it from the model.")
flags.DEFINE_list(
    "saliency",
    list(hsaliency.DEFINITIONS),
    f"Saliency definitions to score, of {hsaliency.DEFINITIONS}.",
)
flags.DEFINE_enum(
    "target",
    scoring.TARGET_LABEL,
    list(scoring.TARGETS),
    "Explain the label's logit (the predicted one when the label is unknown) or "
    "always the predicted one.",
)
flags.DEFINE_float(
    "top_fraction", metrics.DEFAULT_TOP_FRACTION, "Share of pixels compared by Dice and IoU."
)
flags.DEFINE_float(
    "ceiling",
    metrics.HUMAN_CEILING_CLICKME,
    "Human inter-rater ceiling dividing Spearman's rho (see tools/ceiling.py).",
)
flags.DEFINE_bool("baselines", True, "Also score the model-free baseline maps.")
flags.DEFINE_integer(
    "bootstrap_resamples",
    scoring.DEFAULT_BOOTSTRAP_RESAMPLES,
    "Resamples of every bootstrap standard deviation.",
)
flags.DEFINE_integer("seed", 0, "Seed of the bootstrap and of the psychophysics noise.")
flags.DEFINE_string("psychophysics_images_dir", None, "Images of the animal/non-animal test.")
flags.DEFINE_string("psychophysics_maps_dir", None, "Importance maps of those images.")
flags.DEFINE_string("psychophysics_labels_csv", None, "Labels of the psychophysics images.")
flags.DEFINE_string("human_curve", None, "CSV of the human decision curve: level,accuracy.")
flags.DEFINE_integer(
    "psychophysics_levels",
    psychophysics.NUM_LEVELS,
    "Number of log-spaced levels from 1% to 100% of revealed pixels.",
)
flags.DEFINE_string("figures_dir", None, "Folder for PNG figures (needs matplotlib).")
flags.DEFINE_string(
    "tradeoff_csv",
    None,
    "CSV of name,accuracy,alignment,alignment_std,"
    "baseline rows; draws the accuracy-alignment figure and exits.",
)
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("output", None, "Path of the JSON report; default: print only.")


def _config_from_flags() -> EvaluationConfig:
    return EvaluationConfig(
        model_path=FLAGS.model_path or "",
        explainer=FLAGS.explainer or "",
        predict=FLAGS.predict or "",
        preprocessing=FLAGS.preprocessing or "",
        architecture=FLAGS.architecture or "",
        weights_path=FLAGS.weights_path or "",
        data_pattern=FLAGS.data_pattern or "",
        clickme_pattern=FLAGS.clickme_pattern or "",
        images_dir=FLAGS.images_dir or "",
        maps_dir=FLAGS.maps_dir or "",
        labels_csv=FLAGS.labels_csv or "",
        clickme_blur=FLAGS.clickme_blur,
        image_size=FLAGS.image_size,
        batch_size=FLAGS.batch_size,
        definitions=tuple(FLAGS.saliency),
        target=FLAGS.target,
        top_fraction=FLAGS.top_fraction,
        ceiling=FLAGS.ceiling,
        baselines=FLAGS.baselines,
        bootstrap_resamples=FLAGS.bootstrap_resamples,
        seed=FLAGS.seed,
        psychophysics_images_dir=FLAGS.psychophysics_images_dir or "",
        psychophysics_maps_dir=FLAGS.psychophysics_maps_dir or "",
        psychophysics_labels_csv=FLAGS.psychophysics_labels_csv or "",
        human_curve=FLAGS.human_curve or "",
        psychophysics_levels=FLAGS.psychophysics_levels,
        figures_dir=FLAGS.figures_dir or "",
        progress=FLAGS.progress,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.tradeoff_csv:
        if not FLAGS.figures_dir:
            raise app.UsageError("--tradeoff_csv needs --figures_dir for the PNG")
        tf.io.gfile.makedirs(FLAGS.figures_dir)
        path = figures.plot_tradeoff_csv(FLAGS.tradeoff_csv, FLAGS.figures_dir)
        logging.info("wrote %s", path)
        return
    try:
        # The progress bar writes to stdout, which is kept for the JSON report.
        with contextlib.redirect_stdout(sys.stderr):
            report = run_evaluation(_config_from_flags())
    except ValueError as error:
        # One line, without the flag help that app.UsageError would print first.
        raise SystemExit(f"error: {error}") from error
    text = json.dumps(report, indent=2)
    if FLAGS.output:
        with tf.io.gfile.GFile(FLAGS.output, "w") as f:
            f.write(text + "\n")
        logging.info("wrote %s", FLAGS.output)
    print(text)


if __name__ == "__main__":
    app.run(main)
