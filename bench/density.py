"""shoal's density benchmark: sandboxes created in a burst, how many idle ones fit, and latency as they pile up.

Run as root from the repository root::

    .venv/bin/python -m bench.density [--max N] [--concurrency C] [--burst B] [--curve 0,100,500]
                                      [--samples S] [--settle S] [--warm-pool N] [--json FILE]

It starts its own daemon (``bench.harness.BenchDaemon``: the same set-up and clean-up as the other benchmarks),
creates one long-lived sandbox (for the exec round trips, and the source of the runc floor's bundle, made as
``bench.run`` makes it), and measures three things in one run:

``burst``  ``--burst`` sandboxes created ``--concurrency`` at a time (``Sandbox.create.aio(app=app, timeout=…)``,
           no command, from one asyncio loop), then terminated at the same concurrency; before them, as many bare
           ``runc run`` of ``/bin/true`` at the same concurrency on ``bench.run``'s floor bundle (one copy per
           worker, each with a cgroup of its own; ``runc run`` in the foreground: create, start, wait, delete).
           Figures: per second (operations done ÷ wall time from the first start to the last answer), each
           operation's latency (n/p50/p95/p99/max, ms), and the ratio of creates per second to runc runs per
           second (1.0: the daemon creates sandboxes as fast as runc alone runs containers).
``fill``   idle sandboxes (default image, no command) created ``--concurrency`` at a time until ``--max`` exist
           or one create is refused (any exception counts; no new create starts after the first, which is
           printed verbatim: type and message). Figures: how many fit, creates per second, and memory per
           idle sandbox: the drop of the host's ``MemAvailable`` (``/proc/meminfo``) from before the first
           create to after the last, divided by the count; the daemon's ``VmRSS`` growth divided the same way;
           and the growth of what is charged to the sandboxes' cgroups (their parent's ``memory.current``, or
           ``memory.usage_in_bytes`` on cgroup v1: page cache included). Each reading follows ``--settle``
           seconds of quiet.
``curve``  for each level L of ``--curve``, largest first, with L of the fill's sandboxes still running (the
           others terminated, ``--concurrency`` at a time, then ``--settle`` seconds): ``--samples`` rounds,
           after 2 untimed ones, of TTI (``Sandbox.create`` → ``exec("echo", "ready")`` → first stdout chunk,
           then terminate: ``bench.run``'s ``tti_sync``) interleaved with ``sb.exec("true").wait()`` in the
           long-lived sandbox (``bench.run``'s ``exec_sync``). Figures: n/p50/p95/p99 per level (ms) and the
           p50 and p99 over those of the lowest level (normally 0). A level above what the fill reached is
           capped at the count that fit, or one less if a create was refused (each TTI needs a slot).

The daemon runs with ``SHOAL_MAX_SANDBOXES`` = ``--max`` + 2, so its own ceiling is not what the fill measures.
The long-lived sandbox and the daemon's warm pool (``--warm-pool``; by default the daemon's own, 2 sandboxes)
run throughout and are counted in no level; the pool is full at both memory readings, so it cancels out of
the fill's figures. ``MemAvailable`` counts everything a sandbox costs the host (its agent process, kernel
objects such as namespaces, mounts and cgroups, the daemon's and this process's share), but also anything
else the machine did meanwhile: run it on a quiet machine. Every sandbox is created with
``timeout=3600`` and terminated at the end, also on errors and on Ctrl-C; the harness's clean-up is the
backstop. Exit status: 0; 1 on an error, or if a burst create, a runc run, a terminate or a curve sample
failed (a refused fill create is a result, not a failure); 2 if something was left behind; 130 after Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.harness import (
    CGROUP_ROOT,
    BenchDaemon,
    Stats,
    header_lines,
    ms,
    now_ns,
    parse_args_as_root,
    run_with_daemon,
)
from bench.run import METRIC_BY_KEY, Floor, Sample, exec_sync, tti_sync
from bench.soak import rss_mib

if TYPE_CHECKING:
    import shoal

APP_NAME = "bench-density"
SANDBOX_TIMEOUT = 3600
"""Every sandbox's ``timeout`` (s): longer than any run; all are terminated long before."""
WARMUP = 2
"""Untimed operations first: runc runs and create + terminate before the burst, rounds at each curve level."""
KEEP_ERRORS = 5
"""How many failure messages a batch keeps (all failures are counted)."""
CURVE_ROWS = ("tti_sync", "create_sync", "exec_rt_sync")
"""``bench.run``'s metrics shown per curve level."""
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------- batches


