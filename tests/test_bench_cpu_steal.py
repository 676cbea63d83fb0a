"""The benchmarks' steal meter: the share of CPU time the hypervisor took elsewhere."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from cpu_steal import StealMeter, cpu_ticks  # noqa: E402


def _stat(path, user, system, idle, steal):
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {user} 0 {system} {idle} 0 0 0 {steal} 50 0\n"
                    "cpu0 1 2 3 4 5 6 7 8 9 10\n")


def test_ticks_count_steal_and_every_column_but_guest(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, user=100, system=20, idle=300, steal=80)
    assert cpu_ticks(str(stat)) == (80, 500)


def test_meter_reports_the_stolen_share_of_the_block(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, user=100, system=20, idle=300, steal=80)
    with StealMeter(str(stat)) as meter:
        # 400 more ticks, 100 of them stolen
        _stat(stat, user=300, system=60, idle=360, steal=180)
    assert meter.steal == 0.25
    assert meter.label() == ", CPU steal 25 %"
    assert meter.seconds >= 0


def test_meter_is_silent_where_proc_stat_is_missing(tmp_path):
    with StealMeter(str(tmp_path / "absent")) as meter:
        pass
    assert meter.steal is None and meter.label() == ""
