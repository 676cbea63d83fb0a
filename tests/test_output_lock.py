"""One run at a time per output root (issue 15): ROOT/.run.lock with stale-lock detection."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline import run_lock
from pipeline.run import main, run
from tests.conftest import REPO, write_catalog

HOLDER = """
import sys, time
from pipeline.run_lock import RootLock
lock = RootLock(sys.argv[1], "night7").acquire()
print("ready", flush=True)
time.sleep(120)
"""


def _err(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines()
            if line and not line.startswith("progress: ")]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of ``tmp_path / 'root'``."""
    root = tmp_path / "root"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        yield root, child.pid
    finally:
        child.kill()
        child.wait()


def test_a_second_run_on_a_locked_root_is_refused_before_touching_it(tmp_path, tiny_model,
                                                                     capsys, holder):
    root, pid = holder
    catalog = write_catalog(tmp_path / "cat")
    before = sorted(os.listdir(root))
    code = main([f"--input={catalog}", f"--output={root}", f"--model={tiny_model}",
                 "--no_progress"])
    err = _err(capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and f"pid {pid}" in err[0] and "night7" in err[0]
    assert socket.gethostname() in err[0] and "Traceback" not in err[0]
    assert sorted(os.listdir(root)) == before  # no runs/ directory, nothing written


def test_a_killed_holder_leaves_a_stale_lock_that_the_next_run_takes_over(tmp_path,
                                                                          tiny_model, capsys):
    root = tmp_path / "root"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.kill()  # SIGKILL: no clean-up runs; the flock dies with the process
    child.wait()
    assert (root / run_lock.LOCK_FILE).exists()
    catalog = write_catalog(tmp_path / "cat")
    code = main([f"--input={catalog}", f"--output={root}", f"--model={tiny_model}",
                 "--top_k=3", "--no_progress"])
    err = _err(capsys)
    assert code == 0
    assert len(err) == 1 and "taking over the stale lock" in err[0] and str(child.pid) in err[0]
    assert not (root / run_lock.LOCK_FILE).exists()  # released at the end
    assert os.path.isdir(root / "LATEST")


def test_the_lock_is_released_on_a_failed_run(tmp_path, tiny_model, capsys):
    root = tmp_path / "root"
    code = main([f"--input={tmp_path / 'missing.csv'}", f"--output={root}",
                 f"--model={tiny_model}", "--no_progress"])
    assert code == 2 and len(_err(capsys)) == 1
    assert not (root / run_lock.LOCK_FILE).exists()
    # and a good run after it is not refused
    catalog = write_catalog(tmp_path / "cat")
    run([f"--input={catalog}", f"--output={root}", f"--model={tiny_model}", "--top_k=3"])
    assert not (root / run_lock.LOCK_FILE).exists()


def test_a_lock_held_in_this_process_refuses_a_second_holder(tmp_path):
    with run_lock.held(str(tmp_path), "a") as lock:
        record = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["run_id"] == "a"
        lock.note_run_id("b")
        assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["run_id"] == "b"
        # flock is per open file: a second open in this same process is refused too
        with pytest.raises(run_lock.LockHeld, match="run b"):
            run_lock.RootLock(str(tmp_path)).acquire()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


def _write_record(path, **fields):
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
              "started": "2026-12-01T00:00:00Z", "run_id": "other", "token": "t"}
    record.update(fields)
    path.write_text(json.dumps(record))


def test_object_store_locks_decide_by_the_record(tmp_path, caplog):
    """Roots without flock (gs://): a live record is refused; a dead pid or old record is not.

    Exercised through the same FileSystems calls a gs:// root uses, on a local path.
    """
    path = tmp_path / run_lock.LOCK_FILE
    _write_record(path)  # this very process: alive
    with pytest.raises(run_lock.LockHeld, match="run other"):
        run_lock.RootLock(str(tmp_path))._acquire_object()
    _write_record(path, host="elsewhere.example")  # another host, recent: may be live
    with pytest.raises(run_lock.LockHeld):
        run_lock.RootLock(str(tmp_path))._acquire_object()
    for stale in ({"pid": _dead_pid()},
                  {"host": "elsewhere.example",
                   "started_at": time.time() - run_lock.STALE_AFTER_SECONDS - 60}):
        _write_record(path, **stale)
        lock = run_lock.RootLock(str(tmp_path), "mine")
        lock._acquire_object()
        assert json.loads(path.read_text())["token"] == lock.token
        lock._held = True
        lock.release()
        assert not path.exists()
    path.write_text("{garbage")
    assert run_lock.stale_reason(run_lock._parse(path.read_bytes())) is not None
