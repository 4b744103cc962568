"""The per-file work of the builder, run in worker processes.

This module imports no TensorFlow, so a worker process starts in a fraction of a second; the
parent process serializes and writes the records. Local files are read with `open`; a path with
a scheme (`gs://...`) is read through `tf.io.gfile`, imported only then.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Hashable
from pathlib import PurePosixPath

from tfrecords import fingerprint, images, maps


@dataclasses.dataclass(frozen=True)
class InspectTask:
    """One image file to check, with its map file if there is one."""

    index: int
    path: str
    map_path: str = ""
    want_fingerprint: bool = False


@dataclasses.dataclass(frozen=True)
class Inspection:
    """Result of checking one image file and its map.

    Attributes:
        index: the `InspectTask.index` of the checked file.
        error: why the image cannot be used, or "" when it can.
        sha256: hex digest of the file bytes (duplicate detection); "" when unreadable.
        width: width of the decoded image in pixels.
        height: height of the decoded image in pixels.
        note: what the image needs converting from ("" for an RGB JPEG).
        map_error: why the map cannot be used, or "" (also "" when there is no map).
        fingerprint: `fingerprint.image_fingerprints` bytes, or b"" when not requested.
    """

    index: int
    error: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    note: str = ""
    map_error: str = ""
    fingerprint: bytes = b""


@dataclasses.dataclass(frozen=True)
class ExampleTask:
    """One example to write: the image comes from `path` or `image_bytes`, the map from
    `map_path` (a PNG or NPY file), `map_jpeg` (a ClickMe heatmap) or nowhere. With
    `center_square`, only the central square of the image is stored (the field of view of a
    ClickMe heatmap made from a centre crop)."""

    filename: str
    label: int
    width: int
    height: int
    is_rgb_jpeg: bool
    path: str = ""
    image_bytes: bytes = b""
    map_path: str = ""
    map_jpeg: bytes = b""
    map_source: str = "none"
    center_square: bool = False


@dataclasses.dataclass(frozen=True)
class PreparedExample:
    """The encoded fields of one example, ready for `harmonizer.records.Record`."""

    image_jpeg: bytes
    label: int
    filename: str
    map_png: bytes
    map_source: str


def read_bytes(path: str) -> bytes:
    """Read a whole file; paths with a scheme (`gs://`) go through `tf.io.gfile`."""
    if "://" in path:
        import tensorflow as tf  # Only remote paths need TensorFlow's file system layer.

        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def inspect_one(task: InspectTask) -> Inspection:
    """Read, hash and fully decode one image, then check its map against it."""
    try:
        data = read_bytes(task.path)
    except OSError as error:
        return Inspection(index=task.index, error=f"cannot read file: {error}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = images.open_image(data)
    except images.BadImageError as error:
        return Inspection(index=task.index, error=str(error), sha256=digest)

    notes = []
    if image.format != "JPEG":
        notes.append(f"{image.format} data")
    if image.mode != "RGB":
        notes.append(f"{image.mode} pixels")
    thumbnails = fingerprint.image_fingerprints(image) if task.want_fingerprint else b""

    map_error = ""
    if task.map_path:
        try:
            array = maps.decode_map(read_bytes(task.map_path), PurePosixPath(task.map_path).suffix)
            maps.check_map(array, image.width, image.height)
        except OSError as error:
            map_error = f"cannot read map file: {error}"
        except maps.BadMapError as error:
            map_error = str(error)
    return Inspection(
        index=task.index,
        sha256=digest,
        width=image.width,
        height=image.height,
        note=", ".join(notes),
        map_error=map_error,
        fingerprint=thumbnails,
    )


def inspect_batch(tasks: list[InspectTask]) -> list[Inspection]:
    """Run `inspect_one` on each task (one worker call per batch keeps messages few)."""
    return [inspect_one(task) for task in tasks]


def prepare_example(
    task: ExampleTask, max_shorter_side: int, map_blur_sigma: float
) -> PreparedExample:
    """Encode one planned example: RGB JPEG image and 8-bit PNG map.

    Raises:
        images.BadImageError, maps.BadMapError: if a file changed since it was inspected.
    """
    data = task.image_bytes or read_bytes(task.path)
    size = images.stored_size(task.width, task.height, max_shorter_side)
    if task.is_rgb_jpeg and size == (task.width, task.height) and not task.center_square:
        # Inspection already decoded these bytes in full, so they are stored unchanged.
        image_jpeg = data
    else:
        image_jpeg, _ = images.to_rgb_jpeg(data, max_shorter_side, task.center_square)

    map_png = b""
    if task.map_path:
        array = maps.decode_map(read_bytes(task.map_path), PurePosixPath(task.map_path).suffix)
        maps.check_map(array, task.width, task.height)
        map_png = maps.encode_map_png(array, size=size, blur_sigma=map_blur_sigma)
    elif task.map_jpeg:
        array = maps.decode_map_jpeg(task.map_jpeg)
        map_png = maps.encode_map_png(array, blur_sigma=map_blur_sigma)
    return PreparedExample(
        image_jpeg=image_jpeg,
        label=task.label,
        filename=task.filename,
        map_png=map_png,
        map_source=task.map_source,
    )


def prepare_shard(
    job: tuple[Hashable, list[ExampleTask]], max_shorter_side: int, map_blur_sigma: float
) -> tuple[Hashable, list[PreparedExample]]:
    """Prepare every example of one shard, in order; `job` is (shard key, tasks).

    Raises:
        RuntimeError: naming the file, if one fails although it passed inspection (it changed
            or was removed since).
    """
    key, tasks = job
    prepared = []
    for task in tasks:
        try:
            prepared.append(prepare_example(task, max_shorter_side, map_blur_sigma))
        except (OSError, images.BadImageError, maps.BadMapError) as error:
            raise RuntimeError(
                f"{task.path or task.filename} (map {task.map_path or 'none'}) passed "
                f"inspection but failed to encode: {error}; did the file change during the "
                "build? Rerun to resume."
            ) from error
    return key, prepared


@dataclasses.dataclass(frozen=True)
class ClickMeInspection:
    """Result of decoding one ClickMe example.

    Attributes:
        error: why the example cannot be used, or "".
        fingerprint: `fingerprint.thumbnail` bytes of its image.
        width: image width in pixels.
        height: image height in pixels.
    """

    error: str = ""
    fingerprint: bytes = b""
    width: int = 0
    height: int = 0


def inspect_clickme(pair: tuple[bytes, bytes]) -> ClickMeInspection:
    """Fingerprint a ClickMe (image JPEG, heatmap JPEG) pair and check the heatmap."""
    image_jpeg, heatmap_jpeg = pair
    try:
        image = images.open_image(image_jpeg)
    except images.BadImageError as error:
        return ClickMeInspection(error=f"image: {error}")
    try:
        heatmap = maps.decode_map_jpeg(heatmap_jpeg)
        maps.check_map(heatmap, heatmap.shape[1], heatmap.shape[0])
    except maps.BadMapError as error:
        return ClickMeInspection(error=f"heatmap: {error}")
    return ClickMeInspection(
        fingerprint=fingerprint.thumbnail(image), width=image.width, height=image.height
    )


def inspect_clickme_batch(
    job: tuple[int, list[tuple[bytes, bytes]]],
) -> tuple[int, list[ClickMeInspection]]:
    """Run `inspect_clickme` on each pair of `job` = (index of the first pair, pairs)."""
    start, pairs = job
    return start, [inspect_clickme(pair) for pair in pairs]
