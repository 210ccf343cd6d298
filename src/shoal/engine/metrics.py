"""The daemon's Prometheus metrics (``GET /metrics``, in the text format, through ``prometheus_client``).

Counters and histograms are updated by the engine as it works; gauges (sandboxes running, per-sandbox CPU and
memory, the warm pool) and the counters other parts keep for themselves are read when the metrics are scraped.
Each daemon has a registry of its own, not the library's process-wide default.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal.network import tunnels
from shoal.wire.sandboxes import SandboxState

if TYPE_CHECKING:
    from shoal.engine.manager import Manager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """What the engine counts and times, in a registry of its own."""

    def __init__(self, mgr: Manager) -> None:
        self.registry = CollectorRegistry()
        self.creates = Counter(
            "shoal_sandbox_creates",
            "Sandboxes created, by runtime and by whether the warm pool served them (source: pool or cold).",
            ["runtime", "source"],
            registry=self.registry,
        )
        self.create_failures = Counter(
            "shoal_sandbox_create_failures",
            "Creates that failed, by reason (the Modal error the caller got).",
            ["reason"],
            registry=self.registry,
        )
        self.create_seconds = Histogram(
            "shoal_sandbox_create_seconds",
            "Time from a create request to a running sandbox (the daemon's share of time to interactive).",
            ["runtime"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.exec_seconds = Histogram(
            "shoal_exec_start_seconds",
            "Time from an exec request until its process is handed to the sandbox's agent.",
            ["runtime"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Live(mgr))

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class _Live(Collector):
    """What is read at scrape time from the engine's own state."""

    def __init__(self, mgr: Manager) -> None:
        self.mgr = mgr

    def collect(self) -> Iterator[Metric]:
        mgr = self.mgr
        running = GaugeMetricFamily("shoal_sandboxes_running", "Sandboxes running, by runtime.", labels=["runtime"])
        by_runtime = Tally(sb.spec.runtime for sb in mgr.sandboxes.values() if sb.state == SandboxState.RUNNING)
        for runtime in sorted({"runc", *mgr.ctx.runtimes, *by_runtime}):
            running.add_metric([runtime], by_runtime.get(runtime, 0))
        yield running

        pool = mgr.pool
        yield CounterMetricFamily(
            "shoal_warm_pool_hits", "Creates served from the warm pool.", value=pool.taken, labels=None
        )
        yield CounterMetricFamily(
            "shoal_warm_pool_misses",
            "Creates the warm pool could have served but had nothing ready for.",
            value=pool.missed,
        )
        yield GaugeMetricFamily("shoal_warm_pool_ready", "Sandboxes waiting in the warm pool.", value=len(pool.ready))

        steps = CounterMetricFamily(
            "shoal_image_build_steps", "Image build steps applied, by outcome.", labels=["outcome"]
        )
        counts = mgr.images.builder.step_counts if mgr.images.builder is not None else {}
        for outcome in ("built", "cached", "failed"):
            steps.add_metric([outcome], counts.get(outcome, 0))
        yield steps

        tunnel = CounterMetricFamily(
            "shoal_tunnel_bytes",
            "Bytes forwarded through tunnels: in, from clients into sandboxes; out, back to the clients.",
            labels=["direction"],
        )
        for direction in ("in", "out"):
            tunnel.add_metric([direction], tunnels.BYTES[direction])
        yield tunnel

        labels = ["sandbox_id", "app_id", "runtime"]
        cpu = GaugeMetricFamily(
            "shoal_sandbox_cpu_cores", "CPU cores a sandbox used over its latest sample.", labels=labels
        )
        memory = GaugeMetricFamily(
            "shoal_sandbox_memory_bytes",
            "Memory a sandbox uses (its cgroup's, less reclaimable page cache), at its latest sample.",
            labels=labels,
        )
        for sandbox_id, sample in sorted(mgr.usage.latest.items()):
            sb = mgr.sandboxes.get(sandbox_id)
            if sb is None or sb.state != SandboxState.RUNNING:
                continue
            values = [sandbox_id, sb.row.app_id, sb.spec.runtime or "runc"]
            cpu.add_metric(values, sample.cpu_cores)
            memory.add_metric(values, sample.memory_bytes)
        yield cpu
        yield memory
