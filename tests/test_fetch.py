"""Tests of pipeline/http_fetch.py against a misbehaving local HTTP server."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.http_fetch import FetchConfig, FetchError, HttpFetcher, check_url
from pipeline.image_decode import DecodeError, decode_image
from tests.http_fixtures import HTML, JPEG, http_server  # noqa: F401 (fixture)

FAST = dict(
    connect_timeout=1.0,
    read_timeout=0.5,
    total_timeout=1.5,
    max_retries=2,
    backoff_factor=0.01,
    max_backoff=2.0,
    max_redirects=3,
    max_bytes=1024 * 1024,
)


def fetcher(**overrides) -> HttpFetcher:
    options = {**FAST, "allow_private_hosts": True, **overrides}
    return HttpFetcher(FetchConfig(**options))


def fetch_error(fetch: HttpFetcher, url: str, reason: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch.fetch(url)
    assert info.value.reason == reason, info.value.message
    assert info.value.message
    return info.value


@pytest.fixture
def no_connections(monkeypatch):
    """Fail the test if anything opens a TCP connection."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise AssertionError(f"unexpected connection to {address}")

    def refuse_connect(sock, address):
        refuse(address)

    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def fake_resolver(*addresses):
    def resolve(host, port, type=0):
        family = lambda a: socket.AF_INET6 if ":" in a else socket.AF_INET  # noqa: E731
        return [(family(a), socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return resolve


# --- successful downloads ---------------------------------------------------


def test_downloads_body_with_cache_headers(http_server):
    result = fetcher().fetch(http_server.url("image.jpg"))
    assert result.data == JPEG
    assert result.status == 200
    assert result.etag == '"jpeg-v1"'
    assert result.last_modified == "Wed, 01 Jan 2025 00:00:00 GMT"
    assert result.retries == 0


def test_unchanged_image_answers_a_conditional_request_with_304(http_server):
    result = fetcher().fetch(http_server.url("image.jpg"), etag='"jpeg-v1"')
    assert (result.status, result.data, result.etag) == (304, b"", '"jpeg-v1"')
    changed = fetcher().fetch(http_server.url("image.jpg"), etag='"jpeg-v0"')
    assert (changed.status, changed.data) == (200, JPEG)


def test_sends_the_configured_user_agent_and_never_netrc_credentials(http_server, tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    fetcher(user_agent="test-agent/1.0").fetch(http_server.url("image.jpg"))
    headers = http_server.last_headers["/image.jpg"]
    assert headers["User-Agent"] == "test-agent/1.0"
    assert "Authorization" not in headers


def test_follows_a_redirect_to_an_allowed_url(http_server):
    result = fetcher().fetch(http_server.url("redirect"))
    assert result.data == JPEG
    assert http_server.hits["/redirect"] == 1 and http_server.hits["/image.jpg"] == 1


def test_jpeg_at_a_png_url_is_fetched_and_decodes(http_server):
    result = fetcher().fetch(http_server.url("photo.png"))
    assert result.data == JPEG
    assert decode_image(result.data, 16).width == 32


def test_html_labelled_as_jpeg_is_fetched_but_decode_rejects_it(http_server):
    result = fetcher().fetch(http_server.url("html-as-jpeg"))
    assert result.data == HTML  # fetch does not judge content
    with pytest.raises(DecodeError) as info:
        decode_image(result.data, 16)
    assert info.value.reason == "not_an_image" and "HTML" in info.value.message


# --- HTTP errors and retries -------------------------------------------------


@pytest.mark.parametrize("status", [404, 403, 410])
def test_client_errors_fail_at_once_without_retry(http_server, status):
    error = fetch_error(fetcher(), http_server.url(f"status/{status}"), f"http_{status}")
    assert str(status) in error.message
    assert error.retries == 0
    assert http_server.hits[f"/status/{status}"] == 1


def test_transient_500_is_retried_and_succeeds(http_server):
    result = fetcher().fetch(http_server.url("flaky/a"))
    assert result.data == JPEG
    assert result.retries == 1
    assert http_server.hits["/flaky/a"] == 2


def test_persistent_500_fails_after_max_retries(http_server):
    error = fetch_error(fetcher(), http_server.url("status/500"), "http_500")
    assert error.retries == 2
    assert http_server.hits["/status/500"] == 3


def test_429_waits_for_retry_after_then_succeeds(http_server):
    started = time.monotonic()
    result = fetcher().fetch(http_server.url("throttled/a"))
    elapsed = time.monotonic() - started
    assert result.data == JPEG and result.retries == 1
    assert 0.9 <= elapsed < 3.0


def test_retry_after_is_capped_at_max_backoff(http_server):
    # Retry-After: 1 with max_backoff 0 must not sleep a second.
    started = time.monotonic()
    result = fetcher(max_backoff=0.0).fetch(http_server.url("throttled/b"))
    assert result.retries == 1
    assert time.monotonic() - started < 0.8


def test_429_that_never_ends_reports_http_429(http_server):
    error = fetch_error(fetcher(max_retries=0), http_server.url("status/429"), "http_429")
    assert error.retries == 0


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = fetch_error(fetcher(), f"http://127.0.0.1:{port}/x.jpg", "connection_error")
    assert error.retries == 2


# --- bodies that never finish -------------------------------------------------


def test_trickling_body_hits_the_total_timeout(http_server):
    started = time.monotonic()
    error = fetch_error(fetcher(), http_server.url("slow"), "timeout")
    elapsed = time.monotonic() - started
    assert FAST["total_timeout"] - 0.1 <= elapsed < FAST["total_timeout"] + FAST["read_timeout"] + 1.0
    assert "still sending" in error.message


def test_server_that_never_answers_times_out_after_retries(http_server):
    started = time.monotonic()
    error = fetch_error(fetcher(), http_server.url("hang"), "timeout")
    assert error.retries == 2 and http_server.hits["/hang"] == 3
    assert time.monotonic() - started < 3 * FAST["read_timeout"] + 1.0


def test_stalled_body_hits_the_read_timeout(http_server):
    started = time.monotonic()
    fetch_error(fetcher(), http_server.url("stall"), "timeout")
    assert time.monotonic() - started < FAST["total_timeout"] + 1.0


def test_endless_body_is_cut_at_max_bytes(http_server):
    started = time.monotonic()
    error = fetch_error(fetcher(), http_server.url("endless"), "too_large")
    assert time.monotonic() - started < 3.0
    assert "limit" in error.message


def test_declared_length_over_max_bytes_is_refused(http_server):
    fetch_error(fetcher(max_bytes=100), http_server.url("image.jpg"), "too_large")


def test_body_exactly_at_max_bytes_is_accepted(http_server):
    assert fetcher(max_bytes=len(JPEG)).fetch(http_server.url("image.jpg")).data == JPEG


def test_redirect_loop_stops_at_max_redirects(http_server):
    error = fetch_error(fetcher(), http_server.url("loop/0"), "too_many_redirects")
    assert "3" in error.message
    assert sum(n for path, n in http_server.hits.items() if path.startswith("/loop")) == 4


# --- URL policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x/", "javascript:alert(1)", "/local/path.jpg"]
)
def test_non_http_schemes_are_refused(url, no_connections):
    fetch_error(fetcher(), url, "forbidden_scheme")
    assert no_connections == []


def test_loopback_server_is_refused_when_private_hosts_are_not_allowed(http_server, no_connections):
    fetch_error(fetcher(allow_private_hosts=False), http_server.url("image.jpg"), "private_host")
    assert no_connections == [] and sum(http_server.hits.values()) == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.jpg",
        "http://192.168.1.10/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::1]:8080/a.jpg",
        "http://[::ffff:127.0.0.1]/a.jpg",
        "http://0.0.0.0/a.jpg",
        "http://224.0.0.1/a.jpg",
        "http://100.64.0.1/a.jpg",
        "http://localhost/a.jpg",
    ],
)
def test_private_addresses_are_refused_before_connecting(url, no_connections):
    error = fetch_error(fetcher(allow_private_hosts=False), url, "private_host")
    assert "non-public address" in error.message
    assert no_connections == []


