"""The daemon's image store operations: build context uploads, disk use, ``image rm`` and ``image prune``.

(Resolving and building images is ``POST /v1/images/resolve`` in :mod:`shoal.server.routes`; the rules are
in :mod:`shoal.engine.image_store`.)
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from shoal.engine import image_store
from shoal.engine.manager import Manager
from shoal.exception import InvalidError, NotFoundError
from shoal.server.registry import RouteTable
from shoal.server.routes import MANAGER, _clustered, query_int
from shoal.store.state import ImageRow
from shoal.wire import ids
from shoal.wire.image_config import ImageConfig
from shoal.wire.images import ContextStored, ImageRemoved, ImageStoreUsage, PruneResult
from shoal.wire.sandboxes import LogEntries

TABLE = RouteTable()
"""The routes this module serves."""

READ_CHUNK = 1 << 20


@TABLE.route(
    "PUT",
    "/v1/image-store/contexts/{digest}",
    summary="Upload the local files of a build step (a tar stream); kept only if they match the digest",
    raw_body=True,
    response=ContextStored,
)
async def upload_context(request: web.Request) -> ContextStored:
    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await request.content.read(READ_CHUNK):
            yield chunk

    return await image_store.store_context(request.app[MANAGER], request.match_info["digest"], chunks())


@TABLE.route(
    "GET", "/v1/image-store", summary="Images with their sizes, and the store's disk use", response=ImageStoreUsage
)
async def store_usage(request: web.Request) -> ImageStoreUsage:
    return await image_store.usage_report(request.app[MANAGER])


@TABLE.route(
    "DELETE",
    "/v1/images/{image_id}",
    summary="Remove an image, and its layers that nothing else uses",
    response=ImageRemoved,
)
async def remove_image(request: web.Request) -> ImageRemoved:
    return await image_store.remove_image(request.app[MANAGER], request.match_info["image_id"])


def _count(request: web.Request, name: str) -> int | None:
    """An optional count (at least 1) from the query."""
    if name not in request.query:
        return None
    value = query_int(request, name, 0)
    if value < 1:
        raise InvalidError(f"query parameter {name} must be at least 1")
    return value


@TABLE.route(
    "GET",
    "/v1/images/{image_id}/logs",
    summary="What the image's build steps printed when they were built (image.logs)",
    query={"layers": "only the last N build steps (default: all)", "tail": "only the last N lines"},
    response=LogEntries,
)
async def image_logs(request: web.Request) -> LogEntries:
    layers, tail = _count(request, "layers"), _count(request, "tail")
    return image_store.build_log(request.app[MANAGER], request.match_info["image_id"], layers, tail)


@TABLE.route(
    "POST",
    "/v1/image-store/prune",
    summary="Remove layers no image, sandbox or build uses, and uploaded build contexts",
    query={"all": "1 to first remove every image that no running sandbox uses"},
    response=PruneResult,
)
async def prune(request: web.Request) -> PruneResult:
    return await image_store.prune(request.app[MANAGER], request.query.get("all", "") in ("1", "true"))


# ------------------------------------------------------------------ between the nodes of a cluster


def _whole_image(mgr: Manager, image_id: str) -> ImageRow:
    row = mgr.state.image(image_id) if ids.is_valid(image_id, "image") else None
    if row is None or not all(mgr.layers.exists(layer) for layer in ImageConfig.from_json(row.config).layers):
        raise NotFoundError(f"no image {image_id!r} on this node")
    return row


@TABLE.route(
    "GET",
    "/v1/cluster/images/{image_id}",
    summary="An image this node holds whole, as another node takes it in (its recipe, config and layer count)",
)
async def cluster_image(request: web.Request) -> dict[str, Any]:
    row = _whole_image(_clustered(request), request.match_info["image_id"])
    return {"recipe": row.recipe, "config": row.config, "created_at": row.created_at}


@TABLE.route(
    "GET",
    "/v1/cluster/images/{image_id}/layers/{index}",
    summary="One layer of an image this node holds, as a tar stream in the OCI form (whiteouts as .wh. names)",
    content_type="application/x-tar",
)
async def cluster_image_layer(request: web.Request) -> web.StreamResponse:
    mgr = _clustered(request)
    image_id = request.match_info["image_id"]
    _whole_image(mgr, image_id)
    try:
        index = int(request.match_info["index"])
    except ValueError:
        raise InvalidError("a layer index is a number") from None
    dest = mgr.layers.tmp / f"export.{secrets.token_hex(8)}.tar"
    try:
        await asyncio.to_thread(mgr.images.export_layer, image_id, index, dest)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        resp.content_length = dest.stat().st_size
        await resp.prepare(request)
        f = await asyncio.to_thread(open, dest, "rb")
        try:
            while chunk := await asyncio.to_thread(f.read, READ_CHUNK):
                await resp.write(chunk)
        finally:
            f.close()
        await resp.write_eof()
        return resp
    finally:
        dest.unlink(missing_ok=True)
