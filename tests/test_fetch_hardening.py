"""Issue 15, HANG and LEAK classes, at the fetcher and the byte reader.

Each test feeds one class of hostile input (a server that trickles its status
line, headers or chunk trailers; a URL whose authority parsers disagree about;
a name that rebinds to 127.0.0.1; a FIFO, socket or device named as an image)
and checks that it ends as one error with its own reason, within the deadline,
without a connection to any address that was not checked, and without
credentials or content in the message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pipeline.file_bytes import read_file_bytes
from pipeline.http_fetch import FetchConfig, FetchError, HttpFetcher, connect_socket, parse_url
from pipeline.image_decode import DecodeError, decode_image
from pipeline.locations import redact_location
from pipeline.row_errors import RowError, error_record
from tests.http_fixtures import JPEG, http_server  # noqa: F401 (fixture)

FAST = dict(connect_timeout=1.0, read_timeout=0.5, total_timeout=1.5, max_retries=2,
            backoff_factor=0.01, max_backoff=1.0, max_redirects=3, max_bytes=1024 * 1024)
PUBLIC = "93.184.216.34"  # a global address; tests map it onto the local server


def fetcher(**overrides) -> HttpFetcher:
    return HttpFetcher(FetchConfig(**{**FAST, "allow_private_hosts": True, **overrides}))


def fetch_error(fetch: HttpFetcher, url: str, reason: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch.fetch(url)
    assert info.value.reason == reason, info.value.message
    return info.value


@pytest.fixture
def connections(monkeypatch):
    """Record every TCP connect; refuse any that is not to 127.0.0.1."""
    seen = []
    real = socket.socket.connect

    def connect(sock, address):
        seen.append(address)
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test guard: no connection to {address}")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


# --- HANG: the deadline covers the whole exchange ------------------------------------------


@pytest.mark.parametrize("route, words", [
    ("trickle-status", "status line and headers"),
    ("trickle-headers", "status line and headers"),
    ("endless-trailers", "chunk trailers"),
])
def test_trickling_server_is_cut_at_the_total_timeout(http_server, route, words):
    # Each byte comes well within read_timeout, so only the whole-exchange deadline can stop it.
    started = time.monotonic()
    error = fetch_error(fetcher(), http_server.url(route), "timeout")
    elapsed = time.monotonic() - started
    assert FAST["total_timeout"] - 0.1 <= elapsed < FAST["total_timeout"] + 0.8, elapsed
    assert words in error.message and "fetch_total_timeout" in error.message


def test_a_well_formed_chunked_answer_with_a_trailer_is_read(http_server):
    assert fetcher().fetch(http_server.url("chunked")).data == JPEG


def test_retries_and_backoff_stay_inside_the_total_timeout(http_server):
    # Three attempts of 0.5 s each plus a 1 s backoff would need 2.5 s; the deadline is 1.5 s.
    started = time.monotonic()
    error = fetch_error(fetcher(backoff_factor=1.0, max_backoff=1.0), http_server.url("hang"), "timeout")
    assert time.monotonic() - started < FAST["total_timeout"] + 0.5
    assert error.retries <= 2


def test_a_non_http_answer_is_a_bad_response_that_does_not_quote_it(http_server):
    error = fetch_error(fetcher(), http_server.url("not-http"), "bad_response")
    assert "sk_live" not in error.message and "SECRET" not in error.message


def test_cancel_ends_a_fetch_in_flight_at_once(http_server):
    fetch = fetcher(read_timeout=30, total_timeout=60)
    outcome = {}

    def work():
        try:
            fetch.fetch(http_server.url("hang"))
        except FetchError as exc:
            outcome["reason"] = exc.reason

    thread = threading.Thread(target=work)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    fetch.cancel()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 1.0
    assert outcome["reason"] == "cancelled"
    fetch_error(fetch, http_server.url("image.jpg"), "cancelled")  # and no new ones start


SIGINT_CHILD = textwrap.dedent("""
    import signal, sys, time
    # A shell's background job inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: set it, so the test checks the fetches, not the caller's shell.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP
    from pipeline.http_fetch import FetchConfig
    from pipeline.records import CatalogRow
    from transforms.read_bytes import ReadImageBytesFn

    config = FetchConfig(read_timeout=30, total_timeout=120, max_retries=5, backoff_factor=5,
                         max_backoff=30, allow_private_hosts=True, concurrency=4)
    fn = ReadImageBytesFn(config)
    fn.setup()
    fn.start_bundle()
    for i in range(6):
        list(fn.process(CatalogRow(str(i), sys.argv[1] + f"?{i}", i), GlobalWindow(), MIN_TIMESTAMP))
    print("ready", flush=True)
    list(fn.finish_bundle())  # blocks on downloads that never answer
