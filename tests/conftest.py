"""Shared fixtures: small real TFRecords made from the vendored photos and masks."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from harmonizer import records  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS_DIR = os.path.join(REPO_ROOT, "data", "tiny_imagenet_real")
# Photos are shrunk so that tests stay fast; 80 px leaves room for 64-px crops.
FIXTURE_IMAGE_SIDE = 80


def load_manifest() -> list[dict[str, str]]:
    with open(os.path.join(PHOTOS_DIR, "manifest.csv"), newline="") as f:
        return list(csv.DictReader(f))


def mask_path(row: dict[str, str]) -> str:
    stem = os.path.splitext(os.path.basename(row["file"]))[0]
    return os.path.join(PHOTOS_DIR, "masks", "val", row["synset"], stem + ".png")


def encode_jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def small_record(row: dict[str, str], side: int = FIXTURE_IMAGE_SIDE) -> records.Record:
    """Return the photo of a manifest row, resized to side x side, with its mask if any."""
    image = Image.open(os.path.join(PHOTOS_DIR, row["file"])).convert("RGB")
    image = np.asarray(image.resize((side, side), Image.BILINEAR))
    map_png, source = b"", "none"
    if os.path.exists(mask_path(row)):
        mask = Image.open(mask_path(row)).convert("L").resize((side, side), Image.BILINEAR)
        map_png, source = encode_png(np.asarray(mask)), "silhouette"
    return records.Record(
        image_jpeg=encode_jpeg(image),
        label=int(row["class_index"]),
        filename=os.path.basename(row["file"]),
        map_png=map_png,
        map_source=source,
    )


def write_records(path: str, items: list[records.Record]) -> None:
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as writer:
        for item in items:
            writer.write(records.serialize(item))


@pytest.fixture(scope="session")
def tiny_records(tmp_path_factory) -> str:
    """A directory with train-00000-of-00001 (48 photos) and val-00000-of-00001 (16 photos).

    Both splits mix masked and unmasked photos; the labels are the manifest's classes.
    """
    rows = load_manifest()
    masked = [r for r in rows if os.path.exists(mask_path(r))]
    unmasked = [r for r in rows if not os.path.exists(mask_path(r))]
    train = [small_record(r) for r in masked[:28] + unmasked[:20]]
    validation = [small_record(r) for r in masked[28:36] + unmasked[20:28]]
    directory = tmp_path_factory.mktemp("tiny_records")
    write_records(str(directory / "train-00000-of-00001"), train)
    write_records(str(directory / "val-00000-of-00001"), validation)
    return str(directory)
