"""Runs under an output root, and the atomic switch of ``LATEST`` to a verified run.

Layout::

    ROOT/runs/<run_id>/      one run (features/, errors/, index/, neighbors/, …, manifest.json)
    ROOT/runs/<run_id>/INCOMPLETE   present until the run is complete and verified
    ROOT/LATEST              the last good run: a symlink ``runs/<run_id>`` on local disks
                             (so ``ROOT/LATEST/neighbors`` just works), a one-line text
                             object holding ``runs/<run_id>`` on object stores

A run that fails or is killed leaves its own directory marked INCOMPLETE and
``LATEST`` untouched; the live site keeps reading the previous good run.
Re-running is always safe: each run gets a new directory.
"""

from __future__ import annotations

import calendar
import os
import posixpath
import shutil
import socket
import time
import uuid

from apache_beam.io.filesystems import FileSystems

from pipeline import files, run_layout
from pipeline.run_layout import INCOMPLETE, LATEST, MANIFEST_FILE, RUNS_DIR


class RunVerificationError(RuntimeError):
    """A finished run's files do not match its manifest; it is not published."""


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a short random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def run_dir(root: str, run_id: str) -> str:
    """The directory of run ``run_id`` under ``root``."""
    return files.join(root, RUNS_DIR, run_id)


def mark_incomplete(directory: str, run_id: str) -> None:
    """Mark a run as in progress before it writes anything else."""
    files.write_json(files.join(directory, INCOMPLETE),
                     {"run_id": run_id, "started_at": time.time(), "pid": os.getpid(),
                      "host": socket.gethostname()})


def resolve_run(path: str) -> str:
    """The run directory a user means: a run dir, ``ROOT/LATEST`` or ``ROOT`` itself."""
    if FileSystems.exists(files.join(path, MANIFEST_FILE)):
        return path
    latest = path if posixpath.basename(path.rstrip("/")) == LATEST else files.join(path, LATEST)
    if FileSystems.exists(latest) and not (files.is_local(latest) and os.path.isdir(latest)):
        with FileSystems.open(latest) as handle:
            target = handle.read().decode("utf-8").strip()
        parent = posixpath.dirname(latest.rstrip("/")) if not files.is_local(latest) else \
            os.path.dirname(os.path.abspath(latest))
        return files.join(parent, target)
    if files.is_local(latest) and os.path.isdir(latest):
        return os.path.realpath(latest)
    return path


def latest_run(root: str) -> str | None:
    """The directory of the last published run under ``root``, or None."""
    latest = files.join(root, LATEST)
    if files.is_local(latest):
        return os.path.realpath(latest) if os.path.isdir(latest) else None
    if not FileSystems.exists(latest):
        return None
    return resolve_run(latest)


def _count_lines(pattern: str) -> int:
    total = 0
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as handle:
            total += sum(1 for line in handle if line.strip())
    return total


