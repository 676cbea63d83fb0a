"""Raw-pixel baseline "model": a 32x32 thumbnail flattened to a vector.

Evaluation compares every CNN against this baseline: a converted or
configured model whose neighbour quality scores near raw pixels is broken.
It is exported as a SavedModel in the same TF-Hub feature-vector convention
as the CNNs, so the pipeline runs it through exactly the same code path.
"""

from __future__ import annotations

import os

from pipeline.models import cache

INPUT_SIZE = 224
THUMBNAIL_SIZE = 32
DIM = THUMBNAIL_SIZE * THUMBNAIL_SIZE * 3  # 3072
# Bump when the exported computation changes, so old cache entries are not reused.
VERSION = 1
CACHE_ENTRY = f"raw-pixels-{THUMBNAIL_SIZE}-v{VERSION}"


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
