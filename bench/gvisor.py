"""shoal's gVisor benchmark: sandboxes under runsc, and memory snapshots, beside bare ``runsc`` of the same bundle.

Run as root from the repository root::

    .venv/bin/python -m bench.gvisor [--runs 20] [--mib 256] [--json FILE]

It starts its own daemon on temporary directories (``bench.harness.BenchDaemon``, gVisor by default, a warm pool of
one that only the pooled TTI uses: the other creates ask for what a pooled sandbox lacks) and
copies a live gVisor sandbox's bundle for the floors (same runsc flags, platform and mounts, minus shoal's own
``/.shoal`` binds and the network; its root an overlay of the same image layers).  Then, ``--runs`` samples each:

``TTI``                 ``Sandbox.create(runtime="gvisor")`` → ``exec("echo", "ready")`` → first output, cold
``TTI pooled``          the same from the warm pool (a ready sandbox each time; goal: p50 ≤ 0.5x the floor)
``exec``                ``exec("true").wait()`` round trip in one gVisor sandbox
``floor run``           bare ``runsc run`` of ``/bin/true`` on the copied bundle (the TTI goal: p50 ≤ 1.5x this)
``snapshot``            ``sb._experimental_snapshot()`` of a sandbox whose Python process holds a little memory
``restore``             ``Sandbox._experimental_from_snapshot(snap)`` → it runs, its agent connected
``floor checkpoint``    bare ``runsc checkpoint --leave-running`` of the same Python process in the floor bundle
``floor restore``       bare ``runsc restore --detach`` of that checkpoint (the goal: snapshot and restore p50 ≤ 1.3x)
``… N MiB``             the same four with ``--mib`` MiB of the process's memory touched (fewer samples)

Everything is cleaned up at the end, on errors and on Ctrl-C: sandboxes, containers, mounts and cgroups.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    BenchDaemon,
    Stats,
    _remove_cgroup_tree,
    header_lines,
    ms,
    now_ns,
    parse_args_as_root,
    run_with_daemon,
    stats_lines,
)
from shoal.runtime import rootfs
from shoal.runtime.gvisor import GvisorRuntime

STORED_ID = 100000
TTI_GOAL = 1.5
SNAPSHOT_GOAL = 1.3
POOL_GOAL = 0.5
"""The issue's "far below" the floor for a TTI from the gVisor warm pool, made a number."""


def holder(mib: int) -> list[str]:
    """A Python process that touches ``mib`` MiB, says ready and sleeps."""
    code = (
        "import sys, time\n"
        f"b = bytearray({mib} << 20)\n"
        "for i in range(0, len(b), 4096):\n    b[i] = 1\n"
        "print('ready', flush=True)\n"
        "time.sleep(3600)\n"
    )
    return ["python3", "-c", code]


