"""Image fingerprints that survive resizing and JPEG re-encoding, for the ClickMe join.

The fingerprint is a 16 x 16 grayscale thumbnail made by averaging pixel blocks over the whole
image (the aspect ratio is not kept, like a resize to a square). Two versions of one photo,
one of them squashed to 256 x 256 and re-encoded, give thumbnails whose Pearson correlation is
close to 1. Different photos of one class rarely correlate that well. Matching compares
thumbnails only within one label, so the candidate sets stay small.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

THUMBNAIL_SIDE = 16


def thumbnail(image: Image.Image) -> bytes:
    """Return the fingerprint of a decoded image: 16 x 16 uint8 grayscale bytes, row-major."""
    gray = image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return gray.tobytes()


def normalized(thumbnails: list[bytes]) -> np.ndarray:
    """Stack thumbnails as rows with zero mean and unit norm, so a dot product is a Pearson
    correlation (a flat thumbnail stays all zero and correlates 0 with everything)."""
    rows = np.frombuffer(b"".join(thumbnails), dtype=np.uint8).astype(np.float32)
    rows = rows.reshape(len(thumbnails), THUMBNAIL_SIDE * THUMBNAIL_SIDE)
    rows -= rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
