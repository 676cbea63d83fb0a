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
import importlib.util
import os
import stat
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Iterator

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.http_fetch import FetchConfig, HttpFetcher
from pipeline.locations import location_scheme, redact_location
from pipeline.row_errors import STAGE_READ, RowError, error_record
from transforms.errors import ERRORS, METRICS_NAMESPACE, count_failure

_URL_SCHEMES = ("http", "https")
_READ_CHUNK = 1024 * 1024


@dataclasses.dataclass
class _Outcome:
    """What a worker thread hands back: outputs plus facts for the metrics."""

    outputs: list
    reason: str | None = None
    bytes_read: int = 0
    retries: int = 0
    millis: int = 0


# Pseudo-filesystems whose "files" are the system's own state (/proc/self/environ
# holds secrets, /dev/stdin is the launcher's input): never image sources.
_SYSTEM_ROOTS = ("/dev/", "/proc/", "/sys/")
# Beam filesystems and the client library each needs, to tell "not installed" apart.
_FILESYSTEM_MODULES = {"s3": "boto3", "gs": "google.cloud.storage", "hdfs": "hdfs",
                       "azfs": "azure.storage.blob"}


def _file_kind_reason(mode: int) -> tuple[str, str] | None:
    """(reason, kind) for a file that is not a regular file, else None."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is_directory", "a directory"
    if stat.S_ISFIFO(mode):
        return "is_fifo", "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "is_socket", "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is_device", "a device"
    return "not_a_regular_file", "not a regular file"


def read_file_bytes(path: str, max_bytes: int, timeout: float | None = None) -> bytes:
    """Read a local or Beam-filesystem file (gs://, s3://…) up to ``max_bytes``.

    Raises RowError ``missing_file``, ``unreadable``, ``too_large``,
    ``timeout`` (the read took longer than ``timeout`` seconds),
    ``forbidden_scheme`` (file:// or a scheme nothing here reads), ``data_url``
    or ``filesystem_unavailable`` (a Beam filesystem whose client library or
    configuration is missing). A local path that is a directory, FIFO,
    socket or device is refused before it is opened (``is_directory``,
    ``is_fifo``, ``is_socket``, ``is_device``), and so is anything under
    /dev, /proc or /sys (``system_path``): opening a FIFO blocks forever and a
    device never ends. Files are read as stored: a ``.gz`` name does not make
    Beam decompress it. Messages never quote the file's content.
    """
    if not isinstance(path, str) or not path.strip():
        raise RowError("missing_file", "the row has no image location")
    deadline = None if timeout is None else time.monotonic() + timeout
    scheme = location_scheme(path)
    if scheme is None:
        return _read_local(path, max_bytes, deadline, timeout)
    shown = redact_location(path)
    if scheme == "file":
        raise RowError("forbidden_scheme", f"file:// URLs are not accepted ({shown}); give the plain path instead")
    if scheme == "data":
        raise RowError("data_url", f"inline data: URLs are not read ({shown}); give a path or an http(s) URL")
    if "://" not in path:
        raise RowError("forbidden_scheme", f"{scheme}: locations are not read ({shown}); use an http(s) URL or a path")
    try:
        FileSystems.get_filesystem(path)
    except ValueError as exc:
        raise RowError(
            "forbidden_scheme",
            f"no Beam filesystem is available for {scheme}:// here ({shown}); use an "
            "http(s) URL, a local path, or install the filesystem's extra (gs:// needs apache-beam[gcp])",
        ) from exc
    except Exception as exc:  # BeamIOError wrapping an ImportError (hdfs://), …
        raise _unavailable(scheme, shown, exc) from exc
    module = _FILESYSTEM_MODULES.get(scheme)
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        raise _unavailable(scheme, shown, ImportError(module))
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return _read_chunks(handle.read, shown, max_bytes, deadline, timeout)
    except RowError:
        raise
    except (AssertionError, ImportError, AttributeError) as exc:  # "Missing boto3", unset options…
        raise _unavailable(scheme, shown, exc) from exc
    except Exception as exc:  # Filesystems raise IOError, BeamIOError, client errors…
        raise _classify_file_error(path, exc) from exc


def _unavailable(scheme: str, shown: str, exc: BaseException) -> RowError:
    """The error for a Beam filesystem that cannot work in this environment."""
    module = _FILESYSTEM_MODULES.get(scheme)
    need = f" (it needs the {module} package and its configuration)" if module else ""
    return RowError("filesystem_unavailable", f"the {scheme}:// filesystem is not usable here{need}, so "
                                              f"{shown} cannot be read ({type(exc).__name__})")


def _local_os_error(path: str, exc: OSError) -> RowError:
    """The row error for a failed stat or open of a local path (same rule for both)."""
    if isinstance(exc, FileNotFoundError):
        return RowError("missing_file", f"{path} does not exist")
    if isinstance(exc, PermissionError):
        return RowError("unreadable", f"no permission to read {path}")
    return RowError("unreadable", f"could not read {path}: {exc.strerror or type(exc).__name__}")


def _read_local(path: str, max_bytes: int, deadline: float | None, timeout: float | None) -> bytes:
    """Read a local regular file; refuse everything else before opening it."""
    absolute = os.path.abspath(path)
    if any((p + "/").startswith(_SYSTEM_ROOTS) for p in (absolute, os.path.realpath(absolute))):
        raise RowError("system_path", f"{path} is under /dev, /proc or /sys; system files are never read as images")
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _local_os_error(path, exc) from None
    kind = _file_kind_reason(info.st_mode)
    if kind is not None:
        raise RowError(kind[0], f"{path} is {kind[1]}, not an image file; it is not opened")
    if info.st_size > max_bytes:
        raise RowError("too_large", f"{path} is larger than the {max_bytes:,}-byte limit")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _local_os_error(path, exc) from None
    try:
        kind = _file_kind_reason(os.fstat(fd).st_mode)  # what was opened, if it changed since the stat
        if kind is not None:
            raise RowError(kind[0], f"{path} is {kind[1]}, not an image file")
        return _read_chunks(lambda n: os.read(fd, n), path, max_bytes, deadline, timeout)
    except OSError as exc:
        raise RowError("unreadable", f"could not read {path}: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)


def _read_chunks(read, shown: str, max_bytes: int, deadline: float | None, timeout: float | None) -> bytes:
    """Read chunks until EOF under the byte cap, checking the deadline between reads."""
    chunks, size = [], 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise RowError("timeout", f"reading {shown} took longer than {timeout:g} s ({size:,} bytes so far)")
        chunk = read(_READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise RowError("too_large", f"{shown} is larger than the {max_bytes:,}-byte limit")
        chunks.append(chunk)


def _classify_file_error(path: str, exc: Exception) -> RowError:
    """Tell a missing file from one that exists but cannot be read (messages never quote content)."""
    shown = redact_location(path)
    if isinstance(exc, IsADirectoryError):
        return RowError("is_directory", f"{shown} is a directory, not an image file")
    if isinstance(exc, PermissionError):
        return RowError("unreadable", f"no permission to read {shown}")
    if isinstance(exc, FileNotFoundError):
        return RowError("missing_file", f"{shown} does not exist")
    try:
        exists = FileSystems.exists(path)
    except Exception:
        exists = True
    if not exists:
        return RowError("missing_file", f"{shown} does not exist")
    return RowError("unreadable", f"could not read {shown}: {type(exc).__name__}")


def is_url(location: Any) -> bool:
    """True when ``location`` is an http(s) URL, which is fetched over HTTP."""
    return location_scheme(location) in _URL_SCHEMES


# A local file read faster than this (on average) is read on the bundle thread:
# handing it to the pool costs more than the read (measured: 1,000 page-cached
# catalogue JPEGs, 0.016 s inline vs 0.15 s through the pool). Slower "local"
# paths — a network mount — go back to the pool, where reads overlap.
INLINE_READ_MAX_MS = 2.0


def _is_local_file(location: Any) -> bool:
    return isinstance(location, str) and location_scheme(location) is None


class ReadImageBytesFn(beam.DoFn):
    """Add ``data``, ``sha256``, ``etag`` and ``last_modified`` to each row.

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

    def process(self, row: dict, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam) -> Iterator:
        """Start reading ``row``; emit whichever earlier reads have finished."""
        if (_is_local_file(row.get("image"))
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

    def _emit(self, entry: tuple[Future, dict, Any, Any]) -> Iterator:
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

    def _read(self, row: dict) -> _Outcome:
        """Read one row's bytes (on a pool thread or inline; touches no metrics).

        A row carrying ``previous`` (its feature row from the last good run)
        is marked ``unchanged`` when its image is the same: for a URL, the
        server answers a conditional request with 304; for a file, the bytes
        hash to the same sha256.
        """
        started = time.monotonic()
        location = row.get("image")
        previous = row.get("previous")
        # Features store the redacted location (pipeline/locations.py); older runs the raw one.
        same_location = previous is not None and previous.get("image") in (
            location, redact_location(location))
        etag = last_modified = None
        retries = 0
        try:
            if is_url(location):
                result = self._fetcher.fetch(
                    location,
                    etag=previous.get("etag") if same_location else None,
                    last_modified=previous.get("last_modified") if same_location else None)
                data, etag, last_modified, retries = result.data, result.etag, result.last_modified, result.retries
                if result.status == 304:
                    out = dict(row, data=None, sha256=previous["sha256"], etag=etag,
                               last_modified=last_modified, unchanged=True)
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
        out = dict(row)
        out["data"] = data
        out["sha256"] = hashlib.sha256(data).hexdigest()
        out["etag"] = etag
        out["last_modified"] = last_modified
        out["unchanged"] = previous is not None and previous.get("sha256") == out["sha256"]
        if out["unchanged"]:
            out["data"] = None  # the previous embedding is reused: no need to keep the bytes
        return _Outcome([out], None, len(data), retries, _ms_since(started))


def _ms_since(started: float) -> int:
    """Milliseconds elapsed since ``started`` (a time.monotonic() value)."""
    return int((time.monotonic() - started) * 1000)
