"""shoal's latency benchmark: time to interactive and exec round trip, beside the ``runc run`` floor.

Run as root from the repository root::

    .venv/bin/python -m bench.run [--runs N] [--only tti,exec,...] [--runtime runc|gvisor] [--json FILE] [--profile]

It starts its own daemon on temporary directories (reading the machine's
cached base image read-only), warms up, then takes ``--runs`` samples of each
selected measurement, interleaved round by round so that every metric sees the
same machine load:

``tti``         ``Sandbox.create()`` called → ``exec("echo", "ready")`` → first stdout chunk (sync SDK);
                also reports ``Sandbox.create`` alone and ``terminate()``.
``tti-async``   the same through the ``.aio`` API, from the caller's own event loop.
``exec``        ``sb.exec("true").wait()`` in one long-lived sandbox (sync SDK).
``exec-async``  the same through ``.aio``.
``floor``       ``runc run`` of ``/bin/true`` on a bundle copied from a live sandbox (always measured).

``--runtime gvisor`` creates every timed sandbox with ``runtime="gvisor"`` (runsc, decision 0069); the floor
stays ``runc run``, so the ratio shows what gVisor costs over a bare container.

``--profile`` runs the daemon with timestamps around each step of a create, an
exec and a terminate (no source is changed: the daemon process patches
itself at start-up), and prints where the time goes.  Those numbers include
a little instrumentation overhead; use a plain run for the headline table.

Everything is cleaned up at the end, on errors and on Ctrl-C: sandboxes,
containers, overlay mounts, cgroups and the temporary directories.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import functools
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from bench.harness import (
    BenchDaemon,
    Stats,
    _remove_cgroup_tree,
    ms,
    now_ns,
    parse_args_as_root,
    percentile,
    run_with_daemon,
)
from shoal.runtime import rootfs

STORED_ID = 100000
"""The host id image layers are stored from (decision 0002): the floor's root maps to it."""

if TYPE_CHECKING:
    import shoal

GROUPS = ("tti", "tti-async", "exec", "exec-async", "floor")
DEFAULT_RUNS = 100
DEFAULT_WARMUP = 5

F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Metric:
    """One measured quantity and how to show it."""

    key: str
    label: str
    group: str


