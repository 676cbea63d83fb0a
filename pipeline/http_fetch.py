"""Download image bytes over HTTP(S) safely, politely and with bounded time.

Catalogue URLs point at servers we do not control: some are slow, some fail
transiently, some redirect forever, some stream without end, and a URL in a
manifest must never make a worker call an internal service or the cloud
metadata endpoint. :class:`HttpFetcher` handles all of that and turns every
failure into a :class:`FetchError` with a reason code. Whether the bytes are an
image is not decided here: decoding looks at the content.

Three rules keep a URL from reaching a host it was not checked for:

* each URL is parsed exactly once, by :func:`parse_url`, and the request is
  built from that parse (no second parser gets a say in which host is meant);
  an authority with credentials, a backslash, percent-encoding or any other
  ambiguity is refused rather than guessed at;
* the host is resolved once per fetch and every address must be public; the
  connection goes to one of exactly those addresses (the Host header and TLS
  SNI carry the name), for every retry and every redirect back to that host,
  so a DNS answer that changes between check and connect (rebinding) is never
  used;
* every redirect target goes through the same parse and check before it is
  requested.

One deadline, ``FetchConfig.total_timeout``, covers the whole exchange of a
fetch: DNS answer to last byte, connect, TLS handshake, status line, headers,
body, chunk trailers, retries, their backoff sleeps and redirects. Socket waits
are shortened to what is left of it, and a watchdog thread shuts down the
socket of an exchange that overruns it (a server trickling one byte at a time
never trips a per-read timeout). :func:`cancel_all_fetches` (also run when the
interpreter exits) ends every fetch in flight at once, so an interrupted run
does not wait out downloads and retries.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - imported first, so our exit hook runs before its join
import email.utils
import heapq
import http
import http.client
import ipaddress
import itertools
import random
import re
import select
import socket
import ssl
import threading
import time
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

from pipeline.locations import location_scheme, redact_location
from pipeline.row_errors import RowError

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
RETRY_STATUSES = frozenset([429, *range(500, 600)])
REDIRECT_STATUSES = frozenset([301, 302, 303, 307, 308])
CHUNK_BYTES = 64 * 1024
IDLE_REUSE_S = 15.0  # a kept-alive connection idle longer than this is not reused

# Cloud metadata endpoints; also covered by the link-local/private checks,
# listed so the intent is explicit.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)

# A host name after IDNA encoding: dot-separated labels of letters, digits,
# "-" and "_", with an optional final dot. Anything else in an authority
# (say "*", "!", "$", "%", "\") is a parser differential waiting to happen.
_HOST_NAME = re.compile(r"^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?$")
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"

Resolver = Callable[..., list]
# (family, sockaddr, timeout) -> a connected socket.
Connector = Callable[[int, tuple, float], socket.socket]


@dataclass
class FetchConfig:
    """How URLs are downloaded; timeouts are in seconds.

    ``total_timeout`` bounds one whole fetch (connect, TLS, headers, body,
    trailers, retries, backoff and redirects together); ``connect_timeout``
    and ``read_timeout`` bound each connect and each socket wait within it.
    ``allowed_hosts`` lists host names exempt from the private-address check
    (for example an internal image CDN) while every other private address
    stays refused.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 60.0
    max_retries: int = 3
    backoff_factor: float = 0.5
    max_backoff: float = 30.0
    max_redirects: int = 5
    max_bytes: int = 20 * 1024 * 1024
    user_agent: str = "visual-similarity-pipeline/0.1 (+batch image embedding)"
    allow_private_hosts: bool = False
    concurrency: int = 32
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class FetchResult:
    """A downloaded body with the response metadata worth keeping."""

    data: bytes
    status: int
    etag: str | None
    last_modified: str | None
    retries: int


class FetchError(RowError):
    """A URL that could not be downloaded; ``retries`` says how often it was retried."""

    def __init__(self, reason: str, message: str, retries: int = 0):
        super().__init__(reason, message)
        self.retries = retries


