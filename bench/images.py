"""shoal's image builder benchmark: cached resolves and the build time of one ``pip_install`` step.

Run as root from the repository root::

    .venv/bin/python -m bench.images [--runs 200] [--builds 5] [--json FILE]

It starts its own daemon on temporary directories (``bench.harness.BenchDaemon``:
the same set-up and clean-up as the latency benchmark), builds
``Image.debian_slim().pip_install("six")`` once, then measures:

``resolve cached``      resolving that image again, as a new process would: the SDK's per-process cache is
                        bypassed, so each sample is the whole ``POST /v1/images/resolve`` round trip (the
                        daemon walks the step cache: base image, host CA layer, pip step) — ``--runs`` samples
``resolve cached, 10``  the same for an image of 10 steps (env, workdir and 8 ``run_commands``)
``build pip six``       ``pip_install("six", force_build=True)``: the step is rebuilt each time (a build
                        sandbox starts, pip downloads six from PyPI through the host's proxy, the sandbox's
                        upper directory becomes the layer) — ``--builds`` samples; the step's own time (from
                        the daemon's progress event) and the whole resolve

Goal from the issue: cached ``Image.debian_slim().pip_install("six")`` resolve ≤ 50 ms.
Everything is cleaned up at the end, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import Stats, header_lines, parse_args_as_root, run_with_daemon

GOAL_RESOLVE_MS = 50.0


def measure(runs: int, builds: int) -> dict[str, list[float]]:
    import shoal
    from shoal.sdk import _image_resolve
    from shoal.sdk._sync import run_blocking
    from shoal.sdk.transport import default_client

    client = default_client()
    events: list[dict[str, Any]] = []
    original = _image_resolve.show_step

    def record(event: dict[str, Any]) -> None:
        events.append(event)
        original(event)

    _image_resolve.show_step = record

    def resolve(image: shoal.Image) -> float:
        t0 = time.perf_counter()
        run_blocking(_image_resolve.resolve(image._ref, image._steps, client, {}))
        return (time.perf_counter() - t0) * 1000

    six = shoal.Image.debian_slim().pip_install("six")
    deep = shoal.Image.debian_slim().env({"BENCH": "1"}).workdir("/srv")
    for i in range(8):
        deep = deep.run_commands(f"echo {i} > step-{i}")
    print("building the images once …", file=sys.stderr, flush=True)
    resolve(six)
    resolve(deep)
    values: dict[str, list[float]] = {"resolve_ms": [], "resolve_deep_ms": [], "build_step_s": [], "build_total_s": []}
    for _ in range(20):  # warm-up
        resolve(six)
    print(f"{runs} cached resolves of each …", file=sys.stderr, flush=True)
    for _ in range(runs):
        values["resolve_ms"].append(resolve(six))
        values["resolve_deep_ms"].append(resolve(deep))
    print(f"{builds} forced builds of the pip step …", file=sys.stderr, flush=True)
    forced = shoal.Image.debian_slim().pip_install("six", force_build=True)
    for _ in range(builds):
        events.clear()
        total = resolve(forced) / 1000
        built = [e for e in events if e.get("status") == "built" and "pip install" in str(e.get("label"))]
        if not built:
            raise RuntimeError(f"the forced build reported no built pip step: {events}")
        values["build_step_s"].append(float(built[-1]["seconds"]))
        values["build_total_s"].append(total)
    return values


ROWS = (
    ("resolve_ms", "resolve cached: debian_slim().pip_install('six') (ms)", 2),
    ("resolve_deep_ms", "resolve cached: 10-step image (ms)", 2),
    ("build_step_s", "build pip_install('six'): the step (s)", 2),
    ("build_total_s", "build pip_install('six'): whole resolve (s)", 2),
)


def report(values: dict[str, list[float]], facts: dict[str, Any], loads: dict[str, Any]) -> str:
    lines = [
        *header_lines(facts, loads),
        "",
        f"{'measurement':52} {'n':>4} {'p50':>8} {'p95':>8} {'min':>8} {'max':>8}",
    ]
    for key, label, d in ROWS:
        v = values.get(key) or []
        if not v:
            continue
        s = Stats.of(v)
        lines.append(f"{label:52} {len(v):4d} {s.p50:8.{d}f} {s.p95:8.{d}f} {s.min:8.{d}f} {s.max:8.{d}f}")
    p50 = Stats.of(values["resolve_ms"]).p50
    verdict = "PASS" if p50 <= GOAL_RESOLVE_MS else "MISS"
    lines += ["", f"goal: cached resolve ≤ {GOAL_RESOLVE_MS:.0f} ms: p50 {p50:.2f} ms {verdict}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="cached resolves of each image (default 200)")
    parser.add_argument("--builds", type=int, default=5, help="forced builds of the pip step (default 5)")
    parser.add_argument("--json", type=Path, help="write machine facts, load and every sample here")
    args = parse_args_as_root(parser, argv)
    run = run_with_daemon(lambda daemon: measure(args.runs, args.builds))
    if not run.ok:
        return run.exit_code
    print(report(run.value, run.facts, run.loads))
    if args.json:
        run.write_json(args.json, args)
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
