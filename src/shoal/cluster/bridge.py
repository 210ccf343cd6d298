"""The daemon's link to Ray, in a process of its own (``python -m shoal.cluster.bridge ADDRESS``).

Ray's driver brings threads, a core worker and a few hundred MiB that have no place in the daemon's event loop
(which also reaps sandbox processes as a subreaper): the daemon talks to this process instead, one JSON object
per line on its standard input, one answer per line on its standard output, in order, each answer carrying its
request's ``id``::

    {"op": "hello"}                          → {"ok": true, "value": {"ray_node_id": …, "ray_version": …}}
    {"op": "nodes"}                          → {"ok": true, "value": [{"ray_node_id", "alive", "address",
                                                 "resources", "labels", "shoal"}, …]}
    {"op": "beat", "info": {…}, "started": {id: {…}}, "ended": [id, …]}
                                             → register, record sandboxes started and ended here since the
                                               last beat, then nodes (what the daemon sends each second)
    {"op": "where", "sandbox_id": "sb-…"}    → the name of the node a running sandbox was recorded on, or null
    {"op": "lost", "node": "NAME"}           → what that node recorded of its running sandboxes: [{…}, …]
    {"op": "claim", "key": K, "value": V}    → V if K was free (now V's), else whose it is
    {"op": "release", "key": K, "value": V}  → K freed if it was V's

A request that fails answers ``{"ok": false, "error": "…"}``; the bridge keeps going.  It exits when its standard
input closes (the daemon stopped) or when it loses the Ray cluster for good.

What Ray holds for shoal (decision 0077), in its internal key-value store (namespace ``shoal``): each daemon's
registration under ``node:<ray node id>``, next to Ray's own view of the node (alive or not, resources, labels); and,
while a sandbox runs, ``sb:<sandbox id>`` → its node's name and ``on:<node>:<sandbox id>`` → what the API shows of it,
so that the other nodes can answer for the sandboxes of a node that died.  ``name:<kind>:<name>`` → the node that
holds the volume or secret of that name: a claim made before it is created, so two nodes never both create one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from typing import Any

NAMESPACE = "shoal"
NODE_KEY = "node:"
WHERE_KEY = "sb:"
ON_KEY = "on:"
NAME_KEY = "name:"


class NodeGone(Exception):
    """This bridge's Ray node left the cluster: the bridge exits, and the daemon starts a new one."""


def _source_address(address: str) -> str:
    """This machine's address on the way to ``address`` (HOST:PORT), as the kernel would route it."""
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host or address), int(port or 6379)))
        found: str = probe.getsockname()[0]
    return found