""")


def test_sigint_stops_a_process_with_downloads_in_flight_within_seconds(http_server, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(SIGINT_CHILD)
    child = subprocess.Popen([sys.executable, str(script), http_server.url("hang")], cwd=os.getcwd(),
                             env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        started = time.monotonic()
        child.send_signal(signal.SIGINT)
        child.wait(timeout=20)
        elapsed = time.monotonic() - started
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert elapsed < 5.0, f"exit took {elapsed:.1f} s; downloads and retries were waited out"
    assert "KeyboardInterrupt" in child.stderr.read()


# --- LEAK: one parser, no ambiguity, no credentials ----------------------------------------


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1\\@decoy.example/a.jpg", "ambiguous_url"),
    ("http://decoy.example\\@127.0.0.1/a.jpg", "ambiguous_url"),
    ("http://decoy.example\\.127.0.0.1/a.jpg", "ambiguous_url"),
    ("http://[::1]\\@decoy.example/", "ambiguous_url"),
    ("http://169.254.169.254\\@decoy.example/latest/", "ambiguous_url"),
    ("http://decoy.example/a\\b.jpg", "ambiguous_url"),
    ("http://user:s3cret@decoy.example/a.jpg", "credentials_in_url"),
    ("http://user@decoy.example/a.jpg", "credentials_in_url"),
    ("http://@decoy.example/a.jpg", "credentials_in_url"),
    ("http://decoy.example@127.0.0.1/a.jpg", "credentials_in_url"),
    ("http://a:b@c@127.0.0.1/a.jpg", "credentials_in_url"),
    ("http://127.0.0.1%2f@decoy.example/", "credentials_in_url"),
    ("http://127%2e0.0.1/a.jpg", "ambiguous_url"),
    ("http://[fe80::1%25eth0]/a.jpg", "ambiguous_url"),
    ("http://decoy.example:80:81/a.jpg", "ambiguous_url"),
    ("http://[::1]x/a.jpg", "ambiguous_url"),
    ("http://de*coy.example/a.jpg", "ambiguous_url"),
    ("http://decoy.example:+80/a.jpg", "invalid_url"),
    ("http://decoy.example:0/a.jpg", "invalid_url"),
    ("http://[::1/a.jpg", "invalid_url"),
    ("http:decoy.example/a.jpg", "invalid_url"),
    ("http://decoy.example/a b.jpg", "invalid_url"),
    (" http://127.0.0.1/a.jpg", "forbidden_scheme"),
    ("http://decoy.example\t/a.jpg", "invalid_url"),
    ("http://decoy.example/\r\nX-Injected: 1", "invalid_url"),
    ("data:image/png;base64,iVBORw0KGgo=", "forbidden_scheme"),
])
def test_ambiguous_or_credentialled_urls_are_refused_before_any_connection(url, reason, connections):
    error = fetch_error(fetcher(allow_private_hosts=False), url, reason)
    assert connections == []
    assert "s3cret" not in error.message
    assert "Traceback" not in error.message and len(error.message) > 20


def test_parse_sends_exactly_what_was_checked():
    parsed = parse_url("http://Bücher.Example:8080/päth/x y?q=ä#frag".replace(" ", "%20"))
    assert parsed.host == "xn--bcher-kva.example" and parsed.port == 8080
    assert parsed.host_header == "xn--bcher-kva.example:8080"
    assert parsed.target == "/p%C3%A4th/x%20y?q=%C3%A4"
    v6 = parse_url("https://[0:0:0:0:0:0:0:1]/a")
    assert (v6.host, v6.port, v6.host_header, str(v6.literal)) == ("::1", 443, "[::1]", "::1")


def test_credentials_never_reach_an_error_record():
    url = "http://user:s3cret@cdn.example/a.jpg"
    record = error_record({"product_id": "p", "image": url}, "read", "credentials_in_url", "x")
    assert record.image == "http://***@cdn.example/a.jpg"
    assert redact_location("data:image/png;base64,QUJD").startswith("data:image/png;base64,<")
    assert "QUJD" not in redact_location("data:image/png;base64,QUJD")


@pytest.mark.parametrize("target, reason", [
    ("http://127.0.0.1\\@decoy.example/", "ambiguous_url"),
    ("http://user:s3cret@127.0.0.1:{port}/image.jpg", "credentials_in_url"),
    ("http://[::1]:{port}/image.jpg", "private_host"),
    ("http://169.254.169.254/latest/meta-data/", "private_host"),
    ("http://localhost:{port}/image.jpg", "private_host"),
    ("http://0x7f.1:{port}/image.jpg", "private_host"),
    ("file:///etc/passwd", "forbidden_scheme"),
])
def test_redirects_to_private_or_ambiguous_targets_are_refused(http_server, connections, target, reason):
    strict = fetcher(allow_private_hosts=False, allowed_hosts=("127.0.0.1",))
    location = target.format(port=http_server.port)
    error = fetch_error(strict, http_server.url("redirect-to?" + location), reason)
    assert "redirected to a refused URL" in error.message
    assert "s3cret" not in error.message.split("redirected to")[-1]  # (the first URL's query holds it)
    assert {address for address in connections} == {("127.0.0.1", http_server.port)}
    assert http_server.hits["/image.jpg"] == 0


class Rebinding:
    """A resolver that answers a public address first and 127.0.0.1 afterwards (DNS rebinding)."""

    def __init__(self):
        self.calls = []

    def __call__(self, host, port, type=0):
        self.calls.append(host)
        address = PUBLIC if len(self.calls) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]


def mapped_connector(server_port, seen):
    """Connect "PUBLIC" to the local server; record what was asked for; refuse the rest."""
    def connect(family, sockaddr, timeout):
        seen.append(sockaddr[0])
        if sockaddr[0] != PUBLIC:
            raise ConnectionRefusedError(f"test: the unchecked address {sockaddr[0]} was used")
        return connect_socket(family, ("127.0.0.1", server_port), timeout)
    return connect


@pytest.mark.parametrize("path", ["flaky/rebind", "redirect", "redirect-to?http://cdn.example:{port}/image.jpg"])
def test_the_checked_address_is_pinned_for_retries_and_redirects(http_server, path):
    resolver, seen = Rebinding(), []
    fetch = HttpFetcher(FetchConfig(**FAST), resolver=resolver,
                        connector=mapped_connector(http_server.port, seen))
    url = f"http://cdn.example:{http_server.port}/" + path.format(port=http_server.port)
    assert fetch.fetch(url).data == JPEG
    assert resolver.calls == ["cdn.example"]  # resolved once, for every attempt and hop
    assert seen and set(seen) == {PUBLIC}
    assert http_server.last_headers["/image.jpg" if "redirect" in path else "/flaky/rebind"]["Host"] == (
        f"cdn.example:{http_server.port}")


def test_a_new_fetch_resolves_again_and_refuses_the_rebound_address(http_server):
    resolver, seen = Rebinding(), []
    fetch = HttpFetcher(FetchConfig(**FAST), resolver=resolver, connector=mapped_connector(http_server.port, seen))
    url = f"http://cdn.example:{http_server.port}/image.jpg"
    assert fetch.fetch(url).data == JPEG
    fetch_error(fetch, url, "private_host")  # the second answer is 127.0.0.1: refused, never connected
    assert seen == [PUBLIC]


# --- HANG and LEAK at the byte reader --------------------------------------------------------


@pytest.fixture
def special_files(tmp_path):
    """A FIFO, a listening Unix socket, and symlinks to them and to devices."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.jpg"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen(1)
    (tmp_path / "link-to-fifo.jpg").symlink_to(fifo)
    (tmp_path / "link-to-zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "folder.jpg").mkdir()
    try:
        yield tmp_path
    finally:
        server.close()


@pytest.mark.parametrize("name, reason", [
    ("pipe.jpg", "is_fifo"),
    ("link-to-fifo.jpg", "is_fifo"),
    ("sock.jpg", "is_socket"),
    ("folder.jpg", "is_directory"),
    ("link-to-zero.jpg", "system_path"),
])
def test_non_regular_local_files_are_refused_before_opening(special_files, name, reason):
    started = time.monotonic()
    with pytest.raises(RowError) as info:
        read_file_bytes(str(special_files / name), 1000, timeout=5)
    assert info.value.reason == reason, info.value.message
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("path", ["/dev/stdin", "/dev/zero", "/dev/null", "/proc/self/environ",
                                  "/sys/kernel/mm/../../class", "/dev/../dev/random"])
def test_system_paths_are_never_read(path):
    with pytest.raises(RowError) as info:
        read_file_bytes(path, 1000, timeout=5)
    assert info.value.reason == "system_path"


def test_a_regular_file_swapped_for_a_fifo_after_the_check_is_refused(tmp_path, monkeypatch):
    # The stat says "regular file"; what is opened is a FIFO (O_NONBLOCK keeps open from blocking).
    real = tmp_path / "real.jpg"
    real.write_bytes(JPEG)
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(real) if str(p) == str(fifo) else real_stat(p))
    started = time.monotonic()
    with pytest.raises(RowError) as info:
        read_file_bytes(str(fifo), 1000, timeout=5)
    assert info.value.reason == "is_fifo" and time.monotonic() - started < 1.0


