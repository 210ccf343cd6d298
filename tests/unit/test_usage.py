"""The arithmetic of ``sb._experimental_stats()``: percentiles, the time a sandbox ran in a range, billing."""

from __future__ import annotations

import pytest

from shoal.engine.usage import CPU_KEY, GIB, MEMORY_KEY, Sample, percentile, summarize


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 90) == 3.0
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0


def _stats(samples: list[Sample], **kw: float | None):  # type: ignore[no-untyped-def]
    args: dict[str, float | None] = dict(since=100.0, until=200.0, created_at=90.0, finished_at=None)
    args.update(kw)
    return summarize(samples, cpu_request=0.5, memory_request_bytes=GIB // 4, **args)  # type: ignore[arg-type]


def test_duration_is_the_part_of_the_range_the_sandbox_ran() -> None:
    assert _stats([]).duration_seconds == pytest.approx(100.0)
    assert _stats([], created_at=150.0).duration_seconds == pytest.approx(50.0)
    assert _stats([], finished_at=120.0).duration_seconds == pytest.approx(20.0)
    assert _stats([], finished_at=50.0).duration_seconds == 0.0  # ended before the range


def test_no_samples_means_no_percentiles_and_nothing_billed() -> None:
    stats = _stats([])
    assert stats.percentiles == {}
    assert stats.billed_cpu_core_seconds == 0.0 and stats.billed_memory_gib_seconds == 0.0


def test_billing_counts_the_greater_of_use_and_request() -> None:
    samples = [Sample(110.0, 5.0, 0.1, GIB // 8), Sample(115.0, 5.0, 2.0, GIB)]
    stats = _stats(samples)
    assert stats.billed_cpu_core_seconds == pytest.approx(0.5 * 5 + 2.0 * 5)
    assert stats.billed_memory_gib_seconds == pytest.approx(0.25 * 5 + 1.0 * 5)
    unit, points = stats.percentiles[CPU_KEY]
    assert unit == "cores" and [p for p, _ in points] == [50.0, 90.0, 99.0]
    assert dict(points)[99.0] == 2.0 and dict(points)[50.0] == 0.1
    assert stats.percentiles[MEMORY_KEY][0] == "GiB" and dict(stats.percentiles[MEMORY_KEY][1])[99.0] == 1.0
    assert stats.samples == 2
