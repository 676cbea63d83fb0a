"""What a product id is: one rule, applied once when the catalogue is read.

Every id that reaches the features, the neighbour lists or a loader has passed
:func:`product_id_from`, so the stores downstream (Parquet, JSONL,
Elasticsearch ``_id``, PostgreSQL ``text``, SQLite) can all hold it and no two
different manifest ids ever become the same product id silently. The rule:

- **Text** is taken as it is, after trimming ASCII whitespace (space, tab, CR,
  LF, FF, VT) from both ends and nothing else: ``"sku1\\x1f"`` is not trimmed
  into ``"sku1"`` (``str.strip()`` would), and Unicode is not normalised.
  Bytes (a Parquet ``binary`` column) must be UTF-8.
- **Integers** (Parquet integer columns, JSON integers) become their exact
  decimal string: ``7`` → ``"7"``, ``-12`` → ``"-12"``; an integral
  ``decimal`` becomes the decimal string of its integer value.
- **Floats are refused** (``non_string_id``): a float cannot carry an id
  exactly (``1.0`` and ``1`` would have to be the same id, large values lose
  digits beyond 2**53) and NaN / Infinity are no id at all. So are booleans,
  dates, lists and objects. Store ids as strings or integers.
- Refused as ``invalid_product_id``: control characters (U+0000–U+001F but
  TAB, U+007F–U+009F, so NUL and NEL; a TAB inside an id is kept, as every
  store here takes it), the Unicode line and paragraph separators
  U+2028/U+2029 (readers that split lines on them would cut the row), and lone
  surrogates (not encodable as UTF-8: ``invalid_utf8``).
- Refused as ``product_id_too_long``: more than :data:`MAX_ID_BYTES` (512)
  bytes of UTF-8, Elasticsearch's limit for a document ``_id``.
- Empty after trimming: ``missing_product_id``.

Image locations follow the same text rules (:func:`image_from`), so a path
with a NUL byte or a URL with a line break is refused at read time rather than
failing somewhere in a worker.

Error messages never copy an id or a cell raw: :func:`printable` escapes what
is not printable, and :func:`redact_userinfo` removes the ``user:password@``
part of any URL in them.
"""

from __future__ import annotations

import decimal
import math
import re

# Elasticsearch refuses a document _id longer than 512 bytes.
MAX_ID_BYTES = 512
# Only ASCII whitespace is trimmed; anything else is part of the id.
ASCII_WHITESPACE = " \t\r\n\f\v"
# Characters no id or image location may hold (after trimming).
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s@]*@")


class InvalidValue(ValueError):
    """An id or image cell that cannot be used, with a reason code and a sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (undecodable bytes or a JSON ``\\ud800``)."""
    return _SURROGATE.search(text) is not None


