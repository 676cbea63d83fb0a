"""Quiet logs by default: our warnings and errors show, third-party start-up noise does not.

A nightly job's stderr is read by a person only when something went wrong, so
it must hold what they need and nothing else. By default:

* our own loggers (``pipeline``, ``transforms``, ``runners``) show WARNING and
  above, in the launcher and, forwarded by Beam, from worker processes;
* third-party Python loggers (Beam, TensorFlow, absl, urllib3…) show only
  ERROR and above, so Beam's option dumps, "Discarding unparseable args" and
  ``BatchElements statistics`` stay out;
* TensorFlow's and TFLite's native (C++) log lines are filtered at their source
  with ``TF_CPP_MIN_LOG_LEVEL`` (inherited by worker processes), and the
  INFO/WARNING lines absl prints regardless while a model is imported or
  converted are dropped by :func:`native_noise_filtered`; native errors stay.

``--log_level=debug|info|warning`` or ``-v`` (info) turns the noise back on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading

OWN_PACKAGES = ("pipeline", "transforms", "runners", "bench", "__main__")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
QUIET = "quiet"  # the default: ours at WARNING, third-party at ERROR
ENV_LEVEL = "SIMILARITY_LOG_LEVEL"  # the run's level, inherited by local worker processes

# Beam's loggers that re-log what worker processes sent over the Fn logging API.
_WORKER_RELAY_LOGGERS = ("apache_beam.runners.portability.local_job_service",
                         "apache_beam.runners.portability.portable_runner")
_RELAYED = re.compile(r'message: "(?P<message>(?:[^"\\]|\\.)*)"'
                      r'.*?log_location: "(?P<location>(?:[^"\\]|\\.)*)"')
# One capture of fd 2 at a time: two threads swapping it would leave it redirected.
_CAPTURE_LOCK = threading.RLock()
_capture_depth = 0
_PATH_PARTS = re.compile(r"[\\/]")

# Native log lines that are start-up information, not problems: absl's INFO and
# WARNING records (``I0000 00:00:… file.cc:12] …``), the banner absl prints before
# its first record, the CPU-feature continuation line, TFLite's INFO lines, and the
# failed ``build`` probe of Beam's ``--setup_file`` staging (it then uses setup.py).
_NATIVE_NOISE = re.compile(
    r"^(?:[IW]\d{4} [\d:.]+\s+\d+\s+\S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: .*rebuild TensorFlow"
    r"|INFO: (?:Created TensorFlow Lite|Initialized TensorFlow Lite)"
    # Beam's stager probes ``python -m build`` before falling back to setup.py sdist.
    r"|\S*python[\d.]*: No module named build$)")


def level_from(log_level: str | None, verbose: bool = False) -> str:
    """The effective level name: ``-v`` means info; nothing given means quiet."""
    if log_level:
        name = log_level.lower()
        if name not in LEVELS:
            raise ValueError(f"--log_level must be one of {', '.join(LEVELS)}, got {log_level!r}")
        return name
    return "info" if verbose else QUIET


def _own_location(location: str) -> bool:
    parts = _PATH_PARTS.split(location.rsplit(":", 1)[0])
    return "apache_beam" not in parts and any(p in OWN_PACKAGES for p in parts[:-1])


def _unescape(text: str) -> str:
    return text.replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\")


class QuietFilter(logging.Filter):
    """Lets our records through at ``own_level`` and everyone else's at ``other_level``.

    Worker records relayed by Beam's job service are judged by where they were
    logged (their ``log_location``), and ours are rewritten to one readable line.
    """

    def __init__(self, own_level: int, other_level: int):
        super().__init__()
        self.own_level = own_level
        self.other_level = other_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in _WORKER_RELAY_LOGGERS and record.args:
            match = _RELAYED.search(str(record.args[0]))
            if match:
                if not _own_location(match.group("location")):
                    return record.levelno >= self.other_level
                if record.levelno < self.own_level:
                    return False
                record.name = "worker"
                record.msg = "%s"
                record.args = (_unescape(match.group("message")),)
                return True
        own = record.name.split(".", 1)[0] in OWN_PACKAGES
        return record.levelno >= (self.own_level if own else self.other_level)


def configure(level: str = QUIET) -> None:
    """Set up stderr logging for a command-line run at ``level`` (see :func:`level_from`).

    Also sets the native log level of TensorFlow/TFLite/gRPC for this process and
    the worker processes it starts, unless the user set those variables.
    """
    own = logging.WARNING if level == QUIET else LEVELS[level]
    other = logging.ERROR if level == QUIET else LEVELS[level]
    native = {"debug": "0", "info": "0", "warning": "1"}.get(level, "3")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", native)
    os.environ[ENV_LEVEL] = level
    if level == QUIET:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(QuietFilter(own, other))
    root = logging.getLogger()
    for old in list(root.handlers):  # ours from an earlier call, or a basicConfig one
        if getattr(old, "_similarity_handler", False) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    handler._similarity_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(min(own, other))
    # absl (imported by TensorFlow) installs its own handler on first use unless
    # the root logger already has one; keep its Python records going through ours.
    logging.getLogger("absl").propagate = True


def worker_log_level(level: str) -> str:
    """Beam's ``--default_sdk_harness_log_level`` for worker processes at ``level``.

    Workers drop INFO records (batch statistics, option dumps) at the source in
    the quiet default instead of shipping them to the launcher to be filtered.
    """
    return "WARNING" if level == QUIET else level.upper()


def quiet_startup(argv: list[str] | None = None) -> str:
    """Configure logging from ``argv`` before heavy imports (Beam logs while importing)."""
    argv = sys.argv[1:] if argv is None else argv
    log_level, verbose = None, False
    for i, arg in enumerate(argv):
        if arg in ("-v", "--verbose"):
            verbose = True
        elif arg.startswith("--log_level="):
            log_level = arg.split("=", 1)[1]
        elif arg == "--log_level" and i + 1 < len(argv):
            log_level = argv[i + 1]
    try:
        level = level_from(log_level, verbose)
    except ValueError:
        level = QUIET  # the options parser reports the bad value properly later
    configure(level)
    return level


@contextlib.contextmanager
def native_noise_filtered(enabled: bool | None = None):
    """Capture file descriptor 2 while a block runs, then replay all but native noise.

    TensorFlow's absl logging prints INFO lines while it is imported and while a
    model is converted, whatever ``TF_CPP_MIN_LOG_LEVEL`` says. Anything else
    written to stderr meanwhile (native errors, our own log records, a
    traceback) is replayed in order once the block ends. ``enabled`` defaults to
    the run's level (``SIMILARITY_LOG_LEVEL``): on unless debug or info was asked.
    """
    if enabled is None:
        enabled = os.environ.get(ENV_LEVEL, QUIET) not in ("debug", "info")
    global _capture_depth
    if not enabled:
        yield
        return
    with _CAPTURE_LOCK:
        if _capture_depth:  # already capturing (nested call): the outer one filters
            yield
            return
        _capture_depth += 1
        try:
            with _captured_fd2():
                yield
        finally:
            _capture_depth -= 1


@contextlib.contextmanager
def _captured_fd2():
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not _NATIVE_NOISE.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
