"""shoal's soak benchmark: a steady mixed load on its own daemon, and the daemon's memory and descriptors over time.

Run as root from the repository root::

    .venv/bin/python -m bench.soak [--sandboxes 100] [--minutes 10] [--interval 1.0] [--sample 10] [--json FILE]

It starts its own daemon (``bench.harness.BenchDaemon``: the same set-up and clean-up as the other benchmarks)
and goes through four phases, reading the daemon's ``VmRSS`` (``/proc/<pid>/status``) and the number of its
open descriptors (``/proc/<pid>/fd``) every ``--sample`` seconds:

``pre-load``  one sandbox created, one exec in it, terminated; this process's pooled connections closed;
              ``--settle`` seconds of quiet; then the baseline sample: the daemon's RSS and descriptors.
``setup``     ``--sandboxes`` sandboxes created up front (``Sandbox.create(app=app)``, no command).
``load``      for ``--minutes``: every sandbox, once per ``--interval`` seconds, runs one round of
              ``sb.exec("echo", "x")`` + ``stdout.read()`` + ``wait()`` and ``sb.filesystem.write_text`` of a
              line; meanwhile ``--churn`` workers each repeat ``Sandbox.create`` + one exec + ``terminate()``
              (paced by ``--interval`` too, back to back when a cycle takes longer).  One asyncio event loop, one
              task per sandbox, all through the SDK's ``.aio`` faces.
``idle``      every sandbox terminated, the pooled connections closed again; ``--idle-seconds`` of quiet,
              sampled.

Verdicts (the samples of the first ``--warmup-percent`` of the load, at least one, are left out of the fit):

``RSS during load``  a least-squares line through RSS against time: "flat" if its slope is under 0.5 MiB/min
                     and the RSS grew by under 8 MiB from the first sample after warm-up to the last one;
                     otherwise "GROWS (x MiB/min)".
``fds during load``  the same fit of the descriptor count: "flat" if it grew by at most 2 * ``--churn`` + 8
                     descriptors (sandboxes being churned come and go) and the slope is under 1 fd/min.
``RSS after idle``   "returns near idle" if the last idle sample is within 16 MiB of the pre-load baseline.
``fds after idle``   "returns to idle" if the last idle sample has at most 4 descriptors more than the baseline.

Every operation that raises counts as a failure (the first few messages are kept).  Exit status: 0; 1 on an
error or if any operation failed; 2 if something was left behind; 130 after Ctrl-C or SIGTERM.  The verdicts
are reported, not asserted: a GROWS verdict does not change the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import BenchDaemon, Stats, header_lines, parse_args_as_root, run_with_daemon

APP_NAME = "bench-soak"
SOAK_FILE = "/tmp/soak.txt"

FLAT_SLOPE_MIB_PER_MIN = 0.5
"""RSS slope (after warm-up) under which the load phase counts as flat ..."""
FLAT_GROWTH_MIB = 8.0
"""... together with RSS growth under this from the first post-warm-up sample to the last."""
FLAT_FD_SLOPE_PER_MIN = 1.0
"""Descriptor slope under which the load phase's descriptors count as flat ..."""
FLAT_FD_SLACK = 8
"""... together with growth of at most this plus two per churn worker (whose sandboxes come and go)."""
IDLE_RSS_TOLERANCE_MIB = 16.0
"""After the idle phase, RSS within this of the pre-load baseline "returns near idle"."""
IDLE_FD_TOLERANCE = 4
"""After the idle phase, descriptors within this of the pre-load baseline "return to idle"."""
SHORT_FIT_MINUTES = 5.0
"""A fit over less than this is flagged as too short to judge a slope by."""
KEEP_FAILURES = 10
"""How many failure messages are kept (all failures are counted)."""
CREATE_CONCURRENCY = 4
"""Sandboxes created (and terminated) at once in the set-up and tear-down phases."""


# ---------------------------------------------------------------------------------------------- the daemon


