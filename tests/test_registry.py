"""Model resolution: sizes read from the model, stable ids, one-sentence failures."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from pipeline.models.registry import MODELS, ModelLoadError, load_model, resolve_model
from tests.conftest import TINY_DIM, TINY_SIZE, export_tiny_model


def test_local_savedmodel_sizes_come_from_the_model(tiny_model):
    resolved = resolve_model(tiny_model)
    assert (resolved.input_size, resolved.dim) == (TINY_SIZE, TINY_DIM)
    images = np.random.default_rng(0).random((2, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    out = load_model(resolved)(images)
    assert out.shape == (2, TINY_DIM)


def test_tflite_engine_matches_the_savedmodel(tiny_model):
    fast = resolve_model(tiny_model)  # auto: TFLite where it converts and agrees
    slow = resolve_model(tiny_model, engine="savedmodel")
    assert (fast.engine, slow.engine) == ("tflite", "savedmodel")
    assert fast.model_id == slow.model_id  # same weights, same id, whatever runs them
    images = np.random.default_rng(1).random((5, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    a, b = load_model(fast)(images), load_model(slow)(images)
    cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.999



@pytest.mark.parametrize("engine", ["tflite", "savedmodel"])
def test_embedding_uint8_pixels_equals_embedding_their_unit_floats(tiny_model, engine):
    model = load_model(resolve_model(tiny_model, engine=engine))
    rng = np.random.default_rng(2)
    pixels = [rng.integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8) for _ in range(3)]
    floats = np.stack(pixels).astype(np.float32) / 255.0
    np.testing.assert_allclose(model.embed_pixels(pixels), model(floats), rtol=1e-5, atol=1e-6)
    # A different batch size afterwards re-plans the interpreter, same answers.
    np.testing.assert_allclose(model.embed_pixels(pixels[:1]), model(floats[:1]),
                               rtol=1e-5, atol=1e-6)
    if engine == "tflite":  # it writes into a fixed-shape input tensor
        with pytest.raises(ValueError, match="shape"):
            model.embed_pixels([np.zeros((TINY_SIZE + 1, TINY_SIZE, 3), np.uint8)])

def test_model_id_names_the_weights(tiny_model, tmp_path):
    first = resolve_model(tiny_model)
    assert first.model_id == resolve_model(tiny_model).model_id
    other = export_tiny_model(str(tmp_path / "other"), dim=TINY_DIM + 1)
    assert resolve_model(other).model_id.split("@")[1] != first.model_id.split("@")[1]


def test_model_tflite_cannot_run_falls_back_or_fails_clearly(tmp_path):
    path = export_tiny_model(str(tmp_path / "area"), tflite_compatible=False)
    assert resolve_model(path).engine == "savedmodel"
    with pytest.raises(ModelLoadError, match="--engine=tflite: cannot convert"):
        resolve_model(path, engine="tflite")


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ModelLoadError, match="efficientnet_lite0"):
        resolve_model("efficientnet_b99")


def test_unreachable_hub_handle_is_one_sentence():
    with socket.socket() as sock:  # a port on which nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    handle = f"http://127.0.0.1:{port}/google/imagenet/model/5"
    with pytest.raises(ModelLoadError) as info:
        resolve_model(handle)
    message = str(info.value)
    assert message.startswith(f"cannot reach 127.0.0.1:{port} to load {handle}")
    assert "efficientnet_lite0" in message


def test_registry_knows_each_models_shape():
    assert MODELS["efficientnet_lite0"].offline and MODELS["efficientnet_lite0"].dim == 1280
    assert MODELS["efficientnet_lite2"].input_size == 260
    assert not MODELS["mobilenet_v2_140_224"].offline
    assert MODELS["mobilenet_v2_140_224"].handle.startswith("https://tfhub.dev/")