def describe(e: BaseException) -> str:
    """``module.Type: message``, as a traceback's last line shows an exception."""
    t = type(e)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return f"{name}: {e}"


@dataclass
class Batch:
    """Operations run ``concurrency`` at a time: each one's latency (ms), the wall time of all, the failures."""

    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = math.nan
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    """The first ``KEEP_ERRORS`` failures, verbatim (``describe``)."""

    @property
    def done(self) -> int:
        """Operations that succeeded."""
        return len(self.latencies_ms)

    @property
    def per_second(self) -> float:
        """Operations that succeeded per second of the batch's wall time."""
        return self.done / self.wall_s if self.wall_s > 0 else math.nan

    def fail(self, e: BaseException) -> None:
        """Count a failure, keeping the first few messages."""
        self.failures += 1
        if len(self.errors) < KEEP_ERRORS:
            self.errors.append(describe(e))

    def absorb(self, other: Batch) -> None:
        """Add ``other``'s operations, wall time and failures to this batch's."""
        self.latencies_ms += other.latencies_ms
        self.wall_s = other.wall_s if math.isnan(self.wall_s) else self.wall_s + other.wall_s
        self.failures += other.failures
        self.errors += other.errors[: max(0, KEEP_ERRORS - len(self.errors))]

    def summary(self) -> dict[str, Any]:
        """For ``--json``: counts, rate, latency statistics and every latency."""
        return {
            "done": self.done,
            "failures": self.failures,
            "errors": self.errors,
            "wall_s": self.wall_s,
            "per_second": self.per_second,
            "latency_ms": asdict(Stats.of(self.latencies_ms)),
            "samples_ms": self.latencies_ms,
        }


async def in_workers(
    concurrency: int, count: int, job: Callable[[int, int], Awaitable[None]], stop: Callable[[], bool] | None = None
) -> float:
    """``job(worker, k)`` for k in 0..count-1, ``concurrency`` at a time, no new one once ``stop()``; wall s."""
    jobs = iter(range(count))

    async def worker(w: int) -> None:
        for k in jobs:  # shared by the workers: each k is taken once
            if stop is not None and stop():
                return
            await job(w, k)

    t0 = now_ns()
    async with asyncio.TaskGroup() as tg:
        for w in range(min(concurrency, count)):
            tg.create_task(worker(w))
    return ms(t0, now_ns()) / 1000


class Fleet:
    """The sandboxes this benchmark created and has not terminated yet: whatever is left is terminated at the end."""

    def __init__(self) -> None:
        self.live: dict[str, shoal.Sandbox] = {}

    def add(self, sb: shoal.Sandbox) -> None:
        """Track a new sandbox."""
        self.live[sb.object_id] = sb

    async def create(
        self, app: shoal.App, count: int, concurrency: int, *, stop_at_failure: bool = False, progress: int = 0
    ) -> tuple[Batch, list[shoal.Sandbox]]:
        """Create ``count`` idle sandboxes ``concurrency`` at a time; the batch and the sandboxes, in creation order.

        With ``stop_at_failure``, no create starts after the first one that raised. With ``progress``, a line
        on stderr every ``progress`` sandboxes.
        """
        import shoal

        batch = Batch()
        made: list[shoal.Sandbox] = []

        async def one(w: int, k: int) -> None:
            t0 = now_ns()
            try:
                sb = await shoal.Sandbox.create.aio(app=app, timeout=SANDBOX_TIMEOUT)
            except Exception as e:
                batch.fail(e)
                return
            batch.latencies_ms.append(ms(t0, now_ns()))
            self.add(sb)
            made.append(sb)
            if progress and len(made) % progress == 0:
                print(f"  {len(made)} created", file=sys.stderr, flush=True)

        batch.wall_s = await in_workers(
            concurrency, count, one, (lambda: batch.failures > 0) if stop_at_failure else None
        )
        return batch, made

    async def terminate(self, sandboxes: list[shoal.Sandbox], concurrency: int) -> Batch:
        """Terminate ``sandboxes``, ``concurrency`` at a time (each leaves the fleet first: one try each)."""
        batch = Batch()

        async def one(w: int, k: int) -> None:
            sb = sandboxes[k]
            self.live.pop(sb.object_id, None)
            t0 = now_ns()
            try:
                await sb.terminate.aio()
            except Exception as e:
                batch.fail(e)
                return
            batch.latencies_ms.append(ms(t0, now_ns()))

        batch.wall_s = await in_workers(concurrency, len(sandboxes), one)
        return batch


