"""Image fingerprints that survive resizing and JPEG re-encoding, for the ClickMe join.

A thumbnail is a 16 x 16 grayscale image made by averaging pixel blocks (the aspect ratio is not
kept, like a resize to a square). Two versions of one photo, one of them squashed to 256 x 256
and re-encoded, give thumbnails whose Pearson correlation is close to 1. Different photos of one
class rarely correlate that well. Matching compares thumbnails only within one label, so the
candidate sets stay small.

An input image gets one thumbnail per geometry in `GEOMETRIES`: of the whole image (for a
released image that is a resize of it) and of its central square (for one that is a centre crop
resized to a square).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from tfrecords import images

THUMBNAIL_SIDE = 16
THUMBNAIL_BYTES = THUMBNAIL_SIDE * THUMBNAIL_SIDE
GEOMETRIES = ("resize", "center_crop")


def thumbnail(image: Image.Image) -> bytes:
    """Return the fingerprint of a decoded image: 16 x 16 uint8 grayscale bytes, row-major."""
    gray = image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return gray.tobytes()


def image_fingerprints(image: Image.Image) -> bytes:
    """Return the thumbnails of `image` for each of `GEOMETRIES`, concatenated."""
    return thumbnail(image) + thumbnail(images.central_square(image))


def geometry_thumbnails(fingerprints: list[bytes], geometry: int) -> list[bytes]:
    """Return the thumbnail of one geometry (an index into `GEOMETRIES`) of each fingerprint."""
    start = geometry * THUMBNAIL_BYTES
    return [value[start : start + THUMBNAIL_BYTES] for value in fingerprints]


def normalized(thumbnails: list[bytes]) -> np.ndarray:
    """Stack thumbnails as rows with zero mean and unit norm, so a dot product is a Pearson
    correlation (a flat thumbnail stays all zero and correlates 0 with everything)."""
    rows = np.frombuffer(b"".join(thumbnails), dtype=np.uint8).astype(np.float32)
    rows = rows.reshape(len(thumbnails), THUMBNAIL_BYTES)
    rows -= rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
