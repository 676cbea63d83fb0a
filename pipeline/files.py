"""Small, atomic file helpers over Beam ``FileSystems`` (local paths, gs://, s3://…).

Every artefact the pipeline writes outside Beam's own sinks goes through
:func:`write_bytes`, so a reader never sees a half-written file: locally the
bytes go to a temporary sibling that is renamed into place; object stores
publish an object only when its upload completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import uuid

import orjson
from apache_beam.io.filesystems import FileSystems


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# The mode a plainly created file gets; temporary files are created 0600, so they are
# set to this before being renamed into place (outputs are read by other users/tools).
_FILE_MODE = _default_file_mode()


def is_local(path: str) -> bool:
    """Whether ``path`` is on the local filesystem (no URL scheme)."""
    return "://" not in path


def join(base: str, *parts: str) -> str:
    """Join path parts the way the filesystem of ``base`` expects."""
    return FileSystems.join(base, *parts)


def makedirs(path: str) -> None:
    """Create a directory (no-op on object stores, which have none)."""
    if is_local(path):
        os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def naming(path: str):
    """Give an ``OSError`` raised in the block ``path`` as its filename when it has none.

    Why: a write that fails on a full disk says only "No space left on device";
    the launcher's one error line must also say where.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno and exc.filename is None:
            raise type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), path) from exc
        raise


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    if is_local(path):
        directory = os.path.dirname(os.path.abspath(path))
        with naming(path):
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with naming(path), os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    with FileSystems.create(path) as handle:
        handle.write(data)


def write_json(path: str, obj) -> None:
    """Write one JSON document atomically (UTF-8, indented for people)."""
    write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
                .encode("utf-8"))


# One encoder for every JSON line: json.dumps builds a new encoder per call when
# given options, which measured slower per neighbour pair (bench/MEASUREMENTS.md,
# "JSON encoding").
_JSON_LINE = json.JSONEncoder(ensure_ascii=False).encode


# Characters a JSON line never holds raw: C1 controls (U+0085 NEL among them) and
# U+2028/U+2029, which str.splitlines() and some JSON-lines readers treat as line
# ends, and lone surrogates, which cannot be encoded as UTF-8 at all. JSON's own
# \\uXXXX escape says the same thing in ASCII, so escaping them changes no value.
_RAW_TEXT_BREAKS = re.compile("[\x80-\x9f\u2028\u2029\ud800-\udfff]")
_RAW_BYTE_BREAKS = re.compile(b"\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


def _escape_char(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def _escape_utf8(match: re.Match) -> bytes:
    return b"\\u%04x" % ord(match.group().decode("utf-8"))


def escape_line_breaks(data: bytes) -> bytes:
    """UTF-8 JSON with every raw U+0080–U+009F, U+2028 and U+2029 written as ``\\uXXXX``.

    For JSON produced by orjson (which leaves them raw): after this, only
    ``\\n`` can split a line, whichever Unicode-aware splitter a reader uses.
    The byte patterns only occur as those characters in valid UTF-8.
    """
    return _RAW_BYTE_BREAKS.sub(_escape_utf8, data)


def json_line(obj) -> str:
    """One JSONL line: UTF-8 text kept as is, except line-breaking characters, escaped.

    C1 controls, U+2028/U+2029 and lone surrogates are ``\\u``-escaped, so
    no reader splitting on Unicode line breaks can cut the line and no lone
    surrogate makes the UTF-8 encoding of the file fail.
    """
    return _RAW_TEXT_BREAKS.sub(_escape_char, _JSON_LINE(obj))


def write_jsonl(path: str, records) -> None:
    """Write JSON records one per line, atomically, with orjson.

    The neighbour and pair files hold ~20 lines per product; orjson encodes
    them faster than the json module (bench/MEASUREMENTS.md, "JSON encoding").
    Compact separators, UTF-8 text as is except line-breaking characters (see
    :func:`escape_line_breaks`).
    """
    write_bytes(path, escape_line_breaks(
        b"".join(orjson.dumps(record) + b"\n" for record in records)))


def read_json(path: str):
    """Read one JSON document from any filesystem."""
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def copy_to_local(path: str, local_dir: str) -> str:
    """Copy a file to ``local_dir`` once (atomically) and return the local path."""
    os.makedirs(local_dir, exist_ok=True)
    target = os.path.join(local_dir, os.path.basename(path))
    if os.path.exists(target):
        return target
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    with FileSystems.open(path) as src, open(tmp, "wb") as dst:
        for block in iter(lambda: src.read(8 << 20), b""):
            dst.write(block)
    os.replace(tmp, target)
    return target


def local_path(path: str, local_dir: str) -> str:
    """A local path to read ``path`` from: itself when local, else a copy in ``local_dir``."""
    return path if is_local(path) else copy_to_local(path, local_dir)


@contextlib.contextmanager
def staged_output(path: str):
    """Yield a local file name to write; its content is published at ``path`` on success.

    A local destination is written beside the target and renamed into place, so
    an index of gigabytes is written once, not written to /tmp and copied;
    other filesystems get a local temporary file uploaded on exit. On failure
    nothing appears at ``path``. The yielded name keeps ``path``'s suffix.
    """
    if not is_local(path):
        with tempfile.TemporaryDirectory(prefix="similarity-stage-") as local:
            staged = os.path.join(local, os.path.basename(path))
            yield staged
            upload_file(staged, path)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    staged = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with naming(path):
            yield staged
        os.chmod(staged, _FILE_MODE)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


def upload_file(local_path: str, path: str) -> None:
    """Copy a local file to ``path`` on any filesystem (atomically where local)."""
    if is_local(path):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(local_path, "rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(8 << 20), b""):
                dst.write(block)
        os.replace(tmp, path)
        return
    with open(local_path, "rb") as src, FileSystems.create(path) as dst:
        for block in iter(lambda: src.read(8 << 20), b""):
            dst.write(block)