METRICS = (
    Metric("tti_sync", "TTI sync: create → first output", "tti"),
    Metric("create_sync", "  Sandbox.create alone (sync)", "tti"),
    Metric("first_output_sync", "  exec → first output (sync)", "tti"),
    Metric("terminate_sync", "  terminate() (sync)", "tti"),
    Metric("tti_async", "TTI async (.aio)", "tti-async"),
    Metric("create_async", "  Sandbox.create.aio alone", "tti-async"),
    Metric("terminate_async", "  terminate.aio()", "tti-async"),
    Metric("exec_rt_sync", "exec('true').wait() (sync)", "exec"),
    Metric("exec_rt_async", "exec.aio('true') + wait.aio()", "exec-async"),
    Metric("runc_floor", "runc run /bin/true (floor)", "floor"),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
FLOOR = "runc_floor"


@dataclass(frozen=True)
class Target:
    """A latency goal from the issue."""

    metric: str
    stat: str
    limit_ms: float


TARGETS = (Target("tti_sync", "p50", 60.0), Target("tti_sync", "p99", 150.0), Target("exec_rt_sync", "p50", 5.0))


# ---------------------------------------------------------------------------------------------- floor


class Floor:
    """``runc run`` of ``/bin/true`` on a bundle copied from a live sandbox.

    Same namespaces, user-namespace mapping, cgroup settings (under a cgroup
    path of its own), seccomp profile and mounts as the sandbox, minus the
    agent's two ``/.shoal`` bind mounts; the root is an overlay of the same
    image layers (mounted read-only by the bench, once, outside the timing).
    """

    def __init__(self, root: Path, cgroup_parent: str) -> None:
        self.dir = root / "floor"
        self.bundle = self.dir / "bundle"
        self.state = self.dir / "state"
        self.rootfs = self.dir / "rootfs"
        self.cgroup_parent = f"{cgroup_parent}-floor"
        self.runc = shutil.which("runc") or "/usr/sbin/runc"
        self.count = 0

    def prepare(self, sandbox_runtime_dir: Path, lowers: list[str]) -> None:
        """Build the bundle from a running sandbox's ``config.json`` over its image layers ``lowers``.

        The sandbox joins a user namespace the daemon made for it (decision 0063); the floor has runc make one
        itself, mapping the sandbox's ids to the range its layers are stored in, as runc would on its own.
        """
        config = json.loads((sandbox_runtime_dir / "bundle" / "config.json").read_text())
        if not lowers:
            raise RuntimeError("the sandbox's root has no lower layer to run the floor on")
        # The same image layers, read-only, under an overlay of the floor's own (layers are root-only on disk).
        self.rootfs.mkdir(parents=True, exist_ok=True)
        upper, work = self.dir / "upper", self.dir / "work"
        rootfs.mount_overlay(lowers, str(upper), str(work), str(self.rootfs), STORED_ID)
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        config["mounts"] = [m for m in config["mounts"] if not str(m.get("destination", "")).startswith("/.shoal")]
        config["process"]["args"] = ["/bin/true"]
        config["process"]["cwd"] = "/"
        linux = config["linux"]
        linux["cgroupsPath"] = f"{self.cgroup_parent}/true"
        linux["namespaces"] = [{"type": n["type"]} if n["type"] == "user" else n for n in linux["namespaces"]]
        mapping = [{"containerID": 0, "hostID": STORED_ID, "size": 65536}]
        linux["uidMappings"], linux["gidMappings"] = mapping, mapping
        self.bundle.mkdir(parents=True, exist_ok=True)
        (self.bundle / "config.json").write_text(json.dumps(config, indent=1))
        self.state.mkdir(parents=True, exist_ok=True)

    def run_once(self) -> float:
        """One ``runc run``; its wall time in ms."""
        self.count += 1
        argv = [self.runc, "--root", str(self.state), "run", "--bundle", str(self.bundle), f"floor-{self.count}"]
        t0 = now_ns()
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, start_new_session=True, check=False)
        t1 = now_ns()
        if res.returncode != 0:
            raise RuntimeError(f"runc run failed (exit {res.returncode}): {res.stderr.decode(errors='replace')}")
        return ms(t0, t1)

    def cleanup(self) -> list[str]:
        """Delete any container left by an interrupted run and the floor's cgroups; returns what is left."""
        if self.state.is_dir():
            for c in self.state.iterdir():
                if c.is_dir():
                    subprocess.run(
                        [self.runc, "--root", str(self.state), "delete", "--force", c.name],
                        capture_output=True,
                        check=False,
                    )
        left = [f"floor container {c}" for c in self.state.glob("*") if c.is_dir()] if self.state.is_dir() else []
        rootfs.unmount(str(self.rootfs))
        return left + _remove_cgroup_tree(self.cgroup_parent)


# ---------------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One timed run: values in ms, plus client-side stamps (ns) for the profile."""

    values: dict[str, float]
    sandbox_id: str
    marks: dict[str, int] = field(default_factory=dict)


RUNTIME: dict[str, str] = {}
"""``Sandbox.create`` keyword for the runtime under test (``--runtime``); empty: the daemon's default."""


def tti_sync(app: shoal.App) -> Sample:
    """create → exec("echo", "ready") → first stdout chunk, with the blocking SDK; then terminate (timed apart)."""
    import shoal

    t0 = now_ns()
    sb = shoal.Sandbox.create(app=app, **RUNTIME)
    t1 = now_ns()
    p = sb.exec("echo", "ready")
    t2 = now_ns()
    first = next(iter(p.stdout))
    t3 = now_ns()
    rest = p.stdout.read()
    if first + rest != "ready\n":
        raise RuntimeError(f"unexpected output {first + rest!r}")
    t4 = now_ns()
    sb.terminate()
    t5 = now_ns()
    return Sample(
        {
            "tti_sync": ms(t0, t3),
            "create_sync": ms(t0, t1),
            "first_output_sync": ms(t1, t3),
            "terminate_sync": ms(t4, t5),
        },
        sb.object_id,
        {"t0": t0, "created": t1, "exec_returned": t2, "first_output": t3, "terminate0": t4, "terminate1": t5},
    )