@pytest.mark.parametrize("location, reason", [
    ("data:image/png;base64,iVBORw0KGgo=", "data_url"),
    ("hdfs://namenode/images/a.jpg", "filesystem_unavailable"),
    ("file:///etc/passwd", "forbidden_scheme"),
    ("ftp://example.com/a.jpg", "forbidden_scheme"),
    ("mailto:someone@example.com", "forbidden_scheme"),
    ("nosuchfs://bucket/a.jpg", "forbidden_scheme"),
])
def test_each_unsupported_scheme_has_its_own_reason(location, reason):
    with pytest.raises(RowError) as info:
        read_file_bytes(location, 1000, timeout=5)
    assert info.value.reason == reason, info.value.message
    assert "iVBOR" not in info.value.message


def test_s3_without_boto3_is_filesystem_unavailable(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "boto3" else real(name, *a))
    with pytest.raises(RowError) as info:
        read_file_bytes("s3://bucket/a.jpg", 1000, timeout=5)
    assert info.value.reason == "filesystem_unavailable" and "boto3" in info.value.message


def test_a_local_read_has_a_deadline(tmp_path, monkeypatch):
    path = tmp_path / "slow.jpg"
    path.write_bytes(b"\xff" * (3 << 20))
    real_read = os.read

    def slow_read(fd, n):
        time.sleep(0.2)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", slow_read)
    with pytest.raises(RowError) as info:
        read_file_bytes(str(path), 10 << 20, timeout=0.3)
    assert info.value.reason == "timeout"


