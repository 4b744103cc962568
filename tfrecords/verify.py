r"""Re-read the shards of a build and check them against `manifest.json`.

Checks, in order: the manifest marks the build complete. Every shard exists, reads without a
TFRecord CRC error and has the manifest's example count, map count and checksum. The labels per
class and the map counts of each split equal the manifest's. The list of unmatched ClickMe
examples, if any, has the manifest's length. A random sample of examples decodes (JPEG image
with 3 channels, PNG map with 1 channel when `map/has_map` is 1, label in range).

Usage:
    python -m tfrecords.verify --records_dir=runs/tiny/records [--num_decode=64]
"""

from __future__ import annotations

import collections
import dataclasses
import json
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from harmonizer import records
from tfrecords import manifest as manifest_lib
from tfrecords.labels import synsets


@dataclasses.dataclass
class VerifyReport:
    """Result of `verify`.

    Attributes:
        errors: one message per failed check; empty when the build is sound.
        examples_read: examples read across all shards.
        examples_decoded: examples whose image (and map) was decoded.
    """

    errors: list[str] = dataclasses.field(default_factory=list)
    examples_read: int = 0
    examples_decoded: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def _decode_check(features: dict[str, tf.Tensor], where: str, num_classes: int) -> list[str]:
    """Decode one parsed example and return the problems found."""
    problems = []
    label = int(features[records.LABEL_KEY])
    if not 0 <= label < num_classes:
        problems.append(f"{where}: label {label} outside [0, {num_classes})")
    try:
        image = tf.io.decode_jpeg(features[records.IMAGE_KEY], channels=3)
    except tf.errors.InvalidArgumentError as error:
        return problems + [f"{where}: image does not decode as JPEG: {error.message}"]
    has_map = int(features[records.HAS_MAP_KEY])
    map_bytes = features[records.MAP_KEY].numpy()
    source = features[records.MAP_SOURCE_KEY].numpy().decode("utf-8")
    if has_map != bool(map_bytes) or (source == "none") == bool(has_map):
        problems.append(
            f"{where}: map/has_map={has_map}, map/source={source!r} and a map of "
            f"{len(map_bytes)} bytes disagree"
        )
    if map_bytes:
        try:
            map_image = tf.io.decode_png(map_bytes)
        except tf.errors.InvalidArgumentError as error:
            return problems + [f"{where}: map does not decode as PNG: {error.message}"]
        if map_image.shape[-1] != 1:
            problems.append(f"{where}: map has {map_image.shape[-1]} channels, expected 1")
        if source != "clickme" and map_image.shape[:2] != image.shape[:2]:
            problems.append(f"{where}: map is {map_image.shape[:2]} but image is {image.shape[:2]}")
    return problems


def _check_clickme_list(records_dir: str, clickme: dict[str, Any] | None) -> list[str]:
    """Check that the unmatched ClickMe list exists and has the manifest's length."""
    if not clickme:
        return []
    path = posixpath.join(records_dir, clickme["unmatched_file"])
    if not tf.io.gfile.exists(path):
        return [f"{clickme['unmatched_file']}: file missing"]
    with tf.io.gfile.GFile(path, "r") as f:
        rows = json.loads(f.read())
    if len(rows) != clickme["num_unmatched"]:
        message = (
            f"{clickme['unmatched_file']}: {len(rows)} rows but the manifest records "
            f"{clickme['num_unmatched']} unmatched ClickMe examples"
        )
        return [message]
    return []


def verify(records_dir: str, num_decode: int = 64, seed: int = 0) -> VerifyReport:
    """Check the shards in `records_dir` against its manifest.

    Args:
        records_dir: the `output_dir` of a build.
        num_decode: examples to decode in full, drawn at random over all shards.
        seed: seed of that draw.

    Returns:
        The report; `report.ok` is False when any check failed.

    Raises:
        FileNotFoundError: if `records_dir` has no manifest.
    """
    manifest = manifest_lib.read_manifest(records_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"no {manifest_lib.MANIFEST_NAME} in records_dir={records_dir!r}; point it at the "
            "--output_dir of tfrecords.build"
        )
    report = VerifyReport()
    if not manifest.get("complete"):
        report.errors.append(
            "the manifest marks the build incomplete; rerun tfrecords.build to finish it"
        )
    num_classes = len(synsets())

    shard_entries = []
    for split, summary in manifest["splits"].items():
        for index, entry in enumerate(summary["shards"]):
            if entry is None:
                name = manifest_lib.shard_name(split, index, summary["num_shards"])
                report.errors.append(f"{name}: not written (no manifest entry)")
            else:
                shard_entries.append((split, entry))
    total = sum(entry["num_examples"] for _, entry in shard_entries)
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(total, size=min(num_decode, total), replace=False).tolist())

    per_class: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with_map: collections.Counter = collections.Counter()
    position = 0
    for split, entry in shard_entries:
        path = posixpath.join(records_dir, entry["file"])
        if not tf.io.gfile.exists(path):
            report.errors.append(f"{entry['file']}: file missing")
            continue
        checksum = manifest_lib.RecordChecksum()
        shard_with_map = 0
        try:
            for serialized in tf.data.TFRecordDataset(path):
                data = serialized.numpy()
                checksum.update(data)
                features = records.parse(serialized)
                per_class[split][str(int(features[records.LABEL_KEY]))] += 1
                shard_with_map += int(features[records.HAS_MAP_KEY])
                if position in chosen:
                    where = f"{entry['file']} record {checksum.count - 1}"
                    report.errors += _decode_check(features, where, num_classes)
                    report.examples_decoded += 1
                position += 1
        except tf.errors.DataLossError as error:
            report.errors.append(f"{entry['file']}: corrupt TFRecord data: {error.message}")
            continue
        report.examples_read += checksum.count
        with_map[split] += shard_with_map
        for field, found in (
            ("num_examples", checksum.count),
            ("num_with_map", shard_with_map),
            ("sha256", checksum.hexdigest()),
        ):
            if found != entry[field]:
                report.errors.append(
                    f"{entry['file']}: {field} is {found} but the manifest records {entry[field]}"
                )

    report.errors += _check_clickme_list(records_dir, manifest.get("clickme"))
    for split, summary in manifest["splits"].items():
        if dict(per_class[split]) != summary["examples_per_class"]:
            report.errors.append(f"split {split}: examples per class differ from the manifest")
        if with_map[split] != summary["num_with_map"]:
            report.errors.append(
                f"split {split}: {with_map[split]} examples with a map, the manifest records "
                f"{summary['num_with_map']}"
            )
    return report


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command-line flags (only when run as a script, so modules import cleanly)."""
    flags.DEFINE_string("records_dir", None, "The --output_dir of tfrecords.build.", required=True)
    flags.DEFINE_integer("num_decode", 64, "Examples to decode in full, drawn at random.")
    flags.DEFINE_integer("seed", 0, "Seed of the examples drawn for decoding.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report = verify(FLAGS.records_dir, num_decode=FLAGS.num_decode, seed=FLAGS.seed)
    for error in report.errors:
        logging.error("%s", error)
    logging.info(
        "read %d examples, decoded %d, %d problems",
        report.examples_read,
        report.examples_decoded,
        len(report.errors),
    )
    if not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
