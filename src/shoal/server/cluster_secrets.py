"""Named secrets are the cluster's (decision 0077): each lives on the node that created it (its home), any node's
API serves it, and the other nodes hold mirrors only while creates there need its values.

Calls that name a secret by id go to its home; a lookup, create or delete by name asks the other nodes first; a
list gathers every node's own secrets.  The home tells the nodes that mirror a secret when it is updated (they take
the new values) or deleted (they drop it).  A passed-on call is answered for the receiving node's own secrets only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from shoal.exception import InvalidError, NotFoundError
from shoal.server.cluster import FORWARDED, LOOKUP_TIMEOUT, ROUTER, ClusterRouter, Handler, json_object
from shoal.server.registry import RouteTable
from shoal.wire.base import Done
from shoal.wire.cluster import ClusterNode

log = logging.getLogger(__name__)

TABLE = RouteTable()
"""The routes only the cluster's nodes call one another with, about secrets."""


@TABLE.route(
    "POST",
    "/v1/cluster/secrets/{secret_id}/send",
    summary="Send a secret this node holds to the node that asks (its gateway found it by name), to hold there",
    response=Done,
)
async def send_secret(request: web.Request) -> Done:
    router = request.app[ROUTER]
    asker = request.headers.get(FORWARDED)
    node = next((n for n in router.others() if n.name == asker), None) if router.mgr.cluster is not None else None
    if node is None:
        raise InvalidError("only a live node of this cluster may ask for a secret")
    row = router.mgr.secrets.find(request.match_info["secret_id"])
    if row is None or row.home is not None:
        raise NotFoundError(f"Secret {request.match_info['secret_id']!r} is not this node's own")
    await router.mirror_secrets(node, [row.id])
    return Done()


class ClusterSecrets:
    """This node's side of the cluster's named secrets."""

    def __init__(self, router: ClusterRouter) -> None:
        self.router = router
        self.mgr = router.mgr

    async def route(self, request: web.Request, handler: Handler) -> web.StreamResponse | None:
        """The answer for a secret call that is not this node's alone to give; None: this node answers it."""
        resource = request.match_info.route.resource
        path = (request.method, resource.canonical if resource is not None else "")
        secret_id = request.match_info.get("secret_id") if path[1].startswith("/v1/secrets/") else None
        if secret_id is not None:
            row = self.mgr.secrets.find(secret_id)
            if row is not None and row.home is None:
                answer = await handler(request)
                if request.method == "PATCH" and answer.status == 200:
                    await self._tell_mirrors(secret_id)
                return answer
            if FORWARDED in request.headers:
                raise NotFoundError(f"Secret {secret_id!r} not found")  # a mirror answers for nothing
            home = row.home if row is not None else await self._locate(secret_id)
            return await self.router.to_home(request, f"secret {secret_id}", home)
        if path[0] == "DELETE" and path[1] == "/v1/secrets/by-name/{name}":
            name = request.match_info["name"]
            own = self.mgr.secrets.by_name(name)
            if own is not None and own.home is None:
                answer = await handler(request)
                if answer.status == 200:
                    await self._forget_everywhere(own.id)
                    await self.router.release_name("secret", name)
                return answer
            if FORWARDED in request.headers:
                return None
            found = await self.named(name)
            return await self.router.proxy(request, found[0], None) if found else None
        if FORWARDED in request.headers:
            return None
        if path == ("POST", "/v1/secrets/lookup"):
            body = await request.read()
            name = str(json_object(body).get("name") or "")
            if not name or self._own(name):
                return None
            found = await self.named(name)
            return await self.router.proxy(request, found[0], None, body=body) if found else None
        if path == ("POST", "/v1/secrets"):
            return await self.router.create_named(request, "secret", self._own, self.named)
        if path == ("GET", "/v1/secrets"):
            return await self.router.gather(request, handler, "secrets", lambda node, item: None)
        return None

    def _own(self, name: str) -> bool:
        row = self.mgr.secrets.by_name(name)
        return row is not None and row.home is None

    async def named(self, name: str) -> tuple[ClusterNode, dict[str, Any]] | None:
        """The other live node whose own secret is called ``name``, and the secret as it shows it."""
        return await self.router.first("POST", "/v1/secrets/lookup", {"name": name})

    async def _locate(self, secret_id: str) -> str | None:
        found = await self.router.first("GET", f"/v1/secrets/{secret_id}")
        return found[0].name if found else None

    async def _tell_mirrors(self, secret_id: str) -> None:
        """Give the nodes that mirror ``secret_id`` its new values (the others are not sent them)."""
        row, env = self.mgr.secrets.values(secret_id)
        body = {"name": row.name, "env": env, "updated_at": row.updated_at}
        await self._broadcast("PUT", f"/v1/cluster/secrets/{secret_id}?held=1", body)

    async def _forget_everywhere(self, secret_id: str) -> None:
        await self._broadcast("DELETE", f"/v1/cluster/secrets/{secret_id}", None)

    async def _broadcast(self, method: str, path: str, body: Any) -> None:
        async def one(node: ClusterNode) -> None:
            assert node.url is not None
            try:
                async with self.router.session.request(
                    method,
                    node.url + path,
                    headers=self.router._headers(None),
                    json=body,
                    timeout=aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT),
                ) as resp:
                    if resp.status != 200:
                        log.warning("cluster: node %s answered %d to %s %s", node.name, resp.status, method, path)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("cluster: node %s did not take %s %s: %s", node.name, method, path, exc)

        await asyncio.gather(*(one(n) for n in self.router.others()))
