"""Join released ClickMe TFRecord shards to the ImageNet images they were made from.

A released ClickMe example has the features `image` (JPEG, 256 x 256 x 3), `heatmap` (JPEG,
256 x 256 x 1) and `label` (int64), but no file name. Each one is joined to an ImageNet image
of the same label whose `tfrecords.fingerprint` thumbnail correlates best with its image's,
provided the correlation reaches `clickme_min_correlation`. Pairs are taken in decreasing
correlation, so each image gets at most one heatmap and each heatmap at most one image.

A matched image is written with the heatmap as its map (`map/source` = `clickme`), stored at the
heatmap's 256 x 256; an image that already has a map file keeps that map and the ClickMe match
is counted in the report. Unmatched ClickMe examples are listed in the report, and with
`unmatched_clickme="write"` they are also written as standalone examples made from their own
256-pixel image.

Two geometries are tried: the released image as a resize of the whole ImageNet image, or as a
resize of its central square. A match of the second kind stores only the central square of the
image, so that image and heatmap keep one field of view. The report counts matches per geometry.

NOTE: a released image made any other way (an off-centre crop, padding) correlates less and may
stay unmatched. The report gives the best correlation of each unmatched example, which shows
how close it came.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from tfrecords import fingerprint, labels, work

if TYPE_CHECKING:
    from tfrecords.build import BuildConfig, Candidate, _Runner

CLICKME_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "heatmap": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}
CLICKME_BATCH = 256


@dataclasses.dataclass
class ClickMeExample:
    """One released ClickMe example and where it was read from."""

    split: str
    file: str
    index: int
    label: int
    image_jpeg: bytes
    heatmap_jpeg: bytes
    inspection: work.ClickMeInspection | None = None

    @property
    def name(self) -> str:
        """Return a file name for the standalone example, unique per shard and position."""
        return f"clickme_{posixpath.basename(self.file)}_{self.index:06d}.JPEG"


def read_clickme(split: str, pattern: str) -> list[ClickMeExample]:
    """Read every example of the ClickMe shards matching `pattern`, files in sorted order.

    Raises:
        FileNotFoundError: if no file matches.
        ValueError: naming the file, if a record lacks the released features.
    """
    paths = sorted(tf.io.gfile.glob(pattern))
    if not paths:
        raise FileNotFoundError(
            f"no ClickMe shards match {pattern!r} for split {split!r}; check --clickme_files"
        )
    examples = []
    for path in paths:
        for index, serialized in enumerate(tf.data.TFRecordDataset(path)):
            try:
                features = tf.io.parse_single_example(serialized, CLICKME_FEATURES)
            except tf.errors.InvalidArgumentError as error:
                raise ValueError(
                    f"{path} record {index} is not a released ClickMe example (features "
                    f"{sorted(CLICKME_FEATURES)}): {error.message}"
                ) from error
            examples.append(
                ClickMeExample(
                    split=split,
                    file=path,
                    index=index,
                    label=int(features["label"]),
                    image_jpeg=features["image"].numpy(),
                    heatmap_jpeg=features["heatmap"].numpy(),
                )
            )
    return examples


def _inspect_all(examples: list[ClickMeExample], runner: _Runner) -> None:
    jobs = [
        (start, [(e.image_jpeg, e.heatmap_jpeg) for e in examples[start : start + CLICKME_BATCH]])
        for start in range(0, len(examples), CLICKME_BATCH)
    ]
    results = runner.map_unordered(
        work.inspect_clickme_batch, jobs, "fingerprint ClickMe", len(examples)
    )
    for start, inspections in results:
        for offset, inspection in enumerate(inspections):
            examples[start + offset].inspection = inspection


def match_by_label(
    clickme_fingerprints: list[bytes],
    image_fingerprints: list[bytes],
    min_correlation: float,
) -> tuple[dict[int, tuple[int, int]], np.ndarray]:
    """Pair ClickMe examples with images of one label, best correlation first.

    Args:
        clickme_fingerprints: `fingerprint.thumbnail` of each ClickMe image.
        image_fingerprints: `fingerprint.image_fingerprints` of each input image.
        min_correlation: lowest correlation accepted as a match.

    Returns:
        For each matched ClickMe index, the image index and the geometry (an index into
        `fingerprint.GEOMETRIES`) that matched. Also the best correlation of every ClickMe
        example with any image and geometry (-1 when there is no image).
    """
    if not clickme_fingerprints or not image_fingerprints:
        return {}, np.full(len(clickme_fingerprints), -1.0)
    clickme_rows = fingerprint.normalized(clickme_fingerprints)
    per_geometry = np.stack(
        [
            clickme_rows
            @ fingerprint.normalized(fingerprint.geometry_thumbnails(image_fingerprints, k)).T
            for k in range(len(fingerprint.GEOMETRIES))
        ]
    )
    # For a square image both geometries agree, and argmax keeps the first (a resize).
    correlation = per_geometry.max(axis=0)
    geometry = per_geometry.argmax(axis=0)
    best = correlation.max(axis=1)
    rows, columns = np.nonzero(correlation >= min_correlation)
    order = np.argsort(-correlation[rows, columns], kind="stable")
    matches: dict[int, tuple[int, int]] = {}
    taken: set[int] = set()
    for k in order:
        row, column = int(rows[k]), int(columns[k])
        if row not in matches and column not in taken:
            matches[row] = (column, int(geometry[row, column]))
            taken.add(column)
    return matches, best


def join(
    config: BuildConfig, candidates: dict[str, list[Candidate]], runner: _Runner
) -> tuple[dict[str, Any], dict[str, list[work.ExampleTask]]]:
    """Attach ClickMe heatmaps to `candidates` (in place) and report the match rate.

    Returns:
        The report for the manifest, and per split the standalone examples to write (empty
        unless `config.unmatched_clickme` is `write`).
    """
    examples: list[ClickMeExample] = []
    for split, pattern in sorted(config.clickme_files.items()):
        examples += read_clickme(split, pattern)
    _inspect_all(examples, runner)
    if config.unmatched_clickme == "list":
        for example in examples:
            example.image_jpeg = b""  # Only standalone examples need it; this frees memory.

    images_by_label: dict[int, list[Candidate]] = {}
    for split in config.splits:
        for candidate in candidates[split]:
            images_by_label.setdefault(candidate.source.label, []).append(candidate)
    clickme_by_label: dict[int, list[ClickMeExample]] = {}
    unmatched: list[dict[str, Any]] = []
    num_classes = len(labels.synsets())
    for example in examples:
        if not 0 <= example.label < num_classes:
            reason = f"label {example.label} is outside [0, {num_classes})"
            unmatched.append(_unmatched(example, reason, None))
        elif example.inspection.error:
            unmatched.append(_unmatched(example, example.inspection.error, None))
        else:
            clickme_by_label.setdefault(example.label, []).append(example)

    num_matched = 0
    kept_file_map = 0
    matched_by_geometry = dict.fromkeys(fingerprint.GEOMETRIES, 0)
    for label, group in sorted(clickme_by_label.items()):
        images = images_by_label.get(label, [])
        matches, best = match_by_label(
            [e.inspection.fingerprint for e in group],
            [c.inspection.fingerprint for c in images],
            config.clickme_min_correlation,
        )
        for row, example in enumerate(group):
            if row not in matches:
                reason = (
                    f"no image of label {label} in the input"
                    if not images
                    else "no unclaimed image of the same label correlates at least "
                    f"{config.clickme_min_correlation}"
                )
                unmatched.append(_unmatched(example, reason, float(best[row])))
                continue
            num_matched += 1
            column, geometry = matches[row]
            matched_by_geometry[fingerprint.GEOMETRIES[geometry]] += 1
            candidate = images[column]
            if candidate.map_path:
                kept_file_map += 1
                continue
            candidate.map_jpeg = example.heatmap_jpeg
            candidate.map_source = "clickme"
            candidate.center_square = fingerprint.GEOMETRIES[geometry] == "center_crop"

    standalone: dict[str, list[work.ExampleTask]] = {split: [] for split in config.splits}
    if config.unmatched_clickme == "write":
        unmatched_keys = {(row["file"], row["index"]) for row in unmatched}
        for example in examples:
            usable = not example.inspection.error and 0 <= example.label < num_classes
            if not usable or (example.file, example.index) not in unmatched_keys:
                continue
            standalone[example.split].append(
                work.ExampleTask(
                    filename=example.name,
                    label=example.label,
                    width=example.inspection.width,
                    height=example.inspection.height,
                    is_rgb_jpeg=False,
                    image_bytes=example.image_jpeg,
                    map_jpeg=example.heatmap_jpeg,
                    map_source="clickme",
                )
            )

    report = {
        "num_examples": len(examples),
        "num_matched": num_matched,
        "match_rate": num_matched / len(examples) if examples else 0.0,
        "num_matched_by_geometry": matched_by_geometry,
        "num_matched_image_kept_its_map_file": kept_file_map,
        "min_correlation": config.clickme_min_correlation,
        "unmatched_written": config.unmatched_clickme == "write",
        "unmatched": sorted(unmatched, key=lambda row: (row["file"], row["index"])),
    }
    return report, standalone


def _unmatched(example: ClickMeExample, reason: str, best: float | None) -> dict[str, Any]:
    return {
        "split": example.split,
        "file": example.file,
        "index": example.index,
        "label": example.label,
        "reason": reason,
        "best_correlation": None if best is None else round(best, 4),
    }