def rss_mib(pid: int) -> float:
    """``VmRSS`` of process ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors of process ``pid`` by kind: ``socket``, ``pipe``, ``anon_inode:…``, ``/dev/…``, ``file``."""
    kinds: dict[str, int] = {}
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith(("socket:", "pipe:")):
            kind = target.split(":", 1)[0]
        elif target.startswith(("anon_inode:", "/dev/")):
            kind = target
        else:
            kind = "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@dataclass
class Sample:
    """One reading of the daemon."""

    at: float
    """Monotonic time of the reading (s)."""
    phase: str
    rss_mib: float
    fds: int
    ops: int
    fd_kinds: dict[str, int]
    t: float = math.nan
    """Seconds since the load started (negative before it); set once the run is over."""


KINDS = ("exec", "write", "churn")
FAILURE_KINDS = (*KINDS, "setup", "teardown")


@dataclass
class Counters:
    """Operations and failures of the whole run."""

    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))
    messages: list[str] = field(default_factory=list)
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})

    @property
    def total_ops(self) -> int:
        """Operations that succeeded, all kinds."""
        return sum(self.ops.values())

    @property
    def total_failures(self) -> int:
        """Operations that raised, all kinds."""
        return sum(self.failures.values())

    def fail(self, kind: str, e: BaseException) -> None:
        """Count a failure of ``kind``, keeping the first few messages."""
        self.failures[kind] += 1
        if len(self.messages) < KEEP_FAILURES:
            self.messages.append(f"{kind}: {type(e).__name__}: {e}"[:500])

    async def timed(self, kind: str, op: Callable[[], Awaitable[None]]) -> None:
        """Run ``op``, counting it (and its latency) as ``kind``, or its exception as a failure."""
        t0 = time.perf_counter()
        try:
            await op()
        except Exception as e:
            self.fail(kind, e)
            return
        self.ops[kind] += 1
        self.latency_ms[kind].append((time.perf_counter() - t0) * 1e3)


# ---------------------------------------------------------------------------------------------- the load


async def echo_round(sb: Any) -> None:
    """``exec("echo", "x")``, read its output, wait; anything unexpected raises."""
    p = await sb.exec.aio("echo", "x")
    out = await p.stdout.read.aio()
    code = await p.wait.aio()
    if out != "x\n" or code != 0:
        raise RuntimeError(f"echo gave {out!r}, exit {code}")


async def write_round(sb: Any) -> None:
    """Write a line to the sandbox's soak file."""
    await sb.filesystem.write_text.aio("line\n", SOAK_FILE)


async def churn_cycle(app: Any) -> None:
    """``Sandbox.create`` + one exec + ``terminate()``."""
    import shoal

    sb = await shoal.Sandbox.create.aio(app=app, timeout=300)
    try:
        await echo_round(sb)
    finally:
        await sb.terminate.aio()


async def paced(interval: float, deadline: float, round_: Callable[[], Awaitable[None]]) -> None:
    """``round_()`` once per ``interval`` seconds until ``deadline`` (loop time), starting at a random offset.

    A round that takes longer than ``interval`` is followed by the next one at once; missed ticks are skipped,
    not caught up in a burst.
    """
    loop = asyncio.get_running_loop()
    await asyncio.sleep(random.uniform(0, interval))  # spread the workers' rounds over the interval
    next_round = loop.time()
    while loop.time() < deadline:
        await round_()
        now = loop.time()
        next_round = max(next_round + interval, now)
        await asyncio.sleep(max(0.0, min(next_round, deadline) - now))


async def close_connections() -> None:
    """Close this process's pooled connections to the daemon (the next call opens new ones).

    Before the pre-load and idle samples, so that they count what the daemon holds on its own, not the
    keep-alive connections of the benchmark's client (which aiohttp would close only after 15 s idle).
    """
    from shoal.sdk._sync import run_async
    from shoal.sdk.transport import default_client

    await run_async(default_client().close())


async def bounded(limit: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run ``jobs`` at most ``limit`` at a time; each one's result, or the exception it raised."""
    sem = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)


# ---------------------------------------------------------------------------------------------- the run


