"""Builder tests on a real-format tree with the file problems ImageNet and map sets contain."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from harmonizer import records
from tfrecords import build, labels
from tfrecords.testing import jpeg_bytes, png_bytes, vendored_photos, write

SYNSETS = ("n01440764", "n01443537", "n01484850")
SIZE = (96, 72)


def _small(photo: Path) -> Image.Image:
    return Image.open(photo).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def quirk_tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Write a train tree with one file per known problem; return what each should become."""
    root = tmp_path_factory.mktemp("quirks")
    train = root / "tree" / "train"
    maps = root / "tree" / "maps" / "train"
    photos = vendored_photos()
    good: dict[str, str] = {}  # file name -> synset, for every file that must be written
    skipped: dict[str, str] = {}  # file name -> words expected in its skip reason
    unused_maps: dict[str, str] = {}  # map file name -> words expected in its reason
    with_map: set[str] = set()

    for index, photo in enumerate(photos[:6]):
        name = f"{SYNSETS[0]}_{index}.JPEG"
        write(train / SYNSETS[0] / name, jpeg_bytes(_small(photo)))
        good[name] = SYNSETS[0]
    width, height = SIZE
    write(maps / SYNSETS[0] / f"{SYNSETS[0]}_0.png", png_bytes(_blob(width, height)))
    with_map.add(f"{SYNSETS[0]}_0.JPEG")
    npy = io.BytesIO()
    np.save(npy, np.asarray(_blob(width, height), dtype=np.float32)[..., None])
    write(maps / SYNSETS[0] / f"{SYNSETS[0]}_1.npy", npy.getvalue())
    with_map.add(f"{SYNSETS[0]}_1.JPEG")

    second = _small(photos[6])
    cases = {
        "cmyk": jpeg_bytes(second.convert("CMYK")),
        "png": png_bytes(second),
        "gray": jpeg_bytes(second.convert("L")),
    }
    for kind, data in cases.items():
        name = f"{SYNSETS[1]}_{kind}.JPEG"
        write(train / SYNSETS[1] / name, data)
        good[name] = SYNSETS[1]

    original = jpeg_bytes(_small(photos[7]))
    write(train / SYNSETS[2] / f"{SYNSETS[2]}_0.JPEG", original)
    good[f"{SYNSETS[2]}_0.JPEG"] = SYNSETS[2]
    write(train / SYNSETS[2] / f"{SYNSETS[2]}_1_copy.JPEG", original)
    skipped[f"{SYNSETS[2]}_1_copy.JPEG"] = "duplicate of"
    write(train / SYNSETS[2] / f"{SYNSETS[2]}_truncated.JPEG", original[: len(original) // 2])
    skipped[f"{SYNSETS[2]}_truncated.JPEG"] = "truncated"
    write(train / SYNSETS[2] / f"{SYNSETS[2]}_empty.JPEG", b"")
    skipped[f"{SYNSETS[2]}_empty.JPEG"] = "empty"
    write(train / SYNSETS[2] / f"{SYNSETS[2]}_text.JPEG", b"this is not an image\n")
    skipped[f"{SYNSETS[2]}_text.JPEG"] = "not a readable image"
    write(train / "n99999999" / "n99999999_0.JPEG", original)
    skipped["n99999999_0.JPEG"] = "not an ImageNet synset"

    # Maps that must not be used; their images are written without a map.
    for index, (suffix, data, words) in enumerate(
        [
            (".png", png_bytes(_blob(width + 3, height)), "but its image is"),
            (".npy", _npy(np.full((height, width), np.nan, np.float32)), "NaN"),
            (".png", png_bytes(Image.new("L", (width, height), 0)), "constant"),
        ]
    ):
        name = f"{SYNSETS[0]}_{index + 2}"
        write(maps / SYNSETS[0] / f"{name}{suffix}", data)
        unused_maps[f"{name}{suffix}"] = words
    write(maps / SYNSETS[0] / "n01440764_missing.png", png_bytes(_blob(width, height)))
    unused_maps["n01440764_missing.png"] = "no image with the stem"
    write(maps / SYNSETS[2] / f"{SYNSETS[2]}_truncated.png", png_bytes(_blob(width, height)))
    unused_maps[f"{SYNSETS[2]}_truncated.png"] = "is skipped"
    return {
        "root": root / "tree",
        "good": good,
        "skipped": skipped,
        "unused_maps": unused_maps,
        "with_map": with_map,
    }


def _blob(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    blob = np.exp(-((x - width / 3) ** 2 + (y - height / 2) ** 2) / (2 * (width / 6) ** 2))
    return Image.fromarray(np.round(blob * 255).astype(np.uint8))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def quirk_build(quirk_tree: dict[str, object], tmp_path_factory: pytest.TempPathFactory):
    root = quirk_tree["root"]
    output = tmp_path_factory.mktemp("quirks") / "records"
    manifest = build.build(
        build.BuildConfig(
            input_dir=str(root),
            output_dir=str(output),
            splits=("train",),
            num_shards={"train": 3},
            maps_dir=str(root / "maps"),
            show_progress=False,
        )
    )
    examples = []
    for serialized in tf.data.TFRecordDataset(sorted(str(p) for p in output.glob("train-*"))):
        features = records.parse(serialized)
        examples.append({key: value.numpy() for key, value in features.items()})
    return manifest, examples


def test_quirks_good_files_written_once(quirk_tree, quirk_build) -> None:
    _, examples = quirk_build
    names = [e[records.FILENAME_KEY].decode() for e in examples]
    assert sorted(names) == sorted(quirk_tree["good"])
    assert len(names) == len(set(names))


def test_quirks_bad_files_reported(quirk_tree, quirk_build) -> None:
    manifest, _ = quirk_build
    reported = {Path(row["file"]).name: row["reason"] for row in manifest["skipped"]}
    assert sorted(reported) == sorted(quirk_tree["skipped"])
    for name, words in quirk_tree["skipped"].items():
        assert words in reported[name], (name, reported[name])


def test_quirks_count_in_equals_out_plus_skips(quirk_build) -> None:
    manifest, examples = quirk_build
    totals = manifest["totals"]
    assert totals["files_found"] == len(examples) + totals["files_skipped"]
    assert manifest["splits"]["train"]["num_examples"] == len(examples)


def test_quirks_unused_maps_reported(quirk_tree, quirk_build) -> None:
    manifest, _ = quirk_build
    reported = {Path(row["map"]).name: row["reason"] for row in manifest["unused_maps"]}
    assert sorted(reported) == sorted(quirk_tree["unused_maps"])
    for name, words in quirk_tree["unused_maps"].items():
        assert words in reported[name], (name, reported[name])


def test_quirks_maps_only_where_valid(quirk_tree, quirk_build) -> None:
    _, examples = quirk_build
    for example in examples:
        name = example[records.FILENAME_KEY].decode()
        has_map = name in quirk_tree["with_map"]
        assert example[records.HAS_MAP_KEY] == int(has_map), name
        assert example[records.MAP_SOURCE_KEY] == (b"file" if has_map else b"none"), name


def test_quirks_png_and_npy_maps_agree(quirk_build) -> None:
    _, examples = quirk_build
    stored = {
        e[records.FILENAME_KEY].decode(): np.asarray(Image.open(io.BytesIO(e[records.MAP_KEY])))
        for e in examples
        if e[records.HAS_MAP_KEY]
    }
    png_map = stored[f"{SYNSETS[0]}_0.JPEG"]
    npy_map = stored[f"{SYNSETS[0]}_1.JPEG"]
    assert png_map.dtype == np.uint8
    assert png_map.min() == 0
    assert png_map.max() == 255
    np.testing.assert_array_equal(png_map, npy_map)


@pytest.mark.parametrize("kind", ["cmyk", "png", "gray"])
def test_quirks_converted_to_rgb_jpeg(quirk_build, kind: str) -> None:
    _, examples = quirk_build
    (example,) = [
        e for e in examples if e[records.FILENAME_KEY] == f"{SYNSETS[1]}_{kind}.JPEG".encode()
    ]
    image = Image.open(io.BytesIO(example[records.IMAGE_KEY]))
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    reference = np.asarray(_small(vendored_photos()[6]), dtype=np.float32)
    converted = np.asarray(image, dtype=np.float32)
    assert converted.shape == reference.shape
    if kind != "gray":
        assert np.abs(converted - reference).mean() < 6.0
    assert example[records.LABEL_KEY] == labels.synset_to_label()[SYNSETS[1]]


def test_quirks_conversions_reported(quirk_build) -> None:
    manifest, _ = quirk_build
    reported = {Path(row["file"]).name: row["reason"] for row in manifest["converted"]}
    assert sorted(reported) == [f"{SYNSETS[1]}_{kind}.JPEG" for kind in ("cmyk", "gray", "png")]
    assert "CMYK" in reported[f"{SYNSETS[1]}_cmyk.JPEG"]
    assert "PNG" in reported[f"{SYNSETS[1]}_png.JPEG"]
    assert "L pixels" in reported[f"{SYNSETS[1]}_gray.JPEG"]