async def tti_async(app: shoal.App) -> Sample:
    """The same as ``tti_sync`` through the ``.aio`` API."""
    import shoal

    t0 = now_ns()
    sb = await shoal.Sandbox.create.aio(app=app, **RUNTIME)
    t1 = now_ns()
    p = await sb.exec.aio("echo", "ready")
    t2 = now_ns()
    first = ""
    async for chunk in p.stdout:
        first = chunk
        break
    t3 = now_ns()
    rest = await p.stdout.read.aio()
    if first + rest != "ready\n":
        raise RuntimeError(f"unexpected output {first + rest!r}")
    t4 = now_ns()
    await sb.terminate.aio()
    t5 = now_ns()
    return Sample(
        {"tti_async": ms(t0, t3), "create_async": ms(t0, t1), "terminate_async": ms(t4, t5)},
        sb.object_id,
        {"t0": t0, "created": t1, "exec_returned": t2, "first_output": t3, "terminate0": t4, "terminate1": t5},
    )


def exec_sync(sb: shoal.Sandbox) -> Sample:
    """``sb.exec("true").wait()``."""
    t0 = now_ns()
    p = sb.exec("true")
    t1 = now_ns()
    code = p.wait()
    t2 = now_ns()
    if code != 0:
        raise RuntimeError(f"`true` exited {code}")
    return Sample({"exec_rt_sync": ms(t0, t2)}, sb.object_id, {"t0": t0, "exec_returned": t1, "end": t2})


async def exec_async(sb: shoal.Sandbox) -> Sample:
    """``await (await sb.exec.aio("true")).wait.aio()``."""
    t0 = now_ns()
    p = await sb.exec.aio("true")
    t1 = now_ns()
    code = await p.wait.aio()
    t2 = now_ns()
    if code != 0:
        raise RuntimeError(f"`true` exited {code}")
    return Sample({"exec_rt_async": ms(t0, t2)}, sb.object_id, {"t0": t0, "exec_returned": t1, "end": t2})


# ---------------------------------------------------------------------------------------------- instrumented daemon


class _Spans:
    """Spans recorded while the daemon serves one request (a context variable carries the open list)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int, int]] = []
        self.open = True

    def add(self, name: str, t0: int, t1: int) -> None:
        if self.open:
            self.items.append((name, t0, t1))


_CURRENT: contextvars.ContextVar[_Spans | None] = contextvars.ContextVar("bench_spans", default=None)
_SINK: TextIO | None = None


def _emit(sandbox_id: str, event: str, t0: int, t1: int | None = None, exec_id: str = "") -> None:
    if _SINK is not None:
        _SINK.write(json.dumps({"sb": sandbox_id, "ev": event, "t0": t0, "t1": t1, "exec": exec_id}) + "\n")


def _span_sync(name: str, fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = now_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            spans = _CURRENT.get()
            if spans is not None:
                spans.add(name, t0, now_ns())

    return wrapper  # type: ignore[return-value]


def _span_async(name: str, fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = now_ns()
        try:
            return await fn(*args, **kwargs)
        finally:
            spans = _CURRENT.get()
            if spans is not None:
                spans.add(name, t0, now_ns())

    return wrapper  # type: ignore[return-value]


def _request_scope(event: str, fn: F, sandbox_of: Callable[[tuple[Any, ...], Any], str]) -> F:
    """Wrap a request-level engine call: record its own span and every inner span, keyed by sandbox."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        spans = _Spans()
        token = _CURRENT.set(spans)
        t0 = now_ns()
        try:
            result = await fn(*args, **kwargs)
        finally:
            _CURRENT.reset(token)
        t1 = now_ns()
        spans.open = False  # tasks started inside (the agent link's reader) keep the list: stop recording
        sandbox_id = sandbox_of(args, result)
        _emit(sandbox_id, event, t0, t1)
        for name, s0, s1 in spans.items:
            _emit(sandbox_id, name, s0, s1)
        return result

    return wrapper  # type: ignore[return-value]


