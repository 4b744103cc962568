"""Tests of `tfrecords.build` and `tfrecords.verify` on the tiny composite tree."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from harmonizer import records
from tfrecords import build, labels, make_tiny, verify


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
            map_source="silhouette",
            num_shards={"train": 4, "val": 2},
            show_progress=False,
        )
    )
    return output


def test_tiny_build_shard_names(tiny_records: Path) -> None:
    names = sorted(p.name for p in tiny_records.iterdir() if p.name != "manifest.json")
    expected = [f"train-{i:05d}-of-00004" for i in range(4)]
    expected += [f"val-{i:05d}-of-00002" for i in range(2)]
    assert names == expected


@pytest.mark.parametrize("split", ["train", "val"])
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
    assert manifest["totals"]["files_found"] == 243
    assert manifest["splits"]["train"]["num_examples"] == 203
    assert manifest["splits"]["train"]["num_with_map"] == 124
    assert manifest["splits"]["val"]["num_examples"] == 40
    assert manifest["splits"]["val"]["num_with_map"] == 20


def test_tiny_build_verifies(tiny_records: Path) -> None:
    report = verify.verify(str(tiny_records), num_decode=20)
    assert report.errors == []
    assert report.examples_read == 243
    assert report.examples_decoded == 20


def test_tiny_build_rerun_writes_nothing(tiny_tree: Path, tiny_records: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_records.glob("*-of-*")}
    manifest = build.build(
        build.BuildConfig(
            input_dir=str(tiny_tree),
            output_dir=str(tiny_records),
            maps_dir=str(tiny_tree / "maps"),
            map_source="silhouette",
            num_shards={"train": 4, "val": 2},
            show_progress=False,
        )
    )
    after = {p.name: p.stat().st_mtime_ns for p in tiny_records.glob("*-of-*")}
    assert after == before
    assert manifest == json.loads((tiny_records / "manifest.json").read_text())
