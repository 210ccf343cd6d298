"""Volumes for the official client: its calls (``VolumeGetOrCreate``, ``VolumePutFiles2``, ``VolumeGetFile2``, …) on
shoal's volume store, and the two-endpoint HTTP block store they point it at.

The client uploads a file as 8 MiB blocks named by their SHA-256: ``VolumePutFiles2`` says which blocks the
gateway lacks, each with a URL to ``PUT`` it to, and commits the files once it has them all (shoal's batch upload:
all files appear together, or none).  It reads a file as one ``GET`` URL per block.  The URLs are on a loopback
HTTP port of the gateway's own, signed (HMAC, one hour) so that nobody without one can use them; blocks are
checked against their name when they arrive and kept an hour (a block another upload shares needs no second
upload).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web
from modal_proto import api_pb2

from shoal import exception as exc
from shoal.engine.manager import Manager
from shoal.gateway.auth import GatewayAuth
from shoal.runtime import host_room
from shoal.volumes import files

log = logging.getLogger(__name__)

BLOCK_SIZE = 8 << 20
"""The client's block size (``modal._utils.blob_utils.BLOCK_SIZE``)."""
URL_TTL = 3600
BLOCK_KEEP = 3600.0
"""Seconds an uploaded block is kept after it arrived."""
LIST_BATCH = 1000

_KINDS = {
    api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING: "create_if_missing",
    api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS: "create",
    api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL: "ephemeral",
    api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED: "lookup",
}


