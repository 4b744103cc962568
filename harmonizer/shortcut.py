"""A generated image-classification task with a spurious cue, to test harmonization on a CPU.

Each image shows one object on a cluttered background. The class is the object's texture
(horizontal, vertical or diagonal stripes, checkerboard, ...: `TEXTURES`) in two random tones
of moderate contrast plus noise. The object's silhouette (disk, square or diamond) and its
position and size are random and carry no class information. Clutter is random rectangles and
line segments of random colours, drawn before the object. A small patch in the top-left corner
is painted with one of ``num_classes`` palette colours. In a *biased* split the patch colour is
the label's colour for a fraction ``shortcut_rate`` of the images, so the patch predicts the
label. In an *unbiased* split it is drawn independently of the label. A classifier that reads
only the patch is right on the biased split and at chance on the unbiased one.

The texture contrast is set so that the patch is the easier cue: with the defaults of
`harmonizer.shortcut_benchmark`, a small CNN trained on the biased split is at chance on the
unbiased split, while the same CNN trained on an unbiased split learns the textures (0.82
test top-1 in one check, seed 0).

The map of each image is its object mask (1 on the object, 0 elsewhere): the feature-importance
map a human would draw for this task, by construction. It never marks the corner patch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("disk", "square", "cross", "triangle", "ring", "diamond", "hbar", "vbar")
TEXTURES = ("hstripes", "vstripes", "diagonal", "checker", "antidiagonal", "dots")
# Silhouettes that objects take, at random; the class is the texture.
OBJECT_SHAPES = ("disk", "square", "diamond")
TEXTURE_PERIOD = 4
TEXTURE_CONTRAST_RANGE = (30.0, 65.0)
# Saturated colours of the corner patch, one per class (RGB).
PATCH_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (145, 30, 180),
    (245, 130, 48),
    (70, 240, 240),
    (240, 50, 230),
)
BACKGROUND_LEVEL_RANGE = (40, 200)
BACKGROUND_NOISE_STD = 12.0
OBJECT_TEXTURE_STD = 15.0
CLUTTER_SIZE_RANGE = (2, 6)
PIXEL_MAX = 255


@dataclasses.dataclass(frozen=True)
class ShortcutConfig:
    """Parameters of the generated task.

    Attributes:
        image_size: side of the square images in pixels.
        num_classes: number of textures (and patch colours), at most ``len(TEXTURES)``.
        object_size_range: inclusive range of the object's bounding-box side in pixels.
        patch_size: side of the corner patch in pixels.
        clutter_count: number of clutter items per image.
        shortcut_rate: in a biased split, the probability that the patch shows the label's
            colour (otherwise it shows a random palette colour).
    """

    image_size: int = 32
    num_classes: int = 4
    object_size_range: tuple[int, int] = (10, 14)
    patch_size: int = 5
    clutter_count: int = 8
    shortcut_rate: float = 1.0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not 2 <= self.num_classes <= len(TEXTURES):
            raise ValueError(f"num_classes must be in [2, {len(TEXTURES)}], got {self.num_classes}")
        low, high = self.object_size_range
        if not 5 <= low <= high:
            raise ValueError(
                f"object_size_range must satisfy 5 <= low <= high, got {self.object_size_range}"
            )
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        # The object is placed away from the patch, so it needs room beside it.
        if self.image_size < self.patch_size + high + 2:
            raise ValueError(
                f"image_size {self.image_size} leaves no room for objects of up to {high} px "
                f"beside a {self.patch_size}-px corner patch; use image_size >= "
                f"{self.patch_size + high + 2}"
            )
        if self.clutter_count < 0:
            raise ValueError(f"clutter_count must be >= 0, got {self.clutter_count}")
        if not 0.0 <= self.shortcut_rate <= 1.0:
            raise ValueError(f"shortcut_rate must be in [0, 1], got {self.shortcut_rate}")


@dataclasses.dataclass(frozen=True)
class ShortcutSplit:
    """A generated split.

    Attributes:
        images: uint8 [N, S, S, 3] RGB.
        maps: float32 [N, S, S] object masks in {0, 1}.
        labels: int32 [N] texture classes (indices into `TEXTURES`).
        patch_classes: int32 [N] the class whose palette colour the corner patch shows.
    """

    images: np.ndarray
    maps: np.ndarray
    labels: np.ndarray
    patch_classes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shortcut_agreement(self) -> float:
        """Fraction of images whose patch colour is their label's colour."""
        return float(np.mean(self.patch_classes == self.labels))


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Return the bool [size, size] mask of ``shape`` filling a size x size box.

    Raises:
        ValueError: if ``shape`` is not in `SHAPES`.
    """
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    y, x = np.meshgrid(coords, coords, indexing="ij")
    radius = np.sqrt(x**2 + y**2)
    third = 1.0 / 3.0
    if shape == "disk":
        return radius <= 1.0
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "cross":
        return (np.abs(x) <= third) | (np.abs(y) <= third)
    if shape == "triangle":
        # Apex at the top centre, base along the bottom edge.
        return np.abs(x) <= (y + 1.0) / 2.0
    if shape == "ring":
        return (radius <= 1.0) & (radius >= 0.5)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    if shape == "hbar":
        return np.abs(y) <= 0.4
    if shape == "vbar":
        return np.abs(x) <= 0.4
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def texture_pattern(texture: str, size: int, phase: tuple[int, int]) -> np.ndarray:
    """Return the bool [size, size] two-tone pattern of ``texture`` with period `TEXTURE_PERIOD`.

    Raises:
        ValueError: if ``texture`` is not in `TEXTURES`.
    """
    y, x = np.meshgrid(np.arange(size) + phase[0], np.arange(size) + phase[1], indexing="ij")
    half = TEXTURE_PERIOD // 2
    if texture == "hstripes":
        return (y % TEXTURE_PERIOD) < half
    if texture == "vstripes":
        return (x % TEXTURE_PERIOD) < half
    if texture == "diagonal":
        return ((x + y) % TEXTURE_PERIOD) < half
    if texture == "antidiagonal":
        return ((x - y) % TEXTURE_PERIOD) < half
    if texture == "checker":
        return ((x // half + y // half) % 2) == 0
    if texture == "dots":
        return ((x % TEXTURE_PERIOD) < half) & ((y % TEXTURE_PERIOD) < half)
    raise ValueError(f"texture must be one of {TEXTURES}, got {texture!r}")


def _draw_background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(*BACKGROUND_LEVEL_RANGE, size=3)
    noise = rng.normal(0.0, BACKGROUND_NOISE_STD, size=(size, size, 3))
    return base + noise


def _draw_clutter(canvas: np.ndarray, rng: np.random.Generator, count: int) -> None:
    size = canvas.shape[0]
    for _ in range(count):
        colour = rng.uniform(0, PIXEL_MAX, size=3)
        if rng.random() < 0.5:
            height, width = rng.integers(CLUTTER_SIZE_RANGE[0], CLUTTER_SIZE_RANGE[1] + 1, 2)
        else:
            # A thin horizontal or vertical segment.
            length = int(rng.integers(CLUTTER_SIZE_RANGE[1], 2 * CLUTTER_SIZE_RANGE[1] + 1))
            height, width = (1, length) if rng.random() < 0.5 else (length, 1)
        top = int(rng.integers(0, size - height + 1))
        left = int(rng.integers(0, size - width + 1))
        canvas[top : top + height, left : left + width] = colour


def _place_object(
    canvas: np.ndarray,
    mask: np.ndarray,
    texture: str,
    rng: np.random.Generator,
    patch_size: int,
) -> np.ndarray:
    """Paint an object with ``mask`` and ``texture`` where it does not touch the corner patch."""
    size = canvas.shape[0]
    side = mask.shape[0]
    while True:
        top = int(rng.integers(0, size - side + 1))
        left = int(rng.integers(0, size - side + 1))
        # Keep a 1-px gap between the object's box and the patch.
        if top > patch_size or left > patch_size:
            break
    colour = rng.uniform(0, PIXEL_MAX, size=3)
    # The second tone is brighter or darker than the first, whichever stays in range.
    contrast = rng.uniform(*TEXTURE_CONTRAST_RANGE)
    second = np.where(colour > PIXEL_MAX / 2, colour - contrast, colour + contrast)
    pattern = texture_pattern(texture, side, tuple(rng.integers(0, TEXTURE_PERIOD, 2)))
    paint = np.where(pattern[..., None], colour, second)
    paint += rng.normal(0.0, OBJECT_TEXTURE_STD, size=(side, side, 3))
    region = canvas[top : top + side, left : left + side]
    region[mask] = paint[mask]
    full_mask = np.zeros((size, size), np.float32)
    full_mask[top : top + side, left : left + side] = mask
    return full_mask


def generate_split(
    config: ShortcutConfig, num_examples: int, biased: bool, seed: int
) -> ShortcutSplit:
    """Generate ``num_examples`` images with balanced classes.

    Args:
        config: the task parameters.
        num_examples: number of images.
        biased: if True, the patch shows the label's colour with probability
            ``config.shortcut_rate``; if False, the patch colour is independent of the label.
        seed: seed of every random choice; the same arguments give the same arrays.

    Raises:
        ValueError: if ``config`` is invalid or ``num_examples`` < 1.
    """
    config.validate()
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    rng = np.random.default_rng(seed)
    size = config.image_size
    labels = rng.permutation(np.arange(num_examples) % config.num_classes).astype(np.int32)
    random_patch = rng.integers(0, config.num_classes, size=num_examples).astype(np.int32)
    if biased:
        keep_label = rng.random(num_examples) < config.shortcut_rate
        patch_classes = np.where(keep_label, labels, random_patch).astype(np.int32)
    else:
        patch_classes = random_patch

    images = np.empty((num_examples, size, size, 3), np.uint8)
    maps = np.empty((num_examples, size, size), np.float32)
    low, high = config.object_size_range
    for index in range(num_examples):
        canvas = _draw_background(rng, size)
        _draw_clutter(canvas, rng, config.clutter_count)
        side = int(rng.integers(low, high + 1))
        mask = shape_mask(OBJECT_SHAPES[rng.integers(len(OBJECT_SHAPES))], side)
        maps[index] = _place_object(canvas, mask, TEXTURES[labels[index]], rng, config.patch_size)
        canvas[: config.patch_size, : config.patch_size] = PATCH_PALETTE[patch_classes[index]]
        images[index] = np.clip(np.rint(canvas), 0, PIXEL_MAX).astype(np.uint8)
    return ShortcutSplit(images, maps, labels, patch_classes)


def map_coverage_flags(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """Return float32 [N] has-map flags with exactly ``round(fraction * N)`` ones, at random.

    Raises:
        ValueError: if ``fraction`` is not in [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flags = np.zeros(num_examples, np.float32)
    chosen = np.random.default_rng(seed).permutation(num_examples)[: round(fraction * num_examples)]
    flags[chosen] = 1.0
    return flags