def test_every_resolved_address_is_checked(no_connections):
    # A name with one public and one private address is refused.
    with pytest.raises(FetchError) as info:
        check_url("http://cdn.example.com/a.jpg", resolver=fake_resolver("93.184.216.34", "10.1.2.3"))
    assert info.value.reason == "private_host" and "10.1.2.3" in info.value.message
    check_url("http://cdn.example.com/a.jpg", resolver=fake_resolver("93.184.216.34", "2606:2800:220:1::1"))


def test_unresolvable_host_is_a_dns_error(no_connections):
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    fetch = HttpFetcher(FetchConfig(**FAST), resolver=fail)
    fetch_error(fetch, "https://no-such-host.example/a.jpg", "dns_error")


def test_redirect_targets_are_checked_like_the_first_url(http_server):
    strict = fetcher(allow_private_hosts=False, allowed_hosts=("127.0.0.1",))
    assert strict.fetch(http_server.url("redirect")).data == JPEG  # allow-listed host
    fetch_error(strict, http_server.url("redirect-to?http://10.0.0.1/a.jpg"), "private_host")
    fetch_error(strict, http_server.url("redirect-to?http://169.254.169.254/latest/"), "private_host")
    via_localhost = f"redirect-to?http://localhost:{http_server.port}/image.jpg"
    fetch_error(strict, http_server.url(via_localhost), "private_host")
    fetch_error(strict, http_server.url("redirect-to?file:///etc/passwd"), "forbidden_scheme")
    assert http_server.hits["/image.jpg"] == 1