def _instrumented_daemon(events_path: str) -> None:
    """Run ``shoal serve`` with timestamps around the steps of create, exec and terminate (no source edits)."""
    global _SINK
    _SINK = open(events_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the daemon

    from shoal.agent import protocol as P
    from shoal.engine import sandbox as sandbox_mod
    from shoal.engine.manager import Manager
    from shoal.images.service import ImageService
    from shoal.runtime import idmap, rootfs, spec
    from shoal.runtime.oci import OciRuntime
    from shoal.store.state import State

    Manager.create = _request_scope("create", Manager.create, lambda a, r: r.id)  # type: ignore[method-assign]
    Manager.exec = _request_scope("exec", Manager.exec, lambda a, r: a[1])  # type: ignore[method-assign]
    sandbox_mod.Sandbox.terminate = _request_scope(  # type: ignore[method-assign]
        "terminate", sandbox_mod.Sandbox.terminate, lambda a, r: a[0].id
    )
    ImageService.resolve = _span_async("image_resolve", ImageService.resolve)  # type: ignore[method-assign]
    OciRuntime.start = _span_async("runc_run_detach", OciRuntime.start)  # type: ignore[method-assign]
    OciRuntime.delete = _span_async("runc_delete_force", OciRuntime.delete)  # type: ignore[method-assign]
    OciRuntime.create = _span_async("runc_create", OciRuntime.create)  # type: ignore[method-assign]
    OciRuntime.start_created = _span_async("runc_start", OciRuntime.start_created)  # type: ignore[method-assign]
    idmap.make_namespaces = _span_sync("userns_helper", idmap.make_namespaces)
    idmap.mount_overlay = _span_sync("mount_overlay", idmap.mount_overlay)  # per-sandbox ranges (decision 0063)
    State.add_sandbox = _span_sync("db_add_sandbox", State.add_sandbox)  # type: ignore[method-assign]
    State.set_sandbox_state = _span_sync("db_set_state", State.set_sandbox_state)  # type: ignore[method-assign]
    State.add_exec = _span_sync("db_add_exec", State.add_exec)  # type: ignore[method-assign]
    State.finish_sandbox = _span_sync("db_finish_sandbox", State.finish_sandbox)  # type: ignore[method-assign]
    rootfs.mount_overlay = _span_sync("mount_overlay", rootfs.mount_overlay)
    rootfs.unmount = _span_sync("unmount", rootfs.unmount)
    spec.build = _span_sync("spec_build", spec.build)
    sandbox_mod.Sandbox._remove_files = _span_sync(  # type: ignore[method-assign]
        "remove_files", sandbox_mod.Sandbox._remove_files
    )

    original_on_frames = sandbox_mod.Sandbox._on_frames
    seen_output: set[tuple[str, str]] = set()

    def on_frames(self: Any, link: Any, frames: list[Any]) -> None:
        t = now_ns()
        for f in frames:
            if f.msg == P.Msg.HELLO:
                _emit(self.id, "agent_hello", t)
            elif f.msg == P.Msg.STARTED:
                _emit(self.id, "agent_started", t, exec_id=f.exec_id)
            elif f.msg == P.Msg.OUTPUT and (self.id, f.exec_id) not in seen_output:
                seen_output.add((self.id, f.exec_id))
                _emit(self.id, "agent_first_output", t, exec_id=f.exec_id)
            elif f.msg == P.Msg.EXIT:
                _emit(self.id, "agent_exit", t, exec_id=f.exec_id)
        original_on_frames(self, link, frames)

    sandbox_mod.Sandbox._on_frames = on_frames  # type: ignore[method-assign]

    from shoal.cli.main import cli

    cli(["serve"], prog_name="shoal")


@dataclass
class Event:
    """A daemon-side stamp (ns) from the instrumented daemon."""

    sandbox_id: str
    name: str
    t0: int
    t1: int | None
    exec_id: str


def load_events(path: Path) -> list[Event]:
    """Events written by ``_instrumented_daemon``."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            d = json.loads(line)
            events.append(Event(d["sb"], d["ev"], int(d["t0"]), d["t1"], d.get("exec", "")))
    return events


def _window(events: list[Event], sandbox_id: str, start: int, end: int) -> dict[str, Event]:
    """The first event of each name for ``sandbox_id`` between two client stamps."""
    out: dict[str, Event] = {}
    for e in events:
        if e.sandbox_id == sandbox_id and start <= e.t0 <= end and e.name not in out:
            out[e.name] = e
    return out


def _end(e: Event) -> int:
    return e.t1 if e.t1 is not None else e.t0


def _dur(e: Event | None) -> float:
    return ms(e.t0, _end(e)) if e is not None else math.nan


def tti_phases(sample: Sample, events: list[Event]) -> dict[str, float] | None:
    """One TTI run cut into consecutive phases (they sum to the TTI), plus overlapping details."""
    m = sample.marks
    ev = _window(events, sample.sandbox_id, m["t0"], m["first_output"])
    need = ("create", "mount_overlay", "runc_run_detach", "agent_hello", "exec")
    if any(k not in ev for k in need):
        return None
    create, mount, runc, hello, ex = (ev[k] for k in need)
    phases = {
        "1 SDK → daemon: create request": ms(m["t0"], create.t0),
        "2 daemon: resolve image, db insert, dirs": ms(create.t0, mount.t0),
        "3 daemon: overlay mount": _dur(mount),
        "4 daemon: write bundle (spec build)": ms(_end(mount), runc.t0),
        "5 runc run --detach (agent as init)": _dur(runc),
        "6 agent hello after runc returns": ms(_end(runc), hello.t0),
        "7 daemon: mark running, answer": ms(hello.t0, _end(create)),
        "8 daemon → SDK: create response": ms(_end(create), m["created"]),
        "9 SDK → daemon: exec request": ms(m["created"], ex.t0),
        "10 daemon: exec dispatch (db, frame)": _dur(ex),
        "11 daemon → SDK: exec response": ms(_end(ex), m["exec_returned"]),
        "12 SDK: output stream → first chunk": ms(m["exec_returned"], m["first_output"]),
    }
    details = {
        "  image resolve": _dur(ev.get("image_resolve")),
        "  db insert sandbox": _dur(ev.get("db_add_sandbox")),
        "  spec build": _dur(ev.get("spec_build")),
        "  user namespace helper (in 2)": _dur(ev.get("userns_helper")),
        "  db state → running": _dur(ev.get("db_set_state")),
        "  db insert exec": _dur(ev.get("db_add_exec")),
        "  agent: exec frame sent → first output frame": (
            ms(_end(ex), ev["agent_first_output"].t0) if "agent_first_output" in ev else math.nan
        ),
    }
    return phases | details


def exec_phases(sample: Sample, events: list[Event]) -> dict[str, float] | None:
    """One exec round trip cut into consecutive phases."""
    m = sample.marks
    ev = _window(events, sample.sandbox_id, m["t0"], m["end"])
    if "exec" not in ev or "agent_exit" not in ev:
        return None
    ex, exit_ = ev["exec"], ev["agent_exit"]
    return {
        "1 SDK → daemon: exec request": ms(m["t0"], ex.t0),
        "2 daemon: exec dispatch (db, frame)": _dur(ex),
        "3 daemon → SDK: exec response": ms(_end(ex), m["exec_returned"]),
        "4 SDK: wait request → exit seen": ms(m["exec_returned"], m["end"]),
        "  agent: exec frame sent → exit frame": ms(_end(ex), exit_.t0),
        "  db insert exec": _dur(ev.get("db_add_exec")),
    }


def terminate_phases(sample: Sample, events: list[Event]) -> dict[str, float] | None:
    """One terminate() cut into phases."""
    m = sample.marks
    ev = _window(events, sample.sandbox_id, m["terminate0"], m["terminate1"])
    if "terminate" not in ev or "runc_delete_force" not in ev:
        return None
    term, delete = ev["terminate"], ev["runc_delete_force"]
    return {
        "1 SDK → daemon: terminate request": ms(m["terminate0"], term.t0),
        "2 daemon: record result, start teardown": ms(term.t0, delete.t0),
        "3 runc delete --force (running container)": _dur(delete),
        "4 daemon: link close, unmount, remove files": ms(_end(delete), _end(term)),
        "5 daemon → SDK: terminate response": ms(_end(term), m["terminate1"]),
        "  unmount": _dur(ev.get("unmount")),
        "  remove files": _dur(ev.get("remove_files")),
    }


def phase_table(title: str, rows: list[dict[str, float]], total: float) -> list[str]:
    """Median and p95 of each phase across runs, with its share of ``total`` (a median)."""
    if not rows:
        return [f"{title}: no complete runs to analyse"]
    lines = [f"{title} ({len(rows)} runs; phases 1..n add up to the total, indented rows are details)"]
    lines.append(f"  {'phase':<50} {'p50 ms':>8} {'p95 ms':>8} {'share':>6}")
    summed = 0.0
    for name in rows[0]:
        vals = sorted(r[name] for r in rows if not math.isnan(r.get(name, math.nan)))
        if not vals:
            continue
        p50 = percentile(vals, 50)
        share = f"{100 * p50 / total:5.1f}%" if not name.startswith(" ") and total > 0 else ""
        if not name.startswith(" "):
            summed += p50
        lines.append(f"  {name:<50} {p50:8.2f} {percentile(vals, 95):8.2f} {share:>6}")
    lines.append(f"  {'sum of phase medians / median total':<50} {summed:8.2f} {total:8.2f}")
    return lines


# ---------------------------------------------------------------------------------------------- report


def report(
    stats: dict[str, Stats], facts: dict[str, Any], load: dict[str, tuple[float, float, float]], runs: int
) -> tuple[list[str], list[dict[str, Any]]]:
    """The printed table and the target verdicts."""
    floor = stats.get(FLOOR)
    lines = [
        f"shoal bench — {facts['date']} — {facts['cpu_count']} CPUs ({facts['cpu_model']}), {facts['os']},"
        f" kernel {facts['kernel']}, {facts['runc']}, Python {facts['python']}",
        "load average (1/5/15 min): before "
        + " ".join(f"{x:.2f}" for x in load["before"])
        + ", after "
        + " ".join(f"{x:.2f}" for x in load["after"]),
        f"runs per metric: {runs} (after warm-up); all times in ms; ratios are against the runc floor",
        "",
        f"{'metric':<36} {'n':>4} {'p50':>8} {'p95':>8} {'p99':>8} {'min':>8} {'max':>8} {'p50/fl':>7} {'p99/fl':>7}",
    ]
    for m in METRICS:
        s = stats.get(m.key)
        if s is None or s.n == 0:
            continue
        r50 = f"{s.p50 / floor.p50:7.1f}" if floor and floor.n else f"{'':>7}"
        r99 = f"{s.p99 / floor.p99:7.1f}" if floor and floor.n else f"{'':>7}"
        lines.append(
            f"{m.label:<36} {s.n:>4} {s.p50:8.2f} {s.p95:8.2f} {s.p99:8.2f} {s.min:8.2f} {s.max:8.2f} {r50} {r99}"
        )
    verdicts = []
    target_lines = []
    for t in TARGETS:
        s = stats.get(t.metric)
        if s is None or s.n == 0:
            continue
        value = getattr(s, t.stat)
        ok = value <= t.limit_ms
        verdicts.append({"metric": t.metric, "stat": t.stat, "limit_ms": t.limit_ms, "value_ms": value, "pass": ok})
        target_lines.append(
            f"  {METRIC_BY_KEY[t.metric].label.strip():<36} {t.stat} ≤ {t.limit_ms:5.0f} ms:"
            f" {value:7.2f} ms  {'PASS' if ok else 'MISS'}"
        )
    if target_lines:
        lines += ["", "targets (2-core machine):", *target_lines]
    return lines, verdicts


# ---------------------------------------------------------------------------------------------- main


def _parse_only(values: list[str] | None) -> list[str]:
    if not values:
        return list(GROUPS)
    chosen: list[str] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if part and part not in GROUPS:
                raise SystemExit(f"--only: unknown measurement {part!r}; choose from {', '.join(GROUPS)}")
            if part and part not in chosen:
                chosen.append(part)
    if FLOOR_GROUP not in chosen:
        chosen.append(FLOOR_GROUP)  # every run measures the floor beside the rest
    return chosen


FLOOR_GROUP = "floor"


def measure(args: argparse.Namespace, daemon: BenchDaemon, floor: Floor, groups: list[str]) -> dict[str, Any]:
    """Warm up, then take ``args.runs`` rounds of every selected measurement."""
    import shoal

    app = shoal.App.lookup("bench", create_if_missing=True)
    loop = asyncio.new_event_loop()
    try:
        exec_sb = shoal.Sandbox.create(app=app, timeout=3600, **RUNTIME)
        try:
            # The floor copies a runc sandbox's bundle: under --runtime gvisor, one made for that alone.
            runc_sb = (
                exec_sb
                if RUNTIME.get("runtime", "runc") == "runc"
                else shoal.Sandbox.create(app=app, runtime="runc")  # (the daemon's default may be gVisor)
            )
            try:
                bundle_dir = daemon.runtime_dir / "sandboxes" / runc_sb.object_id
                floor.prepare(bundle_dir, daemon.image_lowers(runc_sb.object_id))
            finally:
                if runc_sb is not exec_sb:
                    runc_sb.terminate()
            steps: list[tuple[str, Callable[[], Sample | float]]] = []
            for g in groups:
                if g == "tti":
                    steps.append((g, lambda: tti_sync(app)))
                elif g == "tti-async":
                    steps.append((g, lambda: loop.run_until_complete(tti_async(app))))
                elif g == "exec":
                    steps.append((g, lambda: exec_sync(exec_sb)))
                elif g == "exec-async":
                    steps.append((g, lambda: loop.run_until_complete(exec_async(exec_sb))))
                elif g == "floor":
                    steps.append((g, floor.run_once))
            print(f"warming up ({args.warmup} untimed rounds) …", file=sys.stderr, flush=True)
            for _ in range(args.warmup):
                for _, step in steps:
                    step()
            samples: dict[str, list[Sample]] = {g: [] for g in groups}
            values: dict[str, list[float]] = {}
            print(f"measuring {args.runs} rounds of {', '.join(groups)} …", file=sys.stderr, flush=True)
            for i in range(args.runs):
                for g, step in steps:
                    out = step()
                    if isinstance(out, float):
                        values.setdefault(FLOOR, []).append(out)
                    else:
                        samples[g].append(out)
                        for k, v in out.values.items():
                            values.setdefault(k, []).append(v)
                if (i + 1) % 10 == 0:
                    print(f"  {i + 1}/{args.runs}", file=sys.stderr, flush=True)
        finally:
            exec_sb.terminate()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return {"values": values, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.run``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_instrumented-daemon"]:
        _instrumented_daemon(argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help=f"timed runs per metric (default {DEFAULT_RUNS})"
    )
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed rounds first (default 5)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="WHAT",
        help=f"comma-separated subset of {','.join(GROUPS)} (the floor is always measured)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every sample and summary as JSON")
    parser.add_argument("--profile", action="store_true", help="instrument the daemon and show where the time goes")
    parser.add_argument(
        "--runtime", choices=["runc", "gvisor"], help="what the timed sandboxes run under (default: the daemon's)"
    )
    parser.add_argument(
        "--warm-pool",
        type=int,
        default=None,
        metavar="N",
        help="run the daemon with a warm pool of N sandboxes (default: the daemon's default)",
    )
    args = parse_args_as_root(parser, argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.runs < 50:
        print(f"note: {args.runs} runs is fewer than 50: p99 is not meaningful", file=sys.stderr)
    groups = _parse_only(args.only)
    if args.runtime:
        RUNTIME["runtime"] = args.runtime

    events_path: Path | None = None
    daemon = BenchDaemon()
    if args.warm_pool is not None:
        daemon.env["SHOAL_WARM_POOL"] = str(args.warm_pool)
    if args.profile:
        events_path = daemon.root / "events.jsonl"
        daemon.instrument_to = events_path
    floor = Floor(daemon.root, daemon.cgroup_parent)
    events: list[Event] = []

    def clean_up_floor() -> list[str]:
        left = floor.cleanup()
        if events_path:
            events.extend(load_events(events_path))  # before the daemon's directory goes
        return left

    run = run_with_daemon(lambda d: measure(args, d, floor, groups), daemon=daemon, cleanup=clean_up_floor)
    if not run.ok:
        return run.exit_code
    result, facts, left = run.value, run.facts, run.left

    stats = {k: Stats.of(v) for k, v in result["values"].items()}
    lines, verdicts = report(stats, facts, run.loads, args.runs)
    profile: dict[str, list[dict[str, float]]] = {}
    if args.profile:
        samples: dict[str, list[Sample]] = result["samples"]
        sync_tti = samples.get("tti", [])
        profile["tti"] = [p for s in sync_tti if (p := tti_phases(s, events)) is not None]
        profile["exec"] = [p for s in samples.get("exec", []) if (p := exec_phases(s, events)) is not None]
        profile["terminate"] = [p for s in sync_tti if (p := terminate_phases(s, events)) is not None]
        lines += ["", "profile (instrumented daemon: a little slower than a plain run)", ""]
        for key, title, metric in (
            ("tti", "TTI (sync)", "tti_sync"),
            ("exec", "exec round trip (sync)", "exec_rt_sync"),
            ("terminate", "terminate (sync)", "terminate_sync"),
        ):
            if metric in stats:
                lines += [*phase_table(title, profile[key], stats[metric].p50), ""]
    print("\n".join(lines))
    if args.json:
        doc = {
            "machine": facts,
            "load_average": run.loads,
            "runs": args.runs,
            "warmup": args.warmup,
            "groups": groups,
            "profiled": args.profile,
            "stats": {k: vars(s) for k, s in stats.items()},
            "targets": verdicts,
            "samples_ms": result["values"],
            "profile_phases_ms": profile,
            "left_behind": left,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
