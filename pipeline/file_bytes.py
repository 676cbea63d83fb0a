"""Read one file's bytes, local or on a Beam filesystem, with the pipeline's reason codes.

Plain library code (the bottom layer; Beam's filesystems only, for ``gs://``,
``s3://``… paths), so that the run's byte reader (``transforms/read_bytes.py``)
and the query API (``pipeline/similarity_index.py``, for non-local paths) share
one reader and its refusals (a FIFO, a device, ``/proc``, a ``file://`` URL)
without the query API importing a Beam stage.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import time

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.locations import location_scheme, redact_location
from pipeline.row_errors import RowError

_READ_CHUNK = 1024 * 1024

# Pseudo-filesystems whose "files" are the system's own state (/proc/self/environ
# holds secrets, /dev/stdin is the launcher's input): never image sources.
_SYSTEM_ROOTS = ("/dev/", "/proc/", "/sys/")
# Beam filesystems and the client library each needs, to tell "not installed" apart.
_FILESYSTEM_MODULES = {"s3": "boto3", "gs": "google.cloud.storage", "hdfs": "hdfs",
                       "azfs": "azure.storage.blob"}


def _file_kind_reason(mode: int) -> tuple[str, str] | None:
    """(reason, kind) for a file that is not a regular file, else None."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is_directory", "a directory"
    if stat.S_ISFIFO(mode):
        return "is_fifo", "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "is_socket", "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is_device", "a device"
    return "not_a_regular_file", "not a regular file"


def read_file_bytes(path: str, max_bytes: int, timeout: float | None = None) -> bytes:
    """Read a local or Beam-filesystem file (gs://, s3://…) up to ``max_bytes``.

    Raises RowError ``missing_file``, ``unreadable``, ``too_large``,
    ``timeout`` (the read took longer than ``timeout`` seconds),
    ``forbidden_scheme`` (file:// or a scheme nothing here reads), ``data_url``
    or ``filesystem_unavailable`` (a Beam filesystem whose client library or
    configuration is missing). A local path that is a directory, FIFO,
    socket or device is refused before it is opened (``is_directory``,
    ``is_fifo``, ``is_socket``, ``is_device``), and so is anything under
    /dev, /proc or /sys (``system_path``): opening a FIFO blocks forever and a
    device never ends. Files are read as stored: a ``.gz`` name does not make
    Beam decompress it. Messages never quote the file's content.
    """
    if not isinstance(path, str) or not path.strip():
        raise RowError("missing_file", "the row has no image location")
    deadline = None if timeout is None else time.monotonic() + timeout
    scheme = location_scheme(path)
    if scheme is None:
        return _read_local(path, max_bytes, deadline, timeout)
    shown = redact_location(path)
    if scheme == "file":
        raise RowError("forbidden_scheme", f"file:// URLs are not accepted ({shown}); give the plain path instead")
    if scheme == "data":
        raise RowError("data_url", f"inline data: URLs are not read ({shown}); give a path or an http(s) URL")
    if "://" not in path:
        raise RowError("forbidden_scheme", f"{scheme}: locations are not read ({shown}); use an http(s) URL or a path")
    try:
        FileSystems.get_filesystem(path)
    except ValueError as exc:
        raise RowError(
            "forbidden_scheme",
            f"no Beam filesystem is available for {scheme}:// here ({shown}); use an "
            "http(s) URL, a local path, or install the filesystem's extra (gs:// needs apache-beam[gcp])",
        ) from exc
    except Exception as exc:  # BeamIOError wrapping an ImportError (hdfs://), …
        raise _unavailable(scheme, shown, exc) from exc
    module = _FILESYSTEM_MODULES.get(scheme)
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        raise _unavailable(scheme, shown, ImportError(module))
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return _read_chunks(handle.read, shown, max_bytes, deadline, timeout)
    except RowError:
        raise
    except (AssertionError, ImportError, AttributeError) as exc:  # "Missing boto3", unset options…
        raise _unavailable(scheme, shown, exc) from exc
    except Exception as exc:  # Filesystems raise IOError, BeamIOError, client errors…
        raise _classify_file_error(path, exc) from exc


def _unavailable(scheme: str, shown: str, exc: BaseException) -> RowError:
    """The error for a Beam filesystem that cannot work in this environment."""
    module = _FILESYSTEM_MODULES.get(scheme)
    need = f" (it needs the {module} package and its configuration)" if module else ""
    return RowError("filesystem_unavailable", f"the {scheme}:// filesystem is not usable here{need}, so "
                                              f"{shown} cannot be read ({type(exc).__name__})")


def _local_os_error(path: str, exc: OSError) -> RowError:
    """The row error for a failed stat or open of a local path (same rule for both)."""
    if isinstance(exc, FileNotFoundError):
        return RowError("missing_file", f"{path} does not exist")
    if isinstance(exc, PermissionError):
        return RowError("unreadable", f"no permission to read {path}")
    return RowError("unreadable", f"could not read {path}: {exc.strerror or type(exc).__name__}")


def _read_local(path: str, max_bytes: int, deadline: float | None, timeout: float | None) -> bytes:
    """Read a local regular file; refuse everything else before opening it."""
    absolute = os.path.abspath(path)
    if any((p + "/").startswith(_SYSTEM_ROOTS) for p in (absolute, os.path.realpath(absolute))):
        raise RowError("system_path", f"{path} is under /dev, /proc or /sys; system files are never read as images")
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _local_os_error(path, exc) from None
    kind = _file_kind_reason(info.st_mode)
    if kind is not None:
        raise RowError(kind[0], f"{path} is {kind[1]}, not an image file; it is not opened")
    if info.st_size > max_bytes:
        raise RowError("too_large", f"{path} is larger than the {max_bytes:,}-byte limit")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _local_os_error(path, exc) from None
    try:
        kind = _file_kind_reason(os.fstat(fd).st_mode)  # what was opened, if it changed since the stat
        if kind is not None:
            raise RowError(kind[0], f"{path} is {kind[1]}, not an image file")
        return _read_chunks(lambda n: os.read(fd, n), path, max_bytes, deadline, timeout)
    except OSError as exc:
        raise RowError("unreadable", f"could not read {path}: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)


def _read_chunks(read, shown: str, max_bytes: int, deadline: float | None, timeout: float | None) -> bytes:
    """Read chunks until EOF under the byte cap, checking the deadline between reads."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise RowError("timeout", f"reading {shown} took longer than {timeout:g} s ({size:,} bytes so far)")
        chunk = read(_READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise RowError("too_large", f"{shown} is larger than the {max_bytes:,}-byte limit")
        chunks.append(chunk)


def _classify_file_error(path: str, exc: Exception) -> RowError:
    """Tell a missing file from one that exists but cannot be read (messages never quote content)."""
    shown = redact_location(path)
    if isinstance(exc, IsADirectoryError):
        return RowError("is_directory", f"{shown} is a directory, not an image file")
    if isinstance(exc, PermissionError):
        return RowError("unreadable", f"no permission to read {shown}")
    if isinstance(exc, FileNotFoundError):
        return RowError("missing_file", f"{shown} does not exist")
    try:
        exists = FileSystems.exists(path)
    except Exception:
        exists = True
    if not exists:
        return RowError("missing_file", f"{shown} does not exist")
    return RowError("unreadable", f"could not read {shown}: {type(exc).__name__}")
