"""Tests of the tiny composite dataset written by `tfrecords.make_tiny`."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfrecords import make_tiny


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "tree"
    make_tiny.make_tiny(root, seed=0)
    return root


@pytest.fixture(scope="module")
def composites(tree: Path) -> list[dict[str, str]]:
    with (tree / "composites.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_make_tiny_counts(tree: Path, composites: list[dict[str, str]]) -> None:
    per_split = {split: sum(r["split"] == split for r in composites) for split in make_tiny.SPLITS}
    cutouts = {
        split: {r["cutout"] for r in composites if r["split"] == split} for split in per_split
    }
    assert len(cutouts["train"]) + len(cutouts["val_new_objects"]) == 41
    assert len(cutouts["val_new_objects"]) == 10
    assert per_split == {"train": 4 * 31, "val": 31, "val_new_objects": 2 * 10}
    photos = {
        split: sum(1 for p in (tree / split).rglob("*.JPEG") if "__on__" not in p.name)
        for split in per_split
    }
    assert photos == {"train": 79, "val": 20, "val_new_objects": 0}


def test_make_tiny_splits_by_cutout(composites: list[dict[str, str]]) -> None:
    train = {r["cutout"] for r in composites if r["split"] == "train"}
    val = {r["cutout"] for r in composites if r["split"] == "val"}
    new_objects = {r["cutout"] for r in composites if r["split"] == "val_new_objects"}
    assert val == train
    assert not train & new_objects


def test_make_tiny_validation_backgrounds_unseen(composites: list[dict[str, str]]) -> None:
    train = {r["background"] for r in composites if r["split"] == "train"}
    held_out = {r["background"] for r in composites if r["split"] != "train"}
    assert held_out
    assert not train & held_out


def test_make_tiny_backgrounds_differ_per_cutout(composites: list[dict[str, str]]) -> None:
    pairs = [(r["cutout"], r["background"]) for r in composites]
    assert len(pairs) == len(set(pairs))


def test_make_tiny_backgrounds_from_same_split(
    tree: Path, composites: list[dict[str, str]]
) -> None:
    for row in composites:
        background_name = Path(row["background"]).name
        background_split = make_tiny.BACKGROUND_SPLIT[row["split"]]
        assert list((tree / background_split).rglob(background_name)), row


def test_make_tiny_map_is_pasted_mask(tree: Path, composites: list[dict[str, str]]) -> None:
    for row in composites:
        image = Image.open(tree / row["file"])
        silhouette = np.asarray(Image.open(tree / row["map"]))
        assert silhouette.shape == (image.height, image.width), row["map"]
        left, top = int(row["left"]), int(row["top"])
        right, bottom = left + int(row["width"]), top + int(row["height"])
        inside = np.zeros_like(silhouette, dtype=bool)
        inside[top:bottom, left:right] = True
        assert silhouette[~inside].max(initial=0) == 0, row["map"]
        assert silhouette[inside].max() == 255, row["map"]


def test_make_tiny_label_is_cutout_class(composites: list[dict[str, str]]) -> None:
    for row in composites:
        assert Path(row["file"]).parent.name == Path(row["cutout"]).parent.name
        assert row["synset"] == Path(row["cutout"]).parent.name


def test_make_tiny_is_deterministic(tree: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_tiny.make_tiny(again, seed=0)
    assert _tree_digest(again) == _tree_digest(tree)


def test_make_tiny_seed_changes_placements(
    tmp_path: Path, composites: list[dict[str, str]]
) -> None:
    other = tmp_path / "other"
    make_tiny.make_tiny(other, seed=1)
    with (other / "composites.csv").open(newline="") as f:
        other_rows = list(csv.DictReader(f))
    assert [r["file"] for r in other_rows] != [r["file"] for r in composites]


def test_make_tiny_writes_card_and_manifest(tree: Path) -> None:
    card = (tree / "README.md").read_text()
    assert "not human feature-importance data" in card
    assert (tree / "manifest.csv").read_bytes() == (
        make_tiny.SOURCE_DIR / "manifest.csv"
    ).read_bytes()
