"""Images built or pulled on one node of a cluster are fetched by the others on first use (issue 18): a node asked
for an image id it lacks finds the node that holds it whole and takes in its layers (``ImageService._fetch``).
The layers travel as OCI tars and are unpacked like a registry's: the other node is trusted no further than one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from shoal.exception import ServiceError
from shoal.server import errors
from shoal.server.cluster import ClusterRouter

CHUNK = 1 << 20


class ClusterImages:
    """``ImageSource`` over the cluster's API."""

    def __init__(self, router: ClusterRouter) -> None:
        self.router = router

    async def find(self, image_id: str) -> tuple[str, dict[str, Any]] | None:
        found = await self.router.first("GET", f"/v1/cluster/images/{image_id}", look_again=True)
        if found is None or not isinstance(found[1].get("config"), dict):
            return None
        return found[0].name, found[1]

    async def layer(self, node: str, image_id: str, index: int, dest: Path) -> None:
        found = next((n for n in self.router.others() if n.name == node), None)
        if found is None or found.url is None:
            raise ServiceError(f"node {node}, which holds image {image_id}, left the cluster: try again")
        try:
            async with self.router.session.get(
                f"{found.url}/v1/cluster/images/{image_id}/layers/{index}", headers=self.router._headers(None)
            ) as resp:
                if resp.status != 200:
                    raise errors.from_body(resp.status, await resp.read())
                got = 0
                f = await asyncio.to_thread(open, dest, "wb")
                try:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        await asyncio.to_thread(f.write, chunk)
                        got += len(chunk)
                finally:
                    f.close()
                if resp.content_length is not None and got != resp.content_length:
                    raise ServiceError(f"node {node} broke off layer {index} of image {image_id}: try again")
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceError(f"node {node} did not answer: {exc or type(exc).__name__}") from None


def install(router: ClusterRouter) -> None:
    """Let this node's image service fetch from the other nodes."""
    if router.mgr.images.source is None:  # the API's app, not the dashboard's
        router.mgr.images.source = ClusterImages(router)
