"""A daemon's place in a shoal cluster (``shoal serve --ray``, decision 0077): its registration with Ray and its
view of the other nodes, refreshed every ``POLL_SECONDS``.

Ray is reached through ``shoal.cluster.bridge``, a process of its own; when that process dies (or Ray's head
cannot be reached) the view keeps its last nodes, says why in ``problem``, and the bridge is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from shoal.exception import InvalidError
from shoal.wire.cluster import ClusterInfo, ClusterNode

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""How often the node list is read from Ray (Ray itself takes ~10-15 s to call a silent node dead)."""
EARLY_BEAT = 0.1
"""Seconds after a sandbox starts until the beat that records it (rather than up to POLL_SECONDS)."""
START_TIMEOUT = 60.0
"""Seconds the first connection to Ray may take before the daemon gives up starting."""
REQUEST_TIMEOUT = 30.0
SLOW_BEAT = 2.0
"""A beat that takes longer than this is logged: the view of the other nodes is that old."""
RESTART_DELAY = 2.0
RESTART_DELAY_MAX = 30.0
"""Joining again waits RESTART_DELAY, doubling after each failure up to this (each try starts a Ray driver)."""


class BridgeError(Exception):
    """The bridge process failed a request, or is gone."""


class _BridgeProcess:
    """The running ``shoal.cluster.bridge`` process: requests written one per line, answers matched by id (a caller
    that gives up — a cancelled API call — leaves its answer to be read and dropped, not taken by the next)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, address: str) -> _BridgeProcess:
        # Ray's C++ core logs each failed reconnection; only errors reach the daemon's log.
        env = {**os.environ, "RAY_BACKEND_LOG_LEVEL": "error", "RAY_USAGE_STATS_ENABLED": "0"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shoal.cluster.bridge",
            address,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=16 << 20,
            env=env,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    answer = json.loads(line)
                except ValueError:
                    log.warning("cluster: the Ray bridge wrote something other than an answer: %r", line[:200])
                    continue
                waiter = self._waiting.pop(answer.get("id"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
        except OSError as exc:
            log.warning("cluster: the Ray bridge's answers broke off: %s", exc)
        error = BridgeError(f"the Ray bridge exited ({await self.proc.wait()})")
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._waiting.clear()

    async def request(self, op: str, timeout: float = REQUEST_TIMEOUT, **fields: Any) -> Any:
        assert self.proc.stdin is not None
        if self._reader.done():
            raise BridgeError(f"the Ray bridge exited ({self.proc.returncode})")
        self._next += 1
        key = self._next
        waiter = self._waiting[key] = asyncio.get_running_loop().create_future()
        try:
            self.proc.stdin.write(json.dumps({"id": key, "op": op, **fields}).encode() + b"\n")
            await self.proc.stdin.drain()
            answer = await asyncio.wait_for(waiter, timeout)
        except (OSError, TimeoutError) as exc:
            raise BridgeError(f"Ray bridge: {type(exc).__name__} {exc}") from None
        finally:
            self._waiting.pop(key, None)
        if not answer.get("ok"):
            raise BridgeError(str(answer.get("error")))
        return answer.get("value")

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        await self._reader


def died(node: str) -> str:
    """What a sandbox of a node that Ray lost reads as having ended with (every node's API and gateway say it)."""
    return f"the sandbox's node {node} died (Ray lost it); its processes ended with it"


class Membership:
    """This daemon registered as a node of the cluster at ``address``, and the nodes it sees."""

    def __init__(self, address: str, info: dict[str, Any], load: Callable[[], int]) -> None:
        self.address = address
        self.info = info
        """What this daemon registers: ``name``, ``url``, ``labels``, ``max_sandboxes``, ``version``, ``gateway``
        once its gateway listens (and ``live``, from ``load``, each time it registers again: every poll)."""
        self.load = load
        self.ray_node_id: str | None = None
        self.nodes: list[ClusterNode] = []
        self.slots: int | None = None
        """This node's ``shoal_slot`` Ray resource, where its Ray node was started with one: the most sandboxes
        this daemon takes (``Manager``'s admission), as placement reads it."""
        self.problem: str | None = None
        self._bridge: _BridgeProcess | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._refreshed = asyncio.Event()
        """Set by each beat that read the nodes (``fresh`` waits for the next)."""
        self._started: dict[str, dict[str, Any]] = {}
        self._ended: set[str] = set()
        """Sandboxes that started or ended here since the last beat (recorded in Ray with the next one)."""

    async def start(self) -> None:
        """Connect, register and read the nodes once (InvalidError, saying why, where Ray cannot be reached)."""
        try:
            await asyncio.wait_for(self._connect(), START_TIMEOUT)
        except (BridgeError, TimeoutError) as exc:
            if self._bridge is not None:
                await self._bridge.close()
                self._bridge = None
            raise InvalidError(
                f"cannot join the Ray cluster at {self.address}: {exc or 'no answer in time'}; is `ray start` running"
                " on this machine, joined to that head?"
            ) from None
        log.info(
            "cluster: node %s (Ray node %s) joined %s; %d nodes alive",
            self.info["name"],
            self.ray_node_id,
            self.address,
            sum(n.alive for n in self.nodes),
        )
        self._task = asyncio.create_task(self._poll())

    async def _connect(self) -> None:
        self._bridge = await _BridgeProcess.start(self.address)
        hello = await self._bridge.request("hello", timeout=START_TIMEOUT)
        self.ray_node_id = str(hello["ray_node_id"])
        await self._refresh()

    def sandbox_started(self, sandbox_id: str, shown: dict[str, Any]) -> None:
        """Record, with a beat sent soon (``EARLY_BEAT``), that this node runs ``sandbox_id`` (``shown``: its
        ``SandboxInfo``): the sooner Ray holds it, the smaller the window in which a node's death loses it."""
        self._started[sandbox_id] = shown
        self._ended.discard(sandbox_id)
        self._wake.set()

    def register(self, **fields: Any) -> None:
        """Add ``fields`` to what this daemon registers (its gateway's addresses), sent with a beat soon."""
        self.info.update(fields)
        self._wake.set()

    def sandbox_ended(self, sandbox_id: str) -> None:
        if self._started.pop(sandbox_id, None) is None:
            self._ended.add(sandbox_id)

    async def _refresh(self) -> None:
        assert self._bridge is not None
        started, ended = self._started, self._ended
        self._started, self._ended = {}, set()
        try:
            raw = await self._bridge.request(
                "beat",
                info={**self.info, "live": self.load(), "said_at": time.time()},
                started=started,
                ended=sorted(ended),
            )
        except BaseException:
            self._started = {**started, **self._started}  # sent again with the next beat
            self._ended |= ended - set(self._started)
            raise
        self.nodes = sorted((self._node(n) for n in raw), key=lambda n: (not n.alive, n.name))
        mine: dict[str, Any] = next((n for n in raw if n.get("ray_node_id") == self.ray_node_id), {})
        slots = (mine.get("resources") or {}).get("shoal_slot")
        self.slots = int(slots) if slots else None
        self.problem = None
        self._refreshed.set()

    def _node(self, raw: dict[str, Any]) -> ClusterNode:
        shoal = raw.get("shoal") or {}
        slots = raw.get("resources", {}).get("shoal_slot") or shoal.get("max_sandboxes") or 0
        return ClusterNode(
            name=str(shoal.get("name") or raw["ray_node_id"]),
            ray_node_id=str(raw["ray_node_id"]),
            address=str(raw.get("address", "")),
            alive=bool(raw.get("alive")) and bool(shoal),
            url=shoal.get("url"),
            gateway=shoal.get("gateway"),
            gateway_blocks=shoal.get("gateway_blocks"),
            labels={str(k): str(v) for k, v in (shoal.get("labels") or {}).items()},
            slots=int(slots),
            live=int(shoal.get("live") or 0),
            said_at=float(shoal.get("said_at") or 0.0),
            this=raw["ray_node_id"] == self.ray_node_id,
        )

    async def _poll(self) -> None:
        delay = RESTART_DELAY
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
                await asyncio.sleep(EARLY_BEAT)  # a burst of creates goes in one beat
            self._wake.clear()
            try:
                if self._bridge is None:
                    await self._connect()
                    log.info("cluster: joined %s again", self.address)
                else:
                    began = time.monotonic()
                    await self._refresh()
                    if time.monotonic() - began > SLOW_BEAT:
                        log.warning("cluster: a beat took %.1f s (Ray answered slowly)", time.monotonic() - began)
                delay = RESTART_DELAY
            except Exception as exc:
                if not isinstance(exc, BridgeError | TimeoutError | OSError):
                    log.exception("cluster: reading the cluster failed")
                if self.problem is None:
                    log.warning("cluster: lost the Ray cluster at %s: %s; trying again", self.address, exc)
                self.problem = str(exc) or type(exc).__name__
                if self._bridge is not None:
                    await self._bridge.close()
                    self._bridge = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX)

    async def fresh(self, timeout: float = 3 * POLL_SECONDS) -> None:
        """Wait (``timeout`` at most) for a beat that reads the nodes anew: what a node that missed something among
        the others (a node that joined meanwhile) looks again with."""
        self._refreshed.clear()
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._refreshed.wait(), timeout)

    async def where(self, sandbox_id: str) -> str | None:
        """The node a running sandbox was recorded on (None: none, or Ray cannot be asked now)."""
        if self._bridge is None:
            return None
        try:
            found = await self._bridge.request("where", sandbox_id=sandbox_id)
        except BridgeError:
            return None
        return str(found) if found is not None else None

    async def lost(self, node: str) -> list[dict[str, Any]]:
        """What ``node`` recorded of the sandboxes it ran (``SandboxInfo`` as JSON), for a node that died."""
        if self._bridge is None:
            return []
        try:
            found: list[dict[str, Any]] = await self._bridge.request("lost", node=node)
        except BridgeError:
            return []
        return found

    async def claim(self, key: str, value: str) -> str | None:
        """Claim ``key`` (``volume:NAME``, ``secret:NAME``) for ``value`` (a node) unless another holds it: who holds
        it now.  None where Ray cannot be asked (the caller goes on without the claim)."""
        if self._bridge is None:
            return None
        try:
            held = await self._bridge.request("claim", key=key, value=value)
        except BridgeError as exc:
            log.warning("cluster: could not claim %s: %s", key, exc)
            return None
        return str(held) if held is not None else None

    async def release(self, key: str, value: str) -> None:
        """Give up ``key`` if ``value`` holds it."""
        if self._bridge is not None:
            with contextlib.suppress(BridgeError):
                await self._bridge.request("release", key=key, value=value)

    def alive(self) -> list[ClusterNode]:
        """The nodes that are alive and reachable (this one too)."""
        return [n for n in self.nodes if n.alive and n.url]

    def view(self) -> ClusterInfo:
        """The cluster as ``GET /v1/cluster`` shows it."""
        return ClusterInfo(
            enabled=True,
            ray_address=self.address,
            node_name=str(self.info["name"]),
            nodes=list(self.nodes),
            problem=self.problem,
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._bridge is not None:
            await self._bridge.close()
            self._bridge = None
