"""shoal's snapshot benchmark: ``snapshot_filesystem()`` and time to interactive from a snapshot.

Run as root from the repository root::

    .venv/bin/python -m bench.snapshots [--rounds 5] [--runs 30] [--mib 100] [--json FILE]

It starts its own daemon on temporary directories (``bench.harness.BenchDaemon``:
the same set-up and clean-up as the latency benchmark), then measures:

``snapshot unchanged``   ``sb.snapshot_filesystem()`` of a sandbox that changed nothing (``--runs`` samples, one
                         sandbox): the whole SDK → daemon → SDK call
``snapshot N MiB``       the same for a fresh sandbox that wrote one N MiB file of random bytes (``dd …
                         conv=fsync``, so its data is on disk and in the page cache) — ``--rounds`` samples, a new
                         sandbox each
``snapshot 10k files``   the same for 10,000 files of ~5 bytes in one directory tree — ``--rounds`` samples
``freeze + thaw``        writing FROZEN then THAWED to the sandbox's cgroup freezer and waiting for each state
                         (what pausing the sandbox around a copy would add; shoal does not pause it)
``TTI base`` / ``TTI snapshot``  ``Sandbox.create(image=…)`` → ``exec("echo", "ready")`` → first output, from the
                         base image and from the N MiB snapshot, alternating, ``--runs`` samples each

Goals from the issue: 100 MiB snapshot ≤ 1 s; unchanged snapshot ≤ 50 ms.  Everything is cleaned up at the end,
on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import BenchDaemon, Stats, header_lines, ms, now_ns, parse_args_as_root, run_with_daemon, stats_lines

GOAL_BIG_MS = 1000.0
GOAL_UNCHANGED_MS = 50.0


def _run(sb: Any, script: str) -> None:
    p = sb.exec("sh", "-c", script)
    if p.wait() != 0:
        raise RuntimeError(f"{script!r} failed: {p.stderr.read()}")


def _timed_snapshot(sb: Any) -> tuple[float, Any]:
    t0 = now_ns()
    image = sb.snapshot_filesystem()
    return ms(t0, now_ns()), image


def _tti(app: Any, image: Any) -> float:
    import shoal

    t0 = now_ns()
    sb = shoal.Sandbox.create(app=app, image=image)
    p = sb.exec("echo", "ready")
    first = next(iter(p.stdout))
    took = ms(t0, now_ns())
    if first + p.stdout.read() != "ready\n":
        raise RuntimeError("unexpected output")
    sb.terminate()
    return took


def _freeze_thaw(cgroup_parent: str, sandbox_id: str) -> float | None:
    state = Path("/sys/fs/cgroup/freezer") / cgroup_parent.strip("/") / sandbox_id / "freezer.state"
    if not state.exists():
        return None
    t0 = now_ns()
    for want in ("FROZEN", "THAWED"):
        state.write_text(want)
        while state.read_text().strip() != want:
            time.sleep(0.0005)
    return ms(t0, now_ns())


def measure(daemon: BenchDaemon, rounds: int, runs: int, mib: int) -> dict[str, list[float]]:
    """Every sample, in ms."""
    import shoal

    app = shoal.App.lookup("bench-snapshots", create_if_missing=True)
    base = shoal.Image.debian_slim()
    values: dict[str, list[float]] = {k: [] for k in ("unchanged", "big", "small_files", "freeze", "tti_base", "tti")}
    warm = shoal.Sandbox.create(app=app, image=base, timeout=600)
    try:
        _timed_snapshot(warm)  # warm up the SDK and the daemon
        for _ in range(runs):
            values["unchanged"].append(_timed_snapshot(warm)[0])
            f = _freeze_thaw(daemon.cgroup_parent, warm.object_id)
            if f is not None:
                values["freeze"].append(f)
    finally:
        warm.terminate()
    snapshot = None
    for _ in range(rounds):
        sb = shoal.Sandbox.create(app=app, image=base, timeout=600)
        try:
            _run(sb, f"dd if=/dev/urandom of=/data.bin bs=1M count={mib} conv=fsync status=none")
            took, snapshot = _timed_snapshot(sb)
            values["big"].append(took)
        finally:
            sb.terminate()
        sb = shoal.Sandbox.create(app=app, image=base, timeout=600)
        try:
            _run(
                sb,
                "python3 -c \"import os\nfor d in range(100):\n  os.makedirs(f'/many/{d}')\n"
                "  for i in range(100):\n    open(f'/many/{d}/{i}', 'w').write(str(i))\"; sync",
            )
            values["small_files"].append(_timed_snapshot(sb)[0])
        finally:
            sb.terminate()
    assert snapshot is not None
    _tti(app, base), _tti(app, snapshot)  # warm-up
    for _ in range(runs):
        values["tti_base"].append(_tti(app, base))
        values["tti"].append(_tti(app, snapshot))
    return values


ROWS = (
    ("unchanged", "snapshot_filesystem(), unchanged sandbox"),
    ("big", "snapshot_filesystem(), {mib} MiB written"),
    ("small_files", "snapshot_filesystem(), 10,000 small files"),
    ("freeze", "freeze + thaw of the sandbox's cgroup"),
    ("tti_base", "TTI from the base image"),
    ("tti", "TTI from the {mib} MiB snapshot"),
)


def report(values: dict[str, list[float]], mib: int, facts: dict[str, Any], loads: dict[str, Any]) -> str:
    lines = [*header_lines(facts, loads), "", *stats_lines(values, ROWS, mib=mib)]
    big, unchanged = Stats.of(values["big"]).p50, Stats.of(values["unchanged"]).p50
    lines += [
        "",
        f"goal: {mib} MiB snapshot ≤ {GOAL_BIG_MS:.0f} ms: p50 {big:.0f} ms {'PASS' if big <= GOAL_BIG_MS else 'MISS'}",
        f"goal: unchanged snapshot ≤ {GOAL_UNCHANGED_MS:.0f} ms: p50 {unchanged:.1f} ms"
        f" {'PASS' if unchanged <= GOAL_UNCHANGED_MS else 'MISS'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="sandboxes written and snapshotted (default 5)")
    parser.add_argument("--runs", type=int, default=30, help="samples of the fast measurements (default 30)")
    parser.add_argument("--mib", type=int, default=100, help="MiB the big sandbox writes (default 100)")
    parser.add_argument("--json", type=Path, help="write machine facts, load and every sample here")
    args = parse_args_as_root(parser, argv)
    # TTI from a snapshot is compared with cold creates from the base: no warm pool for the base image.
    daemon = BenchDaemon()
    daemon.env["SHOAL_WARM_POOL"] = "0"
    run = run_with_daemon(lambda d: measure(d, args.rounds, args.runs, args.mib), daemon=daemon)
    if not run.ok:
        return run.exit_code
    print(report(run.value, args.mib, run.facts, run.loads))
    if args.json:
        run.write_json(args.json, args)
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
