"""Live progress of a run: per-process counters in small status files, read by the launcher.

Beam runs bundles in the launcher process (in-memory DirectRunner) or in worker
processes (multi-processing DirectRunner), and a blocking ``pipeline.run()``
gives no metrics until the end. So every process that runs a counting step
keeps its counts in memory and writes them, atomically, to
``<progress dir>/<host>-<pid>.json`` at the end of each bundle and at most
every :data:`FLUSH_SECONDS` in between. The launcher sums the files it finds.
The directory is passed in the ``SIMILARITY_PROGRESS_DIR`` environment
variable, which worker processes started on this machine inherit, and is also
carried by the counting steps themselves (:func:`shared_directory` at graph
construction), so EXTERNAL portable workers on this machine, started outside
the launcher, write there too. Where neither is set (remote workers) counting
costs nothing and nothing is written.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

ENV_DIR = "SIMILARITY_PROGRESS_DIR"
# The Beam counters carrying the same counts (every runner reports them in the job's metrics).
METRICS_NAMESPACE = "similarity_progress"
FLUSH_SECONDS = 0.5

# Counter names, in the order the rows flow.
READ = "read"
FETCHED = "fetched"
DECODED = "decoded"
EMBEDDED = "embedded"
REUSED = "reused"
FAILED_PREFIX = "failed:"  # + stage
FEATURE_FILES = "feature_files"
NEIGHBOR_SHARDS = "neighbor_shards"

PHASES = ("starting", "reading", "embedding", "index", "neighbours", "publishing", "done")


class _Counters:
    """This process's counts; thread-safe; flushed to its status file."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._dirty = False
        self._last_flush = 0.0
        self._directory: str | None = None

    def add(self, name: str, amount: int = 1, directory: str | None = None) -> None:
        directory = directory or os.environ.get(ENV_DIR)
        if not directory:
            return
        with self._lock:
            if directory != self._directory:  # a new run in this process: start afresh
                self._directory = directory
                self._counts = {}
            self._counts[name] = self._counts.get(name, 0) + amount
            self._dirty = True
            due = time.monotonic() - self._last_flush >= FLUSH_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._dirty or not self._directory:
                return
            directory, counts = self._directory, dict(self._counts)
            self._dirty = False
            self._last_flush = time.monotonic()
        _write_status(directory, counts)


_COUNTERS = _Counters()


def count(name: str, amount: int = 1, directory: str | None = None) -> None:
    """Add ``amount`` to counter ``name`` of this process (no-op outside a local run).

    ``directory`` is the run's status directory when the caller knows it (a
    counting step carries it to workers that do not inherit the environment).
    """
    _COUNTERS.add(name, amount, directory)


def shared_directory() -> str | None:
    """The status directory of the run being built in this process, if it has one.

    Read when the graph is built, so the counting steps carry it to every worker.
    """
    return os.environ.get(ENV_DIR) or None


def flush() -> None:
    """Write this process's counts now (called at the end of each bundle)."""
    _COUNTERS.flush()


def _write_status(directory: str, counts: dict) -> None:
    name = f"{socket.gethostname()}-{os.getpid()}.json"
    path = os.path.join(directory, name)
    tmp = f"{path}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"counts": counts, "updated": time.time()}, handle)
        os.replace(tmp, path)
    except OSError:  # progress is best effort: never fail a run over it
        try:
            os.unlink(tmp)
        except OSError:
            pass


def read_counts(directory: str) -> dict[str, int]:
    """The sum of every process's counts in ``directory``."""
    total: dict[str, int] = {}
    for path in glob.glob(os.path.join(directory, "*.json")):
        try:
            with open(path, encoding="utf-8") as handle:
                counts = json.load(handle).get("counts", {})
        except (OSError, ValueError):
            continue
        for name, value in counts.items():
            if isinstance(value, int):
                total[name] = total.get(name, 0) + value
    return total


@dataclass
class Snapshot:
    """What the progress line shows at one moment."""

    counts: dict
    elapsed: float
    total: int | None  # catalogue rows, when known
    phase: str
    rate: float | None = None  # rows done per second, recent
    eta: float | None = None  # seconds
    failed_by_stage: dict = field(default_factory=dict)

    @property
    def done(self) -> int:
        """Rows that reached their end: embedded, reused or failed."""
        return (self.counts.get(EMBEDDED, 0) + self.counts.get(REUSED, 0)
                + sum(self.failed_by_stage.values()))


def phase_of(counts: dict, done_rows: int, total: int | None) -> str:
    """The phase the counters show: the latest stage that has started."""
    if counts.get(NEIGHBOR_SHARDS):
        return "neighbours"
    if counts.get(FEATURE_FILES):
        return "index"
    if done_rows or counts.get(FETCHED):
        return "embedding"
    if counts.get(READ):
        return "reading"
    return "starting"


def snapshot(counts: dict, elapsed: float, total: int | None, phase: str | None = None,
             rate: float | None = None) -> Snapshot:
    """Build the display state from summed counts."""
    failed = {name[len(FAILED_PREFIX):]: value for name, value in counts.items()
              if name.startswith(FAILED_PREFIX)}
    snap = Snapshot(counts, elapsed, total, "", rate, None, failed)
    known_total = total if total is not None else None
    snap.phase = phase or phase_of(counts, snap.done, known_total)
    if rate and known_total and snap.phase in ("reading", "embedding"):
        snap.eta = max(0.0, (known_total - snap.done) / rate)
    return snap


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


def format_line(snap: Snapshot) -> str:
    """One line: phase, rows by stage, failures by stage, rate and ETA."""
    c = snap.counts
    total = f"/{snap.total}" if snap.total is not None else ""
    parts = [f"[{snap.phase}]", f"read {c.get(READ, 0)}{total}",
             f"fetched {c.get(FETCHED, 0)}", f"decoded {c.get(DECODED, 0)}",
             f"embedded {c.get(EMBEDDED, 0)}", f"reused {c.get(REUSED, 0)}"]
    failed = sum(snap.failed_by_stage.values())
    detail = ", ".join(f"{stage} {n}" for stage, n in sorted(snap.failed_by_stage.items()))
    parts.append(f"failed {failed}" + (f" ({detail})" if detail else ""))
    if snap.rate is not None:
        parts.append(f"{snap.rate:.1f} img/s")
    if snap.eta is not None:
        parts.append(f"ETA {_duration(snap.eta)}")
    parts.append(f"elapsed {_duration(snap.elapsed)}")
    return "  ".join(parts)
