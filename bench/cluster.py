"""shoal's cluster benchmark: TTI through the cluster's head beside TTI on one node, in the same run (issue 18).

Run as root from the repository root::

    .venv/bin/python -m bench.cluster [--runs N] [--json FILE]

It builds a three-node cluster on this machine with ``scripts/local-cluster up 3`` (each node its own network
namespace, Ray node and daemon) and removes it afterwards.  Each round takes one sample of each, in turn:

``node``   the SDK pointed at node1's own API, creating there (``node_labels`` naming node1): one daemon, as without
           a cluster, but for its cluster step (which has nothing to do)
``head``   the SDK pointed at the head (node0), creating on node1 the same way: the head places the create and
           passes it on, then passes on the exec and its output
``placed`` the SDK pointed at the head with no labels: the head places the create by room (any of the three)

TTI is ``Sandbox.create`` → ``exec("echo", "hi")`` → its output read (the sandbox then terminated, untimed).  The
goal (issue 18): the head adds at most 10 ms, p50 against p50.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import Stats, machine_facts, machine_line, parse_args_as_root, stats_lines

GOAL_MS = 10.0
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local-cluster"
NODE1_URL = "http://10.251.0.11:8700"

ROWS = (
    ("node", "TTI on one node (node1's own API)"),
    ("head", "TTI through the head, created on node1"),
    ("placed", "TTI through the head, placed by room"),
)


def _tti(app: Any, labels: dict[str, str] | None) -> float:
    import shoal

    options = {"node_labels": labels} if labels else None
    t0 = time.perf_counter()
    sb = shoal.Sandbox.create(app=app, experimental_options=options)
    out = sb.exec("echo", "hi").stdout.read()
    took = (time.perf_counter() - t0) * 1000
    sb.terminate()
    assert out == "hi\n", out
    return took


def measure(head_url: str, token: str, runs: int, warmup: int) -> dict[str, list[float]]:
    import shoal

    values: dict[str, list[float]] = {key: [] for key, _ in ROWS}
    pin = {"shoal.io/node": "node1"}
    os.environ["SHOAL_TOKEN"] = token
    os.environ["SHOAL_URL"] = NODE1_URL
    node_app = shoal.App.lookup("bench-cluster", create_if_missing=True)
    os.environ["SHOAL_URL"] = head_url
    head_app = shoal.App.lookup("bench-cluster", create_if_missing=True)
    for r in range(warmup + runs):
        order = [
            ("node", NODE1_URL, node_app, pin),
            ("head", head_url, head_app, pin),
            ("placed", head_url, head_app, None),
        ]
        if r % 2:
            order.reverse()  # neither always meets node1's warm pool just refilled
        for key, url, app, labels in order:
            os.environ["SHOAL_URL"] = url
            took = _tti(app, labels)
            if r >= warmup:
                values[key].append(took)
            time.sleep(0.15)  # let the warm pools refill
    return values


def report(values: dict[str, list[float]], facts: dict[str, Any], loads: tuple[Any, Any]) -> str:
    lines = [
        machine_line(facts),
        "load average before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(*loads[0], *loads[1]),
        "cluster: scripts/local-cluster up 3 (head node0, workers node1 and node2, one machine)",
        "",
        *stats_lines(values, ROWS),
        "",
    ]
    added = Stats.of(values["head"]).p50 - Stats.of(values["node"]).p50
    verdict = "PASS" if added <= GOAL_MS else "MISS"
    lines.append(f"p50 added by the head (head - node)   {added:+7.1f} ms (goal ≤ +{GOAL_MS:.0f} ms) {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="samples of each measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--json", type=Path, help="write machine facts, load and every sample here")
    args = parse_args_as_root(parser, argv)
    facts = machine_facts()
    before = os.getloadavg()
    print("building the cluster (scripts/local-cluster up 3) …", file=sys.stderr, flush=True)
    os.environ["SHOAL_VENV_BIN"] = str(Path(sys.executable).parent)  # local-cluster runs this Python and its Ray
    up = subprocess.run([str(SCRIPT), "up", "3"], capture_output=True, text=True, timeout=600, check=False)
    if up.returncode != 0:
        print(up.stderr[-3000:], file=sys.stderr)
        subprocess.run([str(SCRIPT), "down"], capture_output=True, timeout=600, check=False)
        return 1
    env = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()[-2:])
    try:
        values = measure(env["SHOAL_URL"], env["SHOAL_TOKEN"], args.runs, args.warmup)
    except KeyboardInterrupt:
        return 130
    finally:
        down = subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=600, check=False)
        if down.returncode != 0:
            print(f"LEFT BEHIND? local-cluster down failed:\n{down.stderr[-2000:]}", file=sys.stderr)
    after = os.getloadavg()
    print(report(values, facts, (before, after)))
    if args.json:
        doc = {"machine": facts, "load_average": {"before": before, "after": after}, "values": values}
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