@dataclass(frozen=True)
class ParsedUrl:
    """The one parse of a URL that every later step uses.

    ``host`` is lower-case ASCII (IDNA-encoded, no brackets), ``target`` the
    request-target sent on the request line, ``host_header`` the Host header
    value, ``shown`` the URL as error messages may quote it.
    """

    scheme: str
    host: str
    port: int
    target: str
    host_header: str
    literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    shown: str


@dataclass(frozen=True)
class CheckedUrl:
    """A parsed URL and the addresses it was checked against (and will connect to)."""

    url: ParsedUrl
    addresses: tuple  # ((family, sockaddr), ...)


def parse_url(url: str) -> ParsedUrl:
    """Parse ``url`` strictly, once, or raise FetchError; never guess.

    Refused: a non-http(s) scheme (``forbidden_scheme``); credentials or an
    empty userinfo in the authority (``credentials_in_url``); a backslash
    anywhere, percent-encoding, a zone id or characters a host name cannot
    have in the authority (``ambiguous_url``); whitespace or control
    characters, a missing ``//`` or host, a bad port or IP literal
    (``invalid_url``). Non-ASCII in the path or query is percent-encoded as
    UTF-8; the fragment is dropped (it is never sent).
    """
    if not isinstance(url, str) or not url:
        raise FetchError("invalid_url", "the row has no URL")
    shown = redact_location(url)
    scheme = location_scheme(url)
    if scheme not in ALLOWED_SCHEMES:
        what = f"{scheme}:" if scheme else "no scheme"
        raise FetchError("forbidden_scheme", f"only http and https URLs are downloaded, not {what} ({shown})")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise FetchError("invalid_url", f"the URL {shown!r} is malformed: it contains whitespace or control characters")
    if "\\" in re.split(r"[?#]", url, maxsplit=1)[0]:  # in the authority or path; a query may hold one
        raise FetchError("ambiguous_url", f"the URL {shown!r} contains a backslash, which URL parsers read "
                                          "differently (as a path or as part of the host); refused")
    if not url[len(scheme) + 1:].startswith("//"):
        raise FetchError("invalid_url", f"the URL {shown!r} is malformed: no // after {scheme}:")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise FetchError("invalid_url", f"the URL {shown!r} is malformed: {exc}") from None
    authority = parts.netloc
    if "@" in authority:
        raise FetchError("credentials_in_url", f"the URL {shown!r} carries credentials (user:password@ before the "
                                               "host); image URLs with credentials are refused and never stored")
    if "%" in authority:
        raise FetchError("ambiguous_url", f"the URL {shown!r} has percent-encoding or a zone id in its host; refused")
    literal = None
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise FetchError("invalid_url", f"the URL {shown!r} is malformed: unclosed [ in the host")
        host, rest = authority[1:close], authority[close + 1:]
        if rest and not rest.startswith(":"):
            raise FetchError("ambiguous_url", f"the URL {shown!r} has text after its [IPv6] host; refused")
        port_text = rest[1:] if rest else None
        try:
            literal = ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise FetchError("invalid_url", f"the URL {shown!r} is malformed: bad IPv6 address") from exc
        host = literal.compressed
    else:
        host, colon, port_text = authority.partition(":")
        port_text = port_text if colon else None
        if port_text is not None and ":" in port_text:
            raise FetchError("ambiguous_url", f"the URL {shown!r} has more than one ':' in its authority; refused")
    if not host:
        raise FetchError("invalid_url", f"the URL {shown!r} has no host name")
    port = DEFAULT_PORTS[scheme]
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise FetchError("invalid_url", f"the URL {shown!r} is malformed: the port is not a number in 1-65535")
        port = int(port_text)
    if literal is None:
        try:
            host = host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
        except UnicodeError as exc:
            raise FetchError("invalid_url", f"the URL {shown!r} is malformed: its host name is not valid IDNA") from exc
        if not _HOST_NAME.match(host):
            raise FetchError("ambiguous_url", f"the URL {shown!r} has characters a host name cannot have; refused")
        try:
            literal = ipaddress.IPv4Address(host)
        except ValueError:
            literal = None
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if not target.startswith("/"):
        target = "/" + target
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    named = f"[{host}]" if isinstance(literal, ipaddress.IPv6Address) else host
    host_header = named if port == DEFAULT_PORTS[scheme] else f"{named}:{port}"
    return ParsedUrl(scheme, host, port, target, host_header, literal, shown)


