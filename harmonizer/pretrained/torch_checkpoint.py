"""Read a PyTorch checkpoint of the legacy (pre-1.6) serialization format without torch.

The legacy format is a stream of five pickles followed by raw storage bytes:

1. the magic number ``0x1950A86A20F9469CFC6C``;
2. the protocol version ``1001``;
3. a dict of system information (byte order and the sizes of C types);
4. the saved object (for a checkpoint, a ``collections.OrderedDict`` name -> tensor) in which
   every tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and
   every storage is a persistent id ``("storage", StorageClass, key, location, numel, view)``;
5. the list of storage keys in the order their bytes follow;

and then, for each key, an int64 element count and that many elements in little-endian order.

`load_state_dict` replaces torch's classes by NumPy equivalents while unpickling and refuses
every other global, so reading a checkpoint runs no code from the file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage classes of the legacy format and the little-endian NumPy dtype of one element.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int
    # For a view into another storage: (root key, element offset into the root).
    view_of: tuple[str, int] | None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *unused_args) -> _TensorRef:
    """Stand in for ``torch._utils._rebuild_tensor_v2`` (and ``_rebuild_tensor``)."""
    del unused_args  # requires_grad, backward hooks and metadata do not matter for arrays.
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class _CheckpointUnpickler(pickle.Unpickler):
    """Unpickler that maps torch's tensor and storage globals to NumPy placeholders."""

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(
            f"checkpoint refers to global {module}.{name}, which this reader does not allow; "
            "only tensors, storages and OrderedDict are supported (a state dict)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(
                f"unsupported persistent id {pid!r}: expected a legacy-format storage "
                "('storage', type, key, location, numel, view_metadata)"
            )
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage {key!r} has unknown type {storage_type!r}")
        view_of = None
        if view_metadata is not None:
            _view_key, view_offset, _view_size = view_metadata
            view_of = (str(key), int(view_offset))
            numel = int(_view_size)
        return _StorageRef(str(key), storage_type.dtype, int(numel), view_of)


def _read_storages(stream: io.BufferedIOBase, keys: list[str], dtypes: dict[str, np.dtype]):
    """Read the raw storages that follow the pickles, in the order of ``keys``."""
    storages = {}
    for key in keys:
        header = stream.read(8)
        if len(header) != 8:
            raise ValueError(f"checkpoint is truncated: storage {key!r} has no element count")
        (numel,) = struct.unpack("<q", header)
        dtype = dtypes[key]
        data = stream.read(numel * dtype.itemsize)
        if len(data) != numel * dtype.itemsize:
            raise ValueError(
                f"checkpoint is truncated: storage {key!r} needs {numel * dtype.itemsize} "
                f"bytes, found {len(data)}"
            )
        storages[key] = np.frombuffer(data, dtype=dtype)
    return storages


def _materialize(ref: _TensorRef, storages: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Copy the strided view that ``ref`` describes out of its storage."""
    if ref.storage.view_of is None:
        flat = storages[ref.storage.key]
    else:
        root_key, view_offset = ref.storage.view_of
        flat = storages[root_key][view_offset : view_offset + ref.storage.numel]
    if len(ref.size) != len(ref.stride):
        raise ValueError(f"tensor {name!r}: size {ref.size} and stride {ref.stride} differ")
    if any(s < 0 for s in ref.stride) or ref.offset < 0:
        raise ValueError(f"tensor {name!r}: negative offset or stride is not supported")
    if 0 in ref.size:
        return np.zeros(ref.size, dtype=flat.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= flat.size:
        raise ValueError(
            f"tensor {name!r} reaches element {last} of a storage of {flat.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.size,
        strides=tuple(s * flat.itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, order="C")  # a C-contiguous copy that owns its memory


def load_state_dict(path: str | os.PathLike) -> OrderedDict[str, np.ndarray]:
    """Load a legacy-format PyTorch state dict as NumPy arrays, in the file's order.

    Args:
        path: the ``.pth`` file, as written by ``torch.save`` before PyTorch 1.6 (or with
            ``_use_new_zipfile_serialization=False``).

    Returns:
        Parameter and buffer name -> array with the tensor's shape and dtype (PyTorch layout:
        convolution kernels are ``[out, in / groups, kh, kw]``, dense kernels ``[out, in]``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a legacy-format checkpoint of a state dict, or is
            truncated.
    """
    with open(path, "rb") as stream:
        if stream.read(2) == b"PK":
            raise ValueError(
                f"{os.fspath(path)!r} is a zip-format checkpoint (PyTorch >= 1.6); this reader "
                "supports only the legacy format: re-save it with "
                "torch.save(..., _use_new_zipfile_serialization=False)"
            )
        stream.seek(0)
        try:
            magic = pickle.load(stream)
            if magic != LEGACY_MAGIC_NUMBER:
                raise ValueError(f"magic number {magic!r} is not {LEGACY_MAGIC_NUMBER:#x}")
            version = pickle.load(stream)
            if version != LEGACY_PROTOCOL_VERSION:
                raise ValueError(f"protocol version {version!r} is not {LEGACY_PROTOCOL_VERSION}")
            sys_info = pickle.load(stream)
            if not sys_info.get("little_endian", False):
                raise ValueError("big-endian checkpoints are not supported")
            state = _CheckpointUnpickler(stream).load()
            keys = pickle.load(stream)
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
            raise ValueError(
                f"{os.fspath(path)!r} is not a legacy-format PyTorch checkpoint: {error}"
            ) from error
        except ValueError as error:
            raise ValueError(
                f"{os.fspath(path)!r} is not a legacy-format PyTorch checkpoint: {error}"
            ) from error
        if not isinstance(state, Mapping):
            raise ValueError(
                f"{os.fspath(path)!r} holds a {type(state).__name__}, not a state dict "
                "(a mapping of names to tensors)"
            )

        dtypes = {}
        for name, value in state.items():
            if not isinstance(value, _TensorRef):
                raise ValueError(f"state dict entry {name!r} is a {type(value).__name__}")
            root = value.storage.view_of[0] if value.storage.view_of else value.storage.key
            dtypes[root] = value.storage.dtype
        missing = set(dtypes) - set(keys)
        if missing:
            raise ValueError(f"storages {sorted(missing)} are referenced but not stored")
        # Storages that no tensor uses still occupy bytes, so they are read with their type
        # unknown only when every storage in the file is used.
        unused = [key for key in keys if key not in dtypes]
        if unused:
            raise ValueError(f"storages {unused} are stored but used by no tensor")
        storages = _read_storages(stream, keys, dtypes)

    return OrderedDict((name, _materialize(ref, storages, name)) for name, ref in state.items())
