"""Snapshot and image-mount operations on running sandboxes (``shoal.engine.snapshot``)."""

from __future__ import annotations

from aiohttp import web

from shoal.engine.snapshot import Snapshots
from shoal.server.registry import RouteTable
from shoal.server.routes import MANAGER
from shoal.wire.base import Done
from shoal.wire.images import ImageId
from shoal.wire.sandboxes import SandboxInfo
from shoal.wire.snapshots import (
    DirectorySnapshotRequest,
    MemorySnapshotInfo,
    MemorySnapshotList,
    Mounted,
    MountList,
    MountRequest,
    RestoreRequest,
    SnapshotRequest,
    Unmounted,
    UnmountRequest,
)

TABLE = RouteTable()
"""The routes this module serves."""


def _snapshots(request: web.Request) -> Snapshots:
    return request.app[MANAGER].snapshots


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/snapshot",
    summary="Snapshot a running sandbox's filesystem as a new image (its changes over its image, one layer)",
    body=SnapshotRequest,
    response=ImageId,
)
async def snapshot_filesystem(request: web.Request, body: SnapshotRequest) -> ImageId:
    image_id = await _snapshots(request).filesystem(request.match_info["sandbox_id"], body.timeout, body.ttl)
    return ImageId(image_id=image_id)


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/snapshot_directory",
    summary="Snapshot one directory of a running sandbox as a new image (for mount_image)",
    body=DirectorySnapshotRequest,
    response=ImageId,
)
async def snapshot_directory(request: web.Request, body: DirectorySnapshotRequest) -> ImageId:
    snapshots = _snapshots(request)
    image_id = await snapshots.directory(request.match_info["sandbox_id"], body.path, body.timeout, body.ttl)
    return ImageId(image_id=image_id)


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/mounts",
    summary="Images mounted into a sandbox (path → image id)",
    response=MountList,
)
async def list_mounts(request: web.Request) -> MountList:
    return MountList(mounts=_snapshots(request).mounts(request.match_info["sandbox_id"]))


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/mounts",
    summary="Mount an image at a path of a running sandbox (writable; replaces what was there)",
    body=MountRequest,
    response=Mounted,
)
async def mount_image(request: web.Request, body: MountRequest) -> Mounted:
    await _snapshots(request).mount(request.match_info["sandbox_id"], body.path, body.image_id)
    return Mounted(path=body.path, image_id=body.image_id)


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/unmount",
    summary="Unmount an image mounted with mount_image",
    body=UnmountRequest,
    response=Unmounted,
)
async def unmount_image(request: web.Request, body: UnmountRequest) -> Unmounted:
    await _snapshots(request).unmount(request.match_info["sandbox_id"], body.path)
    return Unmounted(path=body.path)


# ---------------------------------------------------------------- memory snapshots (gVisor)


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/memory_snapshot",
    summary="Save a running gVisor sandbox's processes, memory and filesystem (it keeps running)",
    response=MemorySnapshotInfo,
)
async def memory_snapshot(request: web.Request) -> MemorySnapshotInfo:
    return await request.app[MANAGER].memory_snapshots.take(request.match_info["sandbox_id"])


@TABLE.route("GET", "/v1/memory_snapshots", summary="Memory snapshots, newest first", response=MemorySnapshotList)
async def list_memory_snapshots(request: web.Request) -> MemorySnapshotList:
    return MemorySnapshotList(snapshots=request.app[MANAGER].memory_snapshots.list())


@TABLE.route("GET", "/v1/memory_snapshots/{snapshot_id}", summary="One memory snapshot", response=MemorySnapshotInfo)
async def get_memory_snapshot(request: web.Request) -> MemorySnapshotInfo:
    return request.app[MANAGER].memory_snapshots.get(request.match_info["snapshot_id"])


@TABLE.route("DELETE", "/v1/memory_snapshots/{snapshot_id}", summary="Delete a memory snapshot", response=Done)
async def delete_memory_snapshot(request: web.Request) -> Done:
    await request.app[MANAGER].memory_snapshots.delete(request.match_info["snapshot_id"])
    return Done()


@TABLE.route(
    "POST",
    "/v1/memory_snapshots/{snapshot_id}/restore",
    summary="A new sandbox from a memory snapshot: its processes carry on where they were",
    body=RestoreRequest,
    response=SandboxInfo,
)
async def restore_memory_snapshot(request: web.Request, body: RestoreRequest) -> SandboxInfo:
    snapshots = request.app[MANAGER].memory_snapshots
    sb = await snapshots.restore(request.match_info["snapshot_id"], body.name, body.keep_name)
    return sb.info()
