"""Read each row's image bytes from a local path, a Beam filesystem or a URL.

Reading is I/O-bound (HTTP round trips, object-store latency), so
:class:`ReadImageBytesFn` keeps up to ``concurrency`` reads in flight per
worker instead of one at a time, while still emitting every row exactly once:
on the main output with its bytes, or on ``ERRORS`` with a reason.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Iterator

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.file_bytes import read_file_bytes
from pipeline.http_fetch import FetchConfig, HttpFetcher
from pipeline.locations import is_url, location_scheme, redact_location
from pipeline.records import CatalogRow, FetchedRow
from pipeline.row_errors import STAGE_READ, RowError, error_record
from transforms.errors import ERRORS, METRICS_NAMESPACE, count_failure


@dataclasses.dataclass
class _Outcome:
    """What a worker thread hands back: outputs plus facts for the metrics."""

    outputs: list
    reason: str | None = None
    bytes_read: int = 0
    retries: int = 0
    millis: int = 0


# A local file read faster than this (on average) is read on the bundle thread:
# handing it to the pool costs more than the read (bench/MEASUREMENTS.md, "Local
# paths and reads"). Slower "local" paths — a network mount — go back to the pool,
# where reads overlap.
INLINE_READ_MAX_MS = 2.0


def _is_local_file(location: Any) -> bool:
    return isinstance(location, str) and location_scheme(location) is None


class ReadImageBytesFn(beam.DoFn):
    """Read each :class:`CatalogRow`'s image into a :class:`FetchedRow`.

    The new record carries ``data``, ``sha256``, ``etag`` and ``last_modified``,
    and the reuse mark ``unchanged``; the input row is never changed.

    URLs and object-store paths are read up to ``fetch_config.concurrency``
    at once in a per-instance thread pool, emitted as they finish, so output
    order is not input order. Local files are read on the bundle thread while
    that stays fast (see ``INLINE_READ_MAX_MS``). Failures go to ``ERRORS`` as
    one record per row.
    """

    def __init__(self, fetch_config: FetchConfig | None = None, max_bytes: int | None = None):
        super().__init__()
        config = fetch_config or FetchConfig()
        self._max_bytes = config.max_bytes if max_bytes is None else max_bytes
        self._config = dataclasses.replace(config, max_bytes=self._max_bytes)
        self._concurrency = max(1, config.concurrency)
        self._fetcher: HttpFetcher | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: collections.deque = collections.deque()
        self._local_read_ms = 0.0  # moving average of inline local reads
        self._fetched = Metrics.counter(METRICS_NAMESPACE, "fetched")
        self._bytes_read = Metrics.counter(METRICS_NAMESPACE, "bytes_read")
        self._retried = Metrics.counter(METRICS_NAMESPACE, "retried")
        self._fetch_ms = Metrics.distribution(METRICS_NAMESPACE, "fetch_ms")

    def setup(self):
        """Create the pooled HTTP session and the thread pool once per instance."""
        self._fetcher = HttpFetcher(self._config)
        self._pool = ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="read-image")

    def start_bundle(self):
        """Begin a bundle with no reads in flight."""
        self._pending = collections.deque()

    def process(self, row: CatalogRow, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam) -> Iterator:
        """Start reading ``row``; emit whichever earlier reads have finished."""
        if (_is_local_file(row.image)
                and self._local_read_ms <= INLINE_READ_MAX_MS):
            started = time.perf_counter()
            outcome = self._read(row)
            self._local_read_ms = (0.9 * self._local_read_ms
                                   + 0.1 * (time.perf_counter() - started) * 1000)
            yield from self._emit_outcome(outcome, timestamp, window)
            return
        self._pending.append((self._pool.submit(self._read, row), row, timestamp, window))
        if len(self._pending) >= 2 * self._concurrency:
            wait([entry[0] for entry in self._pending], return_when=FIRST_COMPLETED)  # full: wait for any
        for entry in [entry for entry in self._pending if entry[0].done()]:
            self._pending.remove(entry)
            yield from self._emit(entry)

    def finish_bundle(self) -> Iterator:
        """Wait for every read still in flight; nothing may cross bundles."""
        while self._pending:
            yield from self._emit(self._pending.popleft())

    def teardown(self):
        """Stop the thread pool and close pooled connections."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def _emit(self, entry: tuple[Future, CatalogRow, Any, Any]) -> Iterator:
        """Yield one finished read's outputs and record its metrics (bundle thread)."""
        future, row, timestamp, window = entry
        try:
            outcome = future.result()
        except Exception as exc:  # _read catches everything; this is a last guard.
            message = f"the read was abandoned: {type(exc).__name__}: {exc}"
            record = error_record(row, STAGE_READ, "internal_error", message)
            outcome = _Outcome([pvalue.TaggedOutput(ERRORS, record)], "internal_error")
        yield from self._emit_outcome(outcome, timestamp, window)

    def _emit_outcome(self, outcome: _Outcome, timestamp, window) -> Iterator:
        """Yield one read's outputs and record its metrics (bundle thread)."""
        self._fetch_ms.update(outcome.millis)
        self._bytes_read.inc(outcome.bytes_read)
        if outcome.retries:
            self._retried.inc(outcome.retries)
        if outcome.reason is None:
            self._fetched.inc()
        else:
            count_failure(STAGE_READ, outcome.reason)
        for output in outcome.outputs:
            if isinstance(output, pvalue.TaggedOutput):
                yield pvalue.TaggedOutput(output.tag, WindowedValue(output.value, timestamp, (window,)))
            else:
                yield WindowedValue(output, timestamp, (window,))

    def _read(self, row: CatalogRow) -> _Outcome:
        """Read one row's bytes (on a pool thread or inline; touches no metrics).

        A row carrying ``previous`` (its feature row from the last good run)
        is marked ``unchanged`` when its image is the same: for a URL, the
        server answers a conditional request with 304; for a file, the bytes
        hash to the same sha256.
        """
        started = time.monotonic()
        location = row.image
        previous = row.previous
        # Features store the redacted location (pipeline/locations.py); older runs the raw one.
        same_location = previous is not None and previous.image in (
            location, redact_location(location))
        etag = last_modified = None
        retries = 0
        try:
            if is_url(location):
                result = self._fetcher.fetch(
                    location,
                    etag=previous.etag if same_location else None,
                    last_modified=previous.last_modified if same_location else None)
                data, etag, last_modified, retries = result.data, result.etag, result.last_modified, result.retries
                if result.status == 304:
                    out = row.fetched(None, previous.sha256, etag, last_modified,
                                      unchanged=True)
                    return _Outcome([out], None, 0, retries, _ms_since(started))
            else:
                data = read_file_bytes(location, self._max_bytes, self._config.total_timeout)
        except RowError as exc:
            retries = getattr(exc, "retries", 0)
            record = error_record(row, STAGE_READ, exc.reason, exc.message)
            return _Outcome([pvalue.TaggedOutput(ERRORS, record)], exc.reason, 0, retries, _ms_since(started))
        except Exception as exc:  # A bug or an exotic client error must not lose the row.
            message = f"unexpected error reading {redact_location(location)}: {type(exc).__name__}"
            record = error_record(row, STAGE_READ, "internal_error", message)
            return _Outcome([pvalue.TaggedOutput(ERRORS, record)], "internal_error", 0, 0, _ms_since(started))
        sha256 = hashlib.sha256(data).hexdigest()
        unchanged = previous is not None and previous.sha256 == sha256
        # An unchanged image's previous embedding is reused: no need to keep the bytes.
        out: FetchedRow = row.fetched(None if unchanged else data, sha256, etag,
                                      last_modified, unchanged)
        return _Outcome([out], None, len(data), retries, _ms_since(started))


def _ms_since(started: float) -> int:
    """Milliseconds elapsed since ``started`` (a time.monotonic() value)."""
    return int((time.monotonic() - started) * 1000)
