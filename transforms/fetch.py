"""Download image bytes over HTTP(S) safely, politely and with bounded time.

Catalogue URLs point at servers we do not control: some are slow, some fail
transiently, some redirect forever, some stream without end, and a URL in a
manifest must never make a worker call an internal service or the cloud
metadata endpoint. :class:`HttpFetcher` handles all of that and turns every
failure into a :class:`FetchError` with a reason code. Whether the bytes are an
image is not decided here: decoding looks at the content.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from transforms.errors import RowError

ALLOWED_SCHEMES = ("http", "https")
RETRY_STATUSES = frozenset([429, *range(500, 600)])
REDIRECT_STATUSES = frozenset([301, 302, 303, 307, 308])
CHUNK_BYTES = 64 * 1024

# Cloud metadata endpoints; also covered by the link-local/private checks,
# listed so the intent is explicit.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)

Resolver = Callable[..., list]


@dataclass
class FetchConfig:
    """How URLs are downloaded; timeouts are in seconds.

    ``total_timeout`` bounds the body download (a trickling or endless body is
    cut off); ``connect_timeout`` and ``read_timeout`` bound each attempt's
    socket waits. ``allowed_hosts`` lists host names exempt from the
    private-address check (for example an internal image CDN) while every
    other private address stays refused.
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


