"""Compute the split-half inter-rater ceiling of per-participant feature-importance maps.

Example:

    python -m tools.ceiling --maps_dir=clicks/ --num_splits=1000 --output=ceiling.json

`--maps_dir` contains one folder per image with one grayscale map per participant,
`<image id>/<participant id>.png`. The ceiling is the mean over random splits of the participant
pool of the mean over images of Spearman's rho between the two halves' mean maps. Divide model
Spearman scores by it (`python -m experiments.evaluate --ceiling=...`).
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from harmonizer.evaluation import ceiling

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "maps_dir", None, "Folder of <image id>/<participant id>.png maps.", required=True
)
flags.DEFINE_integer("num_splits", ceiling.DEFAULT_SPLITS, "Random splits of the participant pool.")
flags.DEFINE_integer("seed", 0, "Seed of the random splits.")
flags.DEFINE_integer("image_size", 0, "Resize maps to this square side in pixels; 0 keeps them.")
flags.DEFINE_string("output", None, "Path of the JSON result; default: print only.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        result = ceiling.ceiling_from_folder(
            FLAGS.maps_dir, FLAGS.num_splits, FLAGS.seed, FLAGS.image_size or None
        )
    except (FileNotFoundError, ValueError) as error:
        # Both name the folder or the maps at fault; a traceback would add nothing.
        raise SystemExit(f"error: {error}") from error
    logging.info("scored %d maps of %d images", result["maps"], result["images"])
    text = json.dumps(result, indent=2)
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as file:
            file.write(text + "\n")
        logging.info("wrote %s", FLAGS.output)
    print(text)


if __name__ == "__main__":
    app.run(main)
