"""Tests of `tfrecords.build` and `tfrecords.verify` on the tiny composite tree."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from harmonizer import records
from tfrecords import build, labels, make_tiny, verify
from tfrecords.testing import jpeg_bytes, vendored_photos, write

TINY_SPLITS = make_tiny.SPLITS
TINY_SHARDS = {"train": 4, "val": 2, "val_new_objects": 1}
# (examples, examples with a map) per split of `make_tiny` with seed 0.
TINY_COUNTS = {"train": (203, 124), "val": (51, 31), "val_new_objects": (20, 20)}


def _read_examples(records_dir: Path, split: str) -> list[dict[str, object]]:
    paths = sorted(str(p) for p in records_dir.glob(f"{split}-*-of-*"))
    examples = []
    for serialized in tf.data.TFRecordDataset(paths):
        features = records.parse(serialized)
        examples.append({key: value.numpy() for key, value in features.items()})
    return examples


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "tree"
    make_tiny.make_tiny(root, seed=0)
    return root


@pytest.fixture(scope="module")
def tiny_records(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("tiny") / "records"
    build.build(
        build.BuildConfig(
            input_dir=str(tiny_tree),
            output_dir=str(output),
            maps_dir=str(tiny_tree / "maps"),
            splits=TINY_SPLITS,
            map_source="silhouette",
            num_shards=TINY_SHARDS,
            show_progress=False,
        )
    )
    return output


def test_tiny_build_shard_names(tiny_records: Path) -> None:
    names = sorted(p.name for p in tiny_records.glob("*-of-*"))
    expected = [
        f"{split}-{index:05d}-of-{count:05d}"
        for split, count in TINY_SHARDS.items()
        for index in range(count)
    ]
    assert names == sorted(expected)


@pytest.mark.parametrize("split", TINY_SPLITS)
def test_tiny_build_labels_and_maps_round_trip(
    tiny_tree: Path, tiny_records: Path, split: str
) -> None:
    source_files = {p.name: p for p in (tiny_tree / split).rglob("*.JPEG")}
    examples = _read_examples(tiny_records, split)
    assert sorted(e[records.FILENAME_KEY].decode() for e in examples) == sorted(source_files)

    synset_labels = labels.synset_to_label()
    for example in examples:
        name = example[records.FILENAME_KEY].decode()
        source = source_files[name]
        assert example[records.LABEL_KEY] == synset_labels[source.parent.name], name
        assert example[records.IMAGE_KEY] == source.read_bytes(), name

        map_file = tiny_tree / "maps" / split / source.parent.name / f"{source.stem}.png"
        has_map = map_file.exists()
        assert example[records.HAS_MAP_KEY] == int(has_map), name
        assert example[records.MAP_SOURCE_KEY] == (b"silhouette" if has_map else b"none")
        if has_map:
            stored = np.asarray(Image.open(io.BytesIO(example[records.MAP_KEY])))
            original = np.asarray(Image.open(map_file)).astype(np.float32)
            scaled = (original - original.min()) / (original.max() - original.min()) * 255
            assert stored.dtype == np.uint8
            assert np.abs(stored - scaled).max() <= 0.5, name
        else:
            assert example[records.MAP_KEY] == b"", name


def test_tiny_build_manifest_counts(tiny_records: Path) -> None:
    manifest = json.loads((tiny_records / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["skipped"] == []
    assert manifest["totals"]["files_found"] == sum(n for n, _ in TINY_COUNTS.values())
    for split, (num_examples, num_with_map) in TINY_COUNTS.items():
        assert manifest["splits"][split]["num_examples"] == num_examples, split
        assert manifest["splits"][split]["num_with_map"] == num_with_map, split


def test_tiny_build_verifies(tiny_records: Path) -> None:
    report = verify.verify(str(tiny_records), num_decode=20)
    assert report.errors == []
    assert report.examples_read == sum(n for n, _ in TINY_COUNTS.values())
    assert report.examples_decoded == 20


def test_tiny_build_reads_with_tfds(tiny_records: Path) -> None:
    builder = tfds.builder_from_directory(str(tiny_records))
    for split, (num_examples, _) in TINY_COUNTS.items():
        assert builder.info.splits[split].num_examples == num_examples, split
    examples = list(builder.as_dataset(split="val").as_numpy_iterator())
    plain = {e[records.FILENAME_KEY]: e for e in _read_examples(tiny_records, "val")}
    assert len(examples) == TINY_COUNTS["val"][0]
    for example in examples:
        reference = plain[example["image"]["filename"]]
        assert example["image"]["class"]["label"] == reference[records.LABEL_KEY]
        assert example["map"]["has_map"] == reference[records.HAS_MAP_KEY]
        assert example["image"]["encoded"].shape[-1] == 3


def test_tiny_build_rerun_writes_nothing(tiny_tree: Path, tiny_records: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_records.glob("*-of-*")}
    manifest = build.build(
        build.BuildConfig(
            input_dir=str(tiny_tree),
            output_dir=str(tiny_records),
            maps_dir=str(tiny_tree / "maps"),
            splits=TINY_SPLITS,
            map_source="silhouette",
            num_shards=TINY_SHARDS,
            show_progress=False,
        )
    )
    after = {p.name: p.stat().st_mtime_ns for p in tiny_records.glob("*-of-*")}
    assert after == before
    assert manifest == json.loads((tiny_records / "manifest.json").read_text())


def _small_jpeg(photo: Path, size: tuple[int, int] = (64, 48)) -> bytes:
    image = Image.open(photo).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return jpeg_bytes(image)


@pytest.fixture(scope="module")
def three_class_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train tree of 3 classes x 10 distinct real photos, in class order on disk."""
    root = tmp_path_factory.mktemp("three") / "tree"
    photos = vendored_photos()
    for class_index, synset in enumerate(labels.synsets()[:3]):
        for index in range(10):
            photo = photos[class_index * 10 + index]
            write(root / "train" / synset / f"{synset}_{index}.JPEG", _small_jpeg(photo))
    return root


