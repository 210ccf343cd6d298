"""Snapshot and image-mount operations on running sandboxes (``shoal.engine.snapshot``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shoal.engine.snapshot import Snapshots
from shoal.server.registry import RouteTable
from shoal.server.routes import MANAGER
from shoal.wire.snapshots import DirectorySnapshotRequest, MountRequest, SnapshotRequest, UnmountRequest

TABLE = RouteTable()
"""The routes this module serves."""


def _snapshots(request: web.Request) -> Snapshots:
    return request.app[MANAGER].snapshots


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/snapshot",
    summary="Snapshot a running sandbox's filesystem as a new image (its changes over its image, one layer)",
    body=SnapshotRequest,
)
async def snapshot_filesystem(request: web.Request, body: SnapshotRequest) -> dict[str, Any]:
    image_id = await _snapshots(request).filesystem(request.match_info["sandbox_id"], body.timeout, body.ttl)
    return {"image_id": image_id}


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/snapshot_directory",
    summary="Snapshot one directory of a running sandbox as a new image (for mount_image)",
    body=DirectorySnapshotRequest,
)
async def snapshot_directory(request: web.Request, body: DirectorySnapshotRequest) -> dict[str, Any]:
    snapshots = _snapshots(request)
    image_id = await snapshots.directory(request.match_info["sandbox_id"], body.path, body.timeout, body.ttl)
    return {"image_id": image_id}


@TABLE.route("GET", "/v1/sandboxes/{sandbox_id}/mounts", summary="Images mounted into a sandbox (path → image id)")
async def list_mounts(request: web.Request) -> dict[str, Any]:
    return {"mounts": _snapshots(request).mounts(request.match_info["sandbox_id"])}


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/mounts",
    summary="Mount an image at a path of a running sandbox (writable; replaces what was there)",
    body=MountRequest,
)
async def mount_image(request: web.Request, body: MountRequest) -> dict[str, Any]:
    await _snapshots(request).mount(request.match_info["sandbox_id"], body.path, body.image_id)
    return {"path": body.path, "image_id": body.image_id}


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/unmount",
    summary="Unmount an image mounted with mount_image",
    body=UnmountRequest,
)
async def unmount_image(request: web.Request, body: UnmountRequest) -> dict[str, Any]:
    await _snapshots(request).unmount(request.match_info["sandbox_id"], body.path)
    return {"path": body.path}
