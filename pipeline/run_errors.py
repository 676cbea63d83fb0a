"""Faults that stop a run, as the one line the launcher prints: ``error: <path>: <cause>``.

An ``OSError`` raised inside a Beam stage (a full disk while a DoFn writes
Parquet, a read-only directory, a quota) does not reach the launcher as
itself: Beam re-raises it with ``[while running '<step>']`` appended, which
for an ``OSError`` lands in its ``filename``; other runners send a
``RuntimeError`` whose message holds the worker's traceback text; pyarrow
wraps the errno in its own message. This module finds the original fault in
the exception chain or in that text, so the user reads the path and the cause,
not a page of Beam internals.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import logging
import os
import re

# "[Errno 28] No space left on device: '/path'" as Python prints an OSError.
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^\n:'\"\[\]]+?)(?:: '([^'\n]+)')?(?=$|[\n'\"\]]|\s\[)")
# pyarrow: "… Detail: [errno 28] No space left on device" (the path, if any, earlier).
_ARROW_ERRNO = re.compile(r"\[errno (\d+)\] ([^\n\]]+)", re.IGNORECASE)
_STEP = re.compile(r"\s*\[while running '[^']*'\]")
# Where Beam tells the step of a failure, for the error line's end.
_STEP_NAME = re.compile(r"\[while running '([^']*)'\]")
_PATH_IN_TEXT = re.compile(r"(?:file|path)[^'\"\n]{0,20}['\"]([^'\"\n]+)['\"]", re.IGNORECASE)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _clean_path(value) -> str | None:
    if value is None:
        return None
    text = _STEP.sub("", os.fsdecode(value) if isinstance(value, (bytes, os.PathLike))
                     else str(value)).strip()
    return text or None


def os_fault(exc: BaseException) -> tuple[str | None, str] | None:
    """``(path, cause)`` of the OS fault behind ``exc``, or None when it is not one.

    Why: the launcher must name the path and the cause of a full disk or a
    read-only directory whichever stage hit it and however Beam wrapped it.
    """
    found = None
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno:
            path = _clean_path(item.filename)
            cause = item.strerror or os.strerror(item.errno)
            if found is None or (path and not found[0]):
                found = (path, cause)
            if path:
                return found
    text = "\n".join(str(item) for item in _chain(exc))
    match = None
    for match in _ERRNO_TEXT.finditer(text):
        if match.group(3):
            break
    if match is not None:
        path = match.group(3)
        cause = os.strerror(int(match.group(1))) if int(match.group(1)) in \
            errno_module.errorcode else match.group(2).strip()
        if path or found is None:
            return (_clean_path(path), cause)
    arrow = _ARROW_ERRNO.search(text)
    if arrow is not None and found is None:
        path = _PATH_IN_TEXT.search(text)
        return (_clean_path(path.group(1)) if path else None,
                os.strerror(int(arrow.group(1))))
    return found


def os_error_line(exc: OSError) -> str:
    """``<path>: <cause>`` for an OS error (the path it names, else the message)."""
    fault = os_fault(exc)
    if fault is None:
        return str(exc)
    path, cause = fault
    return f"{path}: {cause}" if path else cause


# The launcher notes on a failed run's exception which directory it was writing.
RUN_DIR_NOTE = "while writing the run directory "


def note_run_dir(exc: BaseException, run_dir: str) -> None:
    """Remember on ``exc`` the run directory being written, the path of last resort."""
    exc.add_note(f"{RUN_DIR_NOTE}{run_dir}")


def fault_line(exc: BaseException) -> str | None:
    """The ``error: …`` line for an OS fault anywhere in ``exc``, else None.

    When no path is known (Beam's own sinks raise ENOSPC without one) the run
    directory the launcher noted on the exception is named instead.
    """
    fault = os_fault(exc)
    if fault is None:
        return None
    path, cause = fault
    if not path:
        notes = [n for n in getattr(exc, "__notes__", ()) if n.startswith(RUN_DIR_NOTE)]
        path = notes[-1][len(RUN_DIR_NOTE):] if notes else None
    step = _STEP_NAME.search("\n".join(str(item) for item in _chain(exc)))
    where = f" (in {step.group(1)})" if step else ""
    return f"error: {path}: {cause}{where}" if path else f"error: {cause}{where}"


class _DropBeamFailureLogs(logging.Filter):
    """Drops the records Beam logs about a failed bundle: the launcher prints one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("apache_beam") and record.levelno >= logging.ERROR)


@contextlib.contextmanager
def beam_failure_logs_quiet(enabled: bool = True):
    """Drop Beam's ERROR records about a failed bundle for the ``with`` block.

    Why: Beam logs a failed bundle's whole traceback at ERROR before raising;
    the launcher reports the fault itself, in one line. Installed on the root
    logger's handlers (where every record ends) and removed afterwards.
    """
    dropped = _DropBeamFailureLogs()
    handlers = list(logging.getLogger().handlers) if enabled else []
    for handler in handlers:
        handler.addFilter(dropped)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(dropped)
