"""shoal's gateway benchmark: TTI and exec round trip through the official ``modal`` client beside shoal's SDK.

Run as root from the repository root::

    .venv/bin/python -m bench.gateway [--runs N] [--json FILE]

It starts its own daemon (``bench.harness.BenchDaemon``, warm pool as configured by default) and a second
process running the unmodified official client against the daemon's gateway (``shoal gateway env``).  Each round
takes one sample of each measurement in turn, so a burst of load elsewhere hits all of them alike:

``tti``    ``Sandbox.create(app=app)`` → ``exec("echo", "hi")`` → its output read (the sandbox then terminated,
           untimed)
``exec``   ``exec("true").wait()`` in a sandbox made once

The goal (issue 16): the gateway adds at most 5 ms to each, p50 against p50.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from bench.harness import BenchDaemon, Stats, header_lines, parse_args_as_root, run_with_daemon, stats_lines

GOAL_MS = 5.0

_CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import modal

    app = modal.App.lookup("bench-gateway", create_if_missing=True)
    steady = modal.Sandbox.create(app=app, timeout=3600)
    print("ready", flush=True)
    for line in sys.stdin:
        what = line.strip()
        if what == "tti":
            t0 = time.perf_counter()
            sb = modal.Sandbox.create(app=app)
            out = sb.exec("echo", "hi").stdout.read()
            took = (time.perf_counter() - t0) * 1000
            sb.terminate()
            assert out == "hi\\n", out
        elif what == "exec":
            t0 = time.perf_counter()
            code = steady.exec("true").wait()
            took = (time.perf_counter() - t0) * 1000
            assert code == 0, code
        else:
            break
        print(json.dumps(took), flush=True)
    steady.terminate()
    """
)


class OfficialClient:
    """The official client in a process of its own, taking one measurement per line asked (``program``: what it
    runs, ``_CLIENT`` by default; ``wrapper``: the command it runs under, such as ``nsenter``)."""

    def __init__(self, env: dict[str, str], program: str = _CLIENT, wrapper: tuple[str, ...] = ()) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SHOAL_"))}
        environ.update(env)
        environ["MODAL_CONFIG_PATH"] = "/nonexistent/.modal.toml"
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-c", program],
            env=environ,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._line() != "ready":
            raise RuntimeError("the official client did not start")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the official client exited ({self.proc.wait()})")
        return line.strip()

    def take(self, what: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return float(json.loads(self._line()))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def measure(daemon: BenchDaemon, runs: int, warmup: int) -> dict[str, list[float]]:
    import time

    import shoal
    from shoal.sdk._sync import run_blocking
    from shoal.sdk.transport import default_client

    env = run_blocking(default_client().request("GET", "/v1/gateway"))["env"]
    app = shoal.App.lookup("bench-gateway", create_if_missing=True)
    steady = shoal.Sandbox.create(app=app, timeout=3600)
    client = OfficialClient(env)
    values: dict[str, list[float]] = {k: [] for k in ("sdk_tti", "gateway_tti", "sdk_exec", "gateway_exec")}

    def sdk_tti() -> float:
        t0 = time.perf_counter()
        sb = shoal.Sandbox.create(app=app)
        out = sb.exec("echo", "hi").stdout.read()
        took = (time.perf_counter() - t0) * 1000
        sb.terminate()
        assert out == "hi\n", out
        return took

    def sdk_exec() -> float:
        t0 = time.perf_counter()
        code = steady.exec("true").wait()
        took = (time.perf_counter() - t0) * 1000
        assert code == 0, code
        return took

    try:
        for r in range(warmup + runs):
            # Alternate which goes first, so that neither always meets the pool just refilled.
            order = [("sdk_tti", sdk_tti), ("gateway_tti", lambda: client.take("tti"))]
            for key, fn in order if r % 2 == 0 else order[::-1]:
                took = fn()
                if r >= warmup:
                    values[key].append(took)
                time.sleep(0.1)  # let the warm pool refill
            for key, fn in (("sdk_exec", sdk_exec), ("gateway_exec", lambda: client.take("exec"))):
                took = fn()
                if r >= warmup:
                    values[key].append(took)
    finally:
        client.close()
        steady.terminate()
    return values


ROWS = (
    ("sdk_tti", "TTI, shoal's SDK"),
    ("gateway_tti", "TTI, official client through the gateway"),
    ("sdk_exec", "exec('true').wait(), shoal's SDK"),
    ("gateway_exec", "exec('true').wait(), official client"),
)


def report(values: dict[str, list[float]], facts: dict[str, Any], loads: dict[str, Any]) -> str:
    lines = [*header_lines(facts, loads), "", *stats_lines(values, ROWS), ""]
    for what in ("tti", "exec"):
        added = Stats.of(values[f"gateway_{what}"]).p50 - Stats.of(values[f"sdk_{what}"]).p50
        verdict = "PASS" if added <= GOAL_MS else "MISS"
        lines.append(f"p50 added by the gateway, {what:5} {added:+7.1f} ms (goal ≤ +{GOAL_MS:.0f} ms) {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="samples of each measurement (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--json", type=Path, help="write machine facts, load and every sample here")
    args = parse_args_as_root(parser, argv)
    run = run_with_daemon(lambda daemon: measure(daemon, args.runs, args.warmup))
    if not run.ok:
        return run.exit_code
    print(report(run.value, run.facts, run.loads))
    if args.json:
        run.write_json(args.json, args)
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