class BlockStore:
    """Uploaded blocks (``<data dir>/gateway-blocks/<sha256>``) and the HTTP endpoints of the client's block calls."""

    def __init__(self, mgr: Manager, auth: GatewayAuth) -> None:
        self.mgr = mgr
        self.auth = auth
        self.root = mgr.cfg.data_dir / "gateway-blocks"
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.base = ""
        self.peer_base: str | None = None
        """Where other nodes' gateways' clients reach this listener too, in a cluster (``start``'s ``peer_host``)."""
        self._runner: web.AppRunner | None = None
        self.app_routes: list[tuple[str, str, Any]] = []
        """More routes of the same listener (method, path, handler), added before ``start``."""

    def check_room(self, incoming: int = 0) -> None:
        """Refuse an upload that would leave the data disk below the daemon's reserve (``--min-free-disk-mib``),
        with the ``ResourceExhaustedError`` a create gets."""
        cfg = self.mgr.cfg
        room = host_room.measure(cfg.cgroup_parent, cfg.data_dir)
        room = dataclasses.replace(room, pids_left=None, memory_left=None, disk_left=room.disk_left - incoming)
        host_room.check(room, cfg.min_free_disk_mib << 20)

    async def start(self, host: str, peer: tuple[str, int] | None = None) -> None:
        """Listen on ``host`` (loopback), any free port; and on ``peer`` (this node's cluster address and a port,
        any free one where that is taken), where a client of another node's gateway fetches and sends blocks of
        this node's volumes with URLs signed here."""
        app = web.Application(client_max_size=BLOCK_SIZE + 1)
        app.router.add_put("/blocks/{sha}", self._put)
        app.router.add_get("/files/{volume_id}", self._get)
        for method, path, handler in self.app_routes:
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = _url(host, port)
        if peer is not None:
            try:
                site = web.TCPSite(self._runner, peer[0], peer[1])
                await site.start()
            except OSError as e:
                log.warning("gateway blocks: %s:%d is taken (%s); listening on another port", *peer, e)
                site = web.TCPSite(self._runner, peer[0], 0)
                await site.start()
            self.peer_base = _url(peer[0], site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ signed URLs

    def sign_path(self, path: str, params: dict[str, str]) -> str:
        """A URL of this listener for ``path`` with ``params``, signed for an hour."""
        params = {**params, "exp": str(int(time.time()) + URL_TTL)}
        query = urlencode(sorted(params.items()))
        return f"{self.base}{path}?{query}&sig={self.auth.mac(f'{path}?{query}')}"

    def check_signature(self, request: web.Request) -> None:
        """Refuse (403) a request whose URL this gateway did not sign, or whose signature expired."""
        params = sorted((k, v) for k, v in request.query.items() if k != "sig")
        query = urlencode(params)
        good = hmac.compare_digest(request.query.get("sig", ""), self.auth.mac(f"{request.path}?{query}"))
        if not good or int(request.query.get("exp", "0") or 0) < time.time():
            raise web.HTTPForbidden(text="this block URL is not one the gateway signed, or it expired")

    def put_url(self, sha: str) -> str:
        return self.sign_path(f"/blocks/{sha}", {})

    def get_url(self, volume_id: str, path: str, start: int, length: int) -> str:
        return self.sign_path(f"/files/{quote(volume_id)}", {"path": path, "start": str(start), "len": str(length)})

    # ------------------------------------------------------------------ blocks

    def block(self, sha: str) -> Path:
        return self.root / sha

    def has(self, sha: str) -> bool:
        return len(sha) == 64 and all(c in "0123456789abcdef" for c in sha) and self.block(sha).is_file()

    def store(self, sha: str, data: bytes) -> None:
        """Keep ``data`` (whose SHA-256 the caller checked) as block ``sha``."""
        temp = self.root / f".{sha}.{os.getpid()}.{os.urandom(4).hex()}"
        _write(temp, data)
        os.replace(temp, self.block(sha))

    def forget_old(self) -> None:
        """Drop blocks that arrived more than ``BLOCK_KEEP`` seconds ago."""
        now = time.time()
        for path in self.root.iterdir():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > BLOCK_KEEP:
                    path.unlink()

    async def _put(self, request: web.Request) -> web.Response:
        self.check_signature(request)
        sha = request.match_info["sha"]
        body = await request.read()
        if len(body) > BLOCK_SIZE or hashlib.sha256(body).hexdigest() != sha:
            raise web.HTTPBadRequest(text="the block's contents do not match its name (sha256), or it is too long")
        try:
            self.check_room(len(body))
        except exc.ResourceExhaustedError as e:
            raise web.HTTPInsufficientStorage(text=str(e)) from None
        await asyncio.to_thread(self.store, sha, body)
        return web.Response(body=sha.encode())

    async def _get(self, request: web.Request) -> web.Response:
        self.check_signature(request)
        volume_id = request.match_info["volume_id"]
        try:
            start, length = int(request.query["start"]), int(request.query["len"])
            path = request.query["path"]
        except (KeyError, ValueError):
            raise web.HTTPBadRequest(text="path, start and len are needed") from None
        if not 0 < length <= BLOCK_SIZE or start < 0:
            raise web.HTTPBadRequest(text="a block is 1 byte to 8 MiB long")
        try:
            with self.mgr.volumes.open(volume_id) as vol:
                fd, _ = files.open_for_read(vol, path)
        except exc.NotFoundError as e:
            raise web.HTTPNotFound(text=str(e)) from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            data = await asyncio.to_thread(os.pread, f.fileno(), length, start)
        return web.Response(body=data, content_type="application/octet-stream")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class GatewayVolumes:
    """The volume RPCs, on shoal's volume store."""

    def __init__(self, mgr: Manager, blocks: BlockStore) -> None:
        self.mgr = mgr
        self.blocks = blocks

    def get_or_create(self, req: Any) -> api_pb2.VolumeGetOrCreateResponse:
        store = self.mgr.volumes
        kind = _KINDS.get(req.object_creation_type)
        if kind == "ephemeral":
            row = store.create_ephemeral()
        elif kind == "create_if_missing":
            row = store.lookup(req.deployment_name, True)
        elif kind == "create":
            row = store.create(req.deployment_name, False)
        elif kind == "lookup":
            row = store.lookup(req.deployment_name, False)
        else:
            raise exc.UnimplementedError("shoal's gateway does not overwrite volumes: delete the volume first")
        v2 = api_pb2.VOLUME_FS_VERSION_V2
        meta = api_pb2.VolumeMetadata(version=v2, name=row.name or "")
        return api_pb2.VolumeGetOrCreateResponse(volume_id=row.id, version=v2, metadata=meta)

    async def put_files(self, req: Any) -> api_pb2.VolumePutFiles2Response:
        await asyncio.to_thread(self.blocks.forget_old)
        self.blocks.check_room(sum(len(f.blocks) for f in req.files) * BLOCK_SIZE)
        missing = []
        for i, f in enumerate(req.files):
            for j, block in enumerate(f.blocks):
                sha = block.contents_sha256.hex()
                if not self.blocks.has(sha):
                    missing.append(
                        api_pb2.VolumePutFiles2Response.MissingBlock(
                            file_index=i, block_index=j, put_url=self.blocks.put_url(sha)
                        )
                    )
        if missing:
            return api_pb2.VolumePutFiles2Response(missing_blocks=missing)
        await asyncio.to_thread(self._commit, req)
        return api_pb2.VolumePutFiles2Response()

    def _commit(self, req: Any) -> None:
        with self.mgr.volumes.open(req.volume_id) as vol:
            batch = files.UploadBatch(vol, force=not req.disallow_overwrite_existing_files)
            try:
                for f in req.files:
                    fd, parts = batch.open_file(f.path)
                    written = 0
                    try:
                        for block in f.blocks:
                            data = self.blocks.block(block.contents_sha256.hex()).read_bytes()
                            batch.write(fd, data)
                            written += len(data)
                    except BaseException:
                        batch.close_file(fd, parts, 0o600)
                        raise
                    batch.close_file(fd, parts, f.mode or 0o644)
                    if written != f.size:
                        raise exc.InvalidError(f"{f.path}: its blocks hold {written} bytes, not {f.size}")
                batch.commit()
            finally:
                batch.abort()

    def get_file(self, req: Any) -> api_pb2.VolumeGetFile2Response:
        with self.mgr.volumes.open(req.volume_id) as vol:
            fd, size = files.open_for_read(vol, req.path)
        os.close(fd)
        start = min(req.start, size)
        length = size - start if not req.len else min(req.len, size - start)
        urls = []
        pos = start
        while pos < start + length:
            end = min(start + length, (pos // BLOCK_SIZE + 1) * BLOCK_SIZE)
            urls.append(self.blocks.get_url(req.volume_id, req.path, pos, end - pos))
            pos = end
        return api_pb2.VolumeGetFile2Response(get_urls=urls, size=size, start=start, len=length)

    async def list_files(self, req: Any, send: Any) -> None:
        with self.mgr.volumes.open(req.volume_id) as vol:
            entries = files.list_entries(vol, req.path, req.recursive)
            limit = req.max_entries or None
            batch: list[api_pb2.FileEntry] = []
            for count, e in enumerate(entries, 1):
                batch.append(api_pb2.FileEntry(path=e["path"], type=e["type"], mtime=e["mtime"], size=e["size"]))
                if len(batch) >= LIST_BATCH:
                    await send(api_pb2.VolumeListFiles2Response(entries=batch))
                    batch = []
                if limit is not None and count >= limit:
                    break
            if batch:
                await send(api_pb2.VolumeListFiles2Response(entries=batch))

    def remove(self, req: Any) -> None:
        with self.mgr.volumes.open(req.volume_id) as vol:
            files.remove(vol, req.path, req.recursive)

    def copy(self, req: Any) -> None:
        with self.mgr.volumes.open(req.volume_id) as vol:
            files.copy(vol, list(req.src_paths), req.dst_path, req.recursive)

    def listing(self) -> api_pb2.VolumeListResponse:
        items = [
            api_pb2.VolumeListItem(
                label=row.name or "",
                volume_id=row.id,
                created_at=row.created_at,
                metadata=api_pb2.VolumeMetadata(version=api_pb2.VOLUME_FS_VERSION_V2, name=row.name or ""),
            )
            for row in self.mgr.volumes.all()
            if row.name
        ]
        return api_pb2.VolumeListResponse(items=items, environment_name="main")
