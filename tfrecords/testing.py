"""Helpers that make small real-format input trees from the vendored photos, for tests.

The photos are the real ones in `data/tiny_imagenet_real/`, so decoding, conversion and
fingerprinting run on real JPEG content rather than on synthetic arrays.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image

from tfrecords.make_tiny import SOURCE_DIR


def vendored_photos(kind: str = "photo") -> list[Path]:
    """Return the vendored photos of one `kind` (`photo` or `cutout`), sorted by path."""
    with (SOURCE_DIR / "manifest.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["kind"] == kind]
    return sorted(SOURCE_DIR / row["file"] for row in rows)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """Encode `image` as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    """Encode `image` as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    """Write `data` to `path`, creating folders, and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