def _three_class_config(tree: Path, output: Path, **overrides) -> build.BuildConfig:
    arguments = {
        "input_dir": str(tree),
        "output_dir": str(output),
        "splits": ("train",),
        "num_shards": {"train": 3},
        "show_progress": False,
    }
    arguments.update(overrides)
    return build.BuildConfig(**arguments)


def test_build_first_shard_mixes_classes(three_class_tree: Path, tmp_path: Path) -> None:
    build.build(_three_class_config(three_class_tree, tmp_path))
    first = tf.data.TFRecordDataset(str(tmp_path / "train-00000-of-00003"))
    shard_labels = [int(records.parse(s)[records.LABEL_KEY]) for s in first]
    assert len(shard_labels) == 10
    assert len(set(shard_labels)) > 1


def test_build_seed_changes_shuffle(three_class_tree: Path, tmp_path: Path) -> None:
    first = build.build(_three_class_config(three_class_tree, tmp_path / "a", seed=0))
    second = build.build(_three_class_config(three_class_tree, tmp_path / "b", seed=1))
    assert first["plan_sha256"] != second["plan_sha256"]
    assert first["splits"]["train"]["examples_per_class"] == {"0": 10, "1": 10, "2": 10}
    assert second["splits"]["train"]["examples_per_class"] == {"0": 10, "1": 10, "2": 10}


