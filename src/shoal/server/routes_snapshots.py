"""Snapshot and image-mount operations on running sandboxes (``shoal.images.snapshot``)."""

from __future__ import annotations

import weakref
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from shoal.engine.manager import Manager
from shoal.images.snapshot import Snapshots
from shoal.server.registry import route
from shoal.server.routes import MANAGER

MAX_SNAPSHOT_TIMEOUT = 24 * 3600
_services: weakref.WeakKeyDictionary[Manager, Snapshots] = weakref.WeakKeyDictionary()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SnapshotRequest(_Model):
    """``sb.snapshot_filesystem()``."""

    timeout: Annotated[int, Field(ge=1, le=MAX_SNAPSHOT_TIMEOUT)] = 55
    ttl: Annotated[int, Field(ge=1)] | None = None
    """Recorded with the image (``expires_at``); shoal keeps snapshots until they are removed."""


class DirectorySnapshotRequest(SnapshotRequest):
    """``sb.snapshot_directory(path)``."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]


class MountRequest(_Model):
    """``sb.mount_image(path, image)``."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]
    image_id: Annotated[str, Field(min_length=1, max_length=64)]


class UnmountRequest(_Model):
    """``sb.unmount_image(path)``."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]


def _snapshots(request: web.Request) -> Snapshots:
    mgr = request.app[MANAGER]
    service = _services.get(mgr)
    if service is None:
        service = _services[mgr] = Snapshots(mgr)
    return service


@route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/snapshot",
    summary="Snapshot a running sandbox's filesystem as a new image (its changes over its image, one layer)",
    body=SnapshotRequest,
)
async def snapshot_filesystem(request: web.Request, body: SnapshotRequest) -> dict[str, Any]:
    image_id = await _snapshots(request).filesystem(request.match_info["sandbox_id"], body.timeout, body.ttl)
    return {"image_id": image_id}


@route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/snapshot_directory",
    summary="Snapshot one directory of a running sandbox as a new image (for mount_image)",
    body=DirectorySnapshotRequest,
)
async def snapshot_directory(request: web.Request, body: DirectorySnapshotRequest) -> dict[str, Any]:
    snapshots = _snapshots(request)
    image_id = await snapshots.directory(request.match_info["sandbox_id"], body.path, body.timeout, body.ttl)
    return {"image_id": image_id}


@route("GET", "/v1/sandboxes/{sandbox_id}/mounts", summary="Images mounted into a sandbox (path → image id)")
async def list_mounts(request: web.Request) -> dict[str, Any]:
    return {"mounts": _snapshots(request).mounts(request.match_info["sandbox_id"])}


@route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/mounts",
    summary="Mount an image at a path of a running sandbox (writable; replaces what was there)",
    body=MountRequest,
)
async def mount_image(request: web.Request, body: MountRequest) -> dict[str, Any]:
    await _snapshots(request).mount(request.match_info["sandbox_id"], body.path, body.image_id)
    return {"path": body.path, "image_id": body.image_id}


@route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/unmount",
    summary="Unmount an image mounted with mount_image",
    body=UnmountRequest,
)
async def unmount_image(request: web.Request, body: UnmountRequest) -> dict[str, Any]:
    await _snapshots(request).unmount(request.match_info["sandbox_id"], body.path)
    return {"path": body.path}
