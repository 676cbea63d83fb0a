"""One run at a time per output root: ``ROOT/.run.lock``, with stale-lock detection.

Two runs on one root delete each other's files (pruning, Beam temp files) and
race to move ``LATEST``. The launcher takes this lock before it reads the
previous run or writes anything, and releases it on every exit path. The file
records who holds it (pid, host, start time, run id) so a refused run can say
whom it waited for.

Local roots: the file is held with ``flock``, which the kernel releases when
the holder dies, however it dies. So a lock file whose flock is free is stale
(its run was killed) and is taken over with a warning; no age limit is needed
and a live run is never taken over, however long it runs. On filesystems
without ``flock`` the record decides, as for object stores.

Object stores (gs://…): Beam's ``FileSystems`` has no create-if-absent, so the
lock is a best effort: an existing lock object is refused unless it is stale
(its pid is dead on this host, or it is older than ``STALE_AFTER_SECONDS``);
otherwise the launcher writes its record, reads it back and gives up if another
launcher's token is there. Two launchers starting within the same moment can
still both pass; runs a few seconds apart cannot.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

from pipeline import files

LOCK_FILE = ".run.lock"
# A lock this old on an object store (or a filesystem without flock) is abandoned:
# no nightly run takes two days.
STALE_AFTER_SECONDS = 48 * 3600

_log = logging.getLogger(__name__)
_HELD: set[RootLock] = set()


class LockHeld(RuntimeError):
    """Another run holds the output root; the message names it, in one sentence."""


def _record(run_id: str | None, token: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run_id": run_id, "token": token}


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe(record: dict) -> str:
    """``run R (pid P on host H, started T)`` for messages about a lock's holder."""
    parts = [f"pid {record.get('pid', '?')} on host {record.get('host', '?')}",
             f"started {record.get('started', '?')}"]
    run = f"run {record['run_id']} " if record.get("run_id") else "a run "
    return f"{run}({', '.join(parts)})"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def stale_reason(record: dict, now: float | None = None) -> str | None:
    """Why a lock record (read without flock) is abandoned, or None if it may be live."""
    now = time.time() if now is None else now
    if not record:
        return "its record is unreadable"
    if record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid")):
        return "its process is not running"
    started = record.get("started_at")
    if not isinstance(started, (int, float)) or now - started > STALE_AFTER_SECONDS:
        return f"it is older than {STALE_AFTER_SECONDS // 3600} h"
    return None


class RootLock:
    """The lock of one output root, held from :meth:`acquire` until :meth:`release`."""

    def __init__(self, root: str, run_id: str | None = None):
        self.root = root
        self.path = files.join(root, LOCK_FILE)
        self.run_id = run_id
        self.token = uuid.uuid4().hex
        self._fd: int | None = None
        self._held = False
        self._created: list[str] = []  # directories made for the lock, deepest first

    def acquire(self) -> RootLock:
        """Take the lock or raise :class:`LockHeld`; a stale lock is taken over (one warning)."""
        if files.is_local(self.root):
            self._acquire_local()
        else:
            self._acquire_object()
        self._held = True
        _HELD.add(self)
        return self

    def _acquire_local(self) -> None:
        missing, parent = [], os.path.abspath(self.root)
        while not os.path.lexists(parent) and parent != os.path.dirname(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(self.root, exist_ok=True)
        self._created = missing
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 65536, 0))
                os.close(fd)
                raise LockHeld(f"{self.root} is in use by {describe(holder)}; one run at a "
                               f"time per output root (lock {self.path})") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                os.close(fd)  # no flock here: the record decides, as on object stores
                self._acquire_object()
                return
            try:  # the holder may have removed the file between our open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            break
        previous = _parse(os.pread(fd, 65536, 0)) if os.fstat(fd).st_size else None
        if previous is not None:
            _log.warning("taking over the stale lock %s of %s: that run is not running",
                         self.path, describe(previous))
        self._write_local()

    def _write_local(self) -> None:
        data = json.dumps(_record(self.run_id, self.token), sort_keys=True).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _read_object(self) -> dict | None:
        if not FileSystems.exists(self.path):
            return None
        with FileSystems.open(self.path) as handle:
            return _parse(handle.read())

    def _write_object(self) -> None:
        files.write_bytes(self.path, json.dumps(_record(self.run_id, self.token),
                                                sort_keys=True).encode())

    def _acquire_object(self) -> None:
        holder = self._read_object()
        if holder is not None:
            reason = stale_reason(holder)
            if reason is None:
                raise LockHeld(f"{self.root} is in use by {describe(holder)}; one run at a "
                               f"time per output root (lock {self.path}; delete it if "
                               f"that run is gone)")
            _log.warning("taking over the stale lock %s of %s: %s", self.path,
                         describe(holder), reason)
        self._write_object()
        time.sleep(0.2)  # let a racing launcher's write land before reading back
        now = self._read_object() or {}
        if now.get("token") != self.token:
            raise LockHeld(f"{self.root} was just taken by {describe(now)}; one run at a "
                           f"time per output root (lock {self.path})")

    def note_run_id(self, run_id: str) -> None:
        """Record the run id once it is known, so a refused run can name it."""
        self.run_id = run_id
        if not self._held:
            return
        if self._fd is not None:
            self._write_local()
        else:
            self._write_object()

    def release(self) -> None:
        """Give the root back (idempotent); safe from a signal watchdog thread."""
        if not self._held:
            return
        self._held = False
        _HELD.discard(self)
        try:
            if self._fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # while still holding the flock (see acquire)
                os.close(self._fd)
                self._fd = None
                for directory in self._created:  # a run refused early leaves no empty root
                    try:
                        os.rmdir(directory)
                    except OSError:
                        break
            elif (self._read_object() or {}).get("token") == self.token:
                FileSystems.delete([self.path])
        except Exception as exc:  # noqa: BLE001 - releasing must never hide the run's outcome
            _log.warning("could not remove the lock %s (%s); the next run takes it over",
                         self.path, exc)


def release_all() -> None:
    """Release every lock this process holds (for a forced exit on a second signal)."""
    for lock in list(_HELD):
        lock.release()


@contextlib.contextmanager
def held(root: str, run_id: str | None = None) -> Iterator[RootLock]:
    """Hold the lock of output root ``root`` for the ``with`` block, on every exit path."""
    lock = RootLock(root, run_id).acquire()
    try:
        yield lock
    finally:
        lock.release()