class Soak:
    """The phases of one run, and what they saw."""

    def __init__(self, args: argparse.Namespace, pid: int) -> None:
        self.args = args
        self.pid = pid
        self.counters = Counters()
        self.samples: list[Sample] = []
        self.started = time.monotonic()
        self.load_start = math.nan
        self.load_seconds = math.nan
        self.setup_seconds = math.nan
        self.teardown_seconds = math.nan
        self.created = 0
        self.daemon_log: list[str] = []
        """The daemon log's warnings, errors and traceback heads."""

    def sample(self, phase: str) -> None:
        """Read the daemon now; keep the reading and show it (on stderr, as progress)."""
        kinds = fd_kinds(self.pid)
        s = Sample(time.monotonic(), phase, rss_mib(self.pid), sum(kinds.values()), self.counters.total_ops, kinds)
        self.samples.append(s)
        print(
            f"  {s.at - self.started:7.1f} s  {phase:<8}  RSS {s.rss_mib:7.1f} MiB  fds {s.fds:>5}  ops {s.ops:>8}",
            file=sys.stderr,
            flush=True,
        )

    async def sampler(self, phase: str, seconds: float) -> None:
        """A sample at once, then every ``--sample`` seconds for ``seconds``, and one at the end."""
        end = time.monotonic() + seconds
        next_at = time.monotonic()
        while next_at < end - 0.5:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self.sample(phase)
            next_at += self.args.sample
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        self.sample(phase)

    async def run(self) -> None:
        """Pre-load baseline, set-up, load, tear-down, idle."""
        import shoal

        args = self.args
        app = await shoal.App.lookup.aio(APP_NAME, create_if_missing=True)
        duration = args.minutes * 60.0
        timeout = int(duration + args.idle_seconds + 900)  # outlives the run: terminated long before

        print(f"pre-load: one sandbox, then {args.settle:g} s of quiet …", file=sys.stderr, flush=True)
        await self.counters.timed("churn", lambda: churn_cycle(app))
        self.counters.ops["churn"] = 0  # not part of the load
        self.counters.latency_ms["churn"].clear()
        await close_connections()
        await asyncio.sleep(args.settle)
        self.sample("pre-load")

        print(f"set-up: creating {args.sandboxes} sandboxes …", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        made = await bounded(
            CREATE_CONCURRENCY,
            [lambda: shoal.Sandbox.create.aio(app=app, timeout=timeout) for _ in range(args.sandboxes)],
        )
        sandboxes = [sb for sb in made if not isinstance(sb, BaseException)]
        for e in made:
            if isinstance(e, BaseException):
                self.counters.fail("setup", e)
        self.created = len(sandboxes)
        self.setup_seconds = time.monotonic() - t0
        print(
            f"  {self.created} created in {self.setup_seconds:.1f} s; load for {args.minutes:g} min …",
            file=sys.stderr,
            flush=True,
        )
        try:
            loop = asyncio.get_running_loop()
            self.load_start = time.monotonic()
            deadline = loop.time() + duration
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.sampler("load", duration))
                for sb in sandboxes:
                    tg.create_task(paced(args.interval, deadline, functools.partial(self.sandbox_round, sb)))
                for _ in range(args.churn):
                    tg.create_task(
                        paced(args.interval, deadline, lambda: self.counters.timed("churn", lambda: churn_cycle(app)))
                    )
            self.load_seconds = time.monotonic() - self.load_start
            self.sample("end-load")
        finally:
            print(f"tear-down: terminating {len(sandboxes)} sandboxes …", file=sys.stderr, flush=True)
            t1 = time.monotonic()
            for e in await bounded(CREATE_CONCURRENCY, [sb.terminate.aio for sb in sandboxes]):
                if isinstance(e, BaseException):
                    self.counters.fail("teardown", e)
            self.teardown_seconds = time.monotonic() - t1

        print(f"idle: {args.idle_seconds:g} s …", file=sys.stderr, flush=True)
        await close_connections()
        await self.sampler("idle", args.idle_seconds)
        for s in self.samples:
            s.t = round(s.at - self.load_start, 1)

    async def sandbox_round(self, sb: Any) -> None:
        """One round in a long-lived sandbox: an exec and a file write."""
        await self.counters.timed("exec", lambda: echo_round(sb))
        await self.counters.timed("write", lambda: write_round(sb))


