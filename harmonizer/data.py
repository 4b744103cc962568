"""Input pipeline: parse records, crop and flip image and map together, batch and prefetch.

Decoding a record (`parse` in `harmonizer.records`) is kept apart from preprocessing it. Both
paths compute a crop window in the image's pixel coordinates, decode only that window of the
JPEG (`tf.image.decode_and_crop_jpeg`) and cut the same field of view out of the map with
normalized coordinates, so the map may be stored at another resolution than the image.

* Training: Inception-style random-resized crop (random area and aspect ratio), resize to
  ``image_size`` and a random left-right flip, applied identically to image and map. The
  randomness is stateless and seeded per example, so a seeded pipeline repeats exactly.
* Evaluation: a center crop of ``center_crop_fraction`` of the shorter side, resized to
  ``image_size`` (the usual resize-then-center-crop, done in one step).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from harmonizer import records

# Inception-style crop parameters (Szegedy et al., 2015), as used by the ResNet TPU recipe.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_MAX_ATTEMPTS = 10
# Resize to image_size / 0.875 then center-crop image_size, the ImageNet evaluation convention.
CENTER_CROP_FRACTION = 0.875
DEFAULT_SHUFFLE_BUFFER = 1024
# Files that tfrecords.build writes beside the shards (manifest, TFDS metadata, lists).
METADATA_SUFFIXES = (".json", ".txt", ".tmp")
# Maps are stored as 8-bit PNGs.
MAP_MAX_VALUE = 255.0


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Options of the input pipeline."""

    file_pattern: str
    batch_size: int
    image_size: int
    training: bool
    seed: int = 0
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    deterministic: bool = False
    repeat: bool = True
    center_crop_fraction: float = CENTER_CROP_FRACTION
    # Size of a thread pool of this pipeline's own; 0 shares TF's global inter-op pool.
    num_threads: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_threads < 0:
            raise ValueError(
                f"num_threads must be >= 0 (0 = TF's shared pool), got {self.num_threads}"
            )
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {self.image_size}")
        if not 0.0 < self.center_crop_fraction <= 1.0:
            raise ValueError(
                f"center_crop_fraction must be in (0, 1], got {self.center_crop_fraction}"
            )
        files = tf.io.gfile.glob(self.file_pattern)
        if not files:
            raise ValueError(
                f"no TFRecord files match {self.file_pattern!r}; build them with "
                "`python -m tfrecords.build` or fix the data directory"
            )
        reject_metadata_files(files, self.file_pattern)


def reject_metadata_files(files: list[str], pattern: str) -> None:
    """Raise ValueError if a glob matched the JSON or text files written beside the shards.

    A broad pattern such as ``<dir>/*`` would otherwise feed `manifest.json` to the TFRecord
    reader, which fails with a corrupt-record error that names no file.
    """
    metadata = sorted(f for f in files if f.endswith(METADATA_SUFFIXES))
    if metadata:
        raise ValueError(
            f"{pattern!r} also matches metadata files such as {metadata[0]!r}, which are not "
            "TFRecords; use a shard pattern such as '<dir>/val-*'"
        )


def _decode_map(example: dict[str, tf.Tensor]) -> tf.Tensor:
    """Return the map as uint8 [h, w], or a 1x1 zero map when there is none.

    It stays uint8 until it is cropped and resized, so no full-size float copy is made.
    """

    def decode():
        return tf.io.decode_png(example[records.MAP_KEY], channels=1, dtype=tf.uint8)

    def empty():
        return tf.zeros([1, 1, 1], tf.uint8)

    has_map = example[records.HAS_MAP_KEY] > 0
    return tf.cond(has_map, decode, empty)[..., 0]


def _crop_map(map_image: tf.Tensor, window: tf.Tensor, image_shape: tf.Tensor, size: int):
    """Cut the image window's field of view out of a uint8 map and resize it to size x size.

    Returns float32 values in [0, 1].
    """
    map_shape = tf.cast(tf.shape(map_image), tf.float32)
    image_shape = tf.cast(image_shape, tf.float32)
    window = tf.cast(window, tf.float32)
    top = window[0] / image_shape[0] * map_shape[0]
    left = window[1] / image_shape[1] * map_shape[1]
    bottom = (window[0] + window[2]) / image_shape[0] * map_shape[0]
    right = (window[1] + window[3]) / image_shape[1] * map_shape[1]
    top_i = tf.cast(tf.floor(top), tf.int32)
    left_i = tf.cast(tf.floor(left), tf.int32)
    height_i = tf.maximum(tf.cast(tf.math.ceil(bottom), tf.int32) - top_i, 1)
    width_i = tf.maximum(tf.cast(tf.math.ceil(right), tf.int32) - left_i, 1)
    cropped = tf.image.crop_to_bounding_box(map_image[..., None], top_i, left_i, height_i, width_i)
    return tf.image.resize(cropped, [size, size], method="bilinear")[..., 0] / MAP_MAX_VALUE


