"""The daemon's image store operations: build context uploads, disk use, ``image rm`` and ``image prune``.

(Resolving and building images is ``POST /v1/images/resolve`` in :mod:`shoal.server.routes`; the rules are
in :mod:`shoal.engine.image_store`.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from shoal.engine import image_store
from shoal.exception import InvalidError
from shoal.server.registry import RouteTable
from shoal.server.routes import MANAGER, query_int
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
