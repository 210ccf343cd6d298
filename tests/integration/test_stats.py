"""``sb._experimental_stats()``: what a sandbox used, from its cgroup, sampled by the daemon (issue 17).

The daemon of the test session samples each second (``SHOAL_USAGE_INTERVAL=1``); a daemon left to its default
samples every five.  Runs under runc and gVisor (``each_runtime``): both put a sandbox in a cgroup of its own.
"""

from __future__ import annotations

import datetime
import time

import pytest

import shoal
from shoal.exception import InvalidError

pytestmark = pytest.mark.usefixtures("each_runtime")

CPU = "CPU Usage (cores)"
MEMORY = "Memory Usage (GiB)"
BURN_AND_HOLD = (
    "import time\n"
    "buf = bytearray(96 << 20)\n"
    "for i in range(0, len(buf), 4096): buf[i] = 1\n"  # touch each page: resident, not just reserved
    "end = time.time() + 3.0\n"
    "while time.time() < end: pass\n"
    "print('done', flush=True)\n"
    "time.sleep(30)\n"
)


def _p(stats: shoal.types.SandboxStats, key: str, pct: float) -> float:
    return next(p.value for p in stats.percentile_stats[key].percentiles if p.percentile == pct)


def test_stats_show_the_cpu_and_memory_a_sandbox_used() -> None:
    app = shoal.App.lookup("shoal-tests-stats", create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, timeout=120, cpu=0.25, memory=256)
    try:
        proc = sb.exec("python3", "-c", BURN_AND_HOLD)
        assert next(iter(proc.stdout)) == "done\n"
        time.sleep(1.2)  # at least one sample after the burn, with the memory still held
        stats = sb._experimental_stats()
        assert isinstance(stats, shoal.types.SandboxStats)
        assert stats.until > stats.since
        assert datetime.timedelta(seconds=3) < stats.duration < datetime.timedelta(seconds=60)
        assert [p.percentile for p in stats.percentile_stats[CPU].percentiles] == [50.0, 90.0, 99.0]
        assert stats.percentile_stats[CPU].unit == "cores"
        assert stats.percentile_stats[MEMORY].unit == "GiB"
        # One core busy for three seconds: some sample saw most of a core.
        assert _p(stats, CPU, 99.0) > 0.5
        # 96 MiB held: the latest samples see it (the median of a short life may not).
        assert _p(stats, MEMORY, 99.0) > 90 / 1024
        assert _p(stats, MEMORY, 99.0) < 256 / 1024
        # Billed: at least what was requested (0.25 cores, 256 MiB) over the sampled seconds.
        assert stats.billed_cpu_core_seconds >= 0.25 * 3
        assert stats.billed_memory_gib_seconds >= 0.25 * 3
        assert stats.cost is None and stats.cost_by_resource == {}

        # A range before the burn has no samples from it.
        early = sb._experimental_stats(until=stats.since + datetime.timedelta(milliseconds=10))
        assert early.percentile_stats == {}
        assert early.duration <= datetime.timedelta(milliseconds=10)
    finally:
        sb.terminate()

    # After the end, the samples are still there and the duration stops growing.
    after = sb._experimental_stats()
    again = sb._experimental_stats()
    assert _p(after, CPU, 99.0) > 0.5
    assert after.duration == again.duration


def test_stats_refuse_a_range_that_ends_before_it_starts() -> None:
    app = shoal.App.lookup("shoal-tests-stats", create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, timeout=60)
    try:
        now = datetime.datetime.now(datetime.UTC)
        with pytest.raises(InvalidError, match="since"):
            sb._experimental_stats(since=now, until=now - datetime.timedelta(seconds=1))
        # A fresh sandbox already has a reading: the one taken when asked.
        fresh = sb._experimental_stats()
        assert set(fresh.percentile_stats) == {CPU, MEMORY}
        assert 0 < _p(fresh, MEMORY, 50.0) < 1
    finally:
        sb.terminate()
