"""The gateway serves the whole cluster (issue 18, decision 0081).

A call that names a sandbox, memory snapshot or volume another node holds is passed, as the client sent it, to that
node's gateway (``shoal.gateway.peers`` says which calls, and takes them there), and its answers come back the same
way.  The client keeps talking to the gateway it knows: router access is always this gateway's, and block URLs
point at the holding node's block listener.  A create is placed as the API places one (``ClusterRouter.place_for``,
over the nodes' HTTP API); lists and names look at every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from grpclib import GRPCError, Status
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler
from grpclib.exceptions import StreamTerminatedError
from modal_proto import api_pb2

from shoal import exception as exc
from shoal.cluster.membership import died
from shoal.cluster.placement import needs_this_node
from shoal.engine.manager import Manager
from shoal.engine.sandbox import Sandbox
from shoal.gateway.auth import GatewayAuth
from shoal.gateway.convert import grpc_status
from shoal.gateway.peers import (
    PEER_TOKEN,
    VOLUME_BY_NAME,
    Replayed,
    names_a_sandbox,
    names_a_snapshot,
    names_a_volume,
    sandbox_named,
)
from shoal.wire.cluster import ClusterNode
from shoal.wire.sandboxes import CreateSandbox, SandboxInfo

log = logging.getLogger(__name__)

T = TypeVar("T")
Elsewhere = Callable[[Any, Any], Awaitable[bool]]
"""Given a call's stream and first request: answers it from another node (True), or leaves it to this one."""


class NamedObjects(Protocol):
    """Where the API finds a volume or secret of the cluster (``shoal.server.cluster_volumes``, ``…_secrets``)."""

    async def named(self, name: str) -> tuple[ClusterNode, dict[str, Any]] | None: ...


class Volumes(NamedObjects, Protocol):
    """The cluster's volumes as the API finds them: by name, and the node that holds one by id."""

    async def locate(self, volume_id: str) -> str | None: ...


class ClusterAPI(Protocol):
    """What the gateway uses of its daemon's API in a cluster: ``shoal.server.cluster.ClusterRouter``, which the
    daemon hands it (the gateway stands beside the API, and does not import it)."""

    @property
    def volumes(self) -> Volumes | None: ...
    @property
    def secrets(self) -> NamedObjects | None: ...

    def others(self) -> list[ClusterNode]: ...
    def remember(self, sandbox_id: str, node: str) -> None: ...
    async def locate(self, sandbox_id: str) -> ClusterNode | None: ...
    async def verdict(self, node: ClusterNode) -> ClusterNode | None: ...
    async def lost_on(self, node: ClusterNode) -> list[dict[str, Any]]: ...
    async def place_for(self, data: dict[str, Any], here: Callable[[], Awaitable[T]]) -> T | dict[str, Any]: ...
    async def list_of(self, node: ClusterNode, path_qs: str) -> list[dict[str, Any]]: ...
    async def of_dead_nodes(self, app_id: str | None, tags: dict[str, str]) -> list[dict[str, Any]]: ...
    async def first(
        self, method: str, path: str, body: Any = None, *, look_again: bool = False
    ) -> tuple[ClusterNode, dict[str, Any]] | None: ...
    async def ask(self, node: ClusterNode, method: str, path: str, body: Any = None) -> dict[str, Any] | None: ...
    async def take_in_app(self, name: str) -> None: ...
    async def stop_app_elsewhere(self, app_id: str) -> None: ...
    async def claim_name(self, kind: str, name: str) -> ClusterNode | None: ...
    async def release_name(self, kind: str, name: str) -> None: ...


PASSED_METADATA = ("authorization",)
"""The client's metadata passed on with a call (the router's bearer token, which every node's gateway verifies)."""

_CONTROL = "/modal.client.ModalClient/"
_ROUTER_ACCESS = {_CONTROL + "SandboxGetCommandRouterAccess", _CONTROL + "TaskGetCommandRouterAccess"}
"""Answered here for another node's sandbox too: the client reaches that sandbox's router through this gateway."""
_ENDED_ANSWERS: dict[str, Callable[[api_pb2.GenericResult, str], Any]] = {
    _CONTROL + "SandboxWait": lambda r, app: api_pb2.SandboxWaitResponse(
        result=r, metadata=api_pb2.SandboxHandleMetadata(app_id=app, result=r)
    ),
    _CONTROL + "SandboxGetTaskId": lambda r, app: api_pb2.SandboxGetTaskIdResponse(task_result=r),
    _CONTROL + "SandboxTerminate": lambda r, app: api_pb2.SandboxTerminateResponse(existing_result=r),
}
"""How a call about a sandbox whose node died is answered (by its path, V2 or not); any other is a ConflictError."""
_CREATING = (api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING, api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS)


