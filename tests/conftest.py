"""Shared fixtures: a tiny SavedModel in the TF-Hub convention and generated catalogues."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

REPO = Path(__file__).resolve().parents[1]
SHARED_PRODUCTS = REPO.parent / "shared" / "data" / "products"

TINY_SIZE = 32
TINY_DIM = 24


def export_tiny_model(path: str, size: int = TINY_SIZE, dim: int = TINY_DIM,
                      tflite_compatible: bool = True) -> str:
    """A small, deterministic image feature-vector SavedModel (TF-Hub convention).

    Colour histograms and a coarse spatial layout make similar pictures get
    similar vectors, which is all the pipeline tests need from a model.
    ``tflite_compatible=False`` uses an op TFLite lacks (area resize), to test
    the fallback to the SavedModel engine.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    projection = rng.normal(size=(3 * 4 * 4 + 3, dim)).astype(np.float32)

    class TinyFeatures(tf.Module):
        def __init__(self):
            super().__init__()
            self.projection = tf.Variable(projection, trainable=False)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def __call__(self, images):
            if tflite_compatible:
                pooled = tf.nn.avg_pool2d(images, size // 4, size // 4, "VALID")
            else:
                pooled = tf.image.resize(images, (4, 4), method="area")
            flat = tf.reshape(pooled, (-1, 4 * 4 * 3))
            means = tf.reduce_mean(images, axis=(1, 2))
            features = tf.concat([flat - 0.5, means - 0.5], axis=1)
            return tf.nn.relu(tf.matmul(features, self.projection)) + 1e-3

    module = TinyFeatures()
    tf.saved_model.save(module, path, signatures={"serving_default": module.__call__})
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of the tiny SavedModel, exported once per test session."""
    return export_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


def shape_image(kind: str, color: tuple, size: int = 96) -> Image.Image:
    """A product-like picture: one coloured shape on a white background."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    m = size // 6
    if kind == "square":
        draw.rectangle([m, m, size - m, size - m], fill=color)
    elif kind == "disc":
        draw.ellipse([m, m, size - m, size - m], fill=color)
    elif kind == "bar":
        draw.rectangle([m, size // 3, size - m, 2 * size // 3], fill=color)
    else:
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=color)
    return image


FAMILIES = [("square", (200, 30, 30)), ("disc", (30, 30, 200)), ("bar", (30, 160, 30)),
            ("triangle", (220, 180, 20)), ("disc", (160, 40, 160)), ("square", (20, 150, 160))]


def write_catalog(directory: Path, families=FAMILIES, copies: int = 3,
                  bad: dict | None = None) -> Path:
    """Generated product images (families of near-copies) and their catalog.csv.

    ``bad`` maps product ids to raw bytes written as their image (broken inputs).
    """
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for f, (kind, color) in enumerate(families):
        base = shape_image(kind, color)
        for c in range(copies):
            variant = base if c == 0 else (ImageOps.mirror(base) if c == 1 else
                                           base.rotate(3 * c, fillcolor="white"))
            pid = f"p{f:02d}-{c}"
            variant.save(images / f"{pid}.jpg", quality=92)
            rows.append({"product_id": pid, "image": f"images/{pid}.jpg", "family": f"f{f}"})
    for pid, data in (bad or {}).items():
        (images / f"{pid}.jpg").write_bytes(data)
        rows.append({"product_id": pid, "image": f"images/{pid}.jpg", "family": "bad"})
    manifest = directory / "catalog.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["product_id", "image", "family"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Converted offline models are cached once per test session, not in the user's cache.
os.environ.setdefault("SIMILARITY_CACHE_DIR", tempfile.mkdtemp(prefix="vs-test-models-"))
