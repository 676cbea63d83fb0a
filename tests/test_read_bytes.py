"""Tests of transforms/read_bytes.py: every row is read once, or fails once."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.file_bytes import read_file_bytes
from pipeline.http_fetch import FetchConfig
from pipeline.locations import is_url
from pipeline.records import CatalogRow, ErrorRecord, FetchedRow
from pipeline.row_errors import RowError
from tests.http_fixtures import HTML, JPEG, http_server  # noqa: F401 (fixture)
from transforms.errors import ERRORS, METRICS_NAMESPACE
from transforms.read_bytes import ReadImageBytesFn

CONFIG = FetchConfig(
    connect_timeout=1.0,
    read_timeout=0.5,
    total_timeout=1.5,
    max_retries=2,
    backoff_factor=0.01,
    max_backoff=1.0,
    allow_private_hosts=True,  # the test server is on 127.0.0.1
    concurrency=4,
)


def row(product_id: str, image: str, n: int = 0) -> CatalogRow:
    return CatalogRow(product_id, image, n, {"brand": "acme"})


def main_summary(r: FetchedRow) -> tuple:
    """The fields of a main-output record a test compares (bytes by hash)."""
    return (
        r.product_id,
        r.extra,
        hashlib.sha256(r.data).hexdigest(),
        r.sha256,
        r.etag,
        r.last_modified,
    )


def error_summary(e: ErrorRecord) -> tuple:
    return (e.product_id, e.stage, e.reason, bool(e.error), e.image is not None)


def run_read(rows, expected_main, expected_errors, config=CONFIG, max_bytes=None) -> dict:
    """Run ReadImageBytesFn over rows, assert both outputs; return its counters."""
    with test_pipeline.TestPipeline() as p:
        read = beam.ParDo(ReadImageBytesFn(config, max_bytes)).with_outputs(ERRORS, main="read")
        outputs = p | beam.Create(rows) | read
        ids = (outputs.read, outputs[ERRORS]) | beam.Flatten() | beam.Map(lambda r: r.product_id)
        assert_that(ids, equal_to([r.product_id for r in rows]), label="each row exactly once")
        assert_that(outputs.read | "Main" >> beam.Map(main_summary), equal_to(expected_main), label="main")
        errors = outputs[ERRORS] | "Errors" >> beam.Map(error_summary)
        assert_that(errors, equal_to(expected_errors), label="errors")
    metrics = p.result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    return {m.key.metric.name: m.committed for m in metrics}


def ok(product_id: str, body: bytes, n: int = 0, etag=None, last_modified=None) -> tuple:
    digest = hashlib.sha256(body).hexdigest()
    return (product_id, {"brand": "acme"}, digest, digest, etag, last_modified)


def failed(product_id: str, reason: str) -> tuple:
    return (product_id, "read", reason, True, True)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "good.jpg").write_bytes(JPEG)
    (tmp_path / "named.gz").write_bytes(JPEG)  # not decompressed because of its name
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    return tmp_path


def test_local_files_urls_and_failures_each_end_in_one_output(files, http_server):
    rows = [
        row("local", str(files / "good.jpg"), 1),
        row("gz-name", str(files / "named.gz"), 2),
        row("empty", str(files / "empty.jpg"), 3),
        row("missing", str(files / "nope.jpg"), 4),
        row("dir", str(files / "folder.jpg"), 5),
        row("file-url", f"file://{files / 'good.jpg'}", 6),
        row("ftp", "ftp://example.com/a.jpg", 7),
        row("url", http_server.url("image.jpg"), 8),
        row("url-404", http_server.url("status/404"), 9),
        row("url-flaky", http_server.url("flaky/k"), 10),
        row("url-html", http_server.url("html-as-jpeg"), 11),
        row("no-image", "", 12),
    ]
    expected_main = [
        ok("local", JPEG, 1),
        ok("gz-name", JPEG, 2),
        ok("empty", b"", 3),  # decode reports "empty"
        ok("url", JPEG, 8, '"jpeg-v1"', "Wed, 01 Jan 2025 00:00:00 GMT"),
        ok("url-flaky", JPEG, 10),
        ok("url-html", HTML, 11),  # decode decides it is not an image
    ]
    expected_errors = [
        failed("missing", "missing_file"),
        failed("dir", "is_directory"),
        failed("file-url", "forbidden_scheme"),
        failed("ftp", "forbidden_scheme"),
        failed("url-404", "http_404"),
        failed("no-image", "missing_file"),
    ]
    counters = run_read(rows, expected_main, expected_errors)
    assert counters["fetched"] == 6
    assert counters["bytes_read"] == 4 * len(JPEG) + len(HTML)
    assert counters["retried"] == 1
    assert counters["read_failed_missing_file"] == 2
    assert counters["read_failed_forbidden_scheme"] == 2
    assert counters["read_failed_http_404"] == 1
    assert counters["read_failed_is_directory"] == 1


def test_many_rows_with_small_concurrency_are_all_emitted_once(http_server, tmp_path):
    config = dataclasses.replace(CONFIG, concurrency=2)
    rows, expected_main, expected_errors = [], [], []
    for i in range(60):
        if i % 3 == 0:
            path = tmp_path / f"{i}.jpg"
            path.write_bytes(JPEG)
            rows.append(row(f"p{i}", str(path), i))
            expected_main.append(ok(f"p{i}", JPEG, i))
        elif i % 3 == 1:
            rows.append(row(f"p{i}", http_server.url(f"image.jpg?i={i}"), i))
            expected_main.append(ok(f"p{i}", JPEG, i, '"jpeg-v1"', "Wed, 01 Jan 2025 00:00:00 GMT"))
        else:
            status = 404 if i % 2 else 410
            rows.append(row(f"p{i}", http_server.url(f"status/{status}"), i))
            expected_errors.append(failed(f"p{i}", f"http_{status}"))
    counters = run_read(rows, expected_main, expected_errors, config)
    assert counters["fetched"] == 40


def test_max_bytes_caps_files_and_urls(files, http_server):
    rows = [row("file", str(files / "good.jpg")), row("url", http_server.url("image.jpg"))]
    run_read(rows, [], [failed("file", "too_large"), failed("url", "too_large")], max_bytes=100)


def test_private_url_is_refused_by_default_config():
    config = dataclasses.replace(CONFIG, allow_private_hosts=False)
    rows = [row("meta", "http://169.254.169.254/latest/meta-data/")]
    run_read(rows, [], [failed("meta", "private_host")], config)


def test_reads_in_flight_stay_bounded_and_all_are_emitted(http_server):
    # Drive the DoFn by hand: outputs may lag inputs by at most 2×concurrency.
    fn = ReadImageBytesFn(dataclasses.replace(CONFIG, concurrency=3))
    fn.setup()
    try:
        fn.start_bundle()
        emitted, lag = [], 0
        for i in range(40):
            image = http_server.url(f"image.jpg?i={i}")
            emitted.extend(fn.process(row(f"p{i}", image, i), GlobalWindow(), MIN_TIMESTAMP))
            lag = max(lag, i + 1 - len(emitted))
        emitted.extend(fn.finish_bundle())
    finally:
        fn.teardown()
    assert lag <= 6
    assert all(isinstance(out, WindowedValue) for out in emitted)
    assert sorted(int(out.value.product_id[1:]) for out in emitted) == list(range(40))
    assert all(out.windows == (GlobalWindow(),) for out in emitted)



def test_fast_local_files_are_read_inline_and_slow_ones_overlap(monkeypatch, tmp_path):
    # A thread hop costs more than reading a cached local file, but a network
    # mount that looks local must still get overlapping reads.
    import threading
    import time

    from transforms import read_bytes

    path = tmp_path / "a.jpg"
    path.write_bytes(JPEG)
    threads, delay = [], [0.0]

    def timed_read(location, max_bytes, timeout=None):
        threads.append(threading.current_thread().name)
        time.sleep(delay[0])
        return JPEG

    monkeypatch.setattr(read_bytes, "read_file_bytes", timed_read)
    fn = ReadImageBytesFn(dataclasses.replace(CONFIG, concurrency=3))
    fn.setup()
    try:
        fn.start_bundle()
        emitted = []
        for i in range(60):
            delay[0] = 0.0 if i < 20 else 0.02  # the "disk" turns slow after 20 reads
            emitted.extend(fn.process(row(f"p{i}", str(path), i), GlobalWindow(), MIN_TIMESTAMP))
        emitted.extend(fn.finish_bundle())
    finally:
        fn.teardown()
    main = threading.current_thread().name
    assert threads[:20] == [main] * 20
    assert all(t.startswith("read-image") for t in threads[-10:])
    assert sorted(int(out.value.product_id[1:]) for out in emitted) == list(range(60))

@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_file_without_read_permission_is_unreadable(files):
    path = files / "locked.jpg"
    path.write_bytes(JPEG)
    path.chmod(0)
    with pytest.raises(RowError) as info:
        read_file_bytes(str(path), 1000)
    assert info.value.reason == "unreadable"


def test_permission_error_from_the_filesystem_is_unreadable(monkeypatch, files):
    # Runs as root too: the filesystem layer is made to refuse the read.
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(RowError) as info:
        read_file_bytes(str(files / "good.jpg"), 1000)
    assert info.value.reason == "unreadable" and "permission" in info.value.message


def test_unregistered_filesystem_scheme_is_refused():
    with pytest.raises(RowError) as info:
        read_file_bytes("nosuchfs://bucket/a.jpg", 1000)
    assert info.value.reason == "forbidden_scheme"


@pytest.mark.parametrize(
    "location, expected",
    [
        ("http://a/b.jpg", True),
        ("HTTPS://a/b", True),
        ("/x/y.jpg", False),
        ("gs://b/o.jpg", False),
        ("file:///x", False),
        (None, False),
    ],
)
def test_is_url(location, expected):
    assert is_url(location) is expected