class Bridge:
    """One driver connection to the cluster, and the requests the daemon sends it."""

    def __init__(self, address: str) -> None:
        import ray

        self.ray = ray
        ray.init(
            address=address,
            # Ray looks for the local raylet among every process of the machine and may pick another's (daemons
            # sharing a host, scripts/local-cluster): name this one's by the address that reaches the head.
            _node_ip_address=_source_address(address),
            namespace=NAMESPACE,
            logging_level=logging.ERROR,
            log_to_driver=False,
            configure_logging=True,
            include_dashboard=False,
        )
        self.node_id: str = ray.get_runtime_context().get_node_id()
        self._registered = False

    def _ray_nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.ray.nodes()  # type: ignore[no-untyped-call]
        return nodes

    def _kv(self) -> Any:
        from ray.experimental import internal_kv

        return internal_kv

    def hello(self) -> dict[str, Any]:
        return {"ray_node_id": self.node_id, "ray_version": self.ray.__version__}

    def register(self, info: dict[str, Any]) -> None:
        """Record this daemon as the shoal node of this Ray node; drop older records of the same name whose Ray
        node is gone (the same machine, restarted, joins as a new Ray node)."""
        kv = self._kv()
        kv._internal_kv_put(NODE_KEY + self.node_id, json.dumps(info), namespace=NAMESPACE)
        if self._registered:
            return  # older records of this name were dropped when this bridge first registered
        self._registered = True
        alive = {n["NodeID"] for n in self._ray_nodes() if n.get("Alive")}
        for key in kv._internal_kv_list(NODE_KEY, namespace=NAMESPACE):
            other = key.decode()[len(NODE_KEY) :]
            if other == self.node_id or other in alive:
                continue
            raw = kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw is not None and json.loads(raw).get("name") == info.get("name"):
                kv._internal_kv_del(key, namespace=NAMESPACE)

    def record(self, node: str, started: dict[str, Any], ended: list[str]) -> None:
        """Note the sandboxes that started and ended on ``node`` (a sandbox's records live while it runs)."""
        kv = self._kv()
        for sandbox_id, shown in started.items():
            kv._internal_kv_put(WHERE_KEY + sandbox_id, node, namespace=NAMESPACE)
            kv._internal_kv_put(f"{ON_KEY}{node}:{sandbox_id}", json.dumps(shown), namespace=NAMESPACE)
        for sandbox_id in ended:
            kv._internal_kv_del(WHERE_KEY + sandbox_id, namespace=NAMESPACE)
            kv._internal_kv_del(f"{ON_KEY}{node}:{sandbox_id}", namespace=NAMESPACE)

    def lost(self, node: str) -> list[dict[str, Any]]:
        """The sandboxes ``node`` recorded as running."""
        kv = self._kv()
        out: list[dict[str, Any]] = []
        for key in kv._internal_kv_list(f"{ON_KEY}{node}:", namespace=NAMESPACE):
            raw = kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw is not None:
                out.append(json.loads(raw))
        return out

    def nodes(self) -> list[dict[str, Any]]:
        """Every Ray node Ray knows (dead ones too), each with its shoal registration (None: no daemon).

        Raises NodeGone where this bridge's own Ray node is no longer alive (the head restarted, the raylet died):
        the driver cannot come back from that, and a new bridge must join again."""
        kv = self._kv()
        out: list[dict[str, Any]] = []
        raw_nodes = self._ray_nodes()
        if not any(n["NodeID"] == self.node_id and n.get("Alive") for n in raw_nodes):
            raise NodeGone(f"this machine's Ray node {self.node_id} is no longer alive in the cluster")
        for node in raw_nodes:
            raw = kv._internal_kv_get(NODE_KEY + node["NodeID"], namespace=NAMESPACE)
            out.append(
                {
                    "ray_node_id": node["NodeID"],
                    "alive": bool(node.get("Alive")),
                    "address": node.get("NodeManagerAddress", ""),
                    "resources": {k: float(v) for k, v in (node.get("Resources") or {}).items()},
                    "labels": {str(k): str(v) for k, v in (node.get("Labels") or {}).items()},
                    "shoal": json.loads(raw) if raw is not None else None,
                }
            )
        return out

    def handle(self, request: dict[str, Any]) -> Any:
        op = request.get("op")
        if op == "hello":
            return self.hello()
        if op == "nodes":
            return self.nodes()
        if op == "beat":
            info = dict(request["info"])
            self.register(info)
            self.record(str(info.get("name")), dict(request.get("started") or {}), list(request.get("ended") or []))
            return self.nodes()
        if op == "where":
            raw = self._kv()._internal_kv_get(WHERE_KEY + str(request["sandbox_id"]), namespace=NAMESPACE)
            return raw.decode() if raw is not None else None
        if op == "lost":
            return self.lost(str(request["node"]))
        if op == "claim":
            key, value = NAME_KEY + str(request["key"]), str(request["value"])
            kv = self._kv()
            kv._internal_kv_put(key, value, overwrite=False, namespace=NAMESPACE)
            held = kv._internal_kv_get(key, namespace=NAMESPACE)
            return held.decode() if held is not None else None
        if op == "release":
            key, value = NAME_KEY + str(request["key"]), str(request["value"])
            kv = self._kv()
            held = kv._internal_kv_get(key, namespace=NAMESPACE)
            if held is not None and held.decode() == value:
                kv._internal_kv_del(key, namespace=NAMESPACE)
            return None
        raise ValueError(f"unknown request {op!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m shoal.cluster.bridge RAY_ADDRESS", file=sys.stderr)
        return 2
    # The answers get a descriptor of their own: Ray writes to standard output (a node's death, for one), and all
    # of that goes to standard error instead, which the daemon logs.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    bridge = Bridge(argv[0])
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"id": request.get("id"), "ok": True, "value": bridge.handle(request)}
        except NodeGone as exc:
            print(f"shoal Ray bridge: {exc}; exiting", file=sys.stderr)
            return 3
        except Exception as exc:  # one failed request is an answer, not the bridge's end
            answer = {"id": request.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
