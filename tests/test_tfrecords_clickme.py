"""Tests of joining released-format ClickMe shards back to their ImageNet originals."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from harmonizer import records
from tfrecords import build, clickme, fingerprint, images, labels, verify
from tfrecords.make_tiny import SOURCE_DIR, read_source_manifest
from tfrecords.testing import jpeg_bytes, write

CLICKME_SIDE = 256
SYNSETS_WITH_SEVERAL_PHOTOS = ("n02980441", "n03028079", "n04486054", "n04154565", "n02123045")


def _heatmap(index: int) -> Image.Image:
    """A blob whose centre encodes `index`, so a test can tell which heatmap an image got."""
    y, x = np.mgrid[0:CLICKME_SIDE, 0:CLICKME_SIDE]
    center_x, center_y = 24 + 7 * (index % 30), 40 + 5 * (index // 30)
    blob = np.exp(-((x - center_x) ** 2 + (y - center_y) ** 2) / (2 * 12.0**2))
    return Image.fromarray(np.round(blob * 255).astype(np.uint8))


def _clickme_example(photo: Path, label: int, index: int, crop: bool = False) -> bytes:
    image = Image.open(photo).convert("RGB")
    if crop:
        image = images.central_square(image)
    image = image.resize((CLICKME_SIDE, CLICKME_SIDE))
    feature = {
        "image": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[jpeg_bytes(image, quality=75)])
        ),
        "heatmap": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[jpeg_bytes(_heatmap(index), quality=90)])
        ),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.fixture(scope="module")
def clickme_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """30 real photos (several per class) as an ImageNet train tree minus 5 held-out photos,
    and ClickMe shards made from all 30: resized to 256 x 256 and re-encoded."""
    root = tmp_path_factory.mktemp("clickme")
    photos = [row for row in read_source_manifest(SOURCE_DIR) if row.kind == "photo"]
    several = [row for row in photos if row.synset in SYNSETS_WITH_SEVERAL_PHOTOS]
    others = [row for row in photos if row.synset not in SYNSETS_WITH_SEVERAL_PHOTOS]
    chosen = several + others[: 30 - len(several)]
    held_out = {chosen[i].file for i in (0, 5, 9, 20, 29)}
    cropped = {chosen[i].file for i in (3, 11, 17)}  # made from the central square

    expected_heatmap = {}  # image file name -> heatmap index
    paths = [root / "clickme" / f"clickme-{k:05d}-of-00002" for k in range(2)]
    paths[0].parent.mkdir(parents=True)
    writers = [tf.io.TFRecordWriter(str(p)) for p in paths]
    for index, row in enumerate(chosen):
        photo = SOURCE_DIR / row.file
        crop = row.file in cropped
        writers[index % 2].write(_clickme_example(photo, row.class_index, index, crop))
        if row.file not in held_out:
            write(root / "tree" / "train" / row.synset / photo.name, photo.read_bytes())
            expected_heatmap[photo.name] = index
    # Two unusable examples: a label outside ImageNet-1k and image bytes that do not decode.
    writers[0].write(_clickme_example(SOURCE_DIR / chosen[1].file, 1000, 40))
    broken = tf.train.Example.FromString(_clickme_example(SOURCE_DIR / chosen[2].file, 5, 41))
    broken.features.feature["image"].bytes_list.value[0] = b"not a JPEG"
    writers[1].write(broken.SerializeToString())
    for writer in writers:
        writer.close()
    return {
        "root": root,
        "expected_heatmap": expected_heatmap,
        "num_clickme": len(chosen) + 2,
        "num_held_out": len(held_out),
        "num_unusable": 2,
        "cropped": {Path(file).name for file in cropped},
    }


def _config(setup: dict[str, object], output: Path, **overrides) -> build.BuildConfig:
    root = setup["root"]
    arguments = {
        "input_dir": str(root / "tree"),
        "output_dir": str(output),
        "splits": ("train",),
        "num_shards": {"train": 2},
        "clickme_files": {"train": str(root / "clickme" / "clickme-*")},
        "show_progress": False,
    }
    arguments.update(overrides)
    return build.BuildConfig(**arguments)


def _examples(output: Path) -> list[dict[str, object]]:
    paths = sorted(str(p) for p in output.glob("train-*"))
    return [
        {key: value.numpy() for key, value in records.parse(s).items()}
        for s in tf.data.TFRecordDataset(paths)
    ]


def _synset(example: dict[str, object]) -> str:
    return labels.synsets()[int(example[records.LABEL_KEY])]


def _heatmap_index(map_png: bytes) -> int:
    stored = np.asarray(Image.open(io.BytesIO(map_png)).convert("L"), dtype=np.float32)
    row, column = np.unravel_index(np.argmax(stored), stored.shape)
    best = min(
        range(60),
        key=lambda i: (24 + 7 * (i % 30) - column) ** 2 + (40 + 5 * (i // 30) - row) ** 2,
    )
    return best


def test_clickme_match_rate(clickme_setup, tmp_path: Path) -> None:
    manifest = build.build(_config(clickme_setup, tmp_path))
    report = manifest["clickme"]
    unmatched = clickme_setup["num_held_out"] + clickme_setup["num_unusable"]
    matched = clickme_setup["num_clickme"] - unmatched
    assert matched == len(clickme_setup["expected_heatmap"])
    assert report["num_examples"] == clickme_setup["num_clickme"]
    assert report["num_matched"] == matched
    assert report["match_rate"] == pytest.approx(matched / clickme_setup["num_clickme"])
    assert report["num_unmatched"] == unmatched
    rows = json.loads((tmp_path / report["unmatched_file"]).read_text())
    assert len(rows) == unmatched
    reasons = " | ".join(row["reason"] for row in rows)
    assert "label 1000 is outside [0, 1000)" in reasons
    assert "image: not a readable image" in reasons
    num_cropped = len(clickme_setup["cropped"])
    assert report["num_matched_by_geometry"] == {
        "resize": matched - num_cropped,
        "center_crop": num_cropped,
    }


def test_clickme_heatmaps_reach_their_originals(clickme_setup, tmp_path: Path) -> None:
    build.build(_config(clickme_setup, tmp_path))
    examples = _examples(tmp_path)
    assert len(examples) == len(clickme_setup["expected_heatmap"])
    for example in examples:
        name = example[records.FILENAME_KEY].decode()
        assert example[records.HAS_MAP_KEY] == 1, name
        assert example[records.MAP_SOURCE_KEY] == b"clickme", name
        stored = Image.open(io.BytesIO(example[records.MAP_KEY]))
        assert stored.size == (CLICKME_SIDE, CLICKME_SIDE)
        assert _heatmap_index(example[records.MAP_KEY]) == clickme_setup["expected_heatmap"][name]

        original = Image.open(clickme_setup["root"] / "tree" / "train" / _synset(example) / name)
        image = Image.open(io.BytesIO(example[records.IMAGE_KEY]))
        if name in clickme_setup["cropped"]:
            assert original.width != original.height, name
            assert image.size == (min(original.size),) * 2, name
        else:
            assert image.size == original.size, name


def test_clickme_build_verifies(clickme_setup, tmp_path: Path) -> None:
    build.build(_config(clickme_setup, tmp_path))
    assert verify.verify(str(tmp_path)).errors == []
    (tmp_path / "clickme_unmatched.json").write_text("[]")
    assert verify.verify(str(tmp_path)).errors == [
        "clickme_unmatched.json: 0 rows but the manifest records 7 unmatched ClickMe examples"
    ]


def test_clickme_unmatched_written_standalone(clickme_setup, tmp_path: Path) -> None:
    manifest = build.build(_config(clickme_setup, tmp_path, unmatched_clickme="write"))
    examples = _examples(tmp_path)
    standalone = [e for e in examples if e[records.FILENAME_KEY].startswith(b"clickme_")]
    assert len(standalone) == clickme_setup["num_held_out"]
    assert manifest["totals"]["clickme_standalone_examples"] == clickme_setup["num_held_out"]
    for example in standalone:
        image = Image.open(io.BytesIO(example[records.IMAGE_KEY]))
        assert image.size == (CLICKME_SIDE, CLICKME_SIDE)
        assert example[records.HAS_MAP_KEY] == 1


def test_fingerprint_survives_resize_and_reencode() -> None:
    photo = SOURCE_DIR / read_source_manifest(SOURCE_DIR)[0].file
    original = Image.open(photo).convert("RGB")
    squashed = Image.open(
        io.BytesIO(jpeg_bytes(original.resize((CLICKME_SIDE, CLICKME_SIDE)), quality=60))
    )
    rows = fingerprint.normalized(
        [fingerprint.thumbnail(original), fingerprint.thumbnail(squashed)]
    )
    assert float(rows[0] @ rows[1]) > 0.98


def test_match_by_label_pairs_each_image_once() -> None:
    rng = np.random.default_rng(0)
    thumbnails = [rng.integers(0, 256, 256, dtype=np.uint8).tobytes() for _ in range(4)]
    # Image k has thumbnail k whole and thumbnail 3 as its central square, except image 2,
    # whose central square is thumbnail 2 as well.
    image_fingerprints = [
        thumbnails[0] + thumbnails[3],
        thumbnails[1] + thumbnails[3],
        thumbnails[2] * 2,
    ]
    # Two ClickMe examples copy image 1; only the first-ranked one may claim it.
    queries = [thumbnails[1], thumbnails[1], thumbnails[2], thumbnails[3]]
    matches, best = clickme.match_by_label(queries, image_fingerprints, 0.9)
    assert matches[0] == (1, 0)
    assert 1 not in matches
    assert matches[2] == (2, 0)
    assert matches[3] == (0, 1)
    np.testing.assert_allclose(best, [1.0, 1.0, 1.0, 1.0], atol=1e-5)


def test_match_by_label_without_images() -> None:
    matches, best = clickme.match_by_label([bytes(256)], [], 0.9)
    assert matches == {}
    assert best.tolist() == [-1.0]
