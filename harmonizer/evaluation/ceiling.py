"""The split-half inter-rater ceiling of human feature-importance maps.

The participant pool is split at random into two halves. For every image, the mean maps of the
two halves' participants are compared with Spearman's rho, and the split's score is the mean
over images. The ceiling is the mean over splits (1000 in Fel et al., 2022, which gives 0.65753 for
ClickMe). An image with no participant in one half of a split is skipped for that split and
counted.

Per-participant maps are read from a folder `<root>/<image id>/<participant id>.png`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

from harmonizer import metrics

DEFAULT_SPLITS = 1000
# Splits scored per batched Spearman call; bounds memory at about
# SPLIT_CHUNK * pixels * 8 bytes * 4 per image.
SPLIT_CHUNK = 100
MAP_EXTENSIONS = (".png", ".jpg", ".jpeg")


def split_assignments(num_participants: int, num_splits: int, seed: int = 0) -> np.ndarray:
    """Return bool [num_splits, num_participants], True for the first half of each split.

    Each split is a random permutation whose first `num_participants // 2` participants form
    the first half.

    Raises:
        ValueError: with fewer than 2 participants or splits < 1.
    """
    if num_participants < 2:
        raise ValueError(
            f"a split-half ceiling needs at least 2 participants, got {num_participants}"
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    rng = np.random.default_rng(seed)
    half = num_participants // 2
    assignments = np.zeros((num_splits, num_participants), bool)
    for split in range(num_splits):
        assignments[split, rng.permutation(num_participants)[:half]] = True
    return assignments


def split_half_ceiling(
    maps_by_image: Sequence[np.ndarray],
    participants_by_image: Sequence[Sequence[str]],
    num_splits: int = DEFAULT_SPLITS,
    seed: int = 0,
) -> dict[str, Any]:
    """Compute the split-half inter-rater Spearman ceiling.

    Args:
        maps_by_image: per image, float [P_i, H, W] maps of its participants (sizes may differ
            between images).
        participants_by_image: per image, the P_i participant ids of those maps.
        num_splits: random splits of the participant pool.
        seed: seed of the splits.

    Returns:
        `ceiling` (mean over splits), `std_over_splits`, `num_splits`, `participants`,
        `images`, and `skipped_image_splits` (image-split pairs with an empty half or a
        constant half-mean map).
    """
    if len(maps_by_image) != len(participants_by_image):
        raise ValueError(
            f"got {len(maps_by_image)} map stacks but {len(participants_by_image)} participant "
            "lists; give one list of ids per image"
        )
    pool = sorted({pid for ids in participants_by_image for pid in ids})
    position = {pid: index for index, pid in enumerate(pool)}
    assignments = split_assignments(len(pool), num_splits, seed)

    rho_sum = np.zeros(num_splits)
    rho_count = np.zeros(num_splits)
    for maps, ids in zip(maps_by_image, participants_by_image, strict=True):
        maps = np.asarray(maps, np.float64)
        if maps.shape[0] != len(ids):
            raise ValueError(f"an image has {maps.shape[0]} maps but {len(ids)} participant ids")
        flat = maps.reshape(len(ids), -1)
        members = assignments[:, [position[pid] for pid in ids]].astype(np.float64)
        for start in range(0, num_splits, SPLIT_CHUNK):
            first = members[start : start + SPLIT_CHUNK]
            second = 1.0 - first
            count_first = first.sum(axis=1)
            count_second = second.sum(axis=1)
            usable = (count_first > 0) & (count_second > 0)
            mean_first = first @ flat / np.maximum(count_first, 1)[:, None]
            mean_second = second @ flat / np.maximum(count_second, 1)[:, None]
            rho, valid = metrics.spearman(tf.constant(mean_first), tf.constant(mean_second))
            valid = valid.numpy() & usable
            rho_sum[start : start + SPLIT_CHUNK] += np.where(valid, rho.numpy(), 0.0)
            rho_count[start : start + SPLIT_CHUNK] += valid

    scored = rho_count > 0
    split_means = rho_sum[scored] / rho_count[scored]
    return {
        "ceiling": float(split_means.mean()) if split_means.size else None,
        "std_over_splits": float(split_means.std()) if split_means.size else None,
        "num_splits": num_splits,
        "splits_scored": int(scored.sum()),
        "participants": len(pool),
        "images": len(maps_by_image),
        "skipped_image_splits": int(num_splits * len(maps_by_image) - rho_count.sum()),
        "seed": seed,
    }


def read_participant_maps(
    root: str, image_size: int | None = None
) -> tuple[list[np.ndarray], list[list[str]], list[str]]:
    """Read `<root>/<image id>/<participant id>.<png|jpg>` grayscale maps.

    Args:
        root: the folder of per-image folders.
        image_size: resize every map to this square side (bilinear); None keeps each size,
            which must then agree within an image.

    Returns:
        Per-image map stacks, per-image participant ids, and the image ids.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
        ValueError: if no image folder has maps, or an image's maps differ in size.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"maps folder {root!r} not found; pass --maps_dir=<folder of <image>/<participant>"
            ".png maps>"
        )
    maps_by_image, participants_by_image, image_ids = [], [], []
    for image_id in sorted(os.listdir(root)):
        folder = os.path.join(root, image_id)
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(MAP_EXTENSIONS))
        if not files:
            continue
        stack = []
        for file_name in files:
            image = Image.open(os.path.join(folder, file_name)).convert("L")
            if image_size is not None:
                image = image.resize((image_size, image_size), Image.BILINEAR)
            stack.append(np.asarray(image, np.float32))
        shapes = {m.shape for m in stack}
        if len(shapes) > 1:
            raise ValueError(
                f"maps of image {image_id!r} have different sizes {sorted(shapes)}; pass "
                "image_size to resize them"
            )
        maps_by_image.append(np.stack(stack))
        participants_by_image.append([os.path.splitext(f)[0] for f in files])
        image_ids.append(image_id)
    if not maps_by_image:
        raise ValueError(f"no <image id>/<participant id>.png maps found under {root!r}")
    return maps_by_image, participants_by_image, image_ids


def ceiling_from_folder(
    root: str,
    num_splits: int = DEFAULT_SPLITS,
    seed: int = 0,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Read `<root>/<image id>/<participant id>.png` maps and compute their ceiling."""
    maps, participants, image_ids = read_participant_maps(root, image_size)
    result = split_half_ceiling(maps, participants, num_splits, seed)
    result["maps_dir"] = root
    result["maps"] = sum(len(ids) for ids in participants)
    return result
