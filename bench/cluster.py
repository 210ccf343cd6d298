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
``gw_node`` the official modal client in node1's namespace, pointed at node1's own gateway, creating there
``gw_head`` the official modal client in the head's namespace, pointed at the head's gateway, creating on node1:
           the head places the create, and its gateway passes the exec and its output to node1's

TTI is ``Sandbox.create`` → ``exec("echo", "hi")`` → its output read (the sandbox then terminated, untimed).  The
goal (issue 18): the head adds at most 10 ms, p50 against p50.

Then volumes across nodes (decision 0078), all through the head, with a volume of 16 files of 4 MiB made there:

``first_copy``  the first create on node2 that mounts it (node2 copies all 64 MiB), once
``vol_home``    TTI of a create on node0, the volume's home (a bind mount, as on one machine)
``vol_copy``    TTI of a create on node1, whose copy is brought in step (nothing changed: one listing)
``end_home``    ``terminate()`` of a sandbox on node0 that wrote 4 MiB into the volume
``end_copy``    the same on node1, which sends the 4 MiB back to node0 before ``terminate()`` returns
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

from bench.gateway import OfficialClient
from bench.harness import Stats, machine_facts, machine_line, parse_args_as_root, stats_lines

GOAL_MS = 10.0
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local-cluster"
NODE1_URL = "http://10.251.0.11:8700"

ROWS = (
    ("node", "TTI on one node (node1's own API)"),
    ("head", "TTI through the head, created on node1"),
    ("placed", "TTI through the head, placed by room"),
    ("gw_node", "TTI, modal client, node1's own gateway"),
    ("gw_head", "TTI, modal client, head's gateway → node1"),
)
_GATEWAY_CLIENT = """
import json, sys, time
import modal

app = modal.App.lookup("bench-cluster", create_if_missing=True)
print("ready", flush=True)
for line in sys.stdin:
    node = line.strip()
    if not node:
        break
    t0 = time.perf_counter()
    sb = modal.Sandbox.create(app=app, experimental_options={"node_labels": f"shoal.io/node={node}"})
    out = sb.exec("echo", "hi").stdout.read()
    took = (time.perf_counter() - t0) * 1000
    sb.terminate()
    assert out == "hi\\n", out
    print(json.dumps(took), flush=True)
"""
"""The official client's side of ``gw_node`` and ``gw_head``: a create on the node named on each line, timed."""
VOLUME_ROWS = (
    ("first_copy", "first create on node2 (copies 64 MiB, once)"),
    ("vol_home", "TTI with the volume, on its home node0"),
    ("vol_copy", "TTI with the volume, on node1 (a copy)"),
    ("end_home", "terminate after a 4 MiB write, node0"),
    ("end_copy", "terminate after a 4 MiB write, node1"),
)
VOLUME_FILES, VOLUME_FILE_MIB = 16, 4


def _on(node: str) -> dict[str, dict[str, str]]:
    return {"node_labels": {"shoal.io/node": node}}


def measure_volumes(head_url: str, runs: int) -> dict[str, list[float]]:
    import io

    import shoal

    os.environ["SHOAL_URL"] = head_url
    app = shoal.App.lookup("bench-cluster", create_if_missing=True)
    name = f"bench-cluster-{os.getpid()}"
    vol = shoal.Volume.from_name(name, create_if_missing=True)
    values: dict[str, list[float]] = {key: [] for key, _ in VOLUME_ROWS}
    try:
        with vol.batch_upload() as batch:
            for i in range(VOLUME_FILES):
                batch.put_file(io.BytesIO(os.urandom(VOLUME_FILE_MIB << 20)), f"/f{i}")
        t0 = time.perf_counter()
        sb = shoal.Sandbox.create(app=app, volumes={"/v": vol}, experimental_options=_on("node2"))
        assert sb.exec("test", "-s", f"/v/f{VOLUME_FILES - 1}").wait() == 0
        values["first_copy"].append((time.perf_counter() - t0) * 1000)
        sb.terminate()
        for r in range(runs + 1):
            for key, node in (("vol_home", "node0"), ("vol_copy", "node1")):
                t0 = time.perf_counter()
                sb = shoal.Sandbox.create(app=app, volumes={"/v": vol}, experimental_options=_on(node))
                found = sb.exec("test", "-s", "/v/f0").wait()
                took = (time.perf_counter() - t0) * 1000
                assert found == 0
                end_key = "end_home" if node == "node0" else "end_copy"
                sb.exec("dd", "if=/dev/urandom", f"of=/v/w-{node}-{r}", "bs=1M", "count=4").wait()
                t1 = time.perf_counter()
                sb.terminate()
                ended = (time.perf_counter() - t1) * 1000
                if r:  # the first round is untimed (each node's first copy, warm pools)
                    values[key].append(took)
                    values[end_key].append(ended)
                time.sleep(0.15)
        assert len(list(vol.listdir("/"))) == VOLUME_FILES + 2 * (runs + 1)  # every write was sent back
    finally:
        shoal.Volume.objects.delete(name)
    return values


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