def printable(text: str, limit: int = 120) -> str:
    """``text`` quoted for a message: non-printable characters escaped, URLs' userinfo removed.

    Control characters, line separators and lone surrogates are shown as
    ``\\x00`` / ``\\u2028`` / ``\\udcff`` escapes, so an error sentence never
    carries them raw (they would break the line-based files and terminals that
    show it); longer texts are cut at ``limit`` characters with an ellipsis.
    """
    text = redact_userinfo(text)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    out = []
    for char in text:
        if char.isprintable() and not _SURROGATE.match(char):
            out.append("\\\\" if char == "\\" else char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "'" + "".join(out) + "'" + ("…" if cut else "")


def redact_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@``.

    Catalogue rows and error sentences may quote a URL; credentials in it must
    never be stored in ``errors/``.
    """
    if "@" not in text:
        return text
    return _USERINFO.sub(r"\1***@", text)


def _text_from(value, what: str) -> str:
    """The text of a str or UTF-8 bytes cell, or InvalidValue(invalid_utf8)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidValue("invalid_utf8", f"the {what} is not valid UTF-8 "
                               f"({exc.reason} at byte {exc.start})") from None
    if has_surrogate(value):
        raise InvalidValue("invalid_utf8", f"the {what} is not valid UTF-8 text (undecodable "
                           f"bytes or a lone surrogate): {printable(value)}")
    return value


def product_id_from(value) -> str:
    """The product id of a manifest cell, by the module's rule; raises :class:`InvalidValue`.

    Called once per row by the catalogue reader, so everything downstream can
    rely on ids being non-empty, at most 512 UTF-8 bytes, free of control
    characters and line separators, and exactly the manifest's text or integer.
    """
    if value is None:
        raise InvalidValue("missing_product_id", "the id is empty")
    if isinstance(value, bool):
        raise InvalidValue("non_string_id", f"the id is the boolean {value}; ids must be "
                           "strings or integers")
    if isinstance(value, int):
        if abs(value) >= 10 ** MAX_ID_BYTES:  # more digits than bytes allowed
            raise InvalidValue("product_id_too_long", f"the id is an integer of more than "
                               f"{MAX_ID_BYTES} digits, over the {MAX_ID_BYTES}-byte limit")
        text = str(value)
    elif isinstance(value, float):
        kind = "NaN" if math.isnan(value) else "infinite" if math.isinf(value) else "a float"
        raise InvalidValue("non_string_id", f"the id is {kind} ({value!r}); a float cannot "
                           "carry an id exactly, store ids as strings or integers")
    elif isinstance(value, decimal.Decimal):
        if not value.is_finite() or value != value.to_integral_value():
            raise InvalidValue("non_string_id", f"the id is the non-integral decimal {value}; "
                               "store ids as strings or integers")
        text = str(int(value))
    elif isinstance(value, (str, bytes)):
        text = _text_from(value, "id").strip(ASCII_WHITESPACE)
    else:
        raise InvalidValue("non_string_id", f"the id is a {type(value).__name__}, not a "
                           "string or an integer")
    problem = product_id_problem(text)
    if problem is not None:
        raise InvalidValue(*problem)
    return text


def product_id_problem(text: str) -> tuple[str, str] | None:
    """``(reason, sentence)`` when the text ``text`` is not a valid product id, else None.

    The check behind :func:`product_id_from`; the loaders call it too, so a run
    written before the rule existed cannot put a NUL into PostgreSQL or an
    over-long ``_id`` into Elasticsearch.
    """
    if not text:
        return "missing_product_id", "the id is empty"
    if has_surrogate(text):
        return "invalid_utf8", f"the id {printable(text)} is not valid UTF-8 text"
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        return ("invalid_product_id", f"the id {printable(text)} contains the control "
                f"character U+{ord(bad.group()):04X}; ids may not hold control characters "
                "or line separators")
    size = len(text.encode("utf-8"))
    if size > MAX_ID_BYTES:
        return ("product_id_too_long", f"the id {printable(text, 60)} is {size} bytes of "
                f"UTF-8, over the {MAX_ID_BYTES}-byte limit (Elasticsearch's _id limit)")
    return None


def image_from(value) -> str:
    """The image location of a manifest cell; raises :class:`InvalidValue`.

    Text (or UTF-8 bytes) trimmed of ASCII whitespace only; empty is
    ``missing_image``, a control character or line separator is
    ``invalid_image`` (no path or URL holds one, and a NUL would fail the read
    deep inside a worker), a non-text value is ``invalid_image``.
    """
    if value is None:
        raise InvalidValue("missing_image", "the image is empty")
    if not isinstance(value, (str, bytes)):
        raise InvalidValue("invalid_image", f"the image is a {type(value).__name__}, not a "
                           "path or URL")
    text = _text_from(value, "image").strip(ASCII_WHITESPACE)
    if not text:
        raise InvalidValue("missing_image", "the image is empty")
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        raise InvalidValue("invalid_image", f"the image {printable(text)} contains the "
                           f"control character U+{ord(bad.group()):04X}")
    return text


def clean_text(text: str) -> str:
    """``text`` made encodable: undecodable bytes and lone surrogates become U+FFFD.

    Used for carried columns, which are kept (marked) rather than refused.
    """
    if not has_surrogate(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
