"""SIGINT and SIGTERM in the launcher: stop within seconds, one line, exit 130 / 143.

A nightly run that is interrupted must not wait out its downloads' retries
(minutes) or print Beam's wrapped tracebacks. The handler notes the signal,
cancels every fetch in flight from a helper thread (never from the handler,
which may have interrupted a thread holding the fetcher's lock) and raises
``KeyboardInterrupt`` in the main thread, so ``finally`` blocks run: the root
lock is released, the run directory keeps its INCOMPLETE marker, ``LATEST``
stays where it was. Beam may wrap the interrupt in its own exception; the
launcher asks :func:`Interrupts.signum` instead of looking at the exception
type. If unwinding takes longer than ``grace_seconds`` (a C call that does not
return), or a second signal arrives, the helper prints the line, runs the
cleanups and ends the process at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
GRACE_SECONDS = 10.0


class Interrupts:
    """What the launcher needs to know about signals received while it ran."""

    def __init__(self, cleanup: Callable[[], None], message: Callable[[], str],
                 grace_seconds: float = GRACE_SECONDS):
        self.cleanup = cleanup
        self.message = message
        self.grace_seconds = grace_seconds
        self.received: int | None = None
        self._done = threading.Event()
        self._exit_lock = threading.Lock()

    @property
    def signum(self) -> int | None:
        """The first signal received, or None."""
        return self.received

    @property
    def exit_code(self) -> int:
        """130 after SIGINT, 143 after SIGTERM (128 + the signal number)."""
        return EXIT_CODES.get(self.received, 128 + (self.received or 0))

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: no more waiting
            threading.Thread(target=self._force_exit, daemon=True).start()
            return
        self.received = signum
        threading.Thread(target=self._after_signal, daemon=True).start()
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def _after_signal(self) -> None:
        from pipeline.http_fetch import cancel_all_fetches

        with contextlib.suppress(Exception):
            cancel_all_fetches()
        if not self._done.wait(self.grace_seconds):
            self._force_exit()

    def _force_exit(self) -> None:
        if not self._exit_lock.acquire(blocking=False):
            return
        with contextlib.suppress(Exception):
            self.cleanup()
        with contextlib.suppress(Exception):
            sys.stderr.write(self.message() + "\n")
            sys.stderr.flush()
        os._exit(self.exit_code)

    def claim_exit(self) -> bool:
        """Whether the main thread may print the line and exit (the helper has not)."""
        self._done.set()
        return self._exit_lock.acquire(blocking=False)

    def finished(self) -> None:
        """The main thread has unwound; the forced exit is no longer needed."""
        self._done.set()


@contextlib.contextmanager
def handled(cleanup: Callable[[], None], message: Callable[[], str],
            grace_seconds: float = GRACE_SECONDS) -> Iterator[Interrupts]:
    """Handle SIGINT and SIGTERM for the ``with`` block (main thread only), then restore.

    Why: an interrupted run must stop promptly, release what it holds and say
    in one line where ``LATEST`` is, instead of a traceback after minutes.
    """
    state = Interrupts(cleanup, message, grace_seconds)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {sig: signal.signal(sig, state._handle) for sig in EXIT_CODES}
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        state.finished()