def _official_client(node: int, head_url: str) -> OfficialClient:
    """The official client in node ``node``'s namespace, pointed at that node's gateway."""
    from shoal.sdk._sync import run_blocking
    from shoal.sdk.transport import default_client

    os.environ["SHOAL_URL"] = NODE1_URL if node == 1 else head_url
    env: dict[str, str] = run_blocking(default_client().request("GET", "/v1/gateway"))["env"]
    return OfficialClient(env, _GATEWAY_CLIENT, ("nsenter", f"--net=/run/netns/shoal-lc-node{node}", "--"))


def measure(head_url: str, token: str, runs: int, warmup: int) -> dict[str, list[float]]:

    values: dict[str, list[float]] = {key: [] for key, _ in ROWS}
    os.environ["SHOAL_TOKEN"] = token
    clients = {"gw_node": _official_client(1, head_url), "gw_head": _official_client(0, head_url)}
    try:
        return _measure(head_url, runs, warmup, values, clients)
    finally:
        for client in clients.values():
            client.close()


def _measure(
    head_url: str, runs: int, warmup: int, values: dict[str, list[float]], clients: dict[str, OfficialClient]
) -> dict[str, list[float]]:
    import shoal

    pin = {"shoal.io/node": "node1"}
    os.environ["SHOAL_URL"] = NODE1_URL
    node_app = shoal.App.lookup("bench-cluster", create_if_missing=True)
    os.environ["SHOAL_URL"] = head_url
    head_app = shoal.App.lookup("bench-cluster", create_if_missing=True)
    for r in range(warmup + runs):
        order: list[tuple[str, str, Any, dict[str, str] | None]] = [
            ("node", NODE1_URL, node_app, pin),
            ("head", head_url, head_app, pin),
            ("placed", head_url, head_app, None),
            ("gw_node", "", None, None),
            ("gw_head", "", None, None),
        ]
        if r % 2:
            order.reverse()  # neither always meets node1's warm pool just refilled
        for key, url, app, labels in order:
            if key in clients:
                took = clients[key].take("node1")
            else:
                os.environ["SHOAL_URL"] = url
                took = _tti(app, labels)
            if r >= warmup:
                values[key].append(took)
            time.sleep(0.15)  # let the warm pools refill
    return values


def report(
    values: dict[str, list[float]], volumes: dict[str, list[float]], facts: dict[str, Any], loads: tuple[Any, Any]
) -> str:
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
    added = Stats.of(values["gw_head"]).p50 - Stats.of(values["gw_node"]).p50
    verdict = "PASS" if added <= GOAL_MS else "MISS"
    lines.append(f"p50 added by the head's gateway       {added:+7.1f} ms (goal ≤ +{GOAL_MS:.0f} ms) {verdict}")
    lines += ["", f"volumes across nodes ({VOLUME_FILES} files of {VOLUME_FILE_MIB} MiB):", ""]
    lines += stats_lines(volumes, VOLUME_ROWS)
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
        volumes = measure_volumes(env["SHOAL_URL"], max(5, args.runs // 2))
    except KeyboardInterrupt:
        return 130
    finally:
        down = subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=600, check=False)
        if down.returncode != 0:
            print(f"LEFT BEHIND? local-cluster down failed:\n{down.stderr[-2000:]}", file=sys.stderr)
    after = os.getloadavg()
    print(report(values, volumes, facts, (before, after)))
    if args.json:
        doc = {
            "machine": facts,
            "load_average": {"before": before, "after": after},
            "values": values,
            "volumes": volumes,
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
