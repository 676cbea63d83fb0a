"""The launcher's side of live progress: one updating line on a terminal, log lines elsewhere.

Sums the worker status files of :mod:`pipeline.progress` while the job runs.
On a terminal it draws one tqdm line (phase, rows by stage, images per second,
ETA against the catalogue size); without one (cron, CI, Dataflow logs) it
prints a plain ``progress:`` line every ``interval`` seconds. Stopping it
prints a last line from the final counts.

Status files need workers on this machine: DirectRunner's, and a portable
runner's whose job service and workers are on this machine (EXTERNAL worker
pool, LOOPBACK or PROCESS environments). Other workers (Dataflow, a
remote worker pool, Docker containers) cannot write to the launcher's disk,
and Beam's portable job service reports metrics only once the job is done
(measured: ``GetJobMetrics`` answers nothing while the job runs), so there the
launcher says so in one line and prints the final line from the job's Beam
counters (:data:`pipeline.progress.METRICS_NAMESPACE`) when the job ends.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)

from pipeline import progress
from pipeline.local_runner import is_direct

_HEAD_BYTES = 1 << 20


def expected_rows(kind: str, path: str) -> tuple[int | None, bool]:
    """(catalogue rows, exact?) known at start-up: exact for Parquet and globs,
    estimated from the first MiB for CSV and JSONL, None when it cannot be told."""
    try:
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            with FileSystems.open(path) as handle:
                return pq.ParquetFile(pa.PythonFile(handle, mode="r")).metadata.num_rows, True
        if kind == "glob":
            return len(FileSystems.match([path])[0].metadata_list), True
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        with FileSystems.open(path) as handle:
            head = handle.read(_HEAD_BYTES)
        if not head:
            return 0, True
        text = head.decode("utf-8", "replace")
        if len(head) < _HEAD_BYTES:  # the whole file: count it
            body = text
        else:  # drop the last, probably partial, record
            body = text[: text.rfind("\n") + 1]
        if kind == "csv":
            records = sum(1 for _ in csv.reader(io.StringIO(body))) - 1
        else:
            records = sum(1 for line in body.split("\n") if line.strip())
        if len(head) < _HEAD_BYTES:
            return max(records, 0), True
        return (int(records * size / max(len(body.encode("utf-8")), 1)) if records > 0
                else None), False
    except Exception:  # noqa: BLE001 - an estimate must never stop a run
        return None, False


class ProgressReporter:
    """Shows progress from the status files in ``directory`` until :meth:`stop`."""

    def __init__(self, directory: str, total: int | None, interval: float = 30.0, *,
                 stream=None, tty: bool | None = None, exact_total: bool = True):
        self.directory = directory
        self.total = total
        self.exact_total = exact_total
        self.interval = interval
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.phase: str | None = None
        self.phase_started: dict[str, float] = {}
        self.lines_printed = 0
        self._history: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def start(self) -> "ProgressReporter":
        """Start drawing in a daemon thread."""
        if self.tty:
            from tqdm import tqdm

            # A pseudo-terminal without a size reports 0 x 0, which tqdm draws as
            # nothing: fall back to a usual size.
            size = shutil.get_terminal_size((120, 24))
            self._bar = tqdm(total=self.total, file=self.stream, unit="img",
                             ncols=size.columns or 120, nrows=size.lines or 24, leave=True,
                             mininterval=0.2,
                             bar_format="{desc} {percentage:3.0f}%|{bar:16}| {n_fmt}/"
                             "{total_fmt} [{elapsed}<{remaining}, {rate_fmt}] {postfix}")
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def set_phase(self, phase: str) -> None:
        """Force the phase shown (the launcher knows when publishing starts)."""
        self.phase = phase

    def current(self) -> progress.Snapshot:
        """The state now, from the status files."""
        counts = progress.read_counts(self.directory)
        now = time.monotonic()
        snap = progress.snapshot(counts, now - self.started, self.total, self.phase)
        self._history.append((now, snap.done))
        self._history = [h for h in self._history if now - h[0] <= 15.0] or self._history[-1:]
        t0, d0 = self._history[0]
        if now - t0 >= 1.0 and snap.done > d0:
            snap.rate = (snap.done - d0) / (now - t0)
        elif snap.elapsed > 0 and snap.done:
            snap.rate = snap.done / snap.elapsed
        if snap.rate and self.total and snap.phase in ("reading", "embedding"):
            snap.eta = max(0.0, (self.total - snap.done) / snap.rate)
        self.phase_started.setdefault(snap.phase, snap.elapsed)
        return snap

    def _draw(self, snap: progress.Snapshot) -> None:
        if self._bar is not None:
            self._bar.set_description_str(f"[{snap.phase}]", refresh=False)
            c = snap.counts
            failed = sum(snap.failed_by_stage.values())
            self._bar.set_postfix_str(
                f"read {c.get(progress.READ, 0)} fetched {c.get(progress.FETCHED, 0)} "
                f"decoded {c.get(progress.DECODED, 0)} reused {c.get(progress.REUSED, 0)} "
                f"failed {failed}", refresh=False)
            self._bar.n = snap.done
            self._bar.refresh()
        else:
            line = progress.format_line(snap)
            if self.total is not None and not self.exact_total:
                line = line.replace(f"/{self.total}", f"/~{self.total}", 1)
            print(f"progress: {line}", file=self.stream, flush=True)
            self.lines_printed += 1

    def _loop(self) -> None:
        # Poll often (phase start times are taken from what is seen), draw every
        # 0.25 s on a terminal and every ``interval`` seconds elsewhere.
        next_draw = time.monotonic() + (0.25 if self.tty else self.interval)
        while not self._stop.wait(0.25):
            try:
                snap = self.current()
                if time.monotonic() >= next_draw:
                    self._draw(snap)
                    next_draw = time.monotonic() + (0.25 if self.tty else self.interval)
            except Exception:  # noqa: BLE001 - progress must never break a run
                pass

    def stop(self, final: bool = True) -> progress.Snapshot | None:
        """Stop drawing; with ``final``, show one last line from the final counts."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        snap = None
        if final:
            snap = self.current()
            self._draw(snap)
        if self._bar is not None:
            self._bar.close()
        return snap