class RunscFloor:
    """Bare runsc on a bundle copied from a live gVisor sandbox."""

    def __init__(self, root: Path, cgroup_parent: str) -> None:
        self.dir = root / "gvisor-floor"
        self.state = self.dir / "state"
        self.rootfs = self.dir / "rootfs"
        self.cgroup_parent = f"{cgroup_parent}-gvisor-floor"
        binary = shutil.which("runsc") or "/usr/bin/runsc"
        self.runsc = GvisorRuntime(binary, str(self.state))
        self.count = 0
        self.config: dict[str, Any] = {}

    def prepare(self, sandbox_bundle: Path, lowers: list[str]) -> None:
        """The floor's root and base config, from a running gVisor sandbox's bundle over its layers ``lowers``."""
        config = json.loads((sandbox_bundle / "config.json").read_text())
        self.rootfs.mkdir(parents=True, exist_ok=True)
        rootfs.mount_overlay(lowers, str(self.dir / "upper"), str(self.dir / "work"), str(self.rootfs), STORED_ID)
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        config["mounts"] = [
            m for m in config["mounts"] if not str(m.get("destination", "")).startswith(("/.shoal", "/tmp"))
        ]
        config["process"]["cwd"] = "/"
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
        self.config = config
        self.state.mkdir(parents=True, exist_ok=True)

    def _bundle(self, args: list[str]) -> tuple[str, Path]:
        self.count += 1
        cid = f"floor-{self.count}"
        bundle = self.dir / cid
        bundle.mkdir()
        config = json.loads(json.dumps(self.config))
        config["process"]["args"] = args
        config["linux"]["cgroupsPath"] = f"{self.cgroup_parent}/{cid}"
        (bundle / "config.json").write_text(json.dumps(config))
        return cid, bundle

    def _runsc(self, *args: str, out: Path | None = None) -> None:
        """One runsc command; ``out``: the file its output goes to (a detached sandbox keeps it open, so never a
        pipe), else its own log in the floor's directory."""
        argv = self.runsc._argv(*args, network="none", masked=args[0] in ("run", "restore"))
        log = out or self.dir / "runsc.log"
        with open(log, "ab") as f:
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"runsc {args[0]} failed: {log.read_text(errors='replace')[-2000:]}")

    def run_true(self) -> float:
        """One ``runsc run`` of /bin/true; its wall time in ms."""
        cid, bundle = self._bundle(["/bin/true"])
        t0 = now_ns()
        self._runsc("run", "--bundle", str(bundle), cid)
        took = ms(t0, now_ns())
        self._runsc("delete", "--force", cid)
        return took

    def start_holder(self, mib: int) -> str:
        """Start the memory holder detached; its container id once it said ready."""
        cid, bundle = self._bundle(holder(mib))
        out = bundle / "out"
        self._runsc("run", "--detach", "--bundle", str(bundle), cid, out=out)
        deadline = time.monotonic() + 120
        while b"ready" not in out.read_bytes():
            if time.monotonic() > deadline:
                raise RuntimeError("the floor's memory holder did not start")
            time.sleep(0.05)
        return cid

    def checkpoint(self, cid: str) -> tuple[float, Path]:
        """One ``runsc checkpoint --leave-running``; its wall time and image directory."""
        self.count += 1
        image = self.dir / f"image-{self.count}"
        t0 = now_ns()
        self._runsc("checkpoint", "--leave-running", "--image-path", str(image), cid)
        return ms(t0, now_ns()), image

    def restore(self, cid: str, image: Path) -> float:
        """One ``runsc restore --detach`` of ``image`` as a new container (then removed); its wall time."""
        self.count += 1
        new = f"floor-{self.count}"
        bundle = self.dir / cid
        t0 = now_ns()
        self._runsc("restore", "--detach", "--bundle", str(bundle), "--image-path", str(image), new, out=bundle / "out")
        took = ms(t0, now_ns())
        self._runsc("delete", "--force", new)
        return took

    def remove(self, cid: str) -> None:
        self._runsc("delete", "--force", cid)

    def cleanup(self) -> list[str]:
        """Delete what an interrupted run left; returns what is still there."""
        for c in self.state.glob("*.state") if self.state.is_dir() else []:
            cid = c.name.split("_sandbox:")[0]
            subprocess.run(self.runsc._argv("delete", "--force", cid), capture_output=True, check=False)
        rootfs.unmount(str(self.rootfs))
        left = [f"floor container {c}" for c in self.state.glob("*.state")] if self.state.is_dir() else []
        shutil.rmtree(self.dir, ignore_errors=True)
        return left + _remove_cgroup_tree(self.cgroup_parent)


COLD = {"cpu": 1.0}
"""What makes a create one the warm pool cannot serve (a CPU request of one CPU: the default weight)."""


def _pool_ready() -> int:
    from shoal.sdk._sync import run_blocking
    from shoal.sdk.transport import default_client

    return int(run_blocking(default_client().request("GET", "/v1/status"))["warm_pool"]["ready"])


def _tti(app: Any, pooled: bool = False) -> float:
    import shoal

    if pooled:
        deadline = time.monotonic() + 60
        while _pool_ready() < 1:  # each sample takes a ready sandbox (the refill is not timed)
            if time.monotonic() > deadline:
                raise RuntimeError("the warm pool did not refill within 60 s")
            time.sleep(0.02)
    t0 = now_ns()
    sb = shoal.Sandbox.create(app=app, runtime="gvisor", **({} if pooled else COLD))
    p = sb.exec("echo", "ready")
    first = next(iter(p.stdout))
    took = ms(t0, now_ns())
    if first != "ready\n":
        raise RuntimeError(f"unexpected output {first!r}")
    sb.terminate()
    return took


def _exec(sb: Any) -> float:
    t0 = now_ns()
    if sb.exec("true").wait() != 0:
        raise RuntimeError("exec true failed")
    return ms(t0, now_ns())


def _snapshot_rounds(
    app: Any, floor: RunscFloor, mib: int, runs: int, values: dict[str, list[float]], key: str
) -> None:
    """``runs`` rounds of snapshot and restore of a sandbox holding ``mib`` MiB, beside bare runsc's, into
    ``values`` under keys ending in ``key``."""
    import shoal

    sb = shoal.Sandbox.create(*holder(mib), app=app, runtime="gvisor", memory=max(1024, 2 * mib + 512), timeout=3600)
    cid = floor.start_holder(mib)
    try:
        if next(iter(sb.stdout)) != "ready\n":
            raise RuntimeError("the sandbox's memory holder did not start")
        for _ in range(runs):
            t0 = now_ns()
            snap = sb._experimental_snapshot()
            values[f"snapshot{key}"].append(ms(t0, now_ns()))
            t0 = now_ns()
            fork = shoal.Sandbox._experimental_from_snapshot(snap, name=None)
            values[f"restore{key}"].append(ms(t0, now_ns()))
            fork.terminate()
            took, image = floor.checkpoint(cid)
            values[f"floor_checkpoint{key}"].append(took)
            values[f"floor_restore{key}"].append(floor.restore(cid, image))
            shutil.rmtree(image, ignore_errors=True)
    finally:
        sb.terminate()
        floor.remove(cid)


