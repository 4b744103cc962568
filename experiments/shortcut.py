"""Run the shortcut benchmark: baseline vs harmonized models on a task with a spurious cue.

The task (`harmonizer.shortcut`) classifies the texture of an object on a cluttered background.
In the training split a corner patch of a class colour also predicts the label. In the test
split the patch colour is random. The object masks are the maps. Every variant is trained with
the same seed and the same number of steps (`harmonizer.shortcut_benchmark`), then scored on
the test split: top-1, and alignment under both saliency definitions and both BatchNorm modes.

Full benchmark (3 seeds x 3 variants + a map-coverage sweep at 30% and 10%, 15 models): 672 s
and 452 s in two runs on a 2-core machine shared with other jobs (identical metrics):

    python -m experiments.shortcut --output_dir=runs/shortcut --figures_dir=docs/figures

`--quick` runs one seed, fewer images and steps, and no sweep (an estimated 1-2 minutes).
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags, logging

from harmonizer import shortcut_benchmark

FLAGS = flags.FLAGS
_DEFAULTS = shortcut_benchmark.BenchmarkConfig()

flags.DEFINE_string("output_dir", None, "Directory for results.json and summary.md.", required=True)
flags.DEFINE_string("figures_dir", None, "Directory for the PNG figures; none when unset.")
flags.DEFINE_list("seeds", [str(s) for s in _DEFAULTS.seeds], "Seeds, one full run each.")
flags.DEFINE_integer("steps", _DEFAULTS.steps, "Training steps of every model.")
flags.DEFINE_integer("num_train", _DEFAULTS.num_train, "Training images (biased split).")
flags.DEFINE_integer("num_test", _DEFAULTS.num_test, "Test images (unbiased split).")
flags.DEFINE_float(
    "harmonization_weight", _DEFAULTS.harmonization_weight, "lambda_1 of harmonized variants."
)
flags.DEFINE_list(
    "sweep_fractions",
    [str(f) for f in _DEFAULTS.sweep_fractions],
    "Map coverages of the sweep (coverage 1.0 is the main run); empty for none.",
)
flags.DEFINE_bool("quick", False, "One seed, 1000/500 images, 250 steps, no sweep.")
flags.DEFINE_bool(
    "batch_norm", False, "Add BatchNorm to the CNN (off in the recipe) to show the mode gap."
)
flags.DEFINE_list("variants", list(_DEFAULTS.variants), "Variants to train: baseline, paper, abs.")


def config_from_flags() -> shortcut_benchmark.BenchmarkConfig:
    """Return the benchmark configuration that the flags describe."""
    if FLAGS.quick:
        return shortcut_benchmark.BenchmarkConfig(
            num_train=1000,
            num_test=500,
            steps=250,
            seeds=(0,),
            sweep_fractions=(),
            batch_norm=FLAGS.batch_norm,
        )
    return shortcut_benchmark.BenchmarkConfig(
        num_train=FLAGS.num_train,
        num_test=FLAGS.num_test,
        steps=FLAGS.steps,
        harmonization_weight=FLAGS.harmonization_weight,
        seeds=tuple(int(s) for s in FLAGS.seeds),
        sweep_fractions=tuple(float(f) for f in FLAGS.sweep_fractions),
        variants=tuple(FLAGS.variants),
        batch_norm=FLAGS.batch_norm,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    config.validate()
    os.makedirs(FLAGS.output_dir, exist_ok=True)

    start = time.perf_counter()
    rows, models = shortcut_benchmark.run_benchmark(config, log=logging.info)
    seconds = time.perf_counter() - start
    summary = shortcut_benchmark.summarize(rows)

    result = {
        "config": repr(config),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "total_seconds": seconds,
        "rows": rows,
        "summary": summary,
    }
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = shortcut_benchmark.markdown_table(summary)
    with open(os.path.join(FLAGS.output_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    logging.info("shortcut benchmark done in %.0f s\n%s", seconds, table)

    if FLAGS.figures_dir:
        # Imported here so that the benchmark itself does not need matplotlib.
        from harmonizer import benchmark_figures

        os.makedirs(FLAGS.figures_dir, exist_ok=True)
        train, test = shortcut_benchmark.generate_data(config, config.seeds[0])
        prefix = "shortcut_batchnorm" if config.batch_norm else "shortcut"
        paths = benchmark_figures.shortcut_figures(
            summary, models, train, test, FLAGS.figures_dir, prefix
        )
        logging.info("figures: %s", ", ".join(paths))


if __name__ == "__main__":
    app.run(main)