# ---------------------------------------------------------------------------------------------- analysis


def log_problems(log: Path) -> list[str]:
    """The daemon log's ``WARNING``, ``ERROR`` and ``CRITICAL`` lines and traceback heads (read before clean-up)."""
    try:
        text = log.read_text(errors="replace")
    except OSError as e:
        return [f"(could not read {log}: {e.strerror})"]
    marks = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback (most recent call last)")
    return [line for line in text.splitlines() if any(m in line for m in marks)]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of ``(seconds, value)`` points, per minute (NaN with fewer than two times)."""
    n = len(points)
    if n < 2:
        return math.nan
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return math.nan
    return sum((t - mt) * (y - my) for t, y in points) / var * 60.0


def analyse(soak: Soak) -> dict[str, Any]:
    """Summary numbers and verdicts of a finished run."""
    args = soak.args
    samples = soak.samples
    pre = next(s for s in samples if s.phase == "pre-load")
    load = [s for s in samples if s.phase in ("load", "end-load")]
    idle = [s for s in samples if s.phase == "idle"]
    cutoff = args.warmup_percent / 100.0 * soak.load_seconds
    skipped = max(1, sum(1 for s in load if s.t < cutoff))
    post = load[skipped:]
    rss_slope = slope_per_minute([(s.t, s.rss_mib) for s in post])
    fd_slope = slope_per_minute([(s.t, float(s.fds)) for s in post])
    rss_growth = post[-1].rss_mib - post[0].rss_mib if post else math.nan
    fd_growth = post[-1].fds - post[0].fds if post else 0
    fd_slack = FLAT_FD_SLACK + 2 * args.churn

    if math.isnan(rss_slope):
        rss_verdict = "too few samples after warm-up to fit a line (lower --sample or raise --minutes)"
    elif rss_slope < FLAT_SLOPE_MIB_PER_MIN and rss_growth < FLAT_GROWTH_MIB:
        rss_verdict = "flat"
    else:
        rss_verdict = f"GROWS ({rss_slope:.2f} MiB/min)"
    if math.isnan(fd_slope):
        fd_verdict = "too few samples after warm-up to fit a line"
    elif fd_slope < FLAT_FD_SLOPE_PER_MIN and fd_growth <= fd_slack:
        fd_verdict = "flat"
    else:
        fd_verdict = f"GROWS ({fd_slope:.1f} fds/min)"
    end = idle[-1]
    idle_rss = end.rss_mib - pre.rss_mib
    idle_fds = end.fds - pre.fds
    rss_idle_verdict = (
        f"returns near idle ({idle_rss:+.1f} MiB)"
        if idle_rss <= IDLE_RSS_TOLERANCE_MIB
        else f"STAYS HIGH ({idle_rss:+.1f} MiB over the pre-load baseline)"
    )
    fd_idle_verdict = (
        f"returns to idle ({idle_fds:+d})" if idle_fds <= IDLE_FD_TOLERANCE else f"STAYS HIGH ({idle_fds:+d} fds)"
    )
    fd_kinds_change = {
        k: n
        for k in sorted(set(pre.fd_kinds) | set(end.fd_kinds))
        if (n := end.fd_kinds.get(k, 0) - pre.fd_kinds.get(k, 0))
    }
    fitted_minutes = (post[-1].t - post[0].t) / 60.0 if post else 0.0
    c = soak.counters
    rounds = c.ops["exec"] + c.failures["exec"]
    target_rounds = soak.created * soak.load_seconds / args.interval
    end_load = next((s for s in samples if s.phase == "end-load"), load[-1])
    return {
        "created": soak.created,
        "setup_seconds": soak.setup_seconds,
        "load_seconds": soak.load_seconds,
        "teardown_seconds": soak.teardown_seconds,
        "ops": dict(c.ops),
        "ops_total": c.total_ops,
        "ops_per_second": c.total_ops / soak.load_seconds if soak.load_seconds else math.nan,
        "rounds_done_of_target": rounds / target_rounds if target_rounds else math.nan,
        "failures": dict(c.failures),
        "failures_total": c.total_failures,
        "failure_messages": list(c.messages),
        "latency_ms": {k: asdict(Stats.of(v)) for k, v in c.latency_ms.items()},
        "rss_mib": {
            "pre_load": pre.rss_mib,
            "peak": max(s.rss_mib for s in samples),
            "end_of_load": end_load.rss_mib,
            "after_idle": end.rss_mib,
        },
        "fds": {
            "pre_load": pre.fds,
            "peak": max(s.fds for s in samples),
            "end_of_load": end_load.fds,
            "after_idle": end.fds,
        },
        "fd_kinds_after_idle_minus_pre_load": fd_kinds_change,
        "daemon_log_problems": len(soak.daemon_log),
        "daemon_log_first_problems": soak.daemon_log[:KEEP_FAILURES],
        "fit": {
            "warmup_seconds": cutoff,
            "fitted_minutes": fitted_minutes,
            "samples_fitted": len(post),
            "samples_skipped": skipped,
            "rss_slope_mib_per_min": rss_slope,
            "rss_growth_mib": rss_growth,
            "fd_slope_per_min": fd_slope,
            "fd_growth": fd_growth,
        },
        "verdicts": {
            "rss_load": rss_verdict,
            "fds_load": fd_verdict,
            "rss_idle": rss_idle_verdict,
            "fds_idle": fd_idle_verdict,
        },
        "thresholds": {
            "flat_slope_mib_per_min": FLAT_SLOPE_MIB_PER_MIN,
            "flat_growth_mib": FLAT_GROWTH_MIB,
            "flat_fd_slope_per_min": FLAT_FD_SLOPE_PER_MIN,
            "flat_fd_growth": fd_slack,
            "idle_rss_tolerance_mib": IDLE_RSS_TOLERANCE_MIB,
            "idle_fd_tolerance": IDLE_FD_TOLERANCE,
        },
    }


# ---------------------------------------------------------------------------------------------- report


def report(soak: Soak, summary: dict[str, Any]) -> list[str]:
    """The options, the samples, the summary and the verdicts."""
    a = soak.args
    s = summary
    lines = [
        f"options: --sandboxes {a.sandboxes} --minutes {a.minutes:g} --interval {a.interval:g} --sample {a.sample:g}"
        f" --churn {a.churn} --idle-seconds {a.idle_seconds:g} --settle {a.settle:g}"
        f" --warmup-percent {a.warmup_percent:g}",
        "",
        f"{'t (s)':>8}  {'phase':<8}  {'RSS MiB':>8}  {'fds':>5}  {'ops':>8}",
    ]
    for x in soak.samples:
        lines.append(f"{x.t:>8.1f}  {x.phase:<8}  {x.rss_mib:>8.1f}  {x.fds:>5}  {x.ops:>8}")
    ops, lat, fit = s["ops"], s["latency_ms"], s["fit"]
    rss, fds, v, th = s["rss_mib"], s["fds"], s["verdicts"], s["thresholds"]
    failed = ", ".join(f"{k} {n}" for k, n in s["failures"].items() if n)
    lines += [
        "",
        f"sandboxes: {s['created']} created in {s['setup_seconds']:.1f} s, terminated in {s['teardown_seconds']:.1f} s",
        f"operations: {s['ops_total']} in {s['load_seconds']:.1f} s = {s['ops_per_second']:.1f} ops/s"
        f" (exec {ops['exec']}, write {ops['write']}, churn cycles {ops['churn']});"
        f" rounds done: {s['rounds_done_of_target']:.0%} of one per sandbox per --interval",
        f"failures: {s['failures_total']}" + (f" ({failed})" if failed else ""),
        *(f"  {m}" for m in s["failure_messages"]),
        "latency ms (p50 / p99 / max): "
        + "; ".join(
            f"{label} {lat[k]['p50']:.1f} / {lat[k]['p99']:.1f} / {lat[k]['max']:.1f}"
            for k, label in (("exec", "exec round"), ("write", "write_text"), ("churn", "churn cycle"))
        ),
        f"RSS MiB: pre-load {rss['pre_load']:.1f}, peak {rss['peak']:.1f}, end of load {rss['end_of_load']:.1f},"
        f" after idle {rss['after_idle']:.1f}",
        f"fds: pre-load {fds['pre_load']}, peak {fds['peak']}, end of load {fds['end_of_load']},"
        f" after idle {fds['after_idle']}",
        "fds after idle minus pre-load, by kind: "
        + (", ".join(f"{k} {n:+d}" for k, n in s["fd_kinds_after_idle_minus_pre_load"].items()) or "none"),
        f"daemon log: {s['daemon_log_problems']} warning/error/traceback lines",
        *(f"  {line[:300]}" for line in s["daemon_log_first_problems"]),
        f"fit: {fit['samples_fitted']} load samples over {fit['fitted_minutes']:.1f} min, after"
        f" {fit['warmup_seconds']:.0f} s of warm-up ({fit['samples_skipped']} left out)"
        + (
            f"; under {SHORT_FIT_MINUTES:g} min the slope is mostly warm-up: take verdicts from a longer run"
            if fit["fitted_minutes"] < SHORT_FIT_MINUTES
            else ""
        ),
        "",
        f"RSS during load: slope {fit['rss_slope_mib_per_min']:+.2f} MiB/min, growth {fit['rss_growth_mib']:+.1f} MiB"
        f" (flat: < {th['flat_slope_mib_per_min']:g} MiB/min and < {th['flat_growth_mib']:g} MiB) → {v['rss_load']}",
        f"fds during load: slope {fit['fd_slope_per_min']:+.1f} /min, growth {fit['fd_growth']:+d}"
        f" (flat: < {th['flat_fd_slope_per_min']:g} /min and ≤ {th['flat_fd_growth']}) → {v['fds_load']}",
        f"RSS after idle vs pre-load (within {th['idle_rss_tolerance_mib']:g} MiB): {v['rss_idle']}",
        f"fds after idle vs pre-load (within {th['idle_fd_tolerance']}): {v['fds_idle']}",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.soak``."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=100, help="long-lived sandboxes under load (default 100)")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load phase (default 10)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between one sandbox's rounds (default 1.0)"
    )
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples of the daemon (default 10)")
    parser.add_argument("--churn", type=int, default=2, help="workers creating and terminating sandboxes (default 2)")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="quiet after the load, sampled (default 30)")
    parser.add_argument("--settle", type=float, default=5.0, help="quiet before the baseline sample (default 5)")
    parser.add_argument(
        "--warmup-percent", type=float, default=20.0, help="share of the load left out of the fit (default 20)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the samples, summary and verdicts as JSON")
    args = parse_args_as_root(parser, argv)
    if args.sandboxes < 0 or args.churn < 0 or args.sandboxes + args.churn < 1:
        parser.error("--sandboxes and --churn must not be negative, and not both 0")
    if args.minutes <= 0 or args.interval <= 0 or args.sample <= 0:
        parser.error("--minutes, --interval and --sample must be positive")
    if args.idle_seconds < 0 or args.settle < 0 or not 0 <= args.warmup_percent < 100:
        parser.error("--idle-seconds and --settle must not be negative; --warmup-percent must be in [0, 100)")

    def measure(daemon: BenchDaemon) -> Soak:
        assert daemon.proc is not None
        soak = Soak(args, daemon.proc.pid)
        try:
            asyncio.run(soak.run())
        finally:
            soak.daemon_log = log_problems(daemon.log)
        return soak

    run = run_with_daemon(measure)
    if not run.ok:
        return run.exit_code
    soak = run.value
    summary = analyse(soak)
    print("\n".join([*header_lines(run.facts, run.loads), *report(soak, summary)]))
    if args.json:
        doc = {
            "machine": run.facts,
            "load_average": run.loads,
            "args": vars(args),
            "samples": [asdict(s) for s in soak.samples],
            "summary": summary,
            "left_behind": run.left,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if run.exit_code:
        return run.exit_code
    return 1 if summary["failures_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
