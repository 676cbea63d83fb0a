"""Raw-pixel baseline "model": a 32x32 thumbnail flattened to a vector.

Evaluation compares every CNN against this baseline: a converted or
configured model whose neighbour quality scores near raw pixels is broken.
It is exported as a SavedModel in the same TF-Hub feature-vector convention
as the CNNs, so the pipeline runs it through exactly the same code path;
:func:`thumbnail_vectors` computes the same floats with numpy alone, for a
caller that should not start TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.models import cache

INPUT_SIZE = 224
THUMBNAIL_SIZE = 32
DIM = THUMBNAIL_SIZE * THUMBNAIL_SIZE * 3  # 3072
# Bump when the exported computation changes, so old cache entries are not reused.
VERSION = 1
CACHE_ENTRY = f"raw-pixels-{THUMBNAIL_SIZE}-v{VERSION}"
_BLOCK = INPUT_SIZE // THUMBNAIL_SIZE  # 7: each thumbnail pixel averages a 7x7 block


def _hub_module():
    """Build the ``tf.Module`` and its ``serving_default`` function."""
    import tensorflow as tf

    image_spec = tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32, name="images")

    class RawPixelsFeatureVector(tf.Module):
        # Reusable-SavedModel attributes (no weights); they shadow tf.Module's
        # computed properties so they are saved as plain attributes.
        variables = None
        trainable_variables = None
        regularization_losses = None

        def __init__(self) -> None:
            super().__init__(name="raw_pixels")
            self.variables = []
            self.trainable_variables = []
            self.regularization_losses = []

        @tf.function(input_signature=[image_spec])
        def __call__(self, images):
            # Area resampling averages each 7x7 block: an antialiased thumbnail.
            small = tf.image.resize(images, [THUMBNAIL_SIZE, THUMBNAIL_SIZE], method="area")
            return tf.reshape(small, [-1, DIM])

    module = RawPixelsFeatureVector()

    @tf.function(input_signature=[image_spec])
    def serving_default(images):
        return {"features": module(images)}

    return module, serving_default


def export_savedmodel(target_dir: str | os.PathLike) -> None:
    """Write the raw-pixel baseline SavedModel to ``target_dir``.

    Why: lets the baseline be loaded with ``tensorflow_hub.load`` like any
    other model: ``obj(images [B, 224, 224, 3] in [0, 1]) -> [B, 3072]``.
    """
    import tensorflow as tf

    module, serving = _hub_module()
    tf.saved_model.save(module, str(target_dir), signatures={"serving_default": serving})


def ensure_savedmodel(cache_dir: str | os.PathLike | None = None) -> str:
    """Return the path of the cached baseline SavedModel, exporting it on first use.

    Why: same atomic per-user cache as the converted CNNs, so the pipeline
    resolves every model to a local SavedModel directory the same way.
    """
    return cache.ensure_cached_dir(CACHE_ENTRY, export_savedmodel, root=cache_dir)


def thumbnail_vectors(images: np.ndarray) -> np.ndarray:
    """The baseline's vectors of float32 [B, 224, 224, 3] images, computed with numpy.

    Why: the baseline needs no TensorFlow, and a caller without it gets bit for
    bit what the SavedModel returns. TensorFlow's area resize at a whole-number
    factor adds each block row's 7 values in float32, left to right, adds the 7
    row sums top to bottom, then multiplies by float32(1/49); the same additions
    in the same order give the same floats (``tests/test_model_handler.py``).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise ValueError(f"images have shape {images.shape}; the baseline takes "
                         f"[batch, {INPUT_SIZE}, {INPUT_SIZE}, 3]")
    blocks = images.reshape(len(images), THUMBNAIL_SIZE, _BLOCK, THUMBNAIL_SIZE, _BLOCK, 3)
    total = np.zeros((len(images), THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), np.float32)
    for row in range(_BLOCK):
        row_sum = np.zeros_like(total)
        for column in range(_BLOCK):
            row_sum += blocks[:, :, row, :, column, :]
        total += row_sum
    total *= np.float32(1.0 / (_BLOCK * _BLOCK))
    return total.reshape(len(images), DIM)
