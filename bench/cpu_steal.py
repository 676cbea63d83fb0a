"""CPU time the hypervisor gave to other guests while a benchmark phase ran.

On a shared virtual machine, "steal" is time this machine's CPUs were runnable but
the host ran someone else. A ratio of two timings is only fair when both phases
saw similar steal: the benchmarks print it next to each timing so a contended run
can be recognised and repeated instead of reported. Linux only (``/proc/stat``);
elsewhere the meter reads nothing and the benchmarks print no steal figure.
"""

from __future__ import annotations

import time

PROC_STAT = "/proc/stat"
# Columns of the aggregate "cpu" line of /proc/stat, in order (see proc(5)).
_STEAL_COLUMN = 7


def cpu_ticks(path: str = PROC_STAT) -> tuple[int, int] | None:
    """(stolen, total) clock ticks of all CPUs since boot, or None where unknown."""
    try:
        with open(path) as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) <= _STEAL_COLUMN + 1:
        return None
    # guest / guest_nice (columns 9–10) are already counted in user / nice.
    ticks = [int(value) for value in fields[1:_STEAL_COLUMN + 2]]
    return ticks[_STEAL_COLUMN], sum(ticks)


class StealMeter:
    """Measures wall time and the stolen share of CPU time over a ``with`` block."""

    def __init__(self, path: str = PROC_STAT):
        self._path = path
        self.seconds = 0.0
        self.steal: float | None = None

    def __enter__(self) -> "StealMeter":
        self._ticks = cpu_ticks(self._path)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._started
        end = cpu_ticks(self._path)
        if self._ticks is not None and end is not None and end[1] > self._ticks[1]:
            self.steal = (end[0] - self._ticks[0]) / (end[1] - self._ticks[1])

    def label(self) -> str:
        """``", CPU steal 12 %"`` for a report line, or ``""`` where unknown."""
        return "" if self.steal is None else f", CPU steal {100 * self.steal:.0f} %"
