"""The raw-pixel baseline: a 32x32 thumbnail as the feature vector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub

from pipeline.models import raw_pixels


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Export once into a fresh cache dir; yield (path, hub object)."""
    path = raw_pixels.ensure_savedmodel(cache_dir=tmp_path_factory.mktemp("model-cache"))
    return path, hub.load(path)


def _images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 224, 224, 3), dtype=np.float32)


def test_output_is_a_3072_vector_per_image(baseline):
    _, model = baseline
    out = model(_images(0, 3)).numpy()
    assert out.shape == (3, raw_pixels.DIM) == (3, 3072)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_identical_images_give_identical_vectors_and_different_ones_differ(baseline):
    _, model = baseline
    a, b = _images(1, 1), _images(2, 1)
    out = model(np.concatenate([a, b, a])).numpy()
    np.testing.assert_array_equal(out[0], out[2])
    assert not np.allclose(out[0], out[1])


def test_vector_is_an_antialiased_row_major_thumbnail(baseline):
    _, model = baseline
    image = np.zeros((1, 224, 224, 3), np.float32)
    image[0, :, :112, 0] = 1.0  # left half red
    image[0, ::2, 112:, 2] = 1.0  # right half: alternate rows blue (fine detail)
    thumb = model(image).numpy().reshape(32, 32, 3)
    np.testing.assert_allclose(thumb[:, :16, 0], 1.0)
    np.testing.assert_allclose(thumb[:, 16:, 0], 0.0)
    # Area resampling averages the stripes instead of aliasing them to 0 or 1.
    np.testing.assert_allclose(thumb[:, 16:, 2], 0.5, atol=1 / 14 + 1e-6)


def test_savedmodel_follows_the_hub_conventions(baseline):
    path, model = baseline
    serving = model.signatures["serving_default"]
    images = _images(3, 2)
    np.testing.assert_array_equal(serving(images=tf.constant(images))["features"].numpy(),
                                  model(images).numpy())
    assert hub.KerasLayer(path)(images).shape == (2, 3072)


def test_cached_export_is_reused(baseline):
    path, _ = baseline
    assert Path(path).name == raw_pixels.CACHE_ENTRY
    assert raw_pixels.ensure_savedmodel(cache_dir=Path(path).parent) == path
    assert [p.name for p in Path(path).parent.iterdir()] == [raw_pixels.CACHE_ENTRY]