# ---------------------------------------------------------------------------------------------- the floor


class BurstFloor(Floor):
    """``bench.run``'s floor, run by several workers at once: a copy of its bundle per worker, own cgroup each.

    Two containers in one cgroup would make runc's clean-up of one wait for the other; each worker's runs go
    one after the other in its own cgroup, as ``bench.run``'s do. ``Floor.cleanup`` removes them all.
    """

    def worker_bundle(self, worker: int) -> Path:
        """The bundle directory of ``worker``."""
        return self.dir / f"bundle-{worker}"

    def prepare_workers(self, workers: int) -> None:
        """After ``prepare``: one bundle per worker, the same config with ``cgroupsPath`` ``…-floor/true-<w>``."""
        config = json.loads((self.bundle / "config.json").read_text())
        for w in range(workers):
            config["linux"]["cgroupsPath"] = f"{self.cgroup_parent}/true-{w}"
            d = self.worker_bundle(w)
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text(json.dumps(config, indent=1))

    async def run_as(self, worker: int, name: str) -> float:
        """One ``runc run`` of ``/bin/true`` on ``worker``'s bundle as container ``name``; its wall time in ms."""
        argv = [self.runc, "--root", str(self.state), "run", "--bundle", str(self.worker_bundle(worker)), name]
        t0 = now_ns()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        _, err = await proc.communicate()
        t1 = now_ns()
        if proc.returncode != 0:
            raise RuntimeError(f"runc run failed (exit {proc.returncode}): {err.decode(errors='replace').strip()}")
        return ms(t0, t1)

    async def burst(self, count: int, concurrency: int) -> Batch:
        """``count`` runs, ``concurrency`` at a time."""
        batch = Batch()

        async def one(w: int, k: int) -> None:
            try:
                batch.latencies_ms.append(await self.run_as(w, f"burst-{k}"))
            except Exception as e:
                batch.fail(e)

        batch.wall_s = await in_workers(concurrency, count, one)
        return batch


# ---------------------------------------------------------------------------------------------- memory


@dataclass
class Memory:
    """One reading of what the host has left and what the daemon and the sandboxes hold, in MiB."""

    available_mib: float
    daemon_rss_mib: float
    cgroups_mib: float


def mem_available_mib() -> float:
    """``MemAvailable`` from ``/proc/meminfo``, in MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def cgroup_memory_mib(rel: str) -> float:
    """Memory charged to cgroup ``rel`` and below (v2 ``memory.current``, v1 ``memory.usage_in_bytes``); NaN if none."""
    rel = rel.lstrip("/")
    for path in (CGROUP_ROOT / rel / "memory.current", CGROUP_ROOT / "memory" / rel / "memory.usage_in_bytes"):
        try:
            return int(path.read_text()) / MIB
        except (OSError, ValueError):
            continue
    return math.nan


def read_memory(daemon: BenchDaemon) -> Memory:
    """The host's ``MemAvailable``, the daemon's ``VmRSS``, the sandboxes' cgroups, now."""
    assert daemon.proc is not None
    return Memory(mem_available_mib(), rss_mib(daemon.proc.pid), cgroup_memory_mib(daemon.cgroup_parent))


def memory_cost(before: Memory, after: Memory, count: int) -> dict[str, dict[str, float]]:
    """Per reading: before, after, what the sandboxes took (MiB; a drop of ``MemAvailable``) and that per sandbox."""
    used = {
        "available": before.available_mib - after.available_mib,
        "daemon_rss": after.daemon_rss_mib - before.daemon_rss_mib,
        "cgroups": after.cgroups_mib - before.cgroups_mib,
    }
    return {
        key: {
            "before_mib": getattr(before, f"{key}_mib"),
            "after_mib": getattr(after, f"{key}_mib"),
            "used_mib": used[key],
            "per_sandbox_mib": used[key] / count if count else math.nan,
        }
        for key in used
    }


# ---------------------------------------------------------------------------------------------- the parts


