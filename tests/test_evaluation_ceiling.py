"""Tests of the split-half human ceiling against a per-split scipy computation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from harmonizer.evaluation import ceiling

SIDE = 12


def _synthetic_participants(seed: int = 0):
    """Three images. Each participant's map is the image's true map plus their own noise."""
    rng = np.random.default_rng(seed)
    pool = [f"p{index}" for index in range(6)]
    maps_by_image, ids_by_image = [], []
    for image in range(3):
        truth = rng.normal(size=(SIDE, SIDE))
        ids = pool if image < 2 else pool[:4]  # The third image lacks two participants.
        maps_by_image.append(np.stack([truth + rng.normal(size=(SIDE, SIDE)) for _ in ids]))
        ids_by_image.append(ids)
    return maps_by_image, ids_by_image


def test_ceiling_matches_scipy_per_split():
    maps_by_image, ids_by_image = _synthetic_participants()
    pool = sorted({pid for ids in ids_by_image for pid in ids})
    assignments = ceiling.split_assignments(len(pool), 20, seed=3)

    result = ceiling.split_half_ceiling(maps_by_image, ids_by_image, num_splits=20, seed=3)

    split_means = []
    for split in assignments:
        first_half = {pid for pid, chosen in zip(pool, split, strict=True) if chosen}
        rhos = []
        for maps, ids in zip(maps_by_image, ids_by_image, strict=True):
            first = [m for m, pid in zip(maps, ids, strict=True) if pid in first_half]
            second = [m for m, pid in zip(maps, ids, strict=True) if pid not in first_half]
            if first and second:
                a, b = np.mean(first, axis=0).ravel(), np.mean(second, axis=0).ravel()
                rhos.append(scipy.stats.spearmanr(a, b).statistic)
        split_means.append(np.mean(rhos))
    assert result["ceiling"] == pytest.approx(np.mean(split_means), abs=1e-6)
    assert result["participants"] == 6
    assert result["splits_scored"] == 20


def test_identical_participants_give_ceiling_one():
    truth = np.random.default_rng(1).normal(size=(SIDE, SIDE))
    maps = [np.stack([truth] * 4)]

    result = ceiling.split_half_ceiling(maps, [["a", "b", "c", "d"]], num_splits=5)

    assert result["ceiling"] == pytest.approx(1.0)


def test_empty_half_is_skipped_and_counted():
    maps = [np.random.default_rng(2).normal(size=(2, SIDE, SIDE)), np.ones((1, SIDE, SIDE))]

    # Image two has a single participant, so one half is always empty.
    result = ceiling.split_half_ceiling(maps, [["a", "b"], ["a"]], num_splits=4)

    assert result["skipped_image_splits"] == 4
    assert np.isfinite(result["ceiling"])


def test_single_participant_is_rejected():
    with pytest.raises(ValueError, match="at least 2 participants"):
        ceiling.split_half_ceiling([np.ones((1, SIDE, SIDE))], [["a"]], num_splits=3)


def test_ceiling_from_folder(tmp_path):
    maps_by_image, ids_by_image = _synthetic_participants()
    for index, (maps, ids) in enumerate(zip(maps_by_image, ids_by_image, strict=True)):
        folder = tmp_path / "maps" / f"image{index}"
        folder.mkdir(parents=True)
        for participant_map, pid in zip(maps, ids, strict=True):
            scaled = np.clip(participant_map * 40 + 128, 0, 255).astype(np.uint8)
            Image.fromarray(scaled).save(folder / f"{pid}.png")

    result = ceiling.ceiling_from_folder(str(tmp_path / "maps"), num_splits=10)

    assert result["images"] == 3
    assert result["maps"] == 16
    assert result["participants"] == 6
    assert 0.0 < result["ceiling"] < 1.0
