"""Any node's API serves the whole cluster (decision 0077): a call for a sandbox another node runs is passed to
that node, a create lands on the node with the most room, and a list gathers every node's sandboxes.

A passed-on call carries ``X-Shoal-Forwarded`` (the sending node's name): the node that receives it answers for
itself only, so a call is passed on at most once.  Nodes share one bearer token (each node's ``api-token``).
Which node runs a sandbox is asked of the other nodes the first time (``GET /v1/sandboxes/{id}``, all at once)
and then remembered.  Bodies and answers stream through (exec output, file transfers), and WebSockets (a
sandbox's terminal) pass messages both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web

from shoal.cluster.membership import POLL_SECONDS, died
from shoal.cluster.placement import needs_this_node, secret_ids
from shoal.engine.manager import Manager
from shoal.exception import (
    AlreadyExistsError,
    ConflictError,
    Error,
    InvalidError,
    ResourceExhaustedError,
    ServiceError,
)
from shoal.network.connect import pump
from shoal.server import errors
from shoal.server.routes import MANAGER
from shoal.wire.cluster import ClusterNode

if TYPE_CHECKING:
    from shoal.server.cluster_secrets import ClusterSecrets
    from shoal.server.cluster_volumes import ClusterVolumes

log = logging.getLogger(__name__)

FORWARDED = "X-Shoal-Forwarded"
OWNERS_KEPT = 100_000
"""Sandbox → node answers remembered (the oldest are forgotten)."""
LOOKUP_TIMEOUT = 5.0
VERDICT_SECONDS = 20.0
"""How long a call for a sandbox on a node that cannot be reached waits for Ray to call the node dead (Ray's own
health checks take ~5-15 s, by how its head is configured) before it fails with ServiceError."""
CLOCK_SLACK = 0.05
"""Seconds by which nodes' clocks may differ when a placement is matched against a node's last word on its load."""
PASSED_HEADERS = ("Content-Type", "Content-Length", "Content-Encoding", "Accept", "Accept-Encoding", "Idempotency-Key")
"""Request headers passed on as they came (the bearer token is the cluster's own)."""
WS_MAX_MESSAGE = 1 << 20
"""The largest WebSocket message passed between nodes (a terminal's paste is at most 64 KiB)."""
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length", "date", "server"}
)
"""Answer headers that belong to one connection (or that this node's server sets itself): every other is passed
back as the node that ran the call gave it (``X-Shoal-Offset``, ``X-Shoal-Exec-Id``, …)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


class ClusterRouter:
    """This node's side of the cluster's API: where calls go, and the passing on."""

    def __init__(self, mgr: Manager, token: str) -> None:
        self.mgr = mgr
        self.token = token
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, int] = {}
        """Creates this node has sent to each node and not yet heard back about (placement counts them)."""
        self._lost: dict[str, list[dict[str, Any]]] = {}
        """What each dead Ray node had recorded as running (read from Ray once: a dead node records nothing more)."""
        self._placed: dict[str, list[float]] = {}
        """When (wall clock) this node placed sandboxes on each other node: those placed after the node last said
        its load are not in it yet."""
        self.volumes: ClusterVolumes | None = None
        """Where volume calls go (``shoal.server.cluster_volumes``), once the daemon is in a cluster."""
        self.secrets: ClusterSecrets | None = None
        """Where named-secret calls go (``shoal.server.cluster_secrets``), once the daemon is in a cluster."""

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def others(self) -> list[ClusterNode]:
        """The other live nodes of the cluster."""
        assert self.mgr.cluster is not None
        return [n for n in self.mgr.cluster.alive() if not n.this]

    def _headers(self, request: web.Request | None) -> dict[str, str]:
        assert self.mgr.cluster is not None
        headers = {"Authorization": f"Bearer {self.token}", FORWARDED: str(self.mgr.cluster.info["name"])}
        if request is not None:
            headers.update({h: request.headers[h] for h in PASSED_HEADERS if h in request.headers})
        return headers

    async def ask(self, node: ClusterNode, method: str, path: str, body: Any = None) -> dict[str, Any] | None:
        """``node``'s JSON answer to a call of this node's own, where it is 200; None otherwise (unreachable too)."""
        assert node.url is not None
        try:
            async with self.session.request(
                method,
                node.url + path,
                headers=self._headers(None),
                json=body,
                timeout=aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT),
            ) as resp:
                if resp.status != 200:
                    return None
                found = await resp.json()
                return found if isinstance(found, dict) else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def first(
        self, method: str, path: str, body: Any = None, *, look_again: bool = False
    ) -> tuple[ClusterNode, dict[str, Any]] | None:
        """The first other live node (in node order) that answers 200 to the call, and its answer; asked at once.
        ``look_again``: where none does, wait for a fresh view of the nodes (one may have joined since) and ask the
        nodes not asked yet."""
        asked: set[str] = set()
        for attempt in range(2 if look_again else 1):
            if attempt:
                assert self.mgr.cluster is not None
                await self.mgr.cluster.fresh()
            others = [n for n in self.others() if n.ray_node_id not in asked]
            asked |= {n.ray_node_id for n in others}
            answers = await asyncio.gather(*(self.ask(n, method, path, body) for n in others))
            found = next(((n, a) for n, a in zip(others, answers, strict=True) if a is not None), None)
            if found is not None:
                return found
        return None

    async def gather(
        self, request: web.Request, handler: Handler, key: str, seen: Callable[[ClusterNode, dict[str, Any]], None]
    ) -> web.StreamResponse:
        """A list call answered by this node and every other live node, newest first (``key``: the answer's list;
        ``seen`` is told which node listed each item)."""
        local = await handler(request)
        if local.status != 200 or not isinstance(local, web.Response) or local.text is None:
            return local
        items: list[dict[str, Any]] = json.loads(local.text)[key]
        others = self.others()
        answers = await asyncio.gather(*(self.ask(n, "GET", request.rel_url.path_qs) for n in others))
        for node, answer in zip(others, answers, strict=True):
            for item in (answer or {}).get(key) or []:
                seen(node, item)
                items.append(item)
        items.sort(key=lambda i: int(i.get("created_at_us") or 0), reverse=True)
        return web.json_response({key: items})

    async def to_home(self, request: web.Request, what: str, home: str | None) -> web.StreamResponse | None:
        """Pass a call for ``what`` (a volume or secret another node holds) to ``home``, that node; None where no
        node holds it (this node answers NotFoundError)."""
        if home is None:
            return None
        node = next((n for n in self.others() if n.name == home), None)
        if node is None:
            raise ServiceError(f"node {home}, which holds {what}, is not in the cluster now: try again once it is back")
        return await self.proxy(request, node, None)

    # ------------------------------------------------------------------ names of the cluster's objects

    async def claim_name(self, kind: str, name: str) -> ClusterNode | None:
        """Claim the ``kind`` (volume, secret) name ``name`` for this node before it makes one: None where it may (its
        claim, or Ray cannot be asked now); else the node that holds the name, which makes it instead."""
        assert self.mgr.cluster is not None
        me = str(self.mgr.cluster.info["name"])
        held = await self.mgr.cluster.claim(f"{kind}:{name}", me)
        if held is None or held == me:
            return None
        node = next((n for n in self.others() if n.name == held), None)
        if node is None:
            raise ServiceError(
                f"the {kind} name {name!r} is held by node {held}, which is not alive now: try again once it is back"
            )
        return node

    async def made_where_claimed(
        self, request: web.Request, kind: str, name: str, body: bytes
    ) -> web.StreamResponse | None:
        """A call that makes the ``kind`` called ``name``: passed to the node that holds the name, if another does
        (None: this node has claimed it, and makes it)."""
        holder = await self.claim_name(kind, name)
        return await self.proxy(request, holder, None, body=body) if holder else None

    async def create_named(
        self,
        request: web.Request,
        kind: str,
        own: Callable[[str], bool],
        named: Callable[[str], Awaitable[tuple[ClusterNode, dict[str, Any]] | None]],
    ) -> web.StreamResponse | None:
        """A create by name (``{"name", "allow_existing"}``) of a ``kind`` the cluster holds: this node's own name,
        or a name no node holds yet and this node claims, is made here (None); another node's is that node's."""
        body = await request.read()
        data = json_object(body)
        name = str(data.get("name") or "")
        if not name or own(name):
            return None
        found = await named(name)
        if found is None:
            return await self.made_where_claimed(request, kind, name, body)
        if not data.get("allow_existing"):
            raise AlreadyExistsError(f"{kind.capitalize()} '{name}' already exists (on node {found[0].name})")
        return web.json_response(found[1])

    async def release_name(self, kind: str, name: str) -> None:
        """This node no longer holds a ``kind`` called ``name``."""
        assert self.mgr.cluster is not None
        await self.mgr.cluster.release(f"{kind}:{name}", str(self.mgr.cluster.info["name"]))

    # ------------------------------------------------------------------ where a sandbox runs

    def remember(self, sandbox_id: str, node: str) -> None:
        self._owners[sandbox_id] = node
        self._owners.move_to_end(sandbox_id)
        while len(self._owners) > OWNERS_KEPT:
            self._owners.popitem(last=False)

    async def locate(self, sandbox_id: str) -> ClusterNode | None:
        """The other node that runs (or ran) ``sandbox_id``, alive or dead; None: no node is known to."""
        assert self.mgr.cluster is not None
        name = self._owners.get(sandbox_id)
        if name is None:
            others = self.others()
            answers = await asyncio.gather(*(self._knows(n, sandbox_id) for n in others))
            name = next((n.name for n, knows in zip(others, answers, strict=True) if knows), None)
            if name is None:
                name = await self.mgr.cluster.where(sandbox_id)  # recorded while it ran: its node may be dead
            if name is None:
                return None
            self.remember(sandbox_id, name)
        return next((n for n in self.mgr.cluster.nodes if n.name == name and not n.this), None)

    async def _knows(self, node: ClusterNode, sandbox_id: str) -> bool:
        assert node.url is not None
        try:
            async with self.session.get(
                f"{node.url}/v1/sandboxes/{sandbox_id}",
                headers=self._headers(None),
                timeout=aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    # ------------------------------------------------------------------ passing calls on

    async def proxy(
        self, request: web.Request, node: ClusterNode, sandbox_id: str | None, body: bytes | None = None
    ) -> web.StreamResponse:
        """Send ``request`` to ``node`` and stream its answer back unchanged.  Where the node cannot be reached, wait
        (``VERDICT_SECONDS`` at most) for Ray to call it dead, and then answer for its sandbox as ended with it.

        ``sandbox_id`` None: the call is about something else the node holds (a volume); ``body``: the request's
        body where it was read already."""
        assert node.url is not None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.proxy_websocket(request, node, request.rel_url.path_qs)
        data: Any = body if body is not None else request.content if request.can_read_body else None
        try:
            async with self.session.request(
                request.method,
                node.url + request.rel_url.path_qs,
                headers=self._headers(request),
                data=data,
                allow_redirects=False,
            ) as upstream:
                answer = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        answer.headers.add(name, value)
                if upstream.content_length is not None:
                    answer.content_length = upstream.content_length
                await answer.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await answer.write(chunk)
                await answer.write_eof()
                return answer
        except aiohttp.ClientConnectorError as exc:
            if sandbox_id is None:
                raise ServiceError(f"node {node.name} ({node.url}), which holds it, did not answer: {exc}") from None
            dead = await self.verdict(node)
            if dead is not None:
                return await self.of_dead_node(request, dead, sandbox_id)
            raise ServiceError(
                f"node {node.name} ({node.url}), which runs this sandbox, did not answer: {exc}; the cluster still"
                " holds it alive: try again"
            ) from None
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceError(
                f"node {node.name} ({node.url}), which {'runs this sandbox' if sandbox_id else 'holds it'}, did not"
                f" answer: {exc or type(exc).__name__}"
            ) from None

    async def proxy_websocket(self, request: web.Request, node: ClusterNode, path_qs: str) -> web.StreamResponse:
        """Open the WebSocket ``path_qs`` on ``node`` and pass messages both ways until either side closes it (the
        terminal of a sandbox another node runs).  A refusal before the upgrade is passed back as it came."""
        assert node.url is not None
        try:
            upstream = await self.session.ws_connect(
                node.url + path_qs, headers=self._headers(None), heartbeat=30.0, max_msg_size=WS_MAX_MESSAGE
            )
        except aiohttp.WSServerHandshakeError as exc:
            refused = errors.from_http(exc.status, exc.message or "the WebSocket was refused")
            return web.json_response(errors.body_for(refused), status=exc.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServiceError(f"node {node.name} ({node.url}) did not answer: {exc or type(exc).__name__}") from None
        async with upstream:
            ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=WS_MAX_MESSAGE)
            await ws.prepare(request)
            pumps = [asyncio.ensure_future(pump(upstream, ws)), asyncio.ensure_future(pump(ws, upstream))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)  # either side closing ends both
            finally:
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                await upstream.close()
                await ws.close()
        return ws

    async def verdict(self, node: ClusterNode) -> ClusterNode | None:
        """``node`` as the cluster holds it once Ray has called it dead; None where it still holds it alive after
        ``VERDICT_SECONDS``."""
        assert self.mgr.cluster is not None
        deadline = time.monotonic() + VERDICT_SECONDS
        while time.monotonic() < deadline:
            now = next((n for n in self.mgr.cluster.nodes if n.ray_node_id == node.ray_node_id), None)
            if now is None or not now.alive:
                return now or node.model_copy(update={"alive": False})
            await asyncio.sleep(POLL_SECONDS / 4)
        return None

    async def of_dead_node(self, request: web.Request, node: ClusterNode, sandbox_id: str) -> web.StreamResponse:
        """Answer for a sandbox whose node died: it ended, killed with its node (returncode 137); anything that
        needs it running is a ConflictError saying so."""
        assert self.mgr.cluster is not None
        message = died(node.name)
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else ""
        shown = {
            ("GET", "/v1/sandboxes/{sandbox_id}"),
            ("GET", "/v1/sandboxes/{sandbox_id}/wait"),
            ("POST", "/v1/sandboxes/{sandbox_id}/terminate"),  # ended already: as for any finished sandbox
        }
        if (request.method, path) in shown:
            recorded = next((s for s in await self.lost_on(node) if s.get("sandbox_id") == sandbox_id), None)
            if recorded is not None:
                return web.json_response(_ended_with_node(recorded, message))
        raise ConflictError(message)

    # ------------------------------------------------------------------ apps

    async def lookup_app(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """``App.lookup`` of a name this node lacks: an app another node made is taken in here under its id (apps
        live in each node's store; decision 0077), so one name is one app across the cluster."""
        body = await request.read()
        try:
            name = json.loads(body).get("name")
        except (ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name:
            await self.take_in_app(name)
        return await handler(request)

    async def stop_app_elsewhere(self, app_id: str) -> None:
        """``app.stop()`` on every other live node too: each ends the app's sandboxes it runs (a node that never
        took the app in answers 404, and has none)."""
        path = f"/v1/apps/{app_id}/stop"
        nodes = self.others()
        answers = await asyncio.gather(*(self._stop_on(n, path) for n in nodes))
        failed = [n.name for n, ok in zip(nodes, answers, strict=True) if not ok]
        if failed:
            raise ServiceError(
                f"node(s) {', '.join(failed)} did not stop app {app_id}'s sandboxes there: stop the app again"
            )

    async def _stop_on(self, node: ClusterNode, path: str) -> bool:
        assert node.url is not None
        try:
            async with self.session.post(
                node.url + path, headers=self._headers(None), timeout=aiohttp.ClientTimeout(total=30)
            ) as resp:
                return resp.status in (200, 404)
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def place_for(self, data: dict[str, Any], here: Callable[[], Awaitable[T]]) -> T | dict[str, Any]:
        """``place`` for a caller other than this API (the gateway): another node's sandbox as its ``SandboxInfo``
        (JSON), and that node's refusal raised as the error it names."""
        answer = await self.place(data, json.dumps(data).encode(), here)
        if not isinstance(answer, web.Response):
            return answer
        body = answer.body if isinstance(answer.body, bytes) else b""
        if answer.status != 200:
            raise errors.from_body(answer.status, body)
        found = json.loads(body)
        if not isinstance(found, dict):
            raise ServiceError("a node answered a create with something other than a sandbox")
        return found

    async def take_in_app(self, name: str) -> None:
        """Where this node has no app called ``name`` and another node has, take that one in under its id."""
        if self.mgr.state.app_by_name(name) is not None:
            return
        others = self.others()
        answers = await asyncio.gather(*(self._app_named(n, name) for n in others))
        found = next((a for a in answers if a is not None), None)
        if found is not None:
            self.mgr.mirror_app(found, name, False)

    async def sandbox_by_name(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """``Sandbox.from_name``: this node's sandbox of that name, or another node's."""
        here = await handler(request)
        if here.status != 404:
            return here
        found = await self.first("GET", request.rel_url.path_qs)
        if found is None:
            return here
        self.remember(str(found[1].get("sandbox_id")), found[0].name)
        return web.json_response(found[1])

    async def _app_named(self, node: ClusterNode, name: str) -> str | None:
        assert node.url is not None
        try:
            async with self.session.post(
                f"{node.url}/v1/apps/lookup",
                headers=self._headers(None),
                json={"name": name},
                timeout=aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT),
            ) as resp:
                return str((await resp.json())["app_id"]) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------------ creates and lists

    async def create(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """``POST /v1/sandboxes`` placed by ``place``; a create that names objects only this node holds (volumes
        excepted: decision 0078; image builds and pulls) is created here."""
        assert self.mgr.cluster is not None
        body = await request.read()
        try:
            data = json.loads(body)
        except ValueError:
            return await handler(request)  # the route answers the malformed body
        if not isinstance(data, dict) or needs_this_node(data):
            return await handler(request)

        async def here() -> web.StreamResponse:
            answer = await handler(request)
            if answer.status == 429:
                raise ResourceExhaustedError("this node is full")
            return answer

        return await self.place(data, body, here, request)

    async def place(
        self, data: dict[str, Any], body: bytes, here: Callable[[], Awaitable[T]], request: web.Request | None = None
    ) -> T | web.Response:
        """Create on the node with the most room among those with the labels asked for; a node that turns the
        create away (no room, or not the image) passes it to the next.  The create's app and named secrets are made
        known there first.  ``here``: the create on this node, which raises ResourceExhaustedError where it has
        no room; another node's answer (``body`` sent as it is) comes back as that node gave it (200: the
        sandbox's ``SandboxInfo``)."""
        assert self.mgr.cluster is not None
        wanted = data.get("node_labels") or {}
        nodes = [n for n in self.mgr.cluster.alive() if all(n.labels.get(k) == v for k, v in wanted.items())]
        if not nodes:
            raise InvalidError(
                f"no live node of the cluster has the labels {wanted}: `shoal cluster nodes` lists each node's"
            )
        refused: web.Response | None = None
        for node in sorted(nodes, key=self._room, reverse=True):
            if node.this:
                with contextlib.suppress(ResourceExhaustedError):
                    return await here()
                continue
            self._inflight[node.name] = self._inflight.get(node.name, 0) + 1
            try:
                await self._mirror_app(node, str(data.get("app_id", "")))
                await self.mirror_secrets(node, secret_ids(data))
                answer = await self._create_on(request, node, self._portable(data, body))
            except ServiceError as exc:
                log.warning("cluster: create on node %s failed: %s; trying the next", node.name, exc)
                continue
            finally:
                self._inflight[node.name] -= 1
            if answer.status in (404, 429):  # no room, or not the image (built or pulled elsewhere): the next
                refused = answer if answer.status == 404 or refused is None else refused
                continue
            if answer.status == 200:
                self._placed.setdefault(node.name, []).append(time.time())
            return answer
        if refused is not None and refused.status == 404:
            return refused  # what it lacks, in the node's own words
        raise ResourceExhaustedError(
            f"every node of the cluster with room for it is full ({len(nodes)} tried): end some sandboxes or add nodes"
        )

    def _portable(self, data: dict[str, Any], body: bytes) -> bytes:
        """The create as another node can take it: an image id that is this node's ``Image.debian_slim()`` (the
        base, with the host's CAs) becomes that recipe, which the other node resolves to its own."""
        image = data.get("image")
        if not isinstance(image, dict) or image.get("kind") != "id" or image.get("steps"):
            return body
        version = self._debian_slim_version(str(image.get("image_id") or ""))
        if version is None:
            return body
        return json.dumps({**data, "image": {"kind": "debian_slim", "python_version": version}}).encode()

    def _debian_slim_version(self, image_id: str) -> str | None:
        row = self.mgr.state.image(image_id) if image_id else None
        if row is not None and row.recipe.get("kind") == "step" and row.recipe.get("op") == "host_cas":
            row = self.mgr.state.image(str(row.recipe.get("parent") or ""))
        if row is None or row.recipe.get("kind") != "debian_slim":
            return None
        version = row.recipe.get("python")
        return str(version) if version else None

    def _room(self, node: ClusterNode) -> tuple[int, bool]:
        if node.this:
            return node.slots - self.mgr.live_count(), True
        recent = [t for t in self._placed.get(node.name, []) if t > node.said_at - CLOCK_SLACK]
        self._placed[node.name] = recent
        return node.slots - node.live - len(recent) - self._inflight.get(node.name, 0), False

    async def _create_on(self, request: web.Request | None, node: ClusterNode, body: bytes) -> web.Response:
        """The node's answer to the create."""
        assert node.url is not None
        try:
            headers = {"Content-Type": "application/json"}
            headers.update((k, v) for k, v in self._headers(request).items() if k != "Content-Length")
            async with self.session.post(f"{node.url}/v1/sandboxes", headers=headers, data=body) as upstream:
                payload = await upstream.read()
                if upstream.status == 200:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        self.remember(json.loads(payload)["sandbox_id"], node.name)
                return web.Response(
                    status=upstream.status, body=payload, content_type=upstream.content_type or "application/json"
                )
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceError(f"node {node.name} did not answer: {exc or type(exc).__name__}") from None

    async def _mirror_app(self, node: ClusterNode, app_id: str) -> None:
        """Make the create's app known on ``node`` (apps live in each node's store; ids are the cluster's)."""
        row = self.mgr.state.app_row(app_id) if app_id else None
        if row is None:
            return  # the node answers NotFoundError, as this one would
        assert node.url is not None
        try:
            async with self.session.put(
                f"{node.url}/v1/cluster/apps/{app_id}",
                headers=self._headers(None),
                json={"name": row.name, "ephemeral": row.ephemeral},
            ) as resp:
                if resp.status != 200:
                    raise ServiceError(f"node {node.name} did not take app {app_id}: {await resp.text()}")
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceError(f"node {node.name} did not answer: {exc or type(exc).__name__}") from None

    async def mirror_secrets(self, node: ClusterNode, wanted: list[str]) -> None:
        """Give ``node`` the named secrets the create uses (sent to it in the clear over the cluster's API, sealed
        again there by its own key; decision 0077)."""
        assert node.url is not None and self.mgr.cluster is not None
        for secret_id in wanted:
            row, env = self.mgr.secrets.values(secret_id)  # NotFoundError: this node answers it, as it would here
            try:
                async with self.session.put(
                    f"{node.url}/v1/cluster/secrets/{secret_id}",
                    headers=self._headers(None),
                    json={
                        "name": row.name,
                        "env": env,
                        "updated_at": row.updated_at,
                        "home": row.home or str(self.mgr.cluster.info["name"]),
                    },
                ) as resp:
                    if resp.status != 200:
                        raise ServiceError(f"node {node.name} did not take secret {row.name!r}: {await resp.text()}")
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise ServiceError(f"node {node.name} did not answer: {exc or type(exc).__name__}") from None

    async def gather_list(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """This node's sandboxes and every other live node's, newest first; with ``include_finished``, those of
        dead nodes too (ended with their node)."""
        local = await handler(request)
        if local.status != 200 or not isinstance(local, web.Response) or local.text is None:
            return local
        items: list[dict[str, Any]] = json.loads(local.text)["sandboxes"]
        others = self.others()
        answers = await asyncio.gather(*(self.list_of(n, request.rel_url.path_qs) for n in others))
        for node, found in zip(others, answers, strict=True):
            for item in found:
                self.remember(str(item.get("sandbox_id")), node.name)
            items.extend(found)
        if request.query.get("include_finished", "") in ("1", "true"):
            tags = dict(t.partition("=")[::2] for t in request.query.getall("tag", []))
            items.extend(await self.of_dead_nodes(request.query.get("app_id"), tags))
        items.sort(key=lambda i: int(i.get("created_at_us") or 0), reverse=True)
        return web.json_response({"sandboxes": items})

    async def lost_on(self, node: ClusterNode) -> list[dict[str, Any]]:
        """What the dead ``node`` had recorded as running, as the API showed each sandbox."""
        assert self.mgr.cluster is not None
        if node.ray_node_id not in self._lost:
            found = await self.mgr.cluster.lost(node.name)
            if not found:
                return found  # maybe Ray could not be asked: ask again next time
            known = {n.ray_node_id for n in self.mgr.cluster.nodes}
            self._lost = {k: v for k, v in self._lost.items() if k in known}
            self._lost[node.ray_node_id] = found
        return self._lost[node.ray_node_id]

    async def of_dead_nodes(self, app_id: str | None, tags: dict[str, str]) -> list[dict[str, Any]]:
        """What dead nodes ran (of ``app_id``, with ``tags``), each ended with its node."""
        assert self.mgr.cluster is not None
        out: list[dict[str, Any]] = []
        for node in self.mgr.cluster.nodes:
            # A node that came back holds a new Ray node id; its old, dead one lost its registration (url) then.
            if node.alive or node.this or not node.url:
                continue
            for recorded in await self.lost_on(node):
                if app_id and recorded.get("app_id") != app_id:
                    continue
                if any((recorded.get("tags") or {}).get(k) != v for k, v in tags.items()):
                    continue
                message = died(node.name)
                out.append(_ended_with_node(recorded, message))
        return out

    async def list_of(self, node: ClusterNode, path_qs: str) -> list[dict[str, Any]]:
        """``node``'s own sandboxes as ``GET path_qs`` lists them ([] where it does not answer)."""
        assert node.url is not None
        try:
            async with self.session.get(
                node.url + path_qs,
                headers=self._headers(None),
                timeout=aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT),
            ) as resp:
                if resp.status != 200:
                    return []
                found: list[dict[str, Any]] = (await resp.json())["sandboxes"]
                return found
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            log.warning("cluster: node %s did not list its sandboxes", node.name)
            return []


def json_object(body: bytes) -> dict[str, Any]:
    """A request body's JSON object ({} for anything else: the route answers the malformed body)."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _ended_with_node(recorded: dict[str, Any], message: str) -> dict[str, Any]:
    """A dead node's sandbox as the API shows it: finished, killed (137) with its node."""
    return {
        **recorded,
        "state": "finished",
        "result": {"status": "internal_failure", "exitcode": 137, "message": message},
        "returncode": 137,
    }


ROUTER = web.AppKey("cluster_router", ClusterRouter)


def install(app: web.Application, mgr: Manager, token: str) -> ClusterRouter:
    """Give the API its cluster step's router (idle until the daemon joins a cluster), closed with the app."""
    router = ClusterRouter(mgr, token)
    app[ROUTER] = router

    async def close(_app: web.Application) -> None:
        await router.close()

    app.on_cleanup.append(close)
    return router


@web.middleware
async def route(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API's cluster step: pass a call on, or place a create, or gather a list (outside a cluster: nothing)."""
    mgr = request.app[MANAGER]
    if mgr.cluster is None:
        return await handler(request)
    router = request.app[ROUTER]
    try:
        for step in (router.volumes, router.secrets):
            if step is not None:
                answer = await step.route(request, handler)
                if answer is not None:
                    return answer
        if FORWARDED in request.headers:
            return await handler(request)
        sandbox_id = request.match_info.get("sandbox_id")
        if sandbox_id is not None:
            if mgr.knows(sandbox_id):
                return await handler(request)
            node = await router.locate(sandbox_id)
            if node is None:
                return await handler(request)
            if not node.alive:
                return await router.of_dead_node(request, node, sandbox_id)
            return await router.proxy(request, node, sandbox_id)
        resource = request.match_info.route.resource
        if resource is not None and (request.method, resource.canonical) == ("POST", "/v1/apps/lookup"):
            return await router.lookup_app(request, handler)
        if resource is not None and (request.method, resource.canonical) == ("POST", "/v1/apps/{app_id}/stop"):
            answer = await handler(request)
            if answer.status == 200:
                await router.stop_app_elsewhere(request.match_info["app_id"])
            return answer
        if resource is not None and resource.canonical == "/v1/apps/by-name/{app_name}/sandboxes/{name}":
            return await router.sandbox_by_name(request, handler)
        if resource is not None and resource.canonical == "/v1/sandboxes":
            if request.method == "POST":
                return await router.create(request, handler)
            if request.method == "GET":
                return await router.gather_list(request, handler)
        return await handler(request)
    except Error as exc:
        return web.json_response(errors.body_for(exc), status=errors.status_for(exc))