def _on_this_machine(address: str | None) -> bool:
    """Whether ``host:port`` names this machine: a loopback name or address, or an
    address this machine can bind (one of its own interfaces)."""
    host = (address or "").strip()
    if host.startswith("["):  # [::1]:8099
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if not host:
        return False
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, sockaddr in found:
        try:
            if ipaddress.ip_address(sockaddr[0]).is_loopback:
                return True
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((sockaddr[0], 0))
            return True
        except (OSError, ValueError):
            continue
    return False


def workers_share_this_machine(options: PipelineOptions) -> bool:
    """Whether the job's workers run on this machine and can write its status files.

    DirectRunner: yes. PortableRunner: LOOPBACK workers (in this process), an
    EXTERNAL worker pool on this machine, or PROCESS workers of a job service on
    this machine. Anything else (Dataflow, Docker environments whose containers
    do not see this disk, pools on other hosts) is remote.
    """
    if is_direct(options):
        return True
    if options.view_as(StandardOptions).runner not in ("PortableRunner", "FlinkRunner",
                                                       "SparkRunner"):
        return False
    portable = options.view_as(PortableOptions)
    kind = (portable.environment_type or "DOCKER").upper()
    if kind == "LOOPBACK":  # the workers run in this process
        return True
    if kind == "EXTERNAL":  # wherever the worker pool is
        return _on_this_machine(portable.environment_config)
    if kind == "PROCESS":  # started by the job service, on its machine
        return portable.job_endpoint == "embed" or _on_this_machine(portable.job_endpoint)
    return False  # DOCKER: containers do not see this machine's disk


def job_counts(result) -> dict[str, int] | None:
    """The progress counters of a finished job from its Beam metrics (None if unavailable)."""
    try:
        from apache_beam.metrics.metric import MetricsFilter

        found = result.metrics().query(
            MetricsFilter().with_namespace(progress.METRICS_NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001 - a runner without metrics: no final line
        return None
    counts: dict[str, int] = {}
    for counter in found:
        value = counter.committed if counter.committed is not None else counter.attempted
        if value is not None:
            counts[counter.key.metric.name] = counts.get(counter.key.metric.name, 0) + int(value)
    return counts


class RunProgress:
    """Progress for one run: a status directory shared with local workers, or for remote
    workers one line saying live counts are not available and a final line from metrics."""

    def __init__(self, enabled: bool, total: int | None, exact_total: bool, interval: float, *,
                 local: bool = True, runner: str = "DirectRunner", stream=None):
        self.enabled = enabled
        self.local = local
        self.total = total
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.phases: dict[str, float] = {}
        self.result = None
        self.directory = None
        self.reporter = None
        self._previous_env = os.environ.get(progress.ENV_DIR)
        if local:
            self.directory = tempfile.mkdtemp(prefix="similarity-progress-")
            os.environ[progress.ENV_DIR] = self.directory
            if enabled:
                self.reporter = ProgressReporter(self.directory, total, interval,
                                                 stream=self.stream,
                                                 exact_total=exact_total).start()
        else:
            os.environ.pop(progress.ENV_DIR, None)  # nothing for the graph to carry
            if enabled:
                print(f"progress: live counts are not available: {runner} workers cannot "
                      f"write to this machine; the counts follow when the job ends",
                      file=self.stream, flush=True)

    def watch(self, result) -> None:
        """The job was submitted: its result gives the final counts on remote runners."""
        self.result = result
        self.phases.setdefault("job", time.monotonic() - self.started)

    def set_phase(self, phase: str) -> None:
        """Show ``phase`` from now on."""
        if self.reporter is not None:
            self.reporter.set_phase(phase)
        else:
            self.phases.setdefault(phase, time.monotonic() - self.started)

    def _final_remote_line(self) -> None:
        counts = job_counts(self.result) if self.result is not None else None
        if counts is None:
            return
        snap = progress.snapshot(counts, time.monotonic() - self.started, self.total,
                                 "publishing")
        print(f"progress: {progress.format_line(snap)}", file=self.stream, flush=True)

    def close(self, final: bool = True) -> dict:
        """Stop the display, forget the directory; returns the launcher-seen phase start times."""
        phases = dict(self.phases)
        if self.reporter is not None:
            self.reporter.stop(final=final)
            phases = dict(self.reporter.phase_started)
        elif self.enabled and final and not self.local:
            self._final_remote_line()
        if self._previous_env is None:
            os.environ.pop(progress.ENV_DIR, None)
        else:
            os.environ[progress.ENV_DIR] = self._previous_env
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        return phases
