"""Embed decoded images with the run's model: batched, one model per worker process.

The model handler (:class:`pipeline.models.handler.ModelHandler`) says how: it
loads the model once per worker process (held in Beam's ``Shared``), sets the
``BatchElements`` sizes and runs each batch; each output row is a feature row of the contract:
product id, image, the L2-normalised float32 embedding, the model id, the
sha256 of the image bytes, the original width and height, and the carried
manifest columns (a :class:`pipeline.features.FeatureRow`). A batch the model
rejects is retried image by image so one bad image costs one error row, not the
batch.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.features import FeatureRow
from pipeline.locations import redact_location
from pipeline.models.engines import configure_tf_threads
from pipeline.models.handler import ModelHandler
from pipeline.models.specs import ResolvedModel
from pipeline.records import DecodedRow
from pipeline.row_errors import STAGE_EMBED, error_record
from transforms.errors import ERRORS, METRICS_NAMESPACE, count_failure


class _ModelHolder:
    """Weak-referenceable box, as Beam's ``Shared`` requires."""

    def __init__(self, model):
        self.model = model


def normalize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise rows; also return which rows were usable (finite, non-zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
    usable = finite & (norms > 1e-12)
    safe = np.where(usable, norms, 1.0).astype(np.float32)
    return (vectors / safe[:, None]).astype(np.float32), usable


class EmbedBatchFn(beam.DoFn):
    """Embed a batch of :class:`DecodedRow` records into feature rows (:class:`FeatureRow`);
    failures to ``errors``.

    Model calls run on the model's lanes (``engine.lanes`` threads), up to one
    more batch than there are lanes in flight, while Beam's thread goes on
    reading and decoding: inference overlaps the rest of the fused stage instead
    of waiting for it. Outputs keep their input batch's window and timestamp.
    """

    def __init__(self, handler: ModelHandler, shared_handle: shared.Shared):
        self._handler = handler
        self._shared = shared_handle
        self._model = None
        self._calls = None
        self._in_flight: collections.deque = collections.deque()
        self._embedded = Metrics.counter(METRICS_NAMESPACE, "embedded")
        self._batch_size = Metrics.distribution(METRICS_NAMESPACE, "embed_batch_size")

    def setup(self):
        handler = self._handler
        if handler.engine == "savedmodel":  # the other engines never start TensorFlow
            configure_tf_threads(handler.threads)
        if handler.share_across_threads:
            self._model = self._shared.acquire(lambda: _ModelHolder(handler.load_model()),
                                               tag=handler.shared_tag()).model
        else:
            self._model = handler.load_model()
        self._calls = ThreadPoolExecutor(max_workers=self._model.lanes,
                                         thread_name_prefix="model-lane")

    def start_bundle(self):
        self._in_flight = collections.deque()

    def _embed_rows(self, rows: list[DecodedRow]):
        try:
            return self._handler.run_inference([r.pixels for r in rows], self._model), None
        except Exception as exc:  # noqa: BLE001 - isolated per image below
            return None, exc

    def _run_model(self, batch: list[DecodedRow]) -> list[tuple]:
        """(row, vector or None, exception or None) per row; runs on a model lane,
        so it touches nothing of Beam's (metrics belong to the bundle's thread)."""
        vectors, failure = self._embed_rows(batch)
        if failure is None:
            return [(row, vector, None) for row, vector in zip(batch, vectors)]
        results = []
        for row in batch:
            single, exc = self._embed_rows([row])
            results.append((row, None if exc else single[0], exc))
        return results

    def process(self, batch: list[DecodedRow], window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam):
        self._batch_size.update(len(batch))
        self._in_flight.append((self._calls.submit(self._run_model, batch), window, timestamp))
        # One batch queued behind the busy lanes, so a lane that finishes starts at once.
        while len(self._in_flight) > self._model.lanes + 1:
            yield from self._outputs(*self._in_flight.popleft())

    def finish_bundle(self):
        while self._in_flight:
            yield from self._outputs(*self._in_flight.popleft())

    def teardown(self):
        if self._calls is not None:
            self._calls.shutdown(wait=True, cancel_futures=True)

    def _outputs(self, call, window, timestamp):
        results = call.result()

        def windowed(value):
            return WindowedValue(value, timestamp, (window,))

        embedded = []
        for row, vector, exc in results:
            if exc is None:
                embedded.append((row, vector))
                continue
            count_failure(STAGE_EMBED, "model_error")
            yield pvalue.TaggedOutput(ERRORS, windowed(error_record(
                row, STAGE_EMBED, "model_error",
                f"the model failed on this image: {type(exc).__name__}: {exc}")))
        if not embedded:
            return
        normalized, usable = normalize_rows(np.stack([v for _, v in embedded]))
        for (row, _), vector, ok in zip(embedded, normalized, usable):
            if not ok:
                count_failure(STAGE_EMBED, "bad_vector")
                yield pvalue.TaggedOutput(ERRORS, windowed(error_record(
                    row, STAGE_EMBED, "bad_vector",
                    "the model returned a zero or non-finite vector for this image")))
                continue
            self._embedded.inc()
            # The stored location never holds credentials or tokens (issue 15).
            yield windowed(FeatureRow(
                row.product_id, redact_location(row.image), vector, self._handler.model_id,
                sha256=row.sha256, width=row.width, height=row.height, etag=row.etag,
                last_modified=row.last_modified, extra=row.extra))


class EmbedImages(beam.PTransform):
    """:class:`DecodedRow` records → :class:`FeatureRow` records (main output) and embed-stage
    errors."""

    def __init__(self, model: ResolvedModel, batch_size: int = 32, threads: int = 0,
                 lanes: int = 1):
        super().__init__()
        self._handler = ModelHandler(model, threads=threads, lanes=lanes, batch_size=batch_size)

    def expand(self, rows):
        return (rows
                | "Batch" >> beam.BatchElements(**self._handler.batch_elements_kwargs())
                | "RunModel" >> beam.ParDo(EmbedBatchFn(self._handler, shared.Shared()))
                .with_outputs(ERRORS, main="features"))
