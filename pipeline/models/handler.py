"""The model handler: fix a run's model once, then load and run it wherever it embeds.

Shaped like Apache Beam's ``ModelHandler`` (``apache_beam.ml.inference.base``), without
its graph code:

* :func:`resolve` runs once in the launcher. Given a :class:`~pipeline.models.sources.ModelSource`
  it loads the model, reads its input size and dimension from the model itself, fixes
  its id (name + weights digest) and chooses the engine (:func:`choose_engine`: the
  TFLite conversion where it agrees with the SavedModel on a probe batch, a choice
  remembered next to the conversion so the next run starts from the TFLite file
  alone). The answer is a :class:`~pipeline.models.specs.ResolvedModel` of plain values.
* :class:`ModelHandler` is built from those values on every worker: ``load_model()``
  once per process (shared by every thread, ``share_across_threads``), then
  ``run_inference(batch, model)`` per batch of pixels, with the batch size
  (``batch_elements_kwargs``) and concurrent calls (``lanes``) that measured fastest
  for the engine.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from pipeline.models import engines
from pipeline.models.sources import ModelSource, PrecomputedVectors, source_for
from pipeline.models.specs import ModelLoadError, ResolvedModel

VERIFIED_FILE = "verified.json"
# Minimum cosine between TFLite and SavedModel embeddings on the probe batch.
MIN_PROBE_COSINE = 0.999

_log = logging.getLogger(__name__)


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


def verified_tflite(model_id: str, cache_dir: str | None = None) -> str | None:
    """The cached ``.tflite`` of ``model_id`` if an earlier run verified it, else None.

    Lets a run start without loading TensorFlow and the SavedModel at all. The
    entry must also match its digest record: a damaged one is rebuilt on the
    slow path instead of being handed to the interpreter.
    """
    path = engines.cached_tflite(model_id, cache_dir)
    if path is None:
        return None
    try:
        with open(os.path.join(os.path.dirname(path), VERIFIED_FILE)) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("model_id") != model_id \
            or not isinstance(record.get("min_cosine"), (int, float)) \
            or record["min_cosine"] < MIN_PROBE_COSINE:
        return None
    return path


def record_verification(tflite_path: str, model_id: str, cosine: float) -> None:
    """Remember that this conversion matched the SavedModel on the probe batch.

    Best effort: in a read-only cache the record is not written and later runs
    just take the slower start-up path that checks the conversion again.
    """
    from pipeline import files

    try:
        files.write_json(os.path.join(os.path.dirname(tflite_path), VERIFIED_FILE),
                         {"model_id": model_id, "min_cosine": cosine})
    except OSError as exc:
        _log.debug("cannot record the TFLite verification: %s", exc)


def choose_engine(requested: str, model, source: ModelSource, model_id: str, size: int) -> str:
    """The engine a run uses: TFLite where it converts and matches, else the SavedModel.

    Why: TFLite runs faster on CPUs (bench/MEASUREMENTS.md, "Model engines"),
    but only a conversion that gives the SavedModel's embeddings (cosine >=
    ``MIN_PROBE_COSINE`` on a fixed probe batch) may stand in for it; the match
    is recorded for :func:`verified_tflite`.
    ``--engine=tflite`` turns a failed conversion or a mismatch into an error.
    """
    if requested == "savedmodel":
        return "savedmodel"
    local_dir = source.savedmodel_dir()
    probe = engines.probe_images(size)
    try:
        tflite_path = engines.ensure_tflite(local_dir, model_id, source.cache_dir)
        tflite = engines.TfliteEngine(tflite_path)
        cosine = engines.min_cosine(tflite(probe), engines.SavedModelEngine(model)(probe))
    except Exception as exc:  # noqa: BLE001 - any conversion failure means "use TF"
        if requested == "tflite":
            raise ModelLoadError(f"--engine=tflite: cannot convert {model_id} to TFLite: "
                                 f"{exc}") from exc
        _log.warning("TFLite conversion of %s failed (%s); running the SavedModel", model_id, exc)
        return "savedmodel"
    if cosine < MIN_PROBE_COSINE:
        if requested == "tflite":
            raise ModelLoadError(f"--engine=tflite: the TFLite conversion of {model_id} "
                                 f"disagrees with the SavedModel (cosine {cosine:.4f})")
        _log.warning("TFLite conversion of %s disagrees (cosine %.4f); running the SavedModel",
                     model_id, cosine)
        return "savedmodel"
    record_verification(tflite_path, model_id, cosine)
    return "tflite"


def _feature_dim(engine, size: int, label: str) -> int:
    probe = engine(np.zeros((1, size, size, 3), dtype=np.float32))
    if probe.ndim != 2:
        raise ModelLoadError(f"{label} returns shape {probe.shape}; an image feature-vector "
                             f"model returns [batch, dim]")
    return int(probe.shape[1])


def resolve(source: ModelSource, engine: str = "auto") -> ResolvedModel:
    """Fix the source's model for a run: id, input size, dimension and engine.

    Why: once, in the launcher, so every worker runs the same model the same way
    and every feature row names it. Engines: ``auto``, ``tflite``, ``savedmodel``
    and the source's own (the raw-pixel baseline's ``numpy``). A registered
    offline model whose TFLite conversion an earlier run verified resolves from
    the cache without TensorFlow. Precomputed vectors resolve to their facts.
    """
    if isinstance(source, PrecomputedVectors):
        return source.facts()
    allowed = engines.ENGINES + source.native_engines
    if engine not in allowed:
        raise ModelLoadError(f"--engine must be one of {allowed}, got {engine!r}")
    if engine in source.native_engines:
        size = source.default_input_size()
        dim = _feature_dim(source.native_engine(engine), size, source.label)
        return ResolvedModel(name=source.name, handle=source.handle, model_id=source.model_id(),
                             input_size=size, dim=dim, cache_dir=source.cache_dir, engine=engine)
    if source.offline and engine != "savedmodel":
        # Fast start: an earlier run converted and verified this exact model.
        model_id = source.model_id()
        verified = verified_tflite(model_id, source.cache_dir)
        if verified is not None:
            size, dim = engines.tflite_shapes(engines.TfliteEngine(verified))
            return ResolvedModel(name=source.name, handle=source.handle, model_id=model_id,
                                 input_size=size, dim=dim, cache_dir=source.cache_dir,
                                 engine="tflite")
    model = source.load_savedmodel()
    digest = source.digest()
    size = input_size_of(model) or source.default_input_size()
    dim = _feature_dim(engines.SavedModelEngine(model), size, source.label)
    model_id = source.model_id(digest)
    chosen = choose_engine(engine, model, source, model_id, size)
    return ResolvedModel(name=source.name, handle=source.handle, model_id=model_id,
                         input_size=size, dim=dim, cache_dir=source.cache_dir, engine=chosen)


class ModelHandler:
    """A resolved model on a worker: load it once, run batches of pixels through it.

    ``threads`` is the worker's inference threads (0: the engine's default),
    ``lanes`` the model calls that may run at once (0: the engine's best, see
    ``engines.lanes_for``), ``batch_size`` the images per call (0: the engine's
    measured best). Holds plain values only, so it travels inside a DoFn.
    """

    # One loaded model serves every thread of a process: the TFLite engine hands
    # each call its own interpreter (lanes), TensorFlow and numpy are thread-safe.
    share_across_threads = True

    def __init__(self, model: ResolvedModel, threads: int = 0, lanes: int = 0,
                 batch_size: int = 0):
        self.model = model
        self.source = source_for(model)
        self.threads = threads
        self.lanes = engines.lanes_for(model.engine, threads, lanes)
        self._batch_size = batch_size

    # --- the facts the manifest records --------------------------------------

    @property
    def model_id(self) -> str:
        """The id written into every feature row (``name@digest``)."""
        return self.model.model_id

    @property
    def digest(self) -> str:
        """The weights digest part of the id ("" for precomputed vectors)."""
        return self.model.model_id.partition("@")[2]

    @property
    def dim(self) -> int:
        """Length of the vectors the model returns."""
        return self.model.dim

    @property
    def input_size(self) -> int:
        """Side of the square images the model takes (0 for precomputed vectors)."""
        return self.model.input_size

    @property
    def engine(self) -> str:
        """``tflite``, ``savedmodel``, ``numpy`` or ``external`` (nothing to run)."""
        return self.model.engine

    # --- running -------------------------------------------------------------

    def _require_inference(self) -> None:
        if isinstance(self.source, PrecomputedVectors):
            raise self.source.refusal()

    @property
    def batch_size(self) -> int:
        """Images per model call: the one given, else what measured fastest for the engine."""
        self._require_inference()
        return self._batch_size or engines.preferred_batch(self.engine)

    def batch_elements_kwargs(self) -> dict[str, int]:
        """Arguments for ``beam.BatchElements``: fixed-size batches of :attr:`batch_size`.

        Why fixed: the TFLite interpreter is re-planned whenever the batch size
        changes, so only a bundle's tail may be smaller.
        """
        size = self.batch_size
        return {"min_batch_size": size, "max_batch_size": size}

    def shared_tag(self) -> str:
        """Key of the one loaded model per process (same model, threads and lanes)."""
        return f"{self.model_id}/{self.threads}/{self.lanes}"

    def load_model(self):
        """The engine that runs the model here (``embed_pixels(list of uint8 images)``).

        A TFLite file an earlier start-up verified loads without TensorFlow;
        otherwise the conversion is taken from (or made into) the cache. Raises
        :class:`ModelLoadError` for precomputed vectors: there is nothing to run.
        """
        self._require_inference()
        if self.engine in self.source.native_engines:
            return self.source.native_engine(self.engine)
        if self.engine == "tflite":
            path = verified_tflite(self.model_id, self.model.cache_dir) or engines.ensure_tflite(
                self.source.savedmodel_dir(), self.model_id, self.model.cache_dir)
            return engines.TfliteEngine(path, self.threads, self.lanes)
        return engines.SavedModelEngine(self.source.load_savedmodel())

    def run_inference(self, batch: list[np.ndarray], model) -> np.ndarray:
        """float32 [B, dim] vectors of a batch of uint8 [S, S, 3] images, not yet normalised.

        Why not normalised here: the caller L2-normalises and turns a zero or
        non-finite row into an error row of its own, per image.
        """
        self._require_inference()
        return np.asarray(model.embed_pixels(batch), dtype=np.float32)
