"""Embed decoded images with the run's model: batched, one model per worker process.

The model is loaded once per worker process (Beam's ``Shared``), batches come
from ``BatchElements``, and each output row is a feature row of the contract:
product id, image, the L2-normalised float32 embedding, the model id, the
sha256 of the image bytes, the original width and height, and the carried
manifest columns. A batch the model rejects is retried image by image so one
bad image costs one error row, not the batch.
"""

from __future__ import annotations


import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipeline.models.registry import ResolvedModel, load_model
from transforms.errors import ERRORS, METRICS_NAMESPACE, STAGE_EMBED, count_failure, error_record


class _ModelHolder:
    """Weak-referenceable box, as Beam's ``Shared`` requires."""

    def __init__(self, model):
        self.model = model


def configure_tf_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools so worker processes don't oversubscribe cores.

    Must run before TensorFlow starts its runtime in the process; if it already
    has (an in-process runner that loaded the model at start-up), it is a no-op.
    """
    if threads <= 0:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    except RuntimeError:
        pass


def normalize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise rows; also return which rows were usable (finite, non-zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
    usable = finite & (norms > 1e-12)
    safe = np.where(usable, norms, 1.0).astype(np.float32)
    return (vectors / safe[:, None]).astype(np.float32), usable


def feature_row(row: dict, embedding: np.ndarray, model_id: str) -> dict:
    """The Parquet feature row of one embedded image (carried columns flattened in)."""
    out = {
        "product_id": row["product_id"],
        "image": row["image"],
        "embedding": embedding,
        "model": model_id,
        "sha256": row.get("sha256"),
        "width": row.get("width"),
        "height": row.get("height"),
        "etag": row.get("etag"),
        "last_modified": row.get("last_modified"),
    }
    out.update(row.get("extra") or {})
    return out


class EmbedBatchFn(beam.DoFn):
    """Embed a batch of decoded rows; failures go to the ``errors`` output."""

    def __init__(self, model: ResolvedModel, threads: int, shared_handle: shared.Shared):
        self._model_info = model
        self._threads = threads
        self._shared = shared_handle
        self._model = None
        self._embedded = Metrics.counter(METRICS_NAMESPACE, "embedded")
        self._batch_size = Metrics.distribution(METRICS_NAMESPACE, "embed_batch_size")

    def setup(self):
        info = self._model_info
        if info.engine == "savedmodel":  # the TFLite engine never starts TensorFlow
            configure_tf_threads(self._threads)
        holder = self._shared.acquire(lambda: _ModelHolder(load_model(info, self._threads)),
                                      tag=info.model_id)
        self._model = holder.model

    def _embed_rows(self, rows: list[dict]):
        try:
            return self._model.embed_pixels([r["pixels"] for r in rows]), None
        except Exception as exc:  # noqa: BLE001 - isolated per image below
            return None, exc

    def process(self, batch: list[dict]):
        self._batch_size.update(len(batch))
        vectors, failure = self._embed_rows(batch)
        if failure is None:
            results = list(zip(batch, vectors))
        else:
            results = []
            for row in batch:
                single, exc = self._embed_rows([row])
                if exc is not None:
                    count_failure(STAGE_EMBED, "model_error")
                    yield pvalue.TaggedOutput(ERRORS, error_record(
                        row, STAGE_EMBED, "model_error",
                        f"the model failed on this image: {type(exc).__name__}: {exc}"))
                else:
                    results.append((row, single[0]))
        if not results:
            return
        normalized, usable = normalize_rows(np.stack([v for _, v in results]))
        for (row, _), vector, ok in zip(results, normalized, usable):
            if not ok:
                count_failure(STAGE_EMBED, "bad_vector")
                yield pvalue.TaggedOutput(ERRORS, error_record(
                    row, STAGE_EMBED, "bad_vector",
                    "the model returned a zero or non-finite vector for this image"))
                continue
            self._embedded.inc()
            yield feature_row(row, vector, self._model_info.model_id)


class EmbedImages(beam.PTransform):
    """Decoded rows → feature rows (main output) and embed-stage errors."""

    def __init__(self, model: ResolvedModel, batch_size: int = 32, threads: int = 0):
        super().__init__()
        self._model = model
        self._batch_size = batch_size
        self._threads = threads

    def expand(self, rows):
        return (rows
                # Fixed-size batches (only a bundle's tail is smaller): the TFLite
                # interpreter is re-planned only when the batch size changes.
                | "Batch" >> beam.BatchElements(min_batch_size=self._batch_size,
                                                max_batch_size=self._batch_size)
                | "RunModel" >> beam.ParDo(EmbedBatchFn(self._model, self._threads,
                                                        shared.Shared()))
                .with_outputs(ERRORS, main="features"))
