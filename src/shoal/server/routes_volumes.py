"""The daemon's volume operations: lifecycle, and the data API that works with no sandbox running.

Uploads arrive as one streamed body per batch, a sequence of frames::

    <u32 big-endian header length> <header JSON: {"path", "mode", "size"}> <size bytes>
    ...
    <u32 0>                                  (end of batch)

Nothing is committed unless the end frame arrives: a client or daemon that
dies mid-batch leaves only staging files.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from shoal.engine.manager import Manager
from shoal.exception import ConflictError, InvalidError, NotFoundError
from shoal.server.registry import RouteTable
from shoal.server.routes import MANAGER
from shoal.util import safefs
from shoal.volumes import files
from shoal.volumes.store import OpenVolume, VolumeStore
from shoal.wire.base import Done
from shoal.wire.sandboxes import SandboxState
from shoal.wire.volumes import (
    CopyFiles,
    FilesUploaded,
    RemoveFile,
    VolumeCreate,
    VolumeInfo,
    VolumeList,
    VolumeLookup,
    VolumeRename,
)

TABLE = RouteTable()
"""The routes this module serves."""

T = TypeVar("T")
MAX_HEADER = 1 << 16
MAX_FILE_SIZE = 1 << 44
READ_CHUNK = 1 << 20
LIST_BATCH = 1000


def _mgr(request: web.Request) -> Manager:
    return request.app[MANAGER]


def _store(request: web.Request) -> VolumeStore:
    return request.app[MANAGER].volumes


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "") in ("1", "true")


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a thread; if the request is cancelled meanwhile, wait for the thread before unwinding.

    The thread uses the volume's descriptors, which the handler closes on the way out: they must not be
    closed (and their numbers reused) under a running thread.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


def _path(request: web.Request) -> str:
    path = request.query.get("path")
    if path is None:
        raise InvalidError("query parameter path is required")
    return path


# ------------------------------------------------------------------ lifecycle


@TABLE.route(
    "POST",
    "/v1/volumes/lookup",
    summary="Find a volume by name (Volume.from_name)",
    body=VolumeLookup,
    response=VolumeInfo,
)
async def lookup_volume(request: web.Request, body: VolumeLookup) -> VolumeInfo:
    return _store(request).lookup(body.name, body.create_if_missing, body.version).info()


@TABLE.route(
    "POST",
    "/v1/volumes",
    summary="Create a named volume (Volume.objects.create)",
    body=VolumeCreate,
    response=VolumeInfo,
)
async def create_volume(request: web.Request, body: VolumeCreate) -> VolumeInfo:
    return _store(request).create(body.name, body.allow_existing, body.version).info()


@TABLE.route(
    "POST",
    "/v1/volumes/ephemeral",
    summary="Create an ephemeral volume (Volume.ephemeral); it lives while heartbeats arrive",
    response=VolumeInfo,
)
async def create_ephemeral_volume(request: web.Request) -> VolumeInfo:
    return _store(request).create_ephemeral().info()


def _usage(store: VolumeStore, volume_id: str) -> int | None:
    try:
        return store.usage(volume_id)
    except NotFoundError:
        return None  # deleted meanwhile


@TABLE.route(
    "GET",
    "/v1/volumes",
    summary="List named volumes, newest first",
    query={"usage": "1 to add each volume's disk use (walks every volume)"},
    response=VolumeList,
)
async def list_volumes(request: web.Request) -> VolumeList:
    store = _store(request)
    rows = store.all()
    sizes: list[int | None] = [None] * len(rows)
    if _flag(request, "usage"):
        sizes = list(await asyncio.gather(*(asyncio.to_thread(_usage, store, r.id) for r in rows)))
    return VolumeList(volumes=[r.info(size) for r, size in zip(rows, sizes, strict=True)])


@TABLE.route(
    "GET",
    "/v1/volumes/{volume_id}",
    summary="One volume",
    response=VolumeInfo,
    query={"usage": "1 to add its disk use"},
)
async def get_volume(request: web.Request) -> VolumeInfo:
    store = _store(request)
    row = store.get(request.match_info["volume_id"])
    size = await asyncio.to_thread(store.usage, row.id) if _flag(request, "usage") else None
    return row.info(size)


@TABLE.route("POST", "/v1/volumes/{volume_id}/heartbeat", summary="Keep an ephemeral volume alive", response=Done)
async def heartbeat_volume(request: web.Request) -> Done:
    _store(request).heartbeat(request.match_info["volume_id"])
    return Done()


@TABLE.route(
    "DELETE", "/v1/volumes/{volume_id}", summary="Delete a volume by id (ends an ephemeral volume)", response=Done
)
async def delete_volume(request: web.Request) -> Done:
    store = _store(request)
    store.delete(request.match_info["volume_id"])
    store.empty_trash_soon()
    return Done()


@TABLE.route(
    "DELETE",
    "/v1/volumes/by-name/{name}",
    summary="Delete a named volume (Volume.objects.delete)",
    query={"allow_missing": "1: no error if there is no such volume"},
    response=Done,
)
async def delete_volume_by_name(request: web.Request) -> Done:
    store = _store(request)
    store.delete_by_name(request.match_info["name"], _flag(request, "allow_missing"))
    store.empty_trash_soon()
    return Done()


@TABLE.route(
    "POST",
    "/v1/volumes/rename",
    summary="Rename a named volume (Volume.rename)",
    body=VolumeRename,
    response=VolumeInfo,
)
async def rename_volume(request: web.Request, body: VolumeRename) -> VolumeInfo:
    return _store(request).rename(body.old_name, body.new_name).info()


@TABLE.route(
    "POST",
    "/v1/volumes/{volume_id}/commit",
    summary="Flush the volume's changes to disk (vol.commit)",
    response=Done,
)
async def commit_volume(request: web.Request) -> Done:
    with _store(request).open(request.match_info["volume_id"]) as vol:
        await _in_thread(safefs.syncfs, vol.root)
    return Done()


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/reload_volumes",
    summary="Show a sandbox the latest state of its volumes (sb.reload_volumes)",
    response=Done,
)
async def reload_volumes(request: web.Request) -> Done:
    mgr = _mgr(request)
    sb = mgr.get(request.match_info["sandbox_id"])
    if sb.state is not SandboxState.RUNNING:
        raise ConflictError("Sandbox already finished")
    # This node's own volumes are bind mounts of one directory: every sandbox already sees every committed
    # change.  Copies of other nodes' volumes (a cluster) take in what their home holds now.
    await mgr.reload_volumes(sb)
    return Done()


# ------------------------------------------------------------------ data


async def _receive(content: Any, batch: files.UploadBatch) -> None:
    """Read upload frames into staging files until the end frame."""
    while True:
        try:
            size_bytes = await content.readexactly(4)
        except asyncio.IncompleteReadError:
            raise InvalidError("the upload ended before its end frame; nothing was written") from None
        hlen = int.from_bytes(size_bytes, "big")
        if hlen == 0:
            return
        if hlen > MAX_HEADER:
            raise InvalidError(f"upload frame header of {hlen} bytes; the limit is {MAX_HEADER}")
        try:
            header = json.loads(await content.readexactly(hlen))
            path, mode, size = header["path"], header.get("mode", 0o644), header["size"]
        except (asyncio.IncompleteReadError, ValueError, KeyError, TypeError, RecursionError):
            raise InvalidError("malformed upload frame header") from None
        if not isinstance(path, str) or not isinstance(mode, int) or not isinstance(size, int):
            raise InvalidError("upload frame header: path must be a string, mode and size integers")
        try:
            path.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise InvalidError("upload frame header: the path holds a lone surrogate, which is not text") from None
        if not 0 <= size <= MAX_FILE_SIZE or not 0 <= mode <= 0o7777:
            raise InvalidError(f"upload of {path!r}: size or mode out of range")
        fd, parts = batch.open_file(path)
        try:
            remaining = size
            while remaining:
                chunk = await content.read(min(remaining, READ_CHUNK))
                if not chunk:
                    raise InvalidError("the upload ended in the middle of a file; nothing was written")
                batch.write(fd, chunk)
                remaining -= len(chunk)
        except BaseException:
            batch.close_file(fd, parts, 0o600)
            raise
        batch.close_file(fd, parts, mode)


@TABLE.route(
    "PUT",
    "/v1/volumes/{volume_id}/files",
    summary="Upload a batch of files (vol.batch_upload); all appear together, or none",
    query={"force": "1 to overwrite existing files (directories are never overwritten)"},
    raw_body=True,
    response=FilesUploaded,
)
async def upload_files(request: web.Request) -> FilesUploaded:
    with _store(request).open(request.match_info["volume_id"]) as vol:
        batch = files.UploadBatch(vol, _flag(request, "force"))
        try:
            await _receive(request.content, batch)
            count = await _in_thread(batch.commit)
        finally:
            batch.abort()
    return FilesUploaded(files=count)


@TABLE.route(
    "GET",
    "/v1/volumes/{volume_id}/files",
    summary="Read a file (vol.read_file)",
    query={"path": "the file's path in the volume"},
    content_type="application/octet-stream",
)
async def read_file(request: web.Request) -> web.StreamResponse:
    with _store(request).open(request.match_info["volume_id"]) as vol:
        fd, size = files.open_for_read(vol, _path(request))
    with os.fdopen(fd, "rb", buffering=0) as f:  # wraps the descriptor already opened: no blocking I/O
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost")
        if size:
            try:
                await asyncio.get_running_loop().sendfile(transport, f, 0, size)
            except NotImplementedError:
                offset = 0
                while offset < size and (chunk := await asyncio.to_thread(f.read, min(READ_CHUNK, size - offset))):
                    await resp.write(chunk)
                    offset += len(chunk)
            except ConnectionError:
                return resp  # the reader went away: nothing to finish
        await resp.write_eof()
    return resp


def _next_batch(entries: Any) -> list[dict[str, Any]]:
    return list(itertools.islice(entries, LIST_BATCH))


@TABLE.route(
    "GET",
    "/v1/volumes/{volume_id}/entries",
    summary="List a path (vol.listdir / vol.iterdir) as NDJSON FileEntries",
    query={
        "path": "directory or file in the volume",
        "recursive": "1 to list everything below",
        "detail": "1 to add each entry's mode and mtime_ns",
    },
    content_type="application/x-ndjson",
)
async def list_entries(request: web.Request) -> web.StreamResponse:
    store = _store(request)
    with store.open(request.match_info["volume_id"]) as vol:
        return await _stream_entries(
            request, vol, _path(request), _flag(request, "recursive"), _flag(request, "detail")
        )


async def _stream_entries(
    request: web.Request, vol: OpenVolume, path: str, recursive: bool, detail: bool = False
) -> web.StreamResponse:
    entries = await _in_thread(files.list_entries, vol, path, recursive, detail)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    while batch := await _in_thread(_next_batch, entries):
        await resp.write("".join(json.dumps(e) + "\n" for e in batch).encode())
    await resp.write(b'{"end": true}\n')
    await resp.write_eof()
    return resp


@TABLE.route(
    "POST",
    "/v1/volumes/{volume_id}/remove",
    summary="Remove a file or directory (vol.remove_file)",
    body=RemoveFile,
    response=Done,
)
async def remove_file(request: web.Request, body: RemoveFile) -> Done:
    with _store(request).open(request.match_info["volume_id"]) as vol:
        await _in_thread(files.remove, vol, body.path, body.recursive)
    return Done()


@TABLE.route(
    "POST",
    "/v1/volumes/{volume_id}/copy",
    summary="Copy files inside the volume (vol.copy_files)",
    body=CopyFiles,
    response=Done,
)
async def copy_files(request: web.Request, body: CopyFiles) -> Done:
    with _store(request).open(request.match_info["volume_id"]) as vol:
        await _in_thread(files.copy, vol, body.src_paths, body.dst_path, body.recursive)
    return Done()