def test_text_content_is_named_but_never_quoted():
    secret = b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    with pytest.raises(DecodeError) as info:
        decode_image(secret, 16)
    assert info.value.reason == "not_an_image" and "plain text" in info.value.message
    assert "wJalr" not in info.value.message and "AWS_SECRET" not in info.value.message


# --- TLS: connect to the pinned address, verify and send SNI for the name ------------------------


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server on 127.0.0.1 with a certificate for cdn.example; records the SNI it is sent."""
    ssl = pytest.importorskip("ssl")
    x509 = pytest.importorskip("cryptography.x509")
    from datetime import datetime, timedelta, timezone
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdn.example")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("cdn.example")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    sni_seen, hosts_seen = [], []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            hosts_seen.append(self.headers.get("Host"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG)

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_path, key_path)
    server_ctx.sni_callback = lambda sock, server_name, ctx: sni_seen.append(server_name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    try:
        yield httpd.server_address[1], client_ctx, sni_seen, hosts_seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_goes_to_the_pinned_address_with_the_name_in_sni_and_host(tls_server):
    port, client_ctx, sni_seen, hosts_seen = tls_server
    resolver, seen = Rebinding(), []
    fetch = HttpFetcher(FetchConfig(**FAST), resolver=resolver, connector=mapped_connector(port, seen),
                        tls_context=client_ctx)
    assert fetch.fetch(f"https://cdn.example:{port}/a.jpg").data == JPEG
    assert seen == [PUBLIC] and sni_seen == ["cdn.example"] and hosts_seen == [f"cdn.example:{port}"]


def test_https_certificate_for_another_name_is_an_ssl_error(tls_server):
    port, client_ctx, _, _ = tls_server
    seen = []

    def resolver(host, port_, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port_))]

    fetch = HttpFetcher(FetchConfig(**FAST), resolver=resolver, connector=mapped_connector(port, seen),
                        tls_context=client_ctx)
    error = fetch_error(fetch, f"https://other.example:{port}/a.jpg", "ssl_error")
    assert "TLS" in error.message


def test_kept_alive_connections_are_reused_only_for_the_same_pinned_address(http_server):
    seen = []

    def resolver(host, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port))]

    fetch = HttpFetcher(FetchConfig(**FAST), resolver=resolver, connector=mapped_connector(http_server.port, seen))
    for _ in range(3):
        assert fetch.fetch(f"http://cdn.example:{http_server.port}/image.jpg").data == JPEG
    assert seen == [PUBLIC]  # one connection, reused
    fetch.close()