def check_url(
    url: str | ParsedUrl,
    allow_private_hosts: bool = False,
    allowed_hosts: tuple[str, ...] = (),
    resolver: Resolver = socket.getaddrinfo,
) -> CheckedUrl:
    """Refuse URLs a batch job must not fetch; return the URL and its pinned addresses.

    The URL is parsed by :func:`parse_url` and its host resolved once; unless
    private hosts are allowed (or the host is in ``allowed_hosts``) every
    address must be public, so a manifest row (or a redirect) cannot point the
    worker at localhost, the internal network or the cloud metadata service.
    The returned addresses are the only ones a fetch may connect to.
    """
    parsed = url if isinstance(url, ParsedUrl) else parse_url(url)
    if parsed.literal is not None:
        family = socket.AF_INET6 if isinstance(parsed.literal, ipaddress.IPv6Address) else socket.AF_INET
        sockaddr = (str(parsed.literal), parsed.port) if family == socket.AF_INET else (
            str(parsed.literal), parsed.port, 0, 0)
        infos = [(family, socket.SOCK_STREAM, 6, "", sockaddr)]
    else:
        try:
            infos = resolver(parsed.host, parsed.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise FetchError("dns_error", f"the host {parsed.host!r} could not be resolved: {exc}") from exc
    addresses = []
    for info in infos or ():
        family, sockaddr = info[0], tuple(info[4])
        if family not in (socket.AF_INET, socket.AF_INET6) or (family, sockaddr) in addresses:
            continue
        addresses.append((family, sockaddr))
    if not addresses:
        raise FetchError("dns_error", f"the host {parsed.host!r} resolved to no address")
    exempt = allow_private_hosts or parsed.host.rstrip(".") in {h.lower().rstrip(".") for h in allowed_hosts}
    if not exempt:
        for _, sockaddr in addresses:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if _is_private(address):
                raise FetchError(
                    "private_host",
                    f"refused to fetch {parsed.shown}: {parsed.host} resolves to the non-public address "
                    f"{address} (set allow_private_hosts or allowed_hosts to permit internal hosts)",
                )
    return CheckedUrl(parsed, tuple(addresses))


def _is_private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for any address that is not plainly public internet."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address in METADATA_ADDRESSES
        or not address.is_global
        or address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
    )


def connect_socket(family: int, sockaddr: tuple, timeout: float) -> socket.socket:
    """Open a TCP connection to exactly ``sockaddr`` (no name resolution here)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


# --- the whole-exchange deadline -------------------------------------------------


class _Guard:
    """One fetch's deadline, and the socket to shut down when it passes."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self.cancelled = False
        self.done = False
        self.phase = "connecting"
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once past)."""
        return self.deadline - time.monotonic()

    def attach(self, sock: socket.socket | None) -> None:
        """Make ``sock`` the socket the watchdog shuts down (None: none)."""
        with self._lock:
            self._sock = sock
            tripped = self.expired
        if tripped and sock is not None:
            _shutdown(sock)

    def trip(self, cancelled: bool = False) -> None:
        """Mark the exchange over (deadline or cancellation) and unblock its socket."""
        with self._lock:
            if self.done:
                return
            self.expired = True
            self.cancelled = self.cancelled or cancelled
            sock = self._sock
        if sock is not None:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    """Shut a socket down from another thread: a blocked recv or send returns at once.

    ``socket.socket.shutdown`` is called unbound so that, for a TLS socket, the
    SSL object the owning thread is using is left alone.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


class _Watchdog:
    """One daemon thread that trips each guard whose deadline has passed."""

    def __init__(self):
        self._heap: list = []
        self._cond = threading.Condition()
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, guard: _Guard) -> None:
        """Watch ``guard`` until it is done or its deadline passes."""
        with self._cond:
            heapq.heappush(self._heap, (guard.deadline, next(self._counter), guard))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            if self._heap[0][2] is guard:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, _, guard = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            if not guard.done:
                guard.trip()


_WATCHDOG = _Watchdog()
_LIVE_FETCHERS: "weakref.WeakSet[HttpFetcher]" = weakref.WeakSet()


