"""Image checks and conversion for the builder, by content and with Pillow only (no TensorFlow).

ImageNet's files include CMYK JPEGs, PNG data under a `.JPEG` name, grayscale JPEGs and a few
damaged files. `open_image` sniffs the bytes and fully decodes them, so a truncated file is
caught before it is written. `to_rgb_jpeg` turns every readable image into an RGB JPEG.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 95


class BadImageError(ValueError):
    """An image file that cannot be decoded; its message is the reason reported for the skip."""


def open_image(data: bytes) -> Image.Image:
    """Decode `data` fully and return the image.

    Raises:
        BadImageError: if the bytes are empty, not an image, truncated or corrupt.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns about odd EXIF or palette data; the decode below decides validity.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError as error:
        raise BadImageError(f"not a readable image format ({len(data)} bytes)") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(f"truncated or corrupt image data: {error}") from error
    if image.width <= 0 or image.height <= 0:
        raise BadImageError(f"image has no pixels ({image.width}x{image.height})")
    return image


def central_square(image: Image.Image) -> Image.Image:
    """Return the largest square centred in `image`."""
    side = min(image.size)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def stored_size(width: int, height: int, max_shorter_side: int) -> tuple[int, int]:
    """Return the (width, height) an image is stored at: shrunk so its shorter side is at most
    `max_shorter_side`, aspect ratio kept; `max_shorter_side=0` keeps the size."""
    shorter = min(width, height)
    if max_shorter_side <= 0 or shorter <= max_shorter_side:
        return width, height
    scale = max_shorter_side / shorter
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb_jpeg(
    data: bytes, max_shorter_side: int = 0, center_square: bool = False
) -> tuple[bytes, str]:
    """Return `data` as RGB JPEG bytes and a note on what was changed.

    An RGB JPEG that needs no resize or crop comes back unchanged (note `""`), so ordinary
    ImageNet files lose nothing. Anything else is decoded, cropped to its central square if
    `center_square`, converted to RGB (CMYK, grayscale, palette, alpha dropped), resized if
    needed and encoded at quality `JPEG_QUALITY`.

    Raises:
        BadImageError: as `open_image`.
    """
    image = open_image(data)
    source_format = image.format  # A crop or conversion returns an image without a format.
    notes = []
    if center_square and image.width != image.height:
        image = central_square(image)
        notes.append(f"cropped to the central {image.width}x{image.height} square")
    size = stored_size(image.width, image.height, max_shorter_side)
    if source_format == "JPEG" and image.mode == "RGB" and size == image.size and not notes:
        return data, ""

    if source_format != "JPEG":
        notes.append(f"{source_format} data re-encoded as JPEG")
    if image.mode != "RGB":
        notes.append(f"{image.mode} converted to RGB")
        image = image.convert("RGB")
    if size != image.size:
        notes.append(f"resized from {image.width}x{image.height} to {size[0]}x{size[1]}")
        image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), "; ".join(notes)