def check_url(
    url: str,
    allow_private_hosts: bool = False,
    allowed_hosts: tuple[str, ...] = (),
    resolver: Resolver = socket.getaddrinfo,
) -> None:
    """Refuse URLs a batch job must not fetch; raise FetchError, else return.

    Only http and https are allowed. The host is resolved and every address
    it resolves to must be public, so a manifest row (or a redirect) cannot
    point the worker at localhost, the internal network or the cloud
    metadata service.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise FetchError("invalid_url", f"the URL {url!r} is malformed: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"{scheme}://" if scheme else "no scheme"
        raise FetchError("forbidden_scheme", f"only http and https URLs are downloaded, not {shown} ({url})")
    if not host:
        raise FetchError("invalid_url", f"the URL {url!r} has no host name")
    if allow_private_hosts or host.lower() in {h.lower() for h in allowed_hosts}:
        return
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise FetchError("dns_error", f"the host {host!r} could not be resolved: {exc}") from exc
    if not infos:
        raise FetchError("dns_error", f"the host {host!r} resolved to no address")
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if _is_private(address):
            raise FetchError(
                "private_host",
                f"refused to fetch {url}: {host} resolves to the non-public address {address} "
                "(set allow_private_hosts or allowed_hosts to permit internal hosts)",
            )


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


class HttpFetcher:
    """Downloads URLs through one pooled session with retries and limits.

    One instance is meant to live for a whole worker (create it in a DoFn's
    ``setup``): its connection pool, sized to ``config.concurrency``, lets many
    threads reuse connections to the same image host.
    """

    def __init__(self, config: FetchConfig | None = None, resolver: Resolver = socket.getaddrinfo):
        self.config = config or FetchConfig()
        self._resolver = resolver
        self._session = self._make_session()

    def _make_session(self) -> requests.Session:
        cfg = self.config
        retry = Retry(
            total=cfg.max_retries,
            connect=cfg.max_retries,
            read=cfg.max_retries,
            status=cfg.max_retries,
            other=0,
            redirect=0,
            allowed_methods=frozenset(["GET"]),
            status_forcelist=RETRY_STATUSES,
            backoff_factor=cfg.backoff_factor,
            backoff_max=cfg.max_backoff,
            backoff_jitter=cfg.backoff_factor,
            respect_retry_after_header=True,
            retry_after_max=max(0, int(cfg.max_backoff)),
            raise_on_status=False,
            raise_on_redirect=False,
        )
        pool = max(1, cfg.concurrency)
        adapter = HTTPAdapter(pool_connections=pool, pool_maxsize=pool, max_retries=retry)
        session = requests.Session()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update({"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.8"})
        # Image servers' cookies must not leak between unrelated rows, and
        # ~/.netrc credentials must never be sent to hosts a manifest names
        # (requests adds them whenever a request has no auth of its own).
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        session.auth = _no_auth
        return session

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    def fetch(self, url: str, etag: str | None = None,
              last_modified: str | None = None) -> FetchResult:
        """Download ``url`` and return its body, or raise FetchError.

        Redirects are followed by hand, up to ``max_redirects``, so that every
        hop passes the same scheme and private-address checks as the first.
        With the ``etag`` / ``last_modified`` of an earlier download the request
        is conditional: an unchanged image answers 304 (``status`` 304, empty
        ``data``), so a nightly run does not download it again.
        """
        conditional = {}
        if etag:
            conditional["If-None-Match"] = etag
        if last_modified:
            conditional["If-Modified-Since"] = last_modified
        cfg = self.config
        deadline = time.monotonic() + cfg.total_timeout
        retries = 0
        current = url
        for _ in range(cfg.max_redirects + 1):
            if time.monotonic() > deadline:
                message = f"gave up on {url}: redirects took longer than {cfg.total_timeout:g} s"
                raise FetchError("timeout", message, retries)
            check_url(current, cfg.allow_private_hosts, cfg.allowed_hosts, self._resolver)
            response = self._get(current, retries, conditional)
            try:
                retries += _retries_of(response)
                location = response.headers.get("Location")
                if response.status_code in REDIRECT_STATUSES and location:
                    current = urljoin(current, location)
                    continue
                if response.status_code == 304 and conditional:
                    return FetchResult(
                        data=b"",
                        status=304,
                        etag=response.headers.get("ETag") or etag,
                        last_modified=response.headers.get("Last-Modified") or last_modified,
                        retries=retries,
                    )
                if not 200 <= response.status_code < 300:
                    raise _status_error(response, current, retries)
                data = self._read_body(response, current, deadline, retries)
                return FetchResult(
                    data=data,
                    status=response.status_code,
                    etag=response.headers.get("ETag"),
                    last_modified=response.headers.get("Last-Modified"),
                    retries=retries,
                )
            finally:
                response.close()
        message = f"{url} redirected more than {cfg.max_redirects} times (last to {current})"
        raise FetchError("too_many_redirects", message, retries)

    def _get(self, url: str, retries_so_far: int,
             headers: dict | None = None) -> requests.Response:
        """Send one GET (urllib3 retries inside it); map transport errors."""
        cfg = self.config
        try:
            return self._session.get(
                url,
                headers=headers or None,
                stream=True,
                allow_redirects=False,
                timeout=(cfg.connect_timeout, cfg.read_timeout),
            )
        except requests.exceptions.RequestException as exc:
            raise _transport_error(exc, url, retries_so_far, cfg) from exc
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise FetchError("connection_error", f"could not download {url}: {exc}", retries_so_far) from exc

    def _read_body(self, response: requests.Response, url: str, deadline: float, retries: int) -> bytes:
        """Stream the body under the byte cap and the total deadline."""
        cfg = self.config
        limit = cfg.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            message = f"{url} is {int(declared):,} bytes, over the {limit:,}-byte limit"
            raise FetchError("too_large", message, retries)
        raw = response.raw
        chunks: list[bytes] = []
        received = 0

        def overdue() -> FetchError:
            message = f"{url} was still sending after {cfg.total_timeout:g} s ({received:,} bytes so far)"
            return FetchError("timeout", message, retries)

        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise overdue()
                _limit_socket_wait(raw, min(cfg.read_timeout, remaining))
                chunk = raw.read1(CHUNK_BYTES, decode_content=True)
                if not chunk:
                    return b"".join(chunks)
                received += len(chunk)
                if received > limit:
                    raise FetchError("too_large", f"{url} sent more than the {limit:,}-byte limit", retries)
                chunks.append(chunk)
        except FetchError:
            raise
        except (urllib3.exceptions.ReadTimeoutError, socket.timeout, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise overdue() from exc
            message = f"{url} stopped sending for {cfg.read_timeout:g} s mid-body"
            raise FetchError("timeout", message, retries) from exc
        except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError, ValueError) as exc:
            raise FetchError("connection_error", f"the download of {url} broke off: {exc}", retries) from exc


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """An auth hook that adds nothing (and so keeps requests from using ~/.netrc)."""
    return request


def _limit_socket_wait(raw, seconds: float) -> None:
    """Shorten the socket timeout so one read cannot overrun the deadline."""
    connection = getattr(raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.settimeout(max(0.001, seconds))
        except OSError:
            pass


def _retries_of(response: requests.Response) -> int:
    """How many times urllib3 retried before this response."""
    retry = getattr(response.raw, "retries", None)
    return len(retry.history) if retry is not None else 0


def _status_error(response: requests.Response, url: str, retries: int) -> FetchError:
    status = response.status_code
    phrase = response.reason or ""
    after = f" after {retries} retries" if retries else ""
    return FetchError(f"http_{status}", f"{url} answered HTTP {status} {phrase}{after}".rstrip(), retries)


def _transport_error(exc: Exception, url: str, retries: int, cfg: FetchConfig) -> FetchError:
    """Classify a requests/urllib3 transport failure into a reason code."""
    exhausted = _find_cause(exc, urllib3.exceptions.MaxRetryError) is not None
    tried = retries + (cfg.max_retries if exhausted else 0)
    suffix = f" (after {cfg.max_retries} retries)" if exhausted and cfg.max_retries else ""
    if _find_cause(exc, urllib3.exceptions.NameResolutionError) or _find_cause(exc, socket.gaierror):
        return FetchError("dns_error", f"the host of {url} could not be resolved{suffix}", tried)
    if _find_cause(exc, urllib3.exceptions.NewConnectionError):  # a subclass of ConnectTimeoutError
        return FetchError("connection_error", f"could not connect to download {url}{suffix}: {exc}", tried)
    if isinstance(exc, requests.exceptions.Timeout) or _find_cause(exc, urllib3.exceptions.TimeoutError):
        return FetchError("timeout", f"{url} did not answer in time{suffix}: {exc}", tried)
    if isinstance(exc, requests.exceptions.SSLError):
        return FetchError("ssl_error", f"the TLS connection to {url} failed{suffix}: {exc}", tried)
    invalid = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema)
    if isinstance(exc, invalid):
        return FetchError("invalid_url", f"the URL {url!r} is not valid: {exc}", tried)
    return FetchError("connection_error", f"could not connect to download {url}{suffix}: {exc}", tried)


def _find_cause(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s args, reason and cause chain."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:  # ssl errors carry a str .reason
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        stack.extend([current.__cause__, current.__context__, getattr(current, "reason", None)])
        stack.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
    return None