def cancel_all_fetches() -> None:
    """Cancel every fetch in flight in this process and refuse new ones.

    For an interrupted run (SIGINT): downloads, retries and backoff sleeps end
    within moments instead of running to their timeouts. It also runs when the
    interpreter exits, before the thread pools' exit join.
    """
    for fetcher in list(_LIVE_FETCHERS):
        fetcher.cancel()


try:  # Interpreter exit joins pool threads; cancel their fetches first (hooks run last-registered first).
    threading._register_atexit(cancel_all_fetches)  # noqa: SLF001 - the only hook that runs before that join
except (AttributeError, RuntimeError):  # pragma: no cover - other interpreters, or already shutting down
    pass


# --- the fetcher ----------------------------------------------------------------------


class _Retryable(Exception):
    """An attempt failed in a way another attempt may not (refused, reset, timed out)."""

    def __init__(self, reason: str, message: str, stale: bool = False):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.stale = stale  # a reused keep-alive connection failed before any answer


class _Connection:
    """A connected (maybe TLS) socket and the http.client connection speaking over it."""

    def __init__(self, key: tuple, sock: socket.socket, http_conn: http.client.HTTPConnection):
        self.key = key
        self.sock = sock
        self.http = http_conn
        self.idle_since = 0.0
        self.reused = False

    def close(self) -> None:
        """Close the connection and its socket."""
        try:
            self.http.close()
        finally:
            try:
                self.sock.close()
            except OSError:
                pass


