"""``python -m pipeline.status ROOT``: the state of every run under an output root.

A nightly job is watched by cron and alerting, not by a person reading logs.
This lists each run (complete, incomplete = still running, dead = killed or
crashed), which one ``LATEST`` points to, and exits non-zero when something
needs a person: the newest run is dead, or ``LATEST`` is older than
``--max_age``. ``--json`` gives the same for monitoring systems.

Exit codes: 0 all well; 1 the newest run is dead or LATEST is missing or too
old; 2 usage errors (no such root, a bad ``--max_age``).
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import posixpath
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass

from apache_beam.io.filesystems import FileSystems

from pipeline import files, publish

COMPLETE = "complete"
INCOMPLETE = "incomplete"  # still running, as far as can be told from here
DEAD = "dead"  # marked incomplete, but its process is gone (or its files are damaged)

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class RunStatus:
    """One run directory under ``ROOT/runs/`` as the status report shows it."""

    run_id: str
    state: str
    started_at: float | None  # epoch seconds
    age_seconds: float | None  # since the run started
    finished_at: float | None
    wall_seconds: float | None
    model: str | None
    input: int | None
    embedded: int | None
    failed: int | None
    reused: int | None
    reused_share: float | None  # reused / embedded
    latest: bool
    note: str = ""


def parse_age(text: str) -> float:
    """Seconds in an age like ``36h``, ``90m``, ``2d``, ``1w`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not match:
        raise ValueError(f"--max_age must look like 36h, 90m, 2d or a number of seconds, "
                         f"got {text!r}")
    return float(match.group(1)) * _AGE_UNITS[match.group(2) or "s"]


def _read_json(path: str) -> dict | None:
    try:
        value = files.read_json(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _epoch(stamp) -> float | None:
    if isinstance(stamp, (int, float)):
        return float(stamp)
    if isinstance(stamp, str):
        try:
            return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
        except ValueError:
            return None
    return None


def _process_alive(marker: dict) -> bool | None:
    """Whether the process that wrote an INCOMPLETE marker still runs (None: can't tell)."""
    pid = marker.get("pid")
    host = marker.get("host") or marker.get("hostname")
    if not isinstance(pid, int) or pid <= 0:
        return None
    if host and host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    if not host:
        # Markers without a host name: a live pid may be another process that reused
        # the number. Its start time must not be after the run's start.
        started = marker.get("started_at")
        proc_start = _process_start(pid)
        if proc_start is not None and isinstance(started, (int, float)) \
                and proc_start > started + 5:
            return False
    return True


def _process_start(pid: int) -> float | None:
    """Start time (epoch) of a local process, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(float(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _run_ids(root: str) -> list[str]:
    ids = set()
    runs = files.join(root, publish.RUNS_DIR)
    if files.is_local(runs):
        if os.path.isdir(runs):
            ids = {name for name in os.listdir(runs)
                   if os.path.isdir(os.path.join(runs, name)) and not name.startswith(".")}
    else:
        for match in FileSystems.match([files.join(runs, "*", "*")])[0].metadata_list:
            ids.add(posixpath.basename(posixpath.dirname(match.path.rstrip("/"))))
    return sorted(ids)


def run_status(root: str, run_id: str, latest_id: str | None, now: float) -> RunStatus:
    """Read one run's marker or manifest and tell its state."""
    directory = publish.run_dir(root, run_id)
    marker_path = files.join(directory, publish.INCOMPLETE)
    manifest = _read_json(files.join(directory, publish.MANIFEST_FILE))
    if FileSystems.exists(marker_path):
        marker = _read_json(marker_path) or {}
        started = _epoch(marker.get("started_at"))
        alive = _process_alive(marker)
        state = DEAD if alive is False else INCOMPLETE
        note = ("its process is gone" if alive is False else
                "running" if alive else "cannot tell whether its process runs")
        return RunStatus(run_id, state, started, now - started if started else None, None,
                         None, None, None, None, None, None, None, run_id == latest_id, note)
    if manifest is None:
        return RunStatus(run_id, DEAD, None, None, None, None, None, None, None, None, None,
                         None, run_id == latest_id, "no readable manifest.json")
    counts = manifest.get("counts") or {}
    timings = manifest.get("timings") or {}
    started = _epoch(timings.get("started_at"))
    embedded, reused = counts.get("embedded"), counts.get("reused")
    share = (round(reused / embedded, 4) if isinstance(reused, int)
             and isinstance(embedded, int) and embedded else None)
    return RunStatus(run_id, COMPLETE, started, now - started if started else None,
                     _epoch(timings.get("finished_at")), timings.get("wall_seconds"),
                     manifest.get("model"), counts.get("input"), embedded,
                     counts.get("failed"), reused, share, run_id == latest_id)


def root_status(root: str, now: float | None = None) -> dict:
    """Every run under ``root`` (oldest first) and where LATEST points."""
    now = time.time() if now is None else now
    latest = publish.latest_run(root)
    latest_id = posixpath.basename(latest.replace(os.sep, "/").rstrip("/")) if latest else None
    runs = [run_status(root, run_id, latest_id, now) for run_id in _run_ids(root)]
    runs.sort(key=lambda r: (r.started_at or 0.0, r.run_id))
    latest_run = next((r for r in runs if r.latest), None)
    return {"root": root, "latest": latest_id, "now": now,
            "latest_age_seconds": (now - latest_run.finished_at
                                   if latest_run and latest_run.finished_at else None),
            "runs": [asdict(r) for r in runs]}


def problems(status: dict, max_age: float | None) -> list[str]:
    """What a person must look at: a dead newest run, no LATEST, or a stale LATEST."""
    found = []
    runs = status["runs"]
    if runs and runs[-1]["state"] == DEAD:
        found.append(f"the newest run {runs[-1]['run_id']} is dead ({runs[-1]['note']})")
    if status["latest"] is None:
        found.append("LATEST points to no run")
    elif max_age is not None:
        age = status["latest_age_seconds"]
        if age is None or age > max_age:
            found.append(f"LATEST ({status['latest']}) is older than --max_age "
                         f"({_human_age(age)} > {_human_age(max_age)})")
    return found


def _human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(status: dict) -> str:
    """The runs as a compact text table, LATEST marked with ``*``."""
    header = ("", "run", "state", "age", "model", "input", "embedded", "failed", "reused",
              "wall s")
    rows = [header]
    for r in status["runs"]:
        reused = (f"{r['reused']} ({r['reused_share']:.0%})" if r["reused_share"] is not None
                  else _cell(r["reused"]))
        rows.append(("*" if r["latest"] else "", r["run_id"],
                     r["state"] + ("" if r["state"] == COMPLETE or not r["note"]
                                   else f" ({r['note']})"),
                     _human_age(r["age_seconds"]), _cell(r["model"]), _cell(r["input"]),
                     _cell(r["embedded"]), _cell(r["failed"]), reused,
                     _cell(r["wall_seconds"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if len(rows) == 1:
        lines.append("(no runs)")
    lines.append(f"LATEST -> {'runs/' + status['latest'] if status['latest'] else 'nothing'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print the runs under ROOT; exit 1 when the newest is dead or LATEST is stale."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.status",
        description="List the runs under an output root and which one LATEST points to.")
    parser.add_argument("root", help="The output root given to pipeline.run as --output.")
    parser.add_argument("--json", action="store_true", help="Print JSON for monitoring.")
    parser.add_argument("--max_age", "--max-age", default=None,
                        help="Exit 1 when LATEST's run finished longer ago than this "
                        "(e.g. 36h, 2d, 5400).")
    args = parser.parse_args(argv)
    try:
        max_age = parse_age(args.max_age) if args.max_age is not None else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = args.root
    if files.is_local(root) and not os.path.isdir(root):
        print(f"error: {root}: no such output root", file=sys.stderr)
        return 2
    status = root_status(root)
    found = problems(status, max_age)
    status["problems"] = found
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_table(status))
        for problem in found:
            print(f"problem: {problem}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
