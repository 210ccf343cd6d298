"""What each sandbox uses, sampled from its cgroup every few seconds and kept in the store: the samples behind
``Sandbox._experimental_stats()`` and the per-sandbox gauges of ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.exception import InvalidError
from shoal.runtime import cgroups
from shoal.wire.sandboxes import SandboxState
from shoal.wire.times import micros

if TYPE_CHECKING:
    from shoal.engine.manager import Manager
    from shoal.engine.sandbox import Sandbox

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)
CPU_KEY = "CPU Usage (cores)"
MEMORY_KEY = "Memory Usage (GiB)"
DEFAULT_CPU_REQUEST = 0.125
"""Cores a sandbox that asks for none is counted as having requested (Modal's default request)."""
DEFAULT_MEMORY_REQUEST_MIB = 128
GIB = 1 << 30


@dataclass(frozen=True)
class Sample:
    """One reading of a sandbox: when, how many seconds it stands for, CPU cores used over them, memory now."""

    at: float
    seconds: float
    cpu_cores: float
    memory_bytes: int


@dataclass(frozen=True)
class Stats:
    """A sandbox's use over a time range (the fields of Modal's ``SandboxStats``, less cost: shoal does not
    price what it runs)."""

    since: float
    until: float
    duration_seconds: float
    percentiles: dict[str, tuple[str, list[tuple[float, float]]]]
    """Key → (unit, [(percentile, value)]); a key is missing when no sample fell in the range."""
    samples: int
    billed_cpu_core_seconds: float
    billed_memory_gib_seconds: float


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile ``p`` (0-100] of ``values`` (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(
    samples: Iterable[Sample],
    *,
    since: float,
    until: float,
    created_at: float,
    finished_at: float | None,
    cpu_request: float,
    memory_request_bytes: int,
) -> Stats:
    """Stats over [since, until) from the samples taken then: how long the sandbox ran in the range, the
    percentiles of its CPU and memory use, and what a sample counts for billing (the greater of use and
    request, times the seconds it stands for)."""
    ran_until = finished_at if finished_at is not None else until
    duration = max(0.0, min(until, ran_until) - max(since, created_at))
    taken = list(samples)
    percentiles: dict[str, tuple[str, list[tuple[float, float]]]] = {}
    if taken:
        cpu = [s.cpu_cores for s in taken]
        mem = [s.memory_bytes / GIB for s in taken]
        percentiles[CPU_KEY] = ("cores", [(float(p), percentile(cpu, p)) for p in PERCENTILES])
        percentiles[MEMORY_KEY] = ("GiB", [(float(p), percentile(mem, p)) for p in PERCENTILES])
    return Stats(
        since=since,
        until=until,
        duration_seconds=duration,
        percentiles=percentiles,
        samples=len(taken),
        billed_cpu_core_seconds=sum(max(s.cpu_cores, cpu_request) * s.seconds for s in taken),
        billed_memory_gib_seconds=sum(max(s.memory_bytes, memory_request_bytes) / GIB * s.seconds for s in taken),
    )


class UsageSampler:
    """Samples every running sandbox's cgroup each ``interval`` seconds into the store (one transaction per
    round), and keeps the latest reading of each for the metrics."""

    def __init__(self, mgr: Manager, interval: float) -> None:
        self.mgr = mgr
        self.interval = interval
        self.latest: dict[str, Sample] = {}
        """The newest sample of each running sandbox."""
        self._cpu_ns: dict[str, int] = {}
        """Per sandbox: its CPU time (ns) at its latest sample."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sample()
            except Exception:
                log.exception("sampling sandbox usage failed")

    def read(self, sb: Sandbox, now: float) -> tuple[Sample, int] | None:
        """A reading of one sandbox now (CPU averaged since the last reading, or since it started), and its
        CPU time so far (ns)."""
        return self._reading(sb, now, cgroups.usage(sb.cgroup_path))

    def _reading(self, sb: Sandbox, now: float, got: tuple[int, int] | None) -> tuple[Sample, int] | None:
        if got is None:
            return None
        cpu_ns, memory = got
        last = self.latest.get(sb.id)
        last_at, last_ns = (last.at, self._cpu_ns[sb.id]) if last is not None else (sb.row.created_at, 0)
        seconds = max(now - last_at, 1e-3)
        cores = max(0, cpu_ns - last_ns) / 1e9 / seconds
        return Sample(now, seconds, cores, memory), cpu_ns

    async def sample(self) -> None:
        """One round: read every running sandbox (the cgroup files in a thread: thousands of sandboxes are
        thousands of reads), record the readings, forget sandboxes that ended."""
        now = time.time()
        rows: list[tuple[str, float, float, float, int]] = []
        running = [sb for sb in self.mgr.sandboxes.values() if sb.state == SandboxState.RUNNING]
        paths = [sb.cgroup_path for sb in running]
        usages = await asyncio.to_thread(lambda: [cgroups.usage(path) for path in paths])
        for sb, usage in zip(running, usages, strict=True):
            reading = self._reading(sb, now, usage)
            if reading is None:
                continue
            got, self._cpu_ns[sb.id] = reading
            self.latest[sb.id] = got
            rows.append((sb.id, got.at, got.seconds, got.cpu_cores, got.memory_bytes))
        alive = {sb.id for sb in running}
        for gone in [k for k in self.latest if k not in alive]:
            del self.latest[gone], self._cpu_ns[gone]
        self.mgr.state.add_usage(rows)

    def stats(self, sb: Sandbox, since: float | None, until: float | None) -> Stats:
        """The sandbox's stats over [since, until) (defaults: its creation, now).  A running sandbox asked
        about up to now also counts a reading taken now, so a sandbox younger than one interval has one."""
        if since is not None and until is not None and since >= until:
            raise InvalidError("`since` must be before `until`.")
        now = time.time()
        # Whole microseconds, as the range is shown (``since_us``, ``until_us``): a duration worked out from the
        # unrounded creation time could exceed the range it is shown with by a microsecond.
        start = micros(sb.row.created_at if since is None else since) / 1e6
        end = micros(now if until is None else until) / 1e6
        samples = [Sample(*row) for row in self.mgr.state.usage(sb.id, start, end)]
        if until is None and sb.state == SandboxState.RUNNING and (live := self.read(sb, now)) is not None:
            samples.append(live[0])
        req = sb.spec.request
        return summarize(
            samples,
            since=start,
            until=end,
            created_at=micros(sb.row.created_at) / 1e6,
            finished_at=micros(sb.row.finished_at) / 1e6 if sb.row.finished_at is not None else None,
            cpu_request=req.cpu or DEFAULT_CPU_REQUEST,
            memory_request_bytes=(req.memory or DEFAULT_MEMORY_REQUEST_MIB) << 20,
        )
