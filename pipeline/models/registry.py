"""Which image model embeds the catalogue, by name: the older entry points, kept thin.

The registered models and the run's model record live in :mod:`pipeline.models.specs`,
the kinds of model source in :mod:`pipeline.models.sources` (chosen by
:func:`~pipeline.models.sources.model_source`), and loading, engine choice and
inference in :mod:`pipeline.models.handler`. This module keeps the names the launcher
(``pipeline/run.py``), the graph and older callers import: :func:`resolve_model` and
:func:`load_model` are one line over the handler.
"""

from __future__ import annotations

from pipeline.models import engines
from pipeline.models.handler import ModelHandler, input_size_of, resolve
from pipeline.models.sources import OfflineWeights, RawPixels, model_source, savedmodel_digest
from pipeline.models.specs import (
    DEFAULT_INPUT_SIZE,
    MODELS,
    ModelLoadError,
    ModelSpec,
    ResolvedModel,
)

__all__ = ["DEFAULT_INPUT_SIZE", "MODELS", "ModelLoadError", "ModelSpec", "ResolvedModel",
           "input_size_of", "load_model", "resolve_model", "savedmodel_digest",
           "savedmodel_path"]


def savedmodel_path(name: str, cache_dir: str | None = None) -> str:
    """The local SavedModel directory of a registered offline model (converted on first use)."""
    source = model_source(name, cache_dir) if name in MODELS else None
    if not isinstance(source, (OfflineWeights, RawPixels)):
        raise KeyError(f"{name} is not an offline model")
    return source.savedmodel_dir()


def resolve_model(name_or_handle: str, cache_dir: str | None = None,
                  engine: str = "auto") -> ResolvedModel:
    """Load the model once, read its input size and dimension, fix its id and engine.

    Why kept: the launcher's one call; it is :func:`handler.resolve` of the
    source :func:`model_source` chooses, with the command line's engines only.
    """
    if engine not in engines.ENGINES:
        raise ModelLoadError(f"--engine must be one of {engines.ENGINES}, got {engine!r}")
    return resolve(model_source(name_or_handle, cache_dir), engine)


def load_model(resolved: ResolvedModel, threads: int = 0, lanes: int = 1):
    """Load a resolved model on a worker as a callable engine (images → features).

    ``lanes`` is how many calls may run at once (TFLite: one interpreter each,
    sharing ``threads``); the SavedModel engine always has one.
    """
    return ModelHandler(resolved, threads, lanes).load_model()
