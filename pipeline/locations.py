"""What kind of place an image location names, and how to show it safely.

A plain library module (no Beam, no network): the catalogue reader, the byte
reader, the fetcher and the dead-letter records all need the same answer to
"does this location have a scheme, and which?" (and "is it fetched over HTTP?"),
and every place that writes a location into ``errors/`` must write it without
the credentials or the inline content it may carry.
"""

from __future__ import annotations

import re
from typing import Any

# A URI scheme (RFC 3986 section 3.1) of two or more characters, so that a
# Windows drive letter ("C:") is not taken for one.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#]*)(.*)$", re.DOTALL)
_DATA_SHOWN = 40  # characters of a data: URL's media type kept when it is shown


def location_scheme(location: Any) -> str | None:
    """The lower-case scheme of ``location`` (``http``, ``gs``, ``data``…), None for a plain path.

    Any ``name:`` prefix of two or more scheme characters counts, with or
    without ``//``: ``data:image/png;base64,…`` and ``mailto:x`` have schemes
    too, and must not be taken for relative file names.
    """
    if not isinstance(location, str):
        return None
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else None


_URL_SCHEMES = ("http", "https")


def is_url(location: Any) -> bool:
    """True when ``location`` is an http(s) URL, which is fetched over HTTP.

    The byte reader's rule, shared by everything that must agree with it on
    what is fetched (the report's thumbnails, the autoencoder's training set):
    the scheme decides, case-insensitively, with or without ``//``, and a value
    that is not text is no URL.
    """
    return location_scheme(location) in _URL_SCHEMES


# Query parameters that carry a secret in common signed or authenticated image URLs
# (S3 and GCS signed URLs, Azure SAS, OAuth tokens, API keys); compared lower-case.
SECRET_QUERY_KEYS = frozenset({
    "token", "access_token", "id_token", "refresh_token", "auth", "authorization",
    "key", "api_key", "apikey", "api-key", "password", "passwd", "pwd", "secret",
    "client_secret", "sig", "signature", "credential", "x-amz-signature",
    "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
})
# scheme://userinfo@ anywhere in the text (a URL nested in a query, say).
_NESTED_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s@]*@")
_QUERY_PAIR = re.compile(r"([?&;])([^=&;#]*)=([^&;#]*)")
REDACTED = "***"


def _redact_query(text: str) -> str:
    def pair(match: re.Match) -> str:
        name = match.group(2)
        if name.lower() in SECRET_QUERY_KEYS and match.group(3):
            return f"{match.group(1)}{name}={REDACTED}"
        return match.group(0)
    return _QUERY_PAIR.sub(pair, text)


def redact_location(location: Any) -> Any:
    """``location`` as it may be stored in features, errors and logs.

    What is redacted (one rule for every output):

    * credentials in a URL's authority (``user:password@``) become ``***@``;
    * a ``scheme://user:password@`` nested anywhere else (a query value, a path)
      likewise;
    * a fragment holding ``@`` (never sent, but it can carry ``user:pass@``)
      becomes ``#***``;
    * the value of a query parameter named in :data:`SECRET_QUERY_KEYS`
      (``token``, ``sig``, ``X-Amz-Signature``…) becomes ``***``;
    * a ``data:`` URL keeps only its media type, never its content.

    Anything else is returned unchanged, so ordinary locations stay exactly
    as the manifest gave them. The downloaded URL is always the original.
    """
    if not isinstance(location, str):
        return location
    scheme = location_scheme(location)
    if scheme == "data":
        head, comma, body = location.partition(",")
        shown = head[:_DATA_SHOWN] + ("…" if len(head) > _DATA_SHOWN else "")
        return f"{shown},<{len(body):,} characters of inline content not shown>" if comma else shown
    text = location
    match = _AUTHORITY.match(text)
    if match and "@" in match.group(2):
        authority = match.group(2)
        text = f"{match.group(1)}***@{authority.rsplit('@', 1)[1]}{match.group(3)}"
    if "@" in text:
        text = _NESTED_USERINFO.sub(r"\1***@", text)
    if scheme is not None:
        before, hash_mark, fragment = text.partition("#")
        if hash_mark and "@" in fragment:
            text = f"{before}#{REDACTED}"
        if "?" in text:
            text = _redact_query(text)
    return text
