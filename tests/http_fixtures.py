"""A local HTTP server that misbehaves on purpose, for download tests.

It listens on 127.0.0.1 on a free port and serves the failure modes real image
hosts show: 404s, transient 500s, 429 with Retry-After, bodies that trickle or
never end, redirect loops, HTML labelled as JPEG. Import the ``http_server``
fixture into a test module to use it.
"""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import unquote

import pytest
from PIL import Image


def make_jpeg(colour=(200, 30, 30), size=(32, 24)) -> bytes:
    """A small valid JPEG, generated so tests need no binary fixtures."""
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


JPEG = make_jpeg()
HTML = b"<!DOCTYPE html><html><body><h1>Sign in to view this image</h1></body></html>"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # avoid 40 ms delayed-ACK stalls per response
    server: "_Server"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server naming)
        path = self.path.split("?", 1)[0]
        hits = self.server.count(path)
        self.server.last_headers[path] = dict(self.headers.items())
        parts = path.strip("/").split("/")
        route = parts[0]
        try:
            handler = getattr(self, f"_route_{route.replace('-', '_').replace('.', '_')}", None)
            if handler is None:
                self._send(404, b"not found", "text/plain")
            else:
                handler(parts[1:], hits)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as the timeout tests intend

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    # /image.jpg: a good JPEG with cache headers; answers a matching
    # conditional request with 304 Not Modified, as CDNs do.
    def _route_image_jpg(self, rest, hits):
        cache = {"ETag": '"jpeg-v1"', "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"}
        if self.headers.get("If-None-Match") == cache["ETag"]:
            self.send_response(304)
            for key, value in cache.items():
                self.send_header(key, value)
            self.end_headers()
            return
        self._send(200, JPEG, headers=cache)

    # /photo.png: a JPEG at a URL ending .png (content decides, not names).
    def _route_photo_png(self, rest, hits):
        self._send(200, JPEG, content_type="image/png")

    # /html-as-jpeg: an HTML page served as image/jpeg.
    def _route_html_as_jpeg(self, rest, hits):
        self._send(200, HTML, content_type="image/jpeg")

    # /status/<code>: always that status.
    def _route_status(self, rest, hits):
        self._send(int(rest[0]), b"error page", "text/plain")

    # /flaky/<key>: 500 on the first request for key, then the JPEG.
    def _route_flaky(self, rest, hits):
        if hits == 1:
            self._send(500, b"temporary failure", "text/plain")
        else:
            self._send(200, JPEG)

    # /throttled/<key>: 429 with Retry-After: 1 first, then the JPEG.
    def _route_throttled(self, rest, hits):
        if hits == 1:
            self._send(429, b"slow down", "text/plain", headers={"Retry-After": "1"})
        else:
            self._send(200, JPEG)

    # /slow: declares 100 kB and sends one byte every 0.1 s.
    def _route_slow(self, rest, hits):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        stop = time.monotonic() + 20
        while time.monotonic() < stop and not self.server.stopping.is_set():
            self.wfile.write(b"\xff")
            self.wfile.flush()
            time.sleep(0.1)

    # /stall: sends headers, then nothing.
    def _route_stall(self, rest, hits):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.flush()
        self.server.stopping.wait(20)

    # /hang: accepts the request and never answers.
    def _route_hang(self, rest, hits):
        self.server.stopping.wait(20)
        self.close_connection = True

    # /endless: streams bytes fast, forever, with no length.
    def _route_endless(self, rest, hits):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        block = b"\x00" * 65536
        stop = time.monotonic() + 20
        while time.monotonic() < stop and not self.server.stopping.is_set():
            self.wfile.write(block)
        self.close_connection = True

    def _trickle(self, data: bytes, interval: float = 0.1):
        """Write ``data`` one byte per ``interval`` until the client or the server gives up."""
        stop = time.monotonic() + 20
        for byte in itertools.cycle(data):
            if time.monotonic() > stop or self.server.stopping.is_set():
                break
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(interval)
        self.close_connection = True

    # /trickle-status: the status line, one byte every 0.1 s, never finished.
    def _route_trickle_status(self, rest, hits):
        self.wfile.write(b"HTTP/1.1 200 ")
        self._trickle(b"OOOOOOOOOK")

    # /trickle-headers: a status line, then header bytes one every 0.1 s, never finished.
    def _route_trickle_headers(self, rest, hits):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n")
        self._trickle(b"X-Padding: slow\r\n")

    # /endless-trailers: a chunked JPEG whose trailer section never ends.
    def _route_endless_trailers(self, rest, hits):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.wfile.write(b"%x\r\n%s\r\n0\r\n" % (len(JPEG), JPEG))
        self._trickle(b"X-Trailer: more\r\n", interval=0.02)

    # /chunked: a JPEG sent in two chunks with one trailer (a well-formed chunked answer).
    def _route_chunked(self, rest, hits):
        half = len(JPEG) // 2
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (JPEG[:half], JPEG[half:]):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\nX-Checksum: none\r\n\r\n")

    # /not-http: answers with a banner that is not HTTP (and holds a "secret").
    def _route_not_http(self, rest, hits):
        self.wfile.write(b"SECRET-BANNER sk_live_notforerrors\r\n")
        self.close_connection = True

    # /redirect-with-credentials: 302 to /image.jpg on this server with user:password@ in the URL.
    def _route_redirect_with_credentials(self, rest, hits):
        self._redirect(f"http://shop:hunter2pw@{self.headers.get('Host')}/image.jpg")

    # /loop/<n>: redirects to /loop/<n+1>, without end.
    def _route_loop(self, rest, hits):
        self._redirect(f"/loop/{int(rest[0]) + 1 if rest else 1}")

    # /redirect: 302 to /image.jpg on this server.
    def _route_redirect(self, rest, hits):
        self._redirect("/image.jpg")

    # /redirect-to?url: 302 to any URL (for redirect-policy tests).
    def _route_redirect_to(self, rest, hits):
        self._redirect(unquote(self.path.split("?", 1)[1]))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.last_headers: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def count(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]


class LocalHttpServer:
    """A running test server: ``url(path)`` builds URLs, ``hits`` counts requests per path."""

    def __init__(self):
        self._server = _Server()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def hits(self) -> Counter:
        return self._server.hits

    @property
    def last_headers(self) -> dict:
        """Request headers of the latest request, by path."""
        return self._server.last_headers

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self) -> "LocalHttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def http_server() -> Iterator[LocalHttpServer]:
    """A LocalHttpServer started for one test and stopped after it."""
    server = LocalHttpServer().start()
    try:
        yield server
    finally:
        server.stop()