async def measure_burst(
    app: shoal.App, fleet: Fleet, floor: BurstFloor, count: int, concurrency: int, settle: float
) -> dict[str, Batch]:
    """Warm up; ``count`` runc runs, then ``count`` creates and their terminates, ``concurrency`` at a time."""
    import shoal

    for k in range(WARMUP):
        await floor.run_as(0, f"warmup-{k}")
        sb = await shoal.Sandbox.create.aio(app=app, timeout=SANDBOX_TIMEOUT)
        fleet.add(sb)
        await fleet.terminate([sb], 1)
    print(f"burst: {count} runc runs, {concurrency} at a time …", file=sys.stderr, flush=True)
    runc = await floor.burst(count, concurrency)
    await asyncio.sleep(settle)
    print(f"burst: {count} creates, {concurrency} at a time …", file=sys.stderr, flush=True)
    creates, made = await fleet.create(app, count, concurrency)
    terminates = await fleet.terminate(made, concurrency)
    return {"create": creates, "terminate": terminates, "runc": runc}


def curve_plan(requested: list[int], fitted: int, refused: bool) -> list[int]:
    """The levels to measure, largest first: each requested one capped at what the fill left room for."""
    cap = max(0, fitted - 1) if refused else fitted
    return sorted({min(r, cap) for r in requested}, reverse=True)


def curve_level(app: shoal.App, exec_sb: shoal.Sandbox, samples: int) -> tuple[dict[str, list[float]], Batch]:
    """``WARMUP`` untimed, then ``samples`` timed rounds of TTI and exec round trip; the values and the failures."""
    values: dict[str, list[float]] = {}
    failed = Batch()
    steps: list[Callable[[], Sample]] = [lambda: tti_sync(app), lambda: exec_sync(exec_sb)]
    for i in range(WARMUP + samples):
        for step in steps:
            try:
                sample = step()
            except Exception as e:
                failed.fail(e)
                continue
            if i >= WARMUP:
                for key, v in sample.values.items():
                    values.setdefault(key, []).append(v)
    return values, failed