def measure(daemon: BenchDaemon, floor: RunscFloor, runs: int, mib: int) -> dict[str, list[float]]:
    """Every sample, in ms."""
    import shoal

    app = shoal.App.lookup("bench-gvisor", create_if_missing=True)
    keys = ["tti", "tti_pooled", "exec", "floor_run"]
    keys += [f"{k}{s}" for s in ("", "_big") for k in ("snapshot", "restore", "floor_checkpoint", "floor_restore")]
    values: dict[str, list[float]] = {k: [] for k in keys}
    sb = shoal.Sandbox.create(app=app, runtime="gvisor", timeout=3600)
    try:
        floor.prepare(daemon.runtime_dir / "sandboxes" / sb.object_id / "bundle", daemon.image_lowers(sb.object_id))
        _tti(app), _tti(app, pooled=True), _exec(sb), floor.run_true()  # warm-up
        for _ in range(runs):
            values["tti"].append(_tti(app))
            values["tti_pooled"].append(_tti(app, pooled=True))
            values["exec"].append(_exec(sb))
            values["floor_run"].append(floor.run_true())
    finally:
        sb.terminate()
    _snapshot_rounds(app, floor, 8, runs, values, "")
    _snapshot_rounds(app, floor, mib, max(3, runs // 4), values, "_big")
    return values


ROWS = (
    ("tti", "TTI (create → first exec output), cold"),
    ("tti_pooled", "TTI, from the warm pool"),
    ("exec", "exec('true').wait()"),
    ("floor_run", "floor: runsc run /bin/true"),
    ("snapshot", "_experimental_snapshot(), small process"),
    ("floor_checkpoint", "floor: runsc checkpoint --leave-running"),
    ("restore", "_experimental_from_snapshot(), small"),
    ("floor_restore", "floor: runsc restore --detach"),
    ("snapshot_big", "_experimental_snapshot(), {mib} MiB touched"),
    ("floor_checkpoint_big", "floor: runsc checkpoint, {mib} MiB"),
    ("restore_big", "_experimental_from_snapshot(), {mib} MiB"),
    ("floor_restore_big", "floor: runsc restore, {mib} MiB"),
)


def report(values: dict[str, list[float]], mib: int, facts: dict[str, Any], loads: dict[str, Any]) -> str:
    lines = [*header_lines(facts, loads), "", *stats_lines(values, ROWS, mib=mib)]
    p50 = {k: Stats.of(v).p50 for k, v in values.items() if v}
    lines.append("")
    for what, ours, theirs, goal in (
        ("TTI / runsc run", "tti", "floor_run", TTI_GOAL),
        ("pooled TTI / runsc run", "tti_pooled", "floor_run", POOL_GOAL),
        ("snapshot / runsc checkpoint", "snapshot", "floor_checkpoint", SNAPSHOT_GOAL),
        ("restore / runsc restore", "restore", "floor_restore", SNAPSHOT_GOAL),
        (f"snapshot / checkpoint, {mib} MiB", "snapshot_big", "floor_checkpoint_big", SNAPSHOT_GOAL),
        (f"restore / restore, {mib} MiB", "restore_big", "floor_restore_big", SNAPSHOT_GOAL),
    ):
        if ours in p50 and theirs in p50:
            ratio = p50[ours] / p50[theirs]
            verdict = "PASS" if ratio <= goal else "MISS"
            lines.append(f"p50 ratio {what:36} {ratio:5.2f}x (goal ≤ {goal}x) {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gvisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="samples of each measurement (default 20)")
    parser.add_argument("--mib", type=int, default=256, help="MiB the big process touches (default 256)")
    parser.add_argument("--json", type=Path, help="write machine facts, load and every sample here")
    args = parse_args_as_root(parser, argv)
    if shutil.which("runsc") is None:
        print("runsc (gVisor) is not installed: make setup", file=sys.stderr)
        return 1
    daemon = BenchDaemon()
    daemon.env["SHOAL_WARM_POOL"] = "1"  # of gVisor sandboxes (the default here); cold creates say COLD
    daemon.env["SHOAL_DEFAULT_RUNTIME"] = "gvisor"
    floor = RunscFloor(daemon.root, daemon.cgroup_parent)
    run = run_with_daemon(lambda d: measure(d, floor, args.runs, args.mib), daemon=daemon, cleanup=floor.cleanup)
    if not run.ok:
        return run.exit_code
    print(report(run.value, args.mib, run.facts, run.loads))
    if args.json:
        run.write_json(args.json, args)
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
