"""Sets of images with human feature-importance maps, as batched `tf.data` datasets.

Every map set yields dicts of batches with:

* `image`: float32 [B, S, S, 3], RGB in [0, 255];
* `map`: float32 [B, S, S], the human map at the image's resolution;
* `has_map`: bool [B], False for examples without a map (counted, not scored);
* `label`: int32 [B], the ImageNet class (-1 when unknown);
* `id`: string [B], an identifier for per-example output.

Batches keep the last partial batch, so every example is scored.

Sources:

* ClickMe shards in their released schema: `image` (JPEG 256x256x3), `heatmap` (JPEG
  256x256x1), `label` (int64). As in the ClickMe evaluation of the released harmonization code,
  each map is resized to 64x64, blurred with a 10x10 Gaussian kernel of sigma 10 (zero
  padding), and resized to the image size. Every resize, of maps and images, is bilinear.
* The project's records (`harmonizer.records`), center-cropped as `harmonizer.data` evaluates.
* A folder of image/map pairs: `<images>/<relative path>/<stem>.<jpg|jpeg|png>` with the map
  `<maps>/<relative path>/<stem>.png`, for Clicktionary and user data. Images without a map are
  counted as unmapped.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from harmonizer import data as hdata
from harmonizer import records

CLICKME_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "heatmap": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}
CLICKME_IMAGE_SIZE = 256
CLICKME_BLUR_RESOLUTION = 64
CLICKME_BLUR_KERNEL_SIZE = 10
CLICKME_BLUR_SIGMA = 10.0

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MAP_EXTENSION = ".png"
UNKNOWN_LABEL = -1
SYNSET_PATTERN = re.compile(r"^n\d{8}$")


def gaussian_kernel(size: int, sigma: float) -> tf.Tensor:
    """Return a normalized [size, size, 1, 1] Gaussian kernel centered between pixels if even."""
    offsets = tf.range(size, dtype=tf.float32) - (size - 1) / 2.0
    profile = tf.exp(-tf.square(offsets) / (2.0 * sigma**2))
    kernel = profile[:, None] * profile[None, :]
    kernel = kernel / tf.reduce_sum(kernel)
    return kernel[:, :, None, None]


def blur_clickme_map(heatmap: tf.Tensor, output_size: int) -> tf.Tensor:
    """Blur one [H, W] ClickMe map at 64x64 and resize it to output_size x output_size."""
    small = tf.image.resize(heatmap[None, :, :, None], [CLICKME_BLUR_RESOLUTION] * 2)
    kernel = gaussian_kernel(CLICKME_BLUR_KERNEL_SIZE, CLICKME_BLUR_SIGMA)
    blurred = tf.nn.conv2d(small, kernel, strides=1, padding="SAME")
    return tf.image.resize(blurred, [output_size, output_size])[0, :, :, 0]


def _parse_clickme(serialized: tf.Tensor, image_size: int, blur: bool) -> dict[str, tf.Tensor]:
    example = tf.io.parse_single_example(serialized, CLICKME_FEATURES)
    image = tf.cast(tf.io.decode_jpeg(example["image"], channels=3), tf.float32)
    image = tf.image.resize(image, [image_size, image_size])
    image = tf.clip_by_value(image, 0.0, 255.0)
    heatmap = tf.cast(tf.io.decode_jpeg(example["heatmap"], channels=1), tf.float32)[:, :, 0]
    if blur:
        heatmap = blur_clickme_map(heatmap, image_size)
    else:
        heatmap = tf.image.resize(heatmap[:, :, None], [image_size, image_size])[:, :, 0]
    return {
        "image": image,
        "map": heatmap,
        "has_map": tf.constant(True),
        "label": tf.cast(example["label"], tf.int32),
        "id": tf.strings.as_string(example["label"]),
    }


def _finish(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return dataset.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)


def _list_files(patterns: Sequence[str] | str, what: str) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = sorted({path for pattern in patterns for path in tf.io.gfile.glob(pattern)})
    if not files:
        raise ValueError(f"no {what} files match {patterns}; check the path or glob pattern")
    hdata.reject_metadata_files(files, ", ".join(patterns))
    return files


def clickme_dataset(
    patterns: Sequence[str] | str, image_size: int, batch_size: int, blur: bool = True
) -> tf.data.Dataset:
    """Read ClickMe validation shards in their released schema, in file order.

    Args:
        patterns: shard paths or glob patterns.
        image_size: side of the square images and maps fed to the model.
        batch_size: examples per batch; the last batch may be smaller.
        blur: blur the maps as the ClickMe evaluation does (see the module docstring).
    """
    files = _list_files(patterns, "ClickMe shard")
    dataset = tf.data.TFRecordDataset(files)
    dataset = dataset.map(
        lambda serialized: _parse_clickme(serialized, image_size, blur),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return _finish(dataset, batch_size)


def _parse_record(serialized: tf.Tensor, image_size: int) -> dict[str, tf.Tensor]:
    example = records.parse(serialized)
    features, label = hdata.preprocess(example, image_size, training=False)
    return {
        "image": features["image"],
        "map": features["map"],
        "has_map": features["has_map"] > 0,
        "label": label,
        "id": example[records.FILENAME_KEY],
    }


def records_dataset(
    patterns: Sequence[str] | str, image_size: int, batch_size: int
) -> tf.data.Dataset:
    """Read the project's records, center-cropped like `harmonizer.data` evaluation batches."""
    files = _list_files(patterns, "TFRecord")
    dataset = tf.data.TFRecordDataset(files)
    dataset = dataset.map(
        lambda serialized: _parse_record(serialized, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return _finish(dataset, batch_size)


def read_labels_csv(path: str) -> dict[str, int]:
    """Read `file,label` rows (or the `class_index` column of a manifest) keyed by file stem.

    Raises:
        ValueError: if neither a `label` nor a `class_index` column exists.
    """
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        label_column = "label" if "label" in columns else "class_index"
        if "file" not in columns or label_column not in columns:
            raise ValueError(
                f"labels CSV {path!r} needs a 'file' column and a 'label' or 'class_index' "
                f"column, got columns {columns}"
            )
        return {
            os.path.splitext(os.path.basename(row["file"]))[0]: int(row[label_column])
            for row in reader
        }


def find_image_map_pairs(images_dir: str, maps_dir: str) -> list[tuple[str, str | None]]:
    """Return `(image path, map path or None)` for every image under `images_dir`, sorted.

    Raises:
        ValueError: if `images_dir` has no image.
    """
    pairs = []
    for root, _, files in os.walk(images_dir):
        for file_name in files:
            stem, extension = os.path.splitext(file_name)
            if extension.lower() not in IMAGE_EXTENSIONS:
                continue
            relative = os.path.relpath(root, images_dir)
            map_path = os.path.normpath(os.path.join(maps_dir, relative, stem + MAP_EXTENSION))
            image_path = os.path.join(root, file_name)
            pairs.append((image_path, map_path if os.path.exists(map_path) else None))
    if not pairs:
        raise ValueError(f"no {IMAGE_EXTENSIONS} image found under {images_dir!r}")
    return sorted(pairs)


def _label_of(image_path: str, labels: dict[str, int] | None, synsets: list[str] | None) -> int:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    if labels is not None and stem in labels:
        return labels[stem]
    parent = os.path.basename(os.path.dirname(image_path))
    if synsets is not None and SYNSET_PATTERN.match(parent) and parent in synsets:
        return synsets.index(parent)
    return UNKNOWN_LABEL


def folder_dataset(
    images_dir: str,
    maps_dir: str,
    image_size: int,
    batch_size: int,
    labels_csv: str | None = None,
    synsets: list[str] | None = None,
) -> tuple[tf.data.Dataset, int]:
    """Read a folder of image/map pairs, both resized to the same square.

    Labels come from `labels_csv` (see `read_labels_csv`), else from a parent folder named
    after a synset of `synsets` (sorted ImageNet order), else are -1 (unknown). The evaluation
    explains the predicted class of an image with an unknown label.

    Returns:
        The dataset and the number of images.
    """
    pairs = find_image_map_pairs(images_dir, maps_dir)
    labels = read_labels_csv(labels_csv) if labels_csv else None
    image_paths = [image for image, _ in pairs]
    map_paths = [map_path or "" for _, map_path in pairs]
    label_values = np.array([_label_of(path, labels, synsets) for path in image_paths], np.int32)

    def load(image_path: tf.Tensor, map_path: tf.Tensor, label: tf.Tensor):
        image = tf.io.decode_image(tf.io.read_file(image_path), channels=3, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size])
        image = tf.clip_by_value(image, 0.0, 255.0)
        has_map = tf.strings.length(map_path) > 0

        def read_map() -> tf.Tensor:
            decoded = tf.io.decode_png(tf.io.read_file(map_path), channels=1)
            resized = tf.image.resize(tf.cast(decoded, tf.float32), [image_size, image_size])
            return resized[:, :, 0]

        human_map = tf.cond(has_map, read_map, lambda: tf.zeros([image_size, image_size]))
        return {
            "image": image,
            "map": human_map,
            "has_map": has_map,
            "label": label,
            "id": image_path,
        }

    dataset = tf.data.Dataset.from_tensor_slices((image_paths, map_paths, label_values))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(dataset, batch_size), len(pairs)
