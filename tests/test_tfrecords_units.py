"""Unit tests of the builder's image, map and fingerprint helpers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tfrecords import images, labels, maps
from tfrecords.testing import jpeg_bytes, png_bytes, vendored_photos


@pytest.mark.parametrize(
    ("size", "limit", "expected"),
    [
        ((500, 375), 0, (500, 375)),
        ((500, 375), 400, (500, 375)),
        ((500, 375), 300, (400, 300)),
        ((375, 500), 300, (300, 400)),
        ((1, 1000), 0, (1, 1000)),
    ],
)
def test_stored_size(size: tuple[int, int], limit: int, expected: tuple[int, int]) -> None:
    assert images.stored_size(*size, limit) == expected


def test_to_rgb_jpeg_keeps_rgb_jpeg_bytes() -> None:
    data = vendored_photos()[0].read_bytes()
    converted, note = images.to_rgb_jpeg(data)
    assert converted == data
    assert note == ""


def test_to_rgb_jpeg_resizes_shorter_side() -> None:
    data = vendored_photos()[0].read_bytes()
    width, height = Image.open(io.BytesIO(data)).size
    converted, note = images.to_rgb_jpeg(data, max_shorter_side=64)
    image = Image.open(io.BytesIO(converted))
    assert min(image.size) == 64
    assert image.size == images.stored_size(width, height, 64)
    assert "resized" in note


def test_encode_map_png_is_min_max_scaled() -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(20, 30)).astype(np.float32) * 3 + 7
    stored = np.asarray(Image.open(io.BytesIO(maps.encode_map_png(array))), dtype=np.float32)
    expected = (array - array.min()) / (array.max() - array.min()) * maps.MAP_LEVELS
    assert stored.shape == array.shape
    assert np.abs(stored - expected).max() <= 0.5


def test_encode_map_png_keeps_standardized_map() -> None:
    # The loss standardizes each map, and min-max scaling to 8 bits changes that only by rounding.
    rng = np.random.default_rng(1)
    array = rng.gamma(2.0, size=(32, 32)).astype(np.float32)
    stored = np.asarray(Image.open(io.BytesIO(maps.encode_map_png(array))), dtype=np.float32)

    def standardize(x: np.ndarray) -> np.ndarray:
        return (x - x.mean()) / x.std()

    assert np.abs(standardize(stored) - standardize(array)).max() < 0.02


def test_encode_map_png_blur_matches_scipy() -> None:
    array = np.zeros((41, 41), np.float32)
    array[20, 20] = 1.0
    stored = np.asarray(
        Image.open(io.BytesIO(maps.encode_map_png(array, blur_sigma=3.0))), dtype=np.float32
    )
    blurred = ndimage.gaussian_filter(array, sigma=3.0, mode="nearest")
    expected = (blurred - blurred.min()) / (blurred.max() - blurred.min()) * maps.MAP_LEVELS
    assert np.abs(stored - expected).max() <= 0.5


def test_encode_map_png_resizes() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    stored = Image.open(io.BytesIO(maps.encode_map_png(array, size=(8, 6))))
    assert stored.size == (8, 6)
    assert stored.mode == "L"


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.ones((4, 5), np.float32), "constant"),
        (np.full((4, 5), np.inf, np.float32), "NaN or infinite"),
        (np.zeros((5, 4), np.float32), "map is 4x5 but its image is 5x4"),
    ],
)
def test_check_map_rejects(array: np.ndarray, message: str) -> None:
    with pytest.raises(maps.BadMapError, match=message):
        maps.check_map(array, image_width=5, image_height=4)


def test_decode_map_npy_shapes() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3, 4), np.float32))
    with pytest.raises(maps.BadMapError, match=r"2-D \[H, W\] array"):
        maps.decode_map(buffer.getvalue(), ".npy")


def test_decode_map_png_rgb_to_gray() -> None:
    image = Image.new("RGB", (4, 3), (255, 255, 255))
    decoded = maps.decode_map(png_bytes(image), ".png")
    assert decoded.shape == (3, 4)
    assert decoded.dtype == np.float32
    assert float(decoded.max()) == 255.0


def test_open_image_reasons() -> None:
    data = jpeg_bytes(Image.new("RGB", (16, 16), (10, 20, 30)))
    with pytest.raises(images.BadImageError, match="empty file"):
        images.open_image(b"")
    with pytest.raises(images.BadImageError, match="truncated or corrupt"):
        images.open_image(data[: len(data) // 2])
    with pytest.raises(images.BadImageError, match="not a readable image"):
        images.open_image(b"\x00" * 64)


def test_validation_label_range() -> None:
    assert labels.validation_label("ILSVRC2012_val_00000001") == 65
    assert labels.validation_label("ILSVRC2012_val_00050001") is None
    assert labels.validation_label("ILSVRC2012_val_1") is None
    assert labels.synset_to_label()["n01440764"] == 0
