"""Feature-importance map files: checks and the stored encoding (NumPy, Pillow, SciPy; no TF).

Storage decision. A map is stored as a single-channel 8-bit PNG at the stored resolution of its
image (ClickMe heatmaps: at their own 256 x 256, which covers the same field of view), scaled so
its minimum is 0 and its maximum 255, and blurred at build time when `blur_sigma` > 0. The loss
standardizes each map (subtract the mean, divide by the standard deviation) before comparing it,
and that is unchanged by a positive affine rescaling, so min-max scaling loses only the 8-bit
rounding. The input pipeline then decodes one small PNG and crops and resizes it with the same
normalized box as its image, with no per-example blur.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

MAP_SUFFIXES = (".png", ".npy")
MAP_LEVELS = 255


class BadMapError(ValueError):
    """A map that cannot be used; its message is the reason reported."""


def decode_map(data: bytes, suffix: str) -> np.ndarray:
    """Decode map file bytes (`.png` or `.npy`) to a float32 [H, W] array.

    A PNG with colour channels is converted to grayscale; an NPY array may be [H, W] or
    [H, W, 1].

    Raises:
        BadMapError: if the bytes cannot be read or the array is not 2-D.
    """
    suffix = suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise BadMapError(f"unreadable NPY map: {error}") from error
    elif suffix == ".png":
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise BadMapError(f"unreadable PNG map: {error}") from error
        if image.mode not in ("L", "I", "I;16", "F"):
            image = image.convert("L")
        array = np.asarray(image)
    else:
        raise BadMapError(f"map suffix must be one of {MAP_SUFFIXES}, got {suffix!r}")

    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise BadMapError(f"map must be a 2-D [H, W] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise BadMapError(f"map must hold real numbers, got dtype {array.dtype}")
    return array.astype(np.float32)


def decode_map_jpeg(data: bytes) -> np.ndarray:
    """Decode a grayscale JPEG heatmap (the ClickMe release format) to float32 [H, W].

    Raises:
        BadMapError: if the bytes are not a readable image.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadMapError(f"unreadable heatmap JPEG: {error}") from error
    return np.asarray(image.convert("L"), dtype=np.float32)


def check_map(array: np.ndarray, image_width: int, image_height: int) -> None:
    """Check a decoded map against its image.

    Raises:
        BadMapError: if its size differs from the image's, it contains NaN or infinity, or it
            is constant. An all-zero map carries no ranking of pixels, and standardizing a
            constant map divides by zero.
    """
    height, width = array.shape
    if (width, height) != (image_width, image_height):
        raise BadMapError(
            f"map is {width}x{height} but its image is {image_width}x{image_height}; "
            "maps must have the size of the original image"
        )
    finite = np.isfinite(array)
    if not finite.all():
        raise BadMapError(f"map has {int((~finite).sum())} NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise BadMapError(f"map is constant (every value is {low:g}), so it carries no ranking")


def encode_map_png(
    array: np.ndarray, size: tuple[int, int] | None = None, blur_sigma: float = 0.0
) -> bytes:
    """Encode a checked map as the stored 8-bit PNG.

    Args:
        array: float [H, W] map that passed `check_map`.
        size: (width, height) to resize to first, or None to keep its size.
        blur_sigma: standard deviation in pixels of the stored map of a Gaussian blur applied
            before scaling; 0 means no blur.

    Returns:
        PNG bytes of an `L` image scaled to [0, 255].
    """
    array = np.asarray(array, dtype=np.float32)
    if size is not None and (array.shape[1], array.shape[0]) != tuple(size):
        array = np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BILINEAR))
    if blur_sigma > 0:
        from scipy import ndimage  # Imported on use: it slows every worker's start-up.

        array = ndimage.gaussian_filter(array, sigma=blur_sigma, mode="nearest")
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    levels = np.round(scaled * MAP_LEVELS).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    return buffer.getvalue()
