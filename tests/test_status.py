"""pipeline.status: the state of every run under a root, for people and for cron alerts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from pipeline import publish, status
from pipeline.run import run
from tests.conftest import REPO, write_catalog
from tests.http_fixtures import http_server  # noqa: F401 (fixture)

MODEL = "--model=raw_pixels_32"


def _status(root, *args):
    proc = subprocess.run([sys.executable, "-m", "pipeline.status", str(root), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_lists_complete_runs_marks_latest_and_exits_zero(tmp_path):
    catalog = write_catalog(tmp_path / "cat")
    root = tmp_path / "root"
    first = run([f"--input={catalog}", f"--output={root}", MODEL, "--run_id=first"])
    second = run([f"--input={catalog}", f"--output={root}", MODEL, "--run_id=second"])
    code, out, err = _status(root, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["latest"] == "second"
    assert [r["run_id"] for r in report["runs"]] == ["first", "second"]
    by_id = {r["run_id"]: r for r in report["runs"]}
    assert by_id["second"]["state"] == status.COMPLETE and by_id["second"]["latest"]
    assert not by_id["first"]["latest"]
    counts = second["counts"]
    assert by_id["second"]["input"] == counts["input"]
    assert by_id["second"]["embedded"] == counts["embedded"]
    assert by_id["second"]["reused"] == counts["reused"] > 0
    assert by_id["second"]["reused_share"] == round(counts["reused"] / counts["embedded"], 4)
    assert by_id["first"]["model"] == first["model"]
    assert report["problems"] == []

    code, out, _ = _status(root)
    assert code == 0
    line = next(l for l in out.splitlines() if "second" in l)
    assert line.startswith("*") and "complete" in line
    assert out.splitlines()[-1] == "LATEST -> runs/second"


def test_a_killed_run_is_dead_and_a_stale_latest_fails_max_age(tmp_path, http_server):
    catalog = write_catalog(tmp_path / "cat")
    root = tmp_path / "root"
    run([f"--input={catalog}", f"--output={root}", MODEL, "--run_id=good"])
    with open(catalog, "a") as handle:
        handle.write(f"stalled,{http_server.url('hang')},x\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", f"--input={catalog}", f"--output={root}",
         MODEL, "--run_id=killed", "--allow_private_hosts", "--fetch_timeout=60",
         "--fetch_total_timeout=60"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = root / "runs" / "killed" / publish.INCOMPLETE
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the run never started"
    code, out, _ = _status(root, "--json")
    running = {r["run_id"]: r for r in json.loads(out)["runs"]}["killed"]
    assert running["state"] == status.INCOMPLETE and code == 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    code, out, _ = _status(root, "--json")
    report = json.loads(out)
    assert code == 1
    assert report["runs"][-1]["run_id"] == "killed"
    assert report["runs"][-1]["state"] == status.DEAD
    assert report["latest"] == "good"
    assert any("killed" in p and "dead" in p for p in report["problems"])

    code, out, _ = _status(root)
    assert code == 1 and "problem: the newest run killed is dead" in out

    # A good run after it: healthy again, unless LATEST is older than --max_age.
    run([f"--input={catalog}", f"--output={root}", MODEL, "--run_id=after",
         "--allow_private_hosts", "--fetch_total_timeout=1", "--fetch_timeout=1"])
    assert _status(root)[0] == 0
    assert _status(root, "--max_age=1d")[0] == 0
    time.sleep(1.1)
    code, out, _ = _status(root, "--max_age=1")
    assert code == 1 and "older than --max_age" in out


def test_usage_errors_exit_two(tmp_path):
    code, _, err = _status(tmp_path / "missing")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'missing'}: no such output root"
    code, _, err = _status(tmp_path, "--max_age=soon")
    assert code == 2 and "--max_age" in err and len(err.strip().splitlines()) == 1
    code, out, _ = _status(tmp_path)  # an empty root: nothing published yet
    assert code == 1 and "LATEST points to no run" in out


@pytest.mark.parametrize("text,seconds", [("36h", 129600), ("90m", 5400), ("2d", 172800),
                                          ("5400", 5400), ("1w", 604800)])
def test_parse_age(text, seconds):
    assert status.parse_age(text) == seconds