class GatewayCluster:
    """This node's gateway in its cluster: where a call goes, the passing on, and placement, lists and names."""

    def __init__(self, mgr: Manager, router: ClusterAPI, cluster_token: str, auth: GatewayAuth, url: str) -> None:
        self.mgr = mgr
        self.router = router
        self.token = cluster_token
        self.auth = auth
        self.url = url
        """This gateway's own URL, which is every sandbox's router for its clients."""
        self._channels: dict[str, Channel] = {}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    # ------------------------------------------------------------------ calls that name a sandbox

    def routed(self, inner: Any, bearer: bool = False) -> Any:
        """``inner``'s handlers with those that name a sandbox, a memory snapshot or a volume passed on to the node
        that holds it (``bearer``: the router's, whose calls carry a token signed for one sandbox, checked before
        anything is looked up)."""
        cluster = self

        class _Routed:
            def __mapping__(self) -> dict[str, Handler]:
                out = {}
                for path, h in inner.__mapping__().items():
                    decide: Elsewhere | None = None
                    if names_a_sandbox(h):
                        decide = functools.partial(cluster._sandbox_elsewhere, path, h, bearer)
                    elif names_a_snapshot(h):
                        decide = functools.partial(cluster._snapshot_elsewhere, path, h)
                    elif names_a_volume(h):
                        decide = functools.partial(cluster._volume_elsewhere, path, h)
                    elif path == VOLUME_BY_NAME:
                        decide = functools.partial(cluster._volume_name_elsewhere, path, h)
                    out[path] = h if decide is None else h._replace(func=cluster._routing(h, decide))
                return out

        return _Routed()

    def _routing(self, handler: Handler, elsewhere: Elsewhere) -> Callable[[Any], Awaitable[None]]:
        """``handler``'s function, which in a cluster first reads the call's first request and gives it to
        ``elsewhere``: that answers the call from another node (True), or leaves it to this one (False)."""
        local: Callable[[Any], Awaitable[None]] = handler.func

        async def call(stream: Any) -> None:
            first = await stream.recv_message()
            try:
                if first is not None and await elsewhere(stream, first):
                    return None
            except exc.Error as e:
                raise GRPCError(grpc_status(e), str(e)) from None
            return await local(Replayed(stream, first))

        return call

    async def _sandbox_elsewhere(self, path: str, handler: Handler, bearer: bool, stream: Any, first: Any) -> bool:
        sandbox_id = sandbox_named(first)
        if sandbox_id is None or self.mgr.knows(sandbox_id):
            return False
        if bearer:
            token = str(stream.metadata.get("authorization", "")).removeprefix("Bearer ").strip()
            if self.auth.verify(token) != sandbox_id:
                raise GRPCError(Status.PERMISSION_DENIED, f"this token is not for sandbox {sandbox_id}")
        node = await self.router.locate(sandbox_id)
        if node is None:
            return False  # no node has it: this one says so
        if not node.alive:
            await self._ended(stream, path, node, sandbox_id)
        elif path in _ROUTER_ACCESS:
            await stream.send_message(handler.reply_type(jwt=self.auth.sign(sandbox_id), url=self.url))
        else:
            await self._forward(stream, path, handler, node, first, sandbox_id)
        return True

    async def _snapshot_elsewhere(self, path: str, handler: Handler, stream: Any, first: Any) -> bool:
        """Each other node is asked in turn: the first whose gateway does not answer NOT_FOUND has it."""
        with contextlib.suppress(exc.NotFoundError):
            self.mgr.memory_snapshots.get(str(first.snapshot_id))
            return False
        for node in self.router.others():
            if not node.gateway:
                continue
            try:
                await self._forward(stream, path, handler, node, first, None)
                return True
            except GRPCError as e:
                if e.status not in (Status.NOT_FOUND, Status.UNAVAILABLE):
                    raise
        return False

    async def _volume_elsewhere(self, path: str, handler: Handler, stream: Any, first: Any) -> bool:
        volume_id = str(first.volume_id)
        row = self.mgr.volumes.find(volume_id) if volume_id else None
        if row is not None and row.home is None:
            return False  # this node's own
        volumes = self.router.volumes
        home = row.home if row is not None else await volumes.locate(volume_id) if volumes and volume_id else None
        if home is None:
            return False  # no node has it: this one says so
        node = next((n for n in self.router.others() if n.name == home), None)
        if node is None:
            raise GRPCError(Status.UNAVAILABLE, f"node {home}, which holds volume {volume_id}, is not alive")
        await self._forward(stream, path, handler, node, first, None)
        return True

    async def _volume_name_elsewhere(self, path: str, handler: Handler, stream: Any, first: Any) -> bool:
        name = str(first.deployment_name)
        holder = await self.volume_holder(name, first.object_creation_type in _CREATING) if name else None
        if holder is not None:
            await self._forward(stream, path, handler, holder, first, None)
        return holder is not None

    async def _forward(
        self, stream: Any, path: str, handler: Handler, node: ClusterNode, first: Any, sandbox_id: str | None
    ) -> None:
        """Pass the call to ``node``'s gateway and its answers back (router access in them made this gateway's);
        where that node cannot be reached, wait for Ray to call it dead and answer as for a sandbox that ended with
        it (``sandbox_id`` None: the call is about something else, and fails)."""
        channel = await self._channel(node)
        metadata = {PEER_TOKEN: self.token}
        for key in PASSED_METADATA:
            if key in stream.metadata:
                metadata[key] = str(stream.metadata[key])
        client_streams = handler.cardinality in (Cardinality.STREAM_UNARY, Cardinality.STREAM_STREAM)
        answered = False
        try:
            async with channel.request(
                path,
                handler.cardinality,
                handler.request_type,
                handler.reply_type,
                deadline=stream.deadline,
                metadata=metadata,
            ) as peer:
                await peer.send_message(first, end=not client_streams)
                pump = asyncio.ensure_future(_pass_requests(stream, peer)) if client_streams else None
                try:
                    while (reply := await peer.recv_message()) is not None:
                        answered = True
                        await stream.send_message(self._as_here(reply, node))
                        if not handler.cardinality.server_streaming:
                            break
                    await peer.recv_trailing_metadata()
                finally:
                    if pump is not None:
                        pump.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await pump
        except GRPCError as e:
            raise GRPCError(e.status, e.message, e.details) from None
        except (OSError, StreamTerminatedError) as e:
            if answered or sandbox_id is None:
                raise GRPCError(Status.UNAVAILABLE, f"node {node.name} stopped answering: {e}") from None
            dead = await self.router.verdict(node)
            if dead is not None:
                return await self._ended(stream, path, dead, sandbox_id)
            raise GRPCError(
                Status.UNAVAILABLE,
                f"node {node.name}, which runs sandbox {sandbox_id}, did not answer ({e}); the cluster still holds"
                " it alive: try again",
            ) from None

    def _as_here(self, reply: Any, node: ClusterNode) -> Any:
        """``node``'s reply with what points at that node's own loopback made reachable from here: router access
        is this gateway's; block URLs go to the node's block listener on its cluster address."""
        fields = reply.DESCRIPTOR.fields_by_name
        if "command_router_access" in fields:
            reply.command_router_access.url = self.url
        if "get_urls" in fields:
            urls = [_moved(u, node) for u in reply.get_urls]
            del reply.get_urls[:]
            reply.get_urls.extend(urls)
        if "missing_blocks" in fields:
            for block in reply.missing_blocks:
                block.put_url = _moved(block.put_url, node)
        return reply

    async def _channel(self, node: ClusterNode) -> Channel:
        if not node.gateway and self.mgr.cluster is not None:
            await self.mgr.cluster.fresh()  # a node registers its gateway with its second beat
            node = next((n for n in self.mgr.cluster.nodes if n.ray_node_id == node.ray_node_id), node)
        if not node.gateway:
            raise exc.UnimplementedError(
                f"sandbox's node {node.name} runs no gateway (its daemon was started with --gateway off, or without"
                " the gateway extra): use shoal's SDK, which any node serves"
            )
        channel = self._channels.get(node.gateway)
        if channel is None:
            where = urlsplit(node.gateway)
            assert where.hostname is not None and where.port is not None
            channel = self._channels[node.gateway] = Channel(where.hostname, where.port)
        return channel

    async def _ended(self, stream: Any, path: str, node: ClusterNode, sandbox_id: str) -> None:
        """Answer for a sandbox whose node died: it ended, killed with its node (exit code 137)."""
        message = died(node.name)
        answer = _ENDED_ANSWERS.get(path.removesuffix("V2"))
        if answer is None:
            raise exc.ConflictError(message)
        recorded = next((s for s in await self.router.lost_on(node) if s.get("sandbox_id") == sandbox_id), {})
        ended = api_pb2.GenericResult(
            status=api_pb2.GenericResult.GENERIC_STATUS_INTERNAL_FAILURE, exitcode=137, exception=message
        )
        await stream.send_message(answer(ended, str(recorded.get("app_id") or "")))

    # ------------------------------------------------------------------ creates, lists and names

    async def create(self, create: CreateSandbox, here: Callable[[], Awaitable[Sandbox]]) -> Sandbox | SandboxInfo:
        """The create placed on the node with the most room (``here``: on this node); another node's sandbox comes
        back as its ``SandboxInfo``."""
        data = create.model_dump(mode="json")
        if needs_this_node(data):
            return await here()
        placed = await self.router.place_for(data, here)
        return placed if isinstance(placed, Sandbox) else SandboxInfo.model_validate(placed)

    async def others_list(self, app_id: str | None, tags: dict[str, str], include_finished: bool) -> list[SandboxInfo]:
        """Every other node's sandboxes (what dead nodes ran too, with ``include_finished``)."""
        query = [("app_id", app_id)] if app_id else []
        query += [("tag", f"{k}={v}") for k, v in tags.items()]
        query += [("include_finished", "1")] if include_finished else []
        path = "/v1/sandboxes" + (f"?{urlencode(query)}" if query else "")
        others = self.router.others()
        answers = await asyncio.gather(*(self.router.list_of(n, path) for n in others))
        found: list[dict[str, Any]] = []
        for node, items in zip(others, answers, strict=True):
            for item in items:
                self.router.remember(str(item.get("sandbox_id")), node.name)
            found += items
        if include_finished:
            found += await self.router.of_dead_nodes(app_id, tags)
        out = []
        for item in found:
            with contextlib.suppress(ValueError):
                out.append(SandboxInfo.model_validate(item))
        return out

    async def from_name(self, app_name: str, name: str, include_terminated: bool) -> SandboxInfo | None:
        """Another node's sandbox ``name`` of the app ``app_name`` (None: no node has one)."""
        path = f"/v1/apps/by-name/{quote(app_name, safe='')}/sandboxes/{quote(name, safe='')}"
        found = await self.router.first("GET", path + ("?include_terminated=1" if include_terminated else ""))
        if found is None:
            return None
        self.router.remember(str(found[1].get("sandbox_id")), found[0].name)
        return SandboxInfo.model_validate(found[1])

    async def secret_name(self, name: str, creating: bool) -> None:
        """Before the gateway looks up or makes the secret ``name`` in this node's store: another node's secret of
        that name comes to be held here too (a mirror, which its home keeps up to date); a name no node holds is
        claimed for this node where it is to make it."""
        if self.mgr.secrets.by_name(name) is not None or self.router.secrets is None:
            return
        found = await self.router.secrets.named(name)
        if found is not None:
            node, info = found
            if await self.router.ask(node, "POST", f"/v1/cluster/secrets/{info.get('secret_id')}/send") is None:
                raise exc.ServiceError(f"node {node.name}, which holds secret {name!r}, did not send it: try again")
            return
        if creating and (holder := await self.router.claim_name("secret", name)) is not None:
            raise exc.ServiceError(f"secret {name!r} is being made on node {holder.name}: try again")

    async def volume_holder(self, name: str, creating: bool) -> ClusterNode | None:
        """The other node that holds the volume ``name`` (or, ``creating``, is making it); None where this node
        holds it, or none does (and, ``creating``, the name is now claimed for this node)."""
        if self.mgr.volumes.by_name(name) is not None or self.router.volumes is None:
            return None
        found = await self.router.volumes.named(name)
        if found is not None:
            return found[0]
        return await self.router.claim_name("volume", name) if creating else None

    async def others_volumes(self) -> list[api_pb2.VolumeListItem]:
        """Every other live node's named volumes, as ``VolumeList`` shows them."""
        others = self.router.others()
        answers = await asyncio.gather(*(self.router.ask(n, "GET", "/v1/volumes") for n in others))
        items = []
        for answer in answers:
            for v in (answer or {}).get("volumes") or []:
                if not isinstance(v, dict) or not v.get("name") or v.get("ephemeral"):
                    continue
                meta = api_pb2.VolumeMetadata(version=api_pb2.VOLUME_FS_VERSION_V2, name=str(v["name"]))
                items.append(
                    api_pb2.VolumeListItem(
                        label=str(v["name"]),
                        volume_id=str(v.get("volume_id")),
                        created_at=int(v.get("created_at_us") or 0) / 1e6,
                        metadata=meta,
                    )
                )
        return items

    async def volume_gone(self, name: str | None) -> None:
        """This node no longer holds the volume ``name`` (deleted or renamed): the name is free in the cluster."""
        if name:
            await self.router.release_name("volume", name)


async def _pass_requests(stream: Any, peer: Any) -> None:
    """The rest of a client-streaming call's requests, passed on as they come."""
    async for message in stream:
        await peer.send_message(message)
    await peer.end()


def _moved(url: str, node: ClusterNode) -> str:
    """A block URL ``node``'s gateway signed for its loopback listener, pointed at its cluster address instead (the
    signature covers the path and query only)."""
    where = urlsplit(url)
    if not node.gateway_blocks or where.hostname not in ("127.0.0.1", "::1", "localhost"):
        return url
    return node.gateway_blocks + where.path + (f"?{where.query}" if where.query else "")
