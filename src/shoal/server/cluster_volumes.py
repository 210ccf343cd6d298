"""Volumes are the cluster's (decision 0078): each lives on the node that created it (its home), any node's API
serves it, and a sandbox on another node mounts a copy kept in step with it (``shoal.engine.replicas``).

Calls that name a volume by id are passed to its home; calls that name one by name ask the other nodes first; a
list gathers every node's.  A passed-on call (``X-Shoal-Forwarded``) is answered by the node that receives it for
its own volumes only: a copy is never taken for the volume.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from shoal.engine.replicas import VolumeReplicas
from shoal.exception import AlreadyExistsError, NotFoundError, ServiceError
from shoal.server import errors
from shoal.server.cluster import FORWARDED, OWNERS_KEPT, ClusterRouter, Handler, json_object
from shoal.wire.cluster import ClusterNode

CHUNK = 1 << 20


class ClusterVolumes:
    """This node's side of the cluster's volumes: where volume calls go, and how a copy reaches its home."""

    def __init__(self, router: ClusterRouter) -> None:
        self.router = router
        self.mgr = router.mgr
        self._homes: dict[str, str] = {}

    # ------------------------------------------------------------------ the API's step

    async def route(self, request: web.Request, handler: Handler) -> web.StreamResponse | None:
        """The answer for a volume call that is not this node's alone to give; None: this node answers it."""
        volume_id = request.match_info.get("volume_id")
        if volume_id is not None:
            row = self.mgr.volumes.find(volume_id)
            if row is not None and row.home is None:
                answer = await handler(request)
                if request.method == "DELETE" and row.name and answer.status == 200:
                    await self.router.release_name("volume", row.name)
                return answer
            if FORWARDED in request.headers:
                raise NotFoundError(f"Volume {volume_id!r} not found")  # a copy answers for nothing
            home = row.home if row is not None else await self.locate(volume_id)
            return await self.router.to_home(request, f"volume {volume_id}", home)
        resource = request.match_info.route.resource
        path = (request.method, resource.canonical if resource is not None else "")
        # This node's own volumes first, forwarded calls too: the names they free or take are the cluster's.
        if path == ("DELETE", "/v1/volumes/by-name/{name}") and self._own(request.match_info["name"]):
            answer = await handler(request)
            if answer.status == 200:
                await self.router.release_name("volume", request.match_info["name"])
            return answer
        if path == ("POST", "/v1/volumes/rename"):
            body = await request.read()
            old, new = (str(json_object(body).get(k) or "") for k in ("old_name", "new_name"))
            if old and new and self._own(old):
                return await self._rename_here(request, handler, old, new)
            if FORWARDED in request.headers or not old or not new:
                return None
            if new != old and (taken := await self.named(new)) is not None:
                raise AlreadyExistsError(f"Volume '{new}' already exists (on node {taken[0].name})")
            found = await self.named(old)
            return await self.router.proxy(request, found[0], None, body=body) if found else None
        if FORWARDED in request.headers:
            return None
        if path == ("POST", "/v1/volumes/lookup"):
            return await self._by_name(request)
        if path == ("DELETE", "/v1/volumes/by-name/{name}"):
            found = await self.named(request.match_info["name"])
            return await self.router.proxy(request, found[0], None) if found else None
        if path == ("POST", "/v1/volumes"):
            return await self.router.create_named(request, "volume", self._own, self.named)
        if path == ("GET", "/v1/volumes"):
            return await self.router.gather(request, handler, "volumes", self._seen)
        return None

    def _own(self, name: str) -> bool:
        return self.mgr.volumes.by_name(name) is not None  # (a copy has no name)

    async def _by_name(self, request: web.Request) -> web.StreamResponse | None:
        body = await request.read()
        data = json_object(body)
        name = str(data.get("name") or "")
        if not name or self._own(name):
            return None
        found = await self.named(name)
        if found is not None:
            return await self.router.proxy(request, found[0], None, body=body)
        if not data.get("create_if_missing"):
            return None  # NotFoundError, from this node
        return await self.router.made_where_claimed(request, "volume", name, body)

    async def _rename_here(self, request: web.Request, handler: Handler, old: str, new: str) -> web.StreamResponse:
        if new != old:
            if (taken := await self.named(new)) is not None:
                raise AlreadyExistsError(f"Volume '{new}' already exists (on node {taken[0].name})")
            if (holder := await self.router.claim_name("volume", new)) is not None:
                raise AlreadyExistsError(f"Volume '{new}' is being made on node {holder.name}")
        answer = await handler(request)
        if new != old:
            await self.router.release_name("volume", old if answer.status == 200 else new)
        return answer

    # ------------------------------------------------------------------ where a volume lives

    def _seen(self, node: ClusterNode, item: dict[str, Any]) -> None:
        self._homes[str(item.get("volume_id"))] = node.name
        while len(self._homes) > OWNERS_KEPT:  # the oldest answers go first
            del self._homes[next(iter(self._homes))]

    def _node(self, name: str) -> ClusterNode | None:
        return next((n for n in self.router.others() if n.name == name), None)

    async def named(self, name: str) -> tuple[ClusterNode, dict[str, Any]] | None:
        """The other live node that holds the volume called ``name``, and the volume as it shows it."""
        found = await self.router.first("POST", "/v1/volumes/lookup", {"name": name})
        if found is not None:
            self._seen(*found)
        return found

    async def locate(self, volume_id: str) -> str | None:
        """The other node that holds ``volume_id`` (asked of every live node the first time)."""
        name = self._homes.get(volume_id)
        if name is not None and self._node(name) is not None:
            return name
        found = await self.router.first("GET", f"/v1/volumes/{volume_id}", look_again=True)
        if found is None:
            return None
        self._seen(*found)
        return found[0].name

    # ------------------------------------------------------------------ a copy's way to its home (VolumeHome)

    async def home_of(self, volume_id: str) -> str:
        name = await self.locate(volume_id)
        if name is None:
            raise NotFoundError(f"Volume {volume_id!r} not found on any node of the cluster")
        return name

    def _url(self, node: str, volume_id: str, tail: str) -> str:
        found = self._node(node)
        if found is None or found.url is None:
            raise ServiceError(f"node {node}, which holds volume {volume_id}, is not in the cluster now: try again")
        return f"{found.url}/v1/volumes/{volume_id}/{tail}"

    @staticmethod
    async def _fail(resp: aiohttp.ClientResponse) -> None:
        if resp.status != 200:
            raise errors.from_body(resp.status, await resp.read())

    async def entries(self, node: str, volume_id: str) -> AsyncIterator[dict[str, Any]]:
        params = {"path": "/", "recursive": "1", "detail": "1"}
        try:
            async with self.router.session.get(
                self._url(node, volume_id, "entries"), params=params, headers=self.router._headers(None)
            ) as resp:
                await self._fail(resp)
                async for line in resp.content:
                    item = json.loads(line)
                    if item.get("end"):
                        return
                    yield item
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceError(f"node {node} did not answer: {exc or type(exc).__name__}") from None
        raise ServiceError(f"node {node} broke off the list of volume {volume_id}")

    async def read(self, node: str, volume_id: str, path: str) -> AsyncIterator[bytes]:
        try:
            async with self.router.session.get(
                self._url(node, volume_id, "files"), params={"path": path}, headers=self.router._headers(None)
            ) as resp:
                await self._fail(resp)
                got = 0
                async for chunk in resp.content.iter_chunked(CHUNK):
                    got += len(chunk)
                    yield chunk
                if resp.content_length is not None and got != resp.content_length:
                    raise ServiceError(f"node {node} broke off the file {path} of volume {volume_id}")
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceError(f"node {node} did not answer: {exc or type(exc).__name__}") from None

    async def upload(self, node: str, volume_id: str, body: AsyncIterator[bytes]) -> None:
        try:
            async with self.router.session.put(
                self._url(node, volume_id, "files"),
                params={"force": "1"},
                headers=self.router._headers(None),
                data=body,
            ) as resp:
                await self._fail(resp)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceError(f"node {node} did not answer: {exc or type(exc).__name__}") from None

    async def remove(self, node: str, volume_id: str, path: str) -> None:
        try:
            async with self.router.session.post(
                self._url(node, volume_id, "remove"), json={"path": path}, headers=self.router._headers(None)
            ) as resp:
                if resp.status != 404:
                    await self._fail(resp)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceError(f"node {node} did not answer: {exc or type(exc).__name__}") from None


def install(router: ClusterRouter) -> ClusterVolumes:
    """The cluster's volumes for this node; its copies of other nodes' volumes reach their homes through it."""
    volumes = ClusterVolumes(router)
    if router.mgr.ctx.replicas is None:  # the API's app, not the dashboard's (which has its own, for its calls)
        router.mgr.ctx.replicas = VolumeReplicas(router.mgr.volumes, volumes)
    return volumes