def measure(args: argparse.Namespace, daemon: BenchDaemon, floor: BurstFloor) -> dict[str, Any]:
    """The long-lived sandbox and the floor's bundles, then burst, fill and curve; everything terminated at the end."""
    import shoal

    c, settle = args.concurrency, args.settle
    fleet = Fleet()
    result: dict[str, Any] = {}
    try:
        app = shoal.App.lookup(APP_NAME, create_if_missing=True)
        exec_sb = shoal.Sandbox.create(app=app, timeout=SANDBOX_TIMEOUT)
        fleet.add(exec_sb)
        floor.prepare(daemon.runtime_dir / "sandboxes" / exec_sb.object_id, daemon.image_lowers(exec_sb.object_id))
        floor.prepare_workers(c)

        t0 = time.monotonic()
        burst = asyncio.run(measure_burst(app, fleet, floor, args.burst, c, settle))
        result["burst"] = {k: b.summary() for k, b in burst.items()}
        result["burst"]["rate_ratio"] = ratio(burst["create"].per_second, burst["runc"].per_second)
        result["burst"]["seconds"] = time.monotonic() - t0

        t0 = time.monotonic()
        time.sleep(settle)
        before = read_memory(daemon)
        print(f"fill: up to {args.max} sandboxes, {c} at a time …", file=sys.stderr, flush=True)
        creates, made = asyncio.run(
            fleet.create(app, args.max, c, stop_at_failure=True, progress=max(1, args.max // 10))
        )
        time.sleep(settle)
        after = read_memory(daemon)
        result["fill"] = {
            "asked": args.max,
            "fitted": len(made),
            "first_error": creates.errors[0] if creates.errors else None,
            "create": creates.summary(),
            "memory": memory_cost(before, after, len(made)),
            "seconds": time.monotonic() - t0,
        }

        t0 = time.monotonic()
        levels: dict[str, Any] = {}
        terminates = Batch()
        for level in curve_plan(args.curve, len(made), creates.failures > 0):
            if len(made) > level:
                print(f"curve: terminating {len(made) - level} sandboxes …", file=sys.stderr, flush=True)
                terminates.absorb(asyncio.run(fleet.terminate(made[level:], c)))
                made = made[:level]
                time.sleep(settle)
            print(f"curve: {args.samples} rounds with {level} sandboxes running …", file=sys.stderr, flush=True)
            values, failed = curve_level(app, exec_sb, args.samples)
            levels[str(level)] = {
                "stats": {k: asdict(Stats.of(v)) for k, v in values.items()},
                "samples_ms": values,
                "failures": failed.failures,
                "errors": failed.errors,
            }
        result["curve"] = {"levels": levels, "terminate": terminates.summary(), "seconds": time.monotonic() - t0}
    finally:
        left = list(fleet.live.values())
        if left:
            print(f"terminating the {len(left)} sandboxes left …", file=sys.stderr, flush=True)
            result["final_terminate"] = asyncio.run(fleet.terminate(left, c)).summary()
    return result


# ---------------------------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> float:
    """``a / b``, or NaN where ``b`` is 0 or NaN."""
    return a / b if b and not math.isnan(b) else math.nan


def _num(x: float, width: int = 8, digits: int = 2) -> str:
    """``x`` right-aligned, or a dash for NaN."""
    return f"{'—':>{width}}" if math.isnan(x) else f"{x:{width}.{digits}f}"


def burst_lines(burst: dict[str, Any], count: int, concurrency: int) -> list[str]:
    """The burst's table and its ratio."""
    lines = [
        f"burst: {count} of each, {concurrency} at a time (latencies in ms; per s = done ÷ wall time of the batch)",
        f"  {'operation':<30} {'n':>5} {'fail':>5} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} {'wall s':>8}"
        f" {'per s':>8}",
    ]
    for key, label in (
        ("create", "Sandbox.create (SDK)"),
        ("terminate", "  terminate() of those"),
        ("runc", "runc run /bin/true (floor)"),
    ):
        b = burst[key]
        s = b["latency_ms"]
        lines.append(
            f"  {label:<30} {b['done']:>5} {b['failures']:>5} {_num(s['p50'])} {_num(s['p95'])} {_num(s['p99'])}"
            f" {_num(s['max'])} {_num(b['wall_s'])} {_num(b['per_second'], digits=1)}"
        )
    p50_ratio = ratio(burst["create"]["latency_ms"]["p50"], burst["runc"]["latency_ms"]["p50"])
    lines.append(
        f"  creates per second ÷ runc runs per second: {burst['rate_ratio']:.2f}"
        f" (create p50 ÷ runc run p50: {p50_ratio:.2f})"
    )
    for key in ("create", "terminate", "runc"):
        lines += [f"  {key} failed: {e}" for e in burst[key]["errors"]]
    return lines


def fill_lines(fill: dict[str, Any], concurrency: int) -> list[str]:
    """The fill's count, first refusal and memory table."""
    cr = fill["create"]
    s = cr["latency_ms"]
    lines = [
        f"fill: up to {fill['asked']}, {concurrency} at a time: {fill['fitted']} fit, created in {cr['wall_s']:.1f} s"
        f" ({cr['per_second']:.1f} creates/s; create p50 {_num(s['p50'], 0, 1)} ms, p99 {_num(s['p99'], 0, 1)} ms)",
        f"  first refusal: {fill['first_error']}" if fill["first_error"] else "  no create refused: --max reached",
        f"  {'memory (MiB)':<40} {'before':>10} {'after':>10} {'used':>10} {'per sandbox':>12}",
    ]
    for key, label in (
        ("available", "host MemAvailable (drop)"),
        ("daemon_rss", "daemon VmRSS (growth)"),
        ("cgroups", "sandboxes' cgroups, page cache incl."),
    ):
        m = fill["memory"][key]
        lines.append(
            f"  {label:<40} {_num(m['before_mib'], 10, 1)} {_num(m['after_mib'], 10, 1)}"
            f" {_num(m['used_mib'], 10, 1)} {_num(m['per_sandbox_mib'], 12, 2)}"
        )
    return lines


def curve_lines(curve: dict[str, Any], requested: list[int], samples: int) -> list[str]:
    """Percentiles per level and their ratios to the lowest level."""
    levels = curve["levels"]
    if not levels:
        return ["curve: no level measured"]
    base_key = min(levels, key=int)
    measured = sorted(levels, key=int)
    lines = [
        f"curve: {samples} rounds per level after {WARMUP} untimed (ms); ratios against {base_key} running",
        "  (running: the fill's idle sandboxes; the long-lived exec sandbox and the warm pool are not counted)",
    ]
    capped = [r for r in requested if str(r) not in levels]
    if capped:
        top = max(int(k) for k in levels)
        lines.append(f"  asked for {', '.join(map(str, capped))} running: capped at {top} by what the fill reached")
    lines.append(
        f"  {'running':>7}  {'metric':<34} {'n':>4} {'p50':>8} {'p95':>8} {'p99':>8} {'p50/base':>9} {'p99/base':>9}"
    )
    base = levels[base_key]["stats"]
    for key in measured:
        level = levels[key]
        for i, metric in enumerate(CURVE_ROWS):
            s = level["stats"].get(metric)
            if s is None:
                continue
            b = base.get(metric)
            r50 = ratio(s["p50"], b["p50"]) if b else math.nan
            r99 = ratio(s["p99"], b["p99"]) if b else math.nan
            lines.append(
                f"  {key if i == 0 else '':>7}  {METRIC_BY_KEY[metric].label:<34} {s['n']:>4} {_num(s['p50'])}"
                f" {_num(s['p95'])} {_num(s['p99'])} {_num(r50, 9)} {_num(r99, 9)}"
            )
        lines += [f"  {key} running, failed: {e}" for e in level["errors"]]
    t = curve["terminate"]
    if t["done"] or t["failures"]:
        lines.append(
            f"  terminating the fill's sandboxes between levels: {t['done']} at {t['per_second']:.1f}/s,"
            f" p50 {_num(t['latency_ms']['p50'], 0, 1)} ms, {t['failures']} failed"
        )
    return lines


def report(result: dict[str, Any], args: argparse.Namespace, facts: dict[str, Any], loads: dict[str, Any]) -> str:
    """The three tables under the machine and load lines."""
    lines = [
        *header_lines(facts, loads),
        f"{facts['runc']}; --concurrency {args.concurrency} --burst {args.burst} --max {args.max}"
        f" --curve {','.join(map(str, args.curve))} --samples {args.samples} --settle {args.settle:g}"
        + (f" --warm-pool {args.warm_pool}" if args.warm_pool is not None else ""),
        "",
        *burst_lines(result["burst"], args.burst, args.concurrency),
        "",
        *fill_lines(result["fill"], args.concurrency),
        "",
        *curve_lines(result["curve"], args.curve, args.samples),
        "",
        f"seconds: burst {result['burst']['seconds']:.0f}, fill {result['fill']['seconds']:.0f},"
        f" curve {result['curve']['seconds']:.0f}",
    ]
    return "\n".join(lines)


def failures(result: dict[str, Any]) -> int:
    """Burst creates, runc runs, terminates and curve samples that failed (refused fill creates are not counted)."""
    burst, curve = result["burst"], result["curve"]
    n: int = sum(burst[k]["failures"] for k in ("create", "terminate", "runc"))
    n += curve["terminate"]["failures"] + sum(level["failures"] for level in curve["levels"].values())
    return n + int(result.get("final_terminate", {}).get("failures", 0))


# ---------------------------------------------------------------------------------------------- main


def parse_levels(text: str) -> list[int]:
    """``--curve``: comma-separated counts of running sandboxes, each at least 0."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not levels or min(levels) < 0:
        raise argparse.ArgumentTypeError("give at least one level, none negative")
    return sorted(set(levels))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.density``."""
    parser = argparse.ArgumentParser(prog="python -m bench.density", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, default=1000, help="fill: stop at this many sandboxes (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="creates (and runc runs) at once (default 16)")
    parser.add_argument("--burst", type=int, default=100, help="burst: sandboxes and runc runs (default 100)")
    parser.add_argument(
        "--curve", type=parse_levels, default=[0, 100, 500], help="curve: sandboxes running (default 0,100,500)"
    )
    parser.add_argument("--samples", type=int, default=20, help="curve: timed rounds per level (default 20)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before readings (default 3)")
    parser.add_argument(
        "--warm-pool", type=int, default=None, metavar="N", help="the daemon's warm pool (default: the daemon's)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every sample and summary as JSON")
    args = parse_args_as_root(parser, argv)
    if args.max < 1 or args.concurrency < 1 or args.burst < 1 or args.samples < 1:
        parser.error("--max, --concurrency, --burst and --samples must be at least 1")
    if args.settle < 0 or (args.warm_pool is not None and args.warm_pool < 0):
        parser.error("--settle and --warm-pool must not be negative")

    daemon = BenchDaemon()
    # The daemon's own ceiling (--max-sandboxes) sits just above the fill and the long-lived sandbox: what the
    # fill runs into before --max is the host's.
    daemon.env["SHOAL_MAX_SANDBOXES"] = str(args.max + 2)
    if args.warm_pool is not None:
        daemon.env["SHOAL_WARM_POOL"] = str(args.warm_pool)
    floor = BurstFloor(daemon.root, daemon.cgroup_parent)
    run = run_with_daemon(lambda d: measure(args, d, floor), daemon=daemon, cleanup=floor.cleanup)
    if not run.ok:
        return run.exit_code
    print(report(run.value, args, run.facts, run.loads))
    if args.json:
        run.write_json(args.json, args)
    if run.exit_code:
        return run.exit_code
    return 1 if failures(run.value) else 0


if __name__ == "__main__":
    sys.exit(main())