def _random_window(image_shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Return a random [top, left, height, width] Inception-style crop window."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=CROP_MIN_OBJECT_COVERED,
        aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=CROP_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


def _center_window(image_shape: tf.Tensor, fraction: float) -> tf.Tensor:
    """Return the [top, left, height, width] center square of ``fraction`` of the short side."""
    height, width = image_shape[0], image_shape[1]
    side = tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * fraction, tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def preprocess(
    example: dict[str, tf.Tensor],
    image_size: int,
    training: bool,
    seed: tf.Tensor | None = None,
    center_crop_fraction: float = CENTER_CROP_FRACTION,
) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """Turn one parsed record into ``({"image", "map", "has_map"}, label)``.

    Args:
        example: the output of `harmonizer.records.parse`.
        image_size: side of the square output, in pixels.
        training: random-resized crop and flip when True, center crop when False.
        seed: int [2] stateless seed; required when ``training``.
        center_crop_fraction: share of the shorter side kept by the evaluation crop.
    """
    jpeg = example[records.IMAGE_KEY]
    image_shape = tf.image.extract_jpeg_shape(jpeg)[:2]
    map_image = _decode_map(example)

    if training:
        if seed is None:
            raise ValueError("a stateless seed is required for the training path")
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        window = _random_window(tf.concat([image_shape, [3]], 0), crop_seed)
    else:
        window = _center_window(image_shape, center_crop_fraction)

    # Decode only the crop window, then resize image and map to the same square. Bilinear
    # resizing of uint8 returns float32 and, as a convex combination, stays within [0, 255].
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    map_out = _crop_map(map_image, window, image_shape, image_size)

    if training:
        flip = tf.random.stateless_uniform([], seed=flip_seed) < 0.5
        image, map_out = tf.cond(
            flip,
            lambda: (tf.reverse(image, axis=[1]), tf.reverse(map_out, axis=[1])),
            lambda: (image, map_out),
        )

    has_map = tf.cast(example[records.HAS_MAP_KEY] > 0, tf.float32)
    map_out = map_out * has_map
    features = {"image": image, "map": map_out, "has_map": has_map}
    return features, tf.cast(example[records.LABEL_KEY], tf.int32)


def build_dataset(config: PipelineConfig) -> tf.data.Dataset:
    """Return a batched, prefetched dataset of ``(features, labels)`` for ``config``."""
    config.validate()
    files = tf.data.Dataset.list_files(
        config.file_pattern, shuffle=config.training, seed=config.seed
    )
    dataset = files.interleave(
        tf.data.TFRecordDataset,
        cycle_length=tf.data.AUTOTUNE,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=config.deterministic or not config.training,
    )
    if config.training:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed)
        if config.repeat:
            dataset = dataset.repeat()
        seeds = tf.data.Dataset.random(seed=config.seed).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds))
        dataset = dataset.map(
            lambda serialized, seed: preprocess(
                records.parse(serialized), config.image_size, True, seed
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=config.deterministic,
        )
    else:
        dataset = dataset.map(
            lambda serialized: preprocess(
                records.parse(serialized),
                config.image_size,
                False,
                center_crop_fraction=config.center_crop_fraction,
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    # Training batches have a static size (TPU friendly); evaluation keeps the last partial one.
    dataset = dataset.batch(config.batch_size, drop_remainder=config.training)
    options = tf.data.Options()
    options.deterministic = config.deterministic or not config.training
    # Parallelism comes from preprocessing many examples at once; ops that also split one
    # example's work over threads only contend with them.
    options.threading.max_intra_op_parallelism = 1
    if config.num_threads:
        options.threading.private_threadpool_size = config.num_threads
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def count_records(file_pattern: str) -> int:
    """Count the records of the files matching ``file_pattern`` (reads every file once)."""
    files = tf.io.gfile.glob(file_pattern)
    return sum(1 for _ in tf.data.TFRecordDataset(files))