def _count_parquet_rows(pattern: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as handle:
            total += pq.ParquetFile(pa.PythonFile(handle, mode="r")).metadata.num_rows
    return total


def verify_run(directory: str) -> dict:
    """Check the files of a finished run against its manifest; returns the manifest."""
    manifest = files.read_json(files.join(directory, MANIFEST_FILE))
    counts = manifest["counts"]
    found = {
        "features": _count_parquet_rows(run_layout.feature_shards(directory)),
        "errors": _count_lines(run_layout.error_shards(directory)),
    }
    expected = {"features": counts["embedded"], "errors": counts["failed"]}
    if "neighbors" in manifest:
        found["neighbors"] = _count_lines(run_layout.neighbor_shards(directory))
        expected["neighbors"] = counts["embedded"]
    if found != expected:
        raise RunVerificationError(
            f"run {directory} is inconsistent: files hold {found}, manifest says {expected}")
    return manifest


def publish(root: str, run_id: str) -> None:
    """Verify run ``run_id`` and atomically point ``ROOT/LATEST`` at it."""
    directory = run_dir(root, run_id)
    verify_run(directory)
    FileSystems.delete([files.join(directory, INCOMPLETE)])
    target = f"{RUNS_DIR}/{run_id}"
    latest = files.join(root, LATEST)
    if files.is_local(root):
        tmp = os.path.join(root, f".{LATEST}.{uuid.uuid4().hex}")
        os.symlink(target, tmp)
        os.replace(tmp, latest)  # rename over the old link: readers see old or new, never none
    else:
        files.write_bytes(latest, (target + "\n").encode("utf-8"))


def list_runs(root: str) -> list[tuple[str, bool, float]]:
    """(run_id, complete, started_at) of every run under ``root``, oldest first."""
    runs = []
    for match in FileSystems.match([files.join(root, RUNS_DIR, "*", "*")])[0].metadata_list:
        path = match.path.replace(os.sep, "/")
        name = posixpath.basename(path)
        if name not in (MANIFEST_FILE, INCOMPLETE):
            continue
        run_id = posixpath.basename(posixpath.dirname(path))
        runs.append((run_id, name, match.path))
    by_id: dict[str, dict] = {}
    for run_id, name, path in runs:
        by_id.setdefault(run_id, {})[name] = path
    out = []
    for run_id, found in by_id.items():
        if INCOMPLETE in found:
            started = _json_or_empty(found[INCOMPLETE]).get("started_at", 0.0)
            out.append((run_id, False, float(started)))
        else:
            timings = _json_or_empty(found[MANIFEST_FILE]).get("timings", {})
            started = timings.get("started_at")
            epoch = (calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ"))
                     if started else 0.0)
            out.append((run_id, True, epoch))
    return sorted(out, key=lambda r: (r[2], r[0]))


def _json_or_empty(path: str) -> dict:
    try:
        return files.read_json(path)
    except (OSError, ValueError):
        return {}


def prune_runs(root: str, keep: int, current: str, current_started_at: float) -> list[str]:
    """Delete all but the ``keep`` newest complete runs, and dead incomplete ones.

    The run ``LATEST`` points to and ``current`` are never deleted. Incomplete
    runs that started before ``current`` are left-overs of failed or killed
    runs. Assumes one run at a time per output root. Returns the deleted ids.
    """
    latest = latest_run(root)
    latest_id = posixpath.basename(latest.replace(os.sep, "/").rstrip("/")) if latest else None
    runs = list_runs(root)
    complete = [run_id for run_id, ok, _ in runs if ok]
    doomed = set(complete[:-keep] if keep > 0 else complete)
    doomed |= {run_id for run_id, ok, started in runs
               if not ok and started < current_started_at}
    doomed -= {latest_id, current}
    for run_id in sorted(doomed):
        directory = run_dir(root, run_id)
        if files.is_local(directory):
            shutil.rmtree(directory, ignore_errors=True)
        else:
            found = FileSystems.match([files.join(directory, "**")])[0].metadata_list
            if found:
                FileSystems.delete([m.path for m in found])
    return sorted(doomed)


# Names of the temporary files and directories this pipeline and Beam leave while
# writing: files.write_bytes/staged_output (".tmp-"), Beam's file sinks ("beam-temp-"),
# save_vectors (".writing"), the Annoy build (".building") and the LATEST switch.
_TEMPORARY_PREFIXES = (".tmp-", "beam-temp-", f".{LATEST}.")
_TEMPORARY_SUFFIXES = (".writing", ".building")


def is_temporary(name: str) -> bool:
    """Whether a file or directory name is one of the pipeline's or Beam's temporaries."""
    return name.startswith(_TEMPORARY_PREFIXES) or name.endswith(_TEMPORARY_SUFFIXES)


def remove_temporary(directory: str, recursive: bool = True) -> list[str]:
    """Delete temporary files left under ``directory`` by a failed or interrupted run.

    Why: a run that stops half-way (full disk, SIGINT, a crashed stage) must not
    leave Beam's temp directories and partial files behind for ever. Only names
    :func:`is_temporary` recognises are touched; the run's INCOMPLETE marker and
    its partial outputs stay (``prune_runs`` deletes the whole run later). Call
    it only while holding the root's lock. Returns what was removed.
    """
    removed = []
    if files.is_local(directory):
        if not os.path.isdir(directory):
            return removed
        for parent, dirs, names in os.walk(directory):
            for name in [d for d in dirs if is_temporary(d)]:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                dirs.remove(name)
                removed.append(os.path.join(parent, name))
            for name in names:
                if is_temporary(name):
                    path = os.path.join(parent, name)
                    try:
                        os.unlink(path)
                        removed.append(path)
                    except FileNotFoundError:
                        pass
            if not recursive:
                break
        return removed
    pattern = files.join(directory, "**" if recursive else "*")
    found = [m.path for m in FileSystems.match([pattern])[0].metadata_list
             if any(is_temporary(part) for part in
                    m.path[len(directory):].replace(os.sep, "/").split("/"))]
    if found:
        FileSystems.delete(found)
    return found