class HttpFetcher:
    """Downloads URLs with pinned addresses, one deadline per fetch, retries and limits.

    One instance is meant to live for a whole worker (create it in a DoFn's
    ``setup``) and is safe to use from many threads: kept-alive connections,
    up to ``config.concurrency`` per host and address, are reused. No
    cookies, no ``~/.netrc`` and no proxy settings are ever used: requests go
    straight to the checked address. ``resolver``, ``connector`` and
    ``tls_context`` can be replaced (tests use this to simulate DNS answers
    and trust a test certificate).
    """

    def __init__(self, config: FetchConfig | None = None, resolver: Resolver = socket.getaddrinfo,
                 connector: Connector = connect_socket, tls_context: ssl.SSLContext | None = None):
        self.config = config or FetchConfig()
        self._resolver = resolver
        self._connector = connector
        self._tls = tls_context or ssl.create_default_context()
        self._idle: dict[tuple, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._guards: set[_Guard] = set()
        self._closed = threading.Event()
        _LIVE_FETCHERS.add(self)

    def cancel(self) -> None:
        """End every fetch in flight (reason ``cancelled``) and refuse new ones."""
        self._closed.set()
        with self._lock:
            guards = list(self._guards)
        for guard in guards:
            guard.trip(cancelled=True)
        self._close_idle()

    def close(self) -> None:
        """Cancel what is in flight and close kept-alive connections."""
        self.cancel()

    def _close_idle(self) -> None:
        with self._lock:
            idle = [conn for conns in self._idle.values() for conn in conns]
            self._idle.clear()
        for conn in idle:
            conn.close()

    def fetch(self, url: str, etag: str | None = None,
              last_modified: str | None = None) -> FetchResult:
        """Download ``url`` and return its body, or raise FetchError.

        Redirects are followed by hand, up to ``max_redirects``, so that every
        hop passes the same parse, scheme and private-address checks as the
        first. With the ``etag`` / ``last_modified`` of an earlier download the
        request is conditional: an unchanged image answers 304 (``status``
        304, empty ``data``), so a nightly run does not download it again.
        """
        conditional = {}
        if etag and _header_safe(etag):
            conditional["If-None-Match"] = etag
        if last_modified and _header_safe(last_modified):
            conditional["If-Modified-Since"] = last_modified
        guard = _Guard(time.monotonic() + self.config.total_timeout)
        with self._lock:
            # Checked under the lock cancel() takes to collect guards: a cancel either
            # sees this guard (and trips it) or happened first (and is seen here).
            if self._closed.is_set():
                raise FetchError("cancelled",
                                 f"the download of {redact_location(url)} was cancelled: the run is stopping")
            self._guards.add(guard)
        _WATCHDOG.arm(guard)
        try:
            return self._fetch(url, conditional, guard)
        finally:
            guard.done = True
            with self._lock:
                self._guards.discard(guard)

    def _fetch(self, url: str, conditional: dict, guard: _Guard) -> FetchResult:
        cfg = self.config
        pinned: dict[tuple, CheckedUrl] = {}
        retries = 0
        current = url
        shown = redact_location(url)
        for hop in range(cfg.max_redirects + 1):
            parsed = parse_url(current) if hop == 0 else self._parse_redirect(current, shown, retries)
            key = (parsed.scheme, parsed.host, parsed.port)
            if key not in pinned:  # resolved once per fetch: retries and redirects reuse it
                checked = self._check(parsed, shown if hop else None, retries)
                pinned[key] = checked
            checked = CheckedUrl(parsed, pinned[key].addresses)
            conn, response, retries = self._exchange(checked, conditional, guard, retries)
            keep = False
            try:
                location = response.getheader("Location")
                if response.status in REDIRECT_STATUSES and location:
                    if not _header_safe(location) or "\\" in re.split(r"[?#]", location, maxsplit=1)[0]:
                        raise FetchError("ambiguous_url", f"{shown} redirected to a refused URL: its Location has "
                                                          "a backslash or control characters", retries)
                    current = urljoin(f"{parsed.scheme}://{parsed.host_header}{parsed.target}", location)
                    continue
                if response.status == 304 and conditional:
                    self._finish_body(response, guard)
                    keep = True
                    return FetchResult(
                        data=b"",
                        status=304,
                        etag=response.getheader("ETag") or conditional.get("If-None-Match"),
                        last_modified=response.getheader("Last-Modified") or conditional.get("If-Modified-Since"),
                        retries=retries,
                    )
                if not 200 <= response.status < 300:
                    raise _status_error(response.status, parsed.shown, retries)
                data = self._read_body(response, parsed.shown, guard, retries)
                keep = True
                return FetchResult(
                    data=data,
                    status=response.status,
                    etag=response.getheader("ETag"),
                    last_modified=response.getheader("Last-Modified"),
                    retries=retries,
                )
            finally:
                self._release(conn, response, guard, keep)
        message = f"{shown} redirected more than {cfg.max_redirects} times (last to {redact_location(current)})"
        raise FetchError("too_many_redirects", message, retries)

    def _parse_redirect(self, target: str, shown: str, retries: int) -> ParsedUrl:
        """Parse a redirect target like a manifest URL; say that it came from a redirect."""
        try:
            return parse_url(target)
        except FetchError as exc:
            raise FetchError(exc.reason, f"{shown} redirected to a refused URL: {exc.message}", retries) from exc

    def _check(self, parsed: ParsedUrl, redirected_from: str | None, retries: int) -> CheckedUrl:
        cfg = self.config
        try:
            return check_url(parsed, cfg.allow_private_hosts, cfg.allowed_hosts, self._resolver)
        except FetchError as exc:
            if redirected_from is None:
                raise FetchError(exc.reason, exc.message, retries) from exc
            raise FetchError(exc.reason, f"{redirected_from} redirected to a refused URL: {exc.message}",
                             retries) from exc

    # --- one request, with retries ------------------------------------------------

    def _exchange(self, checked: CheckedUrl, conditional: dict, guard: _Guard,
                  retries: int) -> tuple[_Connection, http.client.HTTPResponse, int]:
        """Send the GET (retrying connection failures and 429/5xx); return the answer."""
        cfg = self.config
        attempt = 0
        shown = checked.url.shown
        while True:
            self._raise_if_over(guard, shown, retries + attempt)
            conn = None
            try:
                conn = self._connection(checked, guard)
                response = self._request(conn, checked.url, conditional, guard)
            except _Retryable as exc:
                if conn is not None:
                    self._discard(conn, guard)
                self._raise_if_over(guard, shown, retries + attempt)
                if exc.stale:
                    continue  # a kept-alive connection the server had closed: not a retry
                delay = self._backoff(attempt + 1, None, guard) if attempt < cfg.max_retries else None
                if delay is not None:
                    self._sleep(delay, guard, shown, retries + attempt)
                    attempt += 1
                    continue
                suffix = f" (after {attempt} retries)" if attempt else ""
                raise FetchError(exc.reason, f"{exc.message}{suffix}", retries + attempt) from None
            except FetchError as exc:
                if conn is not None:
                    self._discard(conn, guard)
                raise FetchError(exc.reason, exc.message, retries + attempt) from None
            if response.status in RETRY_STATUSES and attempt < cfg.max_retries:
                delay = self._backoff(attempt + 1, _retry_after(response.getheader("Retry-After")), guard)
                if delay is not None:
                    self._discard(conn, guard)
                    self._sleep(delay, guard, shown, retries + attempt)
                    attempt += 1
                    continue
                # No time left to wait for a retry: report this answer as it is.
            return conn, response, retries + attempt

    def _backoff(self, retry: int, retry_after: float | None, guard: _Guard) -> float | None:
        """Seconds to wait before retry number ``retry``; None when the deadline leaves no time for it.

        The wait is ``backoff_factor * 2**(retry-1)`` plus jitter, or the
        server's Retry-After, capped at ``max_backoff`` either way.
        """
        cfg = self.config
        if retry_after is not None:
            delay = min(retry_after, cfg.max_backoff)
        else:
            base = cfg.backoff_factor * 2 ** (retry - 1)
            delay = min(cfg.max_backoff, base + random.uniform(0, cfg.backoff_factor))
        delay = max(0.0, delay)
        return None if guard.remaining() <= delay + 0.001 else delay

    def _sleep(self, delay: float, guard: _Guard, shown: str, retries: int) -> None:
        """Sleep ``delay`` seconds, cut short (and raised as ``cancelled``) when the fetcher is cancelled."""
        self._closed.wait(delay)
        self._raise_if_over(guard, shown, retries)

    def _raise_if_over(self, guard: _Guard, shown: str, retries: int, received: int | None = None) -> None:
        """Raise the ``cancelled`` or ``timeout`` error once the exchange is over."""
        if guard.cancelled or self._closed.is_set():
            raise FetchError("cancelled", f"the download of {shown} was cancelled: the run is stopping", retries)
        if guard.expired or guard.remaining() <= 0:
            total = f"{self.config.total_timeout:g}"
            if guard.phase == "body":
                message = (f"{shown} was still sending the body (or its chunk trailers) after {total} s "
                           f"({received or 0:,} bytes so far; fetch_total_timeout)")
            elif guard.phase == "headers":
                message = f"{shown} was still sending its status line and headers after {total} s (fetch_total_timeout)"
            else:
                message = f"gave up on {shown}: no answer within the {total} s fetch_total_timeout ({guard.phase})"
            raise FetchError("timeout", message, retries)

    def _wait_limit(self, guard: _Guard, limit: float) -> float:
        """A socket wait of at most ``limit`` that cannot pass the deadline."""
        return max(0.001, min(limit, guard.remaining()))

    def _connection(self, checked: CheckedUrl, guard: _Guard) -> _Connection:
        """A kept-alive connection to one of the pinned addresses, or a new one."""
        parsed = checked.url
        for family, sockaddr in checked.addresses:
            conn = self._take_idle((parsed.scheme, parsed.host, parsed.port, sockaddr))
            if conn is not None:
                guard.attach(conn.sock)
                return conn
        last: Exception | None = None
        for family, sockaddr in checked.addresses:
            guard.phase = "connecting"
            remaining = guard.remaining()
            if remaining <= 0:
                break
            try:
                sock = self._connector(family, sockaddr, max(0.001, min(self.config.connect_timeout, remaining)))
            except (socket.timeout, TimeoutError) as exc:
                last = _Retryable("timeout", f"{parsed.shown} did not answer in time: connecting timed out")
                last.__cause__ = exc
                continue
            except OSError as exc:
                last = _Retryable("connection_error", f"could not connect to download {parsed.shown}: "
                                                      f"{exc.strerror or type(exc).__name__}")
                continue
            guard.attach(sock)
            try:
                if parsed.scheme == "https":
                    guard.phase = "TLS handshake"
                    sock = self._tls.wrap_socket(sock, server_hostname=parsed.host, do_handshake_on_connect=False)
                    guard.attach(sock)
                    sock.settimeout(self._wait_limit(guard, self.config.read_timeout))
                    sock.do_handshake()
            except ssl.SSLError as exc:
                sock.close()
                guard.attach(None)
                if guard.expired:
                    raise _Retryable("timeout", "deadline") from exc
                detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or type(exc).__name__
                raise FetchError("ssl_error", f"the TLS connection to {parsed.shown} failed: {detail}") from None
            except (socket.timeout, TimeoutError):
                sock.close()
                raise _Retryable("timeout", f"{parsed.shown} did not answer in time: the TLS handshake stalled") from None
            except OSError as exc:
                sock.close()
                raise _Retryable("connection_error", f"the TLS connection to {parsed.shown} broke off: "
                                                     f"{exc.strerror or type(exc).__name__}") from None
            http_conn = http.client.HTTPConnection(parsed.host, parsed.port)
            http_conn.auto_open = 0  # never let http.client resolve and connect by itself
            http_conn.sock = sock
            return _Connection((parsed.scheme, parsed.host, parsed.port, sockaddr), sock, http_conn)
        if last is None:
            last = _Retryable("timeout", f"{parsed.shown} did not answer in time")
        raise last

    def _request(self, conn: _Connection, parsed: ParsedUrl, conditional: dict,
                 guard: _Guard) -> http.client.HTTPResponse:
        """Send the GET over ``conn`` and read the status line and headers."""
        cfg = self.config
        guard.phase = "headers"
        try:
            conn.sock.settimeout(self._wait_limit(guard, cfg.read_timeout))
            conn.http.putrequest("GET", parsed.target, skip_host=True, skip_accept_encoding=True)
            conn.http.putheader("Host", parsed.host_header)
            conn.http.putheader("User-Agent", cfg.user_agent)
            conn.http.putheader("Accept", "image/*,*/*;q=0.8")
            conn.http.putheader("Accept-Encoding", "identity")
            for name, value in conditional.items():
                conn.http.putheader(name, value)
            conn.http.endheaders()
            response = conn.http.getresponse()
        except (socket.timeout, TimeoutError):
            raise _Retryable("timeout", f"{parsed.shown} did not answer in time "
                                        f"(nothing for {cfg.read_timeout:g} s)") from None
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            if guard.expired:
                raise _Retryable("timeout", "deadline") from exc
            raise _Retryable("connection_error", f"{parsed.shown} closed the connection before answering",
                             stale=conn.reused) from None
        except http.client.LineTooLong as exc:
            raise FetchError("bad_response", f"{parsed.shown} sent a status line or header line over "
                                             "64 KiB; not a valid HTTP answer") from exc
        except http.client.BadStatusLine as exc:
            if guard.expired:
                raise _Retryable("timeout", "deadline") from exc
            raise FetchError("bad_response", f"{parsed.shown} did not answer with an HTTP status line "
                                             "(is it an HTTP server?)") from None
        except http.client.HTTPException as exc:
            if guard.expired:
                raise _Retryable("timeout", "deadline") from exc
            raise FetchError("bad_response", f"{parsed.shown} sent a malformed HTTP answer "
                                             f"({type(exc).__name__})") from None
        except OSError as exc:
            if guard.expired:
                raise _Retryable("timeout", "deadline") from exc
            raise _Retryable("connection_error", f"could not download {parsed.shown}: "
                                                 f"{exc.strerror or type(exc).__name__}") from None
        if guard.expired:  # the watchdog's shutdown ended a trickled line early: not an answer
            response.close()
            raise _Retryable("timeout", "deadline")
        return response

    # --- the body -----------------------------------------------------------------

    def _read_body(self, response: http.client.HTTPResponse, shown: str, guard: _Guard, retries: int) -> bytes:
        """Stream the body under the byte cap and the total deadline."""
        cfg = self.config
        limit = cfg.max_bytes
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise FetchError("too_large", f"{shown} is {int(declared):,} bytes, over the {limit:,}-byte limit", retries)
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib framing
        elif encoding in ("identity", ""):
            decoder = None
        else:
            raise FetchError("unsupported_encoding", f"{shown} was sent with Content-Encoding "
                                                     f"{encoding[:40]!r}, which is not decoded", retries)
        guard.phase = "body"
        chunks: list[bytes] = []
        received = size = 0
        try:
            while True:
                self._raise_if_over(guard, shown, retries, received)
                self._set_timeout(guard)
                chunk = response.read1(CHUNK_BYTES)
                self._raise_if_over(guard, shown, retries, received)  # EOF may be the watchdog's doing
                if not chunk:
                    break
                received += len(chunk)
                if received > limit:
                    raise FetchError("too_large", f"{shown} sent more than the {limit:,}-byte limit", retries)
                if decoder is not None:
                    chunk = decoder.decompress(chunk, limit + 1 - size)
                    if decoder.unconsumed_tail:
                        raise FetchError("too_large", f"{shown} decompresses to more than the {limit:,}-byte limit",
                                         retries)
                size += len(chunk)
                if size > limit:
                    raise FetchError("too_large", f"{shown} sent more than the {limit:,}-byte limit", retries)
                chunks.append(chunk)
        except FetchError:
            raise
        except (socket.timeout, TimeoutError):
            self._raise_if_over(guard, shown, retries, received)
            raise FetchError("timeout", f"{shown} stopped sending for {cfg.read_timeout:g} s mid-body", retries) from None
        except zlib.error:
            raise FetchError("bad_response", f"{shown} sent a body that is not valid {encoding}", retries) from None
        except (http.client.HTTPException, OSError, ValueError) as exc:
            self._raise_if_over(guard, shown, retries, received)
            raise FetchError("connection_error", f"the download of {shown} broke off after {received:,} bytes "
                                                 f"({type(exc).__name__})", retries) from None
        if response.length:  # the server closed before the Content-Length it declared
            raise FetchError("connection_error", f"the download of {shown} broke off after {received:,} of "
                                                 f"{received + response.length:,} bytes", retries)
        response.close()
        return b"".join(chunks)

    def _finish_body(self, response: http.client.HTTPResponse, guard: _Guard) -> None:
        """Read what is left of a body that should be empty (a 304), so the connection can be reused."""
        if response.length == 0 or response.isclosed():
            response.close()

    def _set_timeout(self, guard: _Guard) -> None:
        """Shorten the socket's wait so one read cannot overrun the deadline."""
        sock = guard._sock
        if sock is not None:
            try:
                sock.settimeout(self._wait_limit(guard, self.config.read_timeout))
            except OSError:
                pass

    # --- kept-alive connections ---------------------------------------------------

    def _release(self, conn: _Connection, response: http.client.HTTPResponse, guard: _Guard, keep: bool) -> None:
        """Return a cleanly finished connection to the pool, else close it."""
        guard.attach(None)
        reusable = (keep and response.isclosed() and not response.will_close and not guard.expired
                    and not self._closed.is_set())
        if not reusable:
            response.close()
            conn.close()
            return
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < max(1, self.config.concurrency):
                idle.append(conn)
                return
        conn.close()

    def _discard(self, conn: _Connection, guard: _Guard) -> None:
        guard.attach(None)
        conn.close()

    def _take_idle(self, key: tuple) -> _Connection | None:
        """A kept-alive connection for ``key`` that is still open and recently used."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
            if time.monotonic() - conn.idle_since > IDLE_REUSE_S or _has_eof(conn.sock):
                conn.close()
                continue
            conn.reused = True
            return conn


def _has_eof(sock: socket.socket) -> bool:
    """True when an idle socket is readable: the server closed it (or sent junk)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _header_safe(value: str) -> bool:
    """True when ``value`` can be sent as a header value (no CR, LF or other controls)."""
    return isinstance(value, str) and value.isascii() and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_error(status: int, shown: str, retries: int) -> FetchError:
    """The error for a final non-2xx answer (the standard phrase, never the server's text)."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    after = f" after {retries} retries" if retries else ""
    return FetchError(f"http_{status}", f"{shown} answered HTTP {status} {phrase}".rstrip() + after, retries)
