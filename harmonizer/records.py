"""The TFRecord schema shared by the dataset builders and the input pipeline.

Every example carries one ImageNet image and, when one exists, its feature-importance map:

* ``image/encoded``: the RGB image as JPEG bytes.
* ``image/class/label``: 0-based ImageNet label in sorted-synset order (``n01440764`` is 0).
* ``image/filename``: the source file name (for ImageNet, ``<synset>_<n>.JPEG`` or
  ``ILSVRC2012_val_XXXXXXXX.JPEG``).
* ``map/encoded``: the map as single-channel 8-bit PNG bytes, empty when there is no map. The
  map may have another resolution than the image: it covers the same field of view, so the input
  pipeline crops it with normalized coordinates.
* ``map/has_map``: 1 when ``map/encoded`` contains a map, 0 otherwise.
* ``map/source``: where the map came from (``none``, ``file``, ``clickme``, ``silhouette``).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
FILENAME_KEY = "image/filename"
MAP_KEY = "map/encoded"
HAS_MAP_KEY = "map/has_map"
MAP_SOURCE_KEY = "map/source"

MAP_SOURCES = ("none", "file", "clickme", "silhouette")

FEATURE_SPEC = {
    IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
    FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    MAP_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    HAS_MAP_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    MAP_SOURCE_KEY: tf.io.FixedLenFeature([], tf.string, default_value="none"),
}


@dataclasses.dataclass(frozen=True)
class Record:
    """One example before serialization."""

    image_jpeg: bytes
    label: int
    filename: str
    map_png: bytes = b""
    map_source: str = "none"

    @property
    def has_map(self) -> bool:
        return bool(self.map_png)


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def serialize(record: Record) -> bytes:
    """Serialize a record to `tf.train.Example` bytes.

    Raises:
        ValueError: if the label is negative or the map source is unknown.
    """
    if record.label < 0:
        raise ValueError(f"label must be >= 0, got {record.label} for {record.filename!r}")
    if record.map_source not in MAP_SOURCES:
        raise ValueError(
            f"map_source must be one of {MAP_SOURCES}, got {record.map_source!r} "
            f"for {record.filename!r}"
        )
    if record.has_map == (record.map_source == "none"):
        raise ValueError(
            f"{record.filename!r}: map_source {record.map_source!r} does not agree with "
            f"has_map={record.has_map}; use 'none' exactly when there is no map"
        )
    feature = {
        IMAGE_KEY: _bytes_feature(record.image_jpeg),
        LABEL_KEY: _int64_feature(record.label),
        FILENAME_KEY: _bytes_feature(record.filename.encode("utf-8")),
        MAP_KEY: _bytes_feature(record.map_png),
        HAS_MAP_KEY: _int64_feature(int(record.has_map)),
        MAP_SOURCE_KEY: _bytes_feature(record.map_source.encode("utf-8")),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Deterministic map ordering, so the same record gives the same bytes in every process.
    return example.SerializeToString(deterministic=True)


def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse one serialized example into the raw feature dict of `FEATURE_SPEC` (no decoding)."""
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)
