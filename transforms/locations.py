"""What kind of place an image location names, and how to show it safely.

A plain library module (no Beam, no network): the catalogue reader, the byte
reader, the fetcher and the dead-letter records all need the same answer to
"does this location have a scheme, and which?", and every place that writes a
location into ``errors/`` must write it without the credentials or the inline
content it may carry.
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


def redact_location(location: Any) -> Any:
    """``location`` as it may be stored in features, errors and logs.

    Credentials in a URL's authority (``user:password@``) are replaced by
    ``***@`` and a ``data:`` URL keeps only its media type, never its
    content. Anything else is returned unchanged, so ordinary locations stay
    exactly as the manifest gave them.
    """
    if not isinstance(location, str):
        return location
    scheme = location_scheme(location)
    if scheme == "data":
        head, comma, body = location.partition(",")
        shown = head[:_DATA_SHOWN] + ("…" if len(head) > _DATA_SHOWN else "")
        return f"{shown},<{len(body):,} characters of inline content not shown>" if comma else shown
    match = _AUTHORITY.match(location)
    if match and "@" in match.group(2):
        authority = match.group(2)
        return f"{match.group(1)}***@{authority.rsplit('@', 1)[1]}{match.group(3)}"
    return location