def test_build_two_workers_same_output(three_class_tree: Path, tmp_path: Path) -> None:
    one = build.build(_three_class_config(three_class_tree, tmp_path / "one", num_workers=1))
    two = build.build(_three_class_config(three_class_tree, tmp_path / "two", num_workers=2))
    assert one == two
    for name in ("train-00000-of-00003", "train-00002-of-00003"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_build_rejects_other_arguments_in_output_dir(
    three_class_tree: Path, tmp_path: Path
) -> None:
    build.build(_three_class_config(three_class_tree, tmp_path, seed=0))
    with pytest.raises(ValueError, match="--overwrite"):
        build.build(_three_class_config(three_class_tree, tmp_path, seed=5))
    manifest = build.build(_three_class_config(three_class_tree, tmp_path, seed=5, overwrite=True))
    assert manifest["arguments"]["seed"] == 5
    assert verify.verify(str(tmp_path)).errors == []


def test_build_flat_validation_labels(tmp_path: Path) -> None:
    photos = vendored_photos()
    for number in (1, 2, 50000):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        write(tmp_path / "tree" / "val" / name, _small_jpeg(photos[number % len(photos)]))
    write(tmp_path / "tree" / "val" / "README.txt", b"not an image")
    manifest = build.build(
        build.BuildConfig(
            input_dir=str(tmp_path / "tree"),
            output_dir=str(tmp_path / "records"),
            splits=("val",),
            num_shards={"val": 1},
            show_progress=False,
        )
    )
    examples = _read_examples(tmp_path / "records", "val")
    by_name = {e[records.FILENAME_KEY].decode(): int(e[records.LABEL_KEY]) for e in examples}
    expected = {
        f"ILSVRC2012_val_{n:08d}.JPEG": labels.synset_to_label()[labels.validation_synsets()[n - 1]]
        for n in (1, 2, 50000)
    }
    assert by_name == expected
    assert by_name["ILSVRC2012_val_00000001.JPEG"] == 65
    assert [row["file"] for row in manifest["skipped"]] == ["val/README.txt"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_shards": {"train": 0}}, "num_shards needs a count >= 1 for split 'train'"),
        ({"num_shards": {"val": 2}}, "num_shards needs a count >= 1 for split 'train'"),
        ({"map_source": "clickme"}, "map_source must be one of"),
        ({"splits": ("train", "train")}, "splits must be distinct"),
        ({"unmatched_clickme": "drop"}, "unmatched_clickme must be one of"),
        ({"clickme_files": {"test": "x*"}}, "clickme_files names splits"),
        ({"num_workers": 0}, "num_workers must be >= 1"),
        ({"max_shorter_side": -1}, "max_shorter_side and map_blur_sigma must be >= 0"),
    ],
)
def test_build_config_rejects(overrides: dict[str, object], message: str, tmp_path: Path) -> None:
    config = _three_class_config(tmp_path, tmp_path / "out", **overrides)
    with pytest.raises(ValueError, match=message):
        config.validate()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8", {"train": 8, "val": 8}), ("train=1024,val=128", {"train": 1024, "val": 128})],
)
def test_parse_num_shards(text: str, expected: dict[str, int]) -> None:
    assert build.parse_num_shards(text, ["train", "val"]) == expected


def test_parse_num_shards_rejects_text() -> None:
    with pytest.raises(ValueError, match="--num_shards must be a count"):
        build.parse_num_shards("train=many", ["train"])


def test_build_through_gfile_scheme() -> None:
    """Read and write on TensorFlow's in-memory `ram://` file system, as for gs://."""
    photos = vendored_photos()[:6]
    for photo in photos:
        folder = f"ram://gfile_test/in/train/{photo.parent.name}"
        tf.io.gfile.makedirs(folder)
        with tf.io.gfile.GFile(f"{folder}/{photo.name}", "wb") as f:
            f.write(photo.read_bytes())
    manifest = build.build(
        build.BuildConfig(
            input_dir="ram://gfile_test/in",
            output_dir="ram://gfile_test/out",
            splits=("train",),
            num_shards={"train": 2},
            show_progress=False,
            tfds_metadata=False,
        )
    )
    assert manifest["totals"]["examples"] == len(photos)
    assert sorted(tf.io.gfile.listdir("ram://gfile_test/out")) == [
        "manifest.json",
        "train-00000-of-00002",
        "train-00001-of-00002",
    ]
    report = verify.verify("ram://gfile_test/out")
    assert report.errors == []
    assert report.examples_read == len(photos)


@pytest.fixture()
def three_class_records(three_class_tree: Path, tmp_path: Path) -> Path:
    build.build(_three_class_config(three_class_tree, tmp_path))
    return tmp_path


def test_verify_detects_corrupt_shard(three_class_records: Path) -> None:
    shard = three_class_records / "train-00001-of-00003"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    errors = verify.verify(str(three_class_records)).errors
    assert any("train-00001-of-00003: corrupt TFRecord data" in e for e in errors), errors


def test_verify_detects_missing_shard(three_class_records: Path) -> None:
    (three_class_records / "train-00002-of-00003").unlink()
    errors = verify.verify(str(three_class_records)).errors
    assert "train-00002-of-00003: file missing" in errors
    assert any("examples per class differ" in e for e in errors), errors


def test_verify_detects_checksum_mismatch(three_class_records: Path) -> None:
    manifest_path = three_class_records / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    errors = verify.verify(str(three_class_records)).errors
    assert len(errors) == 1
    assert errors[0].startswith("train-00000-of-00003: sha256 is ")
