"""The Annoy build's child process ends with the run that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os, time; from pipeline.annoy_child import die_with_parent; "
         "die_with_parent(int(os.environ['SIMILARITY_ANNOY_PARENT'])); time.sleep(60)"],
        env=dict(os.environ, SIMILARITY_ANNOY_PARENT=str(os.getpid())))
    print(child.pid, flush=True)
    time.sleep(60)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_build_child_is_killed_when_the_run_process_dies():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()))
    child_pid = int(parent.stdout.readline())
    time.sleep(1.0)  # the child has asked for the signal by now
    os.kill(child_pid, 0)  # alive while its parent runs
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        # A killed child is a zombie until init reaps it; it no longer runs.
        try:
            with open(f"/proc/{child_pid}/stat") as handle:
                if handle.read().split(") ", 1)[1].startswith("Z"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(child_pid, signal.SIGKILL)
    pytest.fail("the build child outlived the process that started it")
