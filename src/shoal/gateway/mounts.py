"""Local files for the official client: ``Image.add_local_file/dir/python_source`` (Modal's *mounts*).

The client uploads each file once, named by its SHA-256 (``MountBatchedCheckExistence`` says which are missing;
``MountPutFile`` carries a small file, ``BlobCreate`` plus an HTTP PUT a large one), then names a set of them,
with their paths in the sandbox and modes, as a mount (``MountGetOrCreate``).  Modal adds a mount's files to the
container when it starts (or, with ``copy=True``, as a ``COPY`` in an image layer); shoal lays them over the
image as one more build step either way: a *context* (``shoal.images.context``) made of the mount's files, copied
into ``/`` — which leaves existing directories as they are, and is cached by its content like any other step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from modal_proto import api_pb2

from shoal import exception as exc
from shoal.engine import image_store
from shoal.engine.manager import Manager
from shoal.gateway.volumes import BlockStore
from shoal.images.context import tree_manifest
from shoal.wire import manifest

MOUNTS_KEPT = 10_000
"""Mounts remembered (the oldest are forgotten; a client makes its mounts again in each process)."""
MAX_BLOB = 4 << 30
"""The largest file one ``BlobCreate`` upload may carry."""
READ_CHUNK = 1 << 20


class GatewayMounts:
    """Uploaded files (in the block store's directory, by SHA-256), blobs in flight, and mounts by id."""

    def __init__(self, mgr: Manager, blocks: BlockStore) -> None:
        self.mgr = mgr
        self.blocks = blocks
        self._mounts: OrderedDict[str, str | None] = OrderedDict()
        """mount id → the stored context of its files (None: it has none)."""
        self._blobs: OrderedDict[str, tuple[str, int]] = OrderedDict()
        """blob id → (its sha256 hex, its length), until the client names it in ``MountPutFile``."""
        blocks.app_routes.append(("PUT", "/blobs/{blob_id}", self._put_blob))

    # ------------------------------------------------------------------ uploads

    def missing(self, hashes: list[str]) -> list[str]:
        return [h for h in hashes if not self.blocks.has(h)]

    def blob_create(self, req: Any) -> api_pb2.BlobCreateResponse:
        if not 0 <= req.content_length <= MAX_BLOB:
            raise exc.InvalidError(f"a file of {req.content_length} bytes is larger than {MAX_BLOB >> 30} GiB")
        self.blocks.check_room(req.content_length)
        try:
            sha = base64.b64decode(req.content_sha256_base64).hex()
        except ValueError:
            raise exc.InvalidError("content_sha256_base64 is not base64") from None
        if len(sha) != 64:
            raise exc.InvalidError("content_sha256_base64 is not a SHA-256")
        blob_id = "bl-" + os.urandom(12).hex()
        self._blobs[blob_id] = (sha, req.content_length)
        while len(self._blobs) > MOUNTS_KEPT:
            self._blobs.popitem(last=False)  # uploads never named in a MountPutFile
        url = self.blocks.sign_path(f"/blobs/{blob_id}", {})
        return api_pb2.BlobCreateResponse(blob_ids=[blob_id], upload_urls=api_pb2.UploadUrlList(items=[url]))

    async def _put_blob(self, request: web.Request) -> web.Response:
        self.blocks.check_signature(request)
        blob_id = request.match_info["blob_id"]
        expected = self._blobs.get(blob_id)
        if expected is None:
            raise web.HTTPNotFound(text="no such blob upload")
        sha, length = expected
        temp = self.blocks.root / f".blob-{blob_id}"
        digest, md5, total = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            while chunk := await request.content.read(READ_CHUNK):
                total += len(chunk)
                if total > length:
                    raise web.HTTPBadRequest(text="the upload is longer than announced")
                digest.update(chunk)
                md5.update(chunk)
                await asyncio.to_thread(os.write, fd, chunk)
        finally:
            os.close(fd)
        if total != length or digest.hexdigest() != sha:
            temp.unlink(missing_ok=True)
            raise web.HTTPBadRequest(text="the upload does not match the length and SHA-256 announced")
        os.replace(temp, self.blocks.block(sha))
        return web.Response(headers={"ETag": f'"{md5.hexdigest()}"'})

    def put_file(self, req: Any) -> api_pb2.MountPutFileResponse:
        sha = req.sha256_hex
        if req.data_blob_id:
            blob = self._blobs.pop(req.data_blob_id, None)
            if blob is None or blob[0] != sha or not self.blocks.has(sha):
                raise exc.NotFoundError(f"blob {req.data_blob_id} was not uploaded as {sha[:12]}")
        elif req.data or not self.blocks.has(sha):
            if hashlib.sha256(req.data).hexdigest() != sha:
                return api_pb2.MountPutFileResponse(exists=False)
            self.blocks.store(sha, req.data)
        return api_pb2.MountPutFileResponse(exists=True)

    async def create(self, req: Any) -> api_pb2.MountGetOrCreateResponse:
        """A mount of uploaded files, made into a stored context now: its files need not stay in the block store,
        which keeps them only an hour."""
        files: list[tuple[str, str, int]] = []
        for f in req.files:
            if not f.filename.startswith("/"):
                raise exc.InvalidError(f"a mounted file's path must be absolute, not {f.filename[:200]!r}")
            manifest.check_name(f.filename.lstrip("/"))
            if not self.blocks.has(f.sha256_hex):
                raise exc.NotFoundError(f"{f.filename}: its contents ({f.sha256_hex[:12]}) were not uploaded")
            files.append((f.filename, f.sha256_hex, f.mode))
        mount_id = "mo-" + os.urandom(11).hex()
        self._mounts[mount_id] = await self._context(files) if files else None
        while len(self._mounts) > MOUNTS_KEPT:
            self._mounts.popitem(last=False)
        return api_pb2.MountGetOrCreateResponse(mount_id=mount_id)

    # ------------------------------------------------------------------ use

    def copy_steps(self, mount_ids: list[str]) -> list[dict[str, Any]]:
        """The build steps that lay these mounts' files over an image (a stored context each, copied into /)."""
        steps = []
        for mount_id in mount_ids:
            if mount_id not in self._mounts:
                raise exc.NotFoundError(f"no mount {mount_id!r} on this shoal gateway (mounts last one daemon run)")
            context = self._mounts[mount_id]
            if context is not None:
                steps.append({"op": "copy", "context": context, "dest": "/"})
        return steps

    async def _context(self, files: list[tuple[str, str, int]]) -> str:
        tmp = Path(tempfile.mkdtemp(prefix="mount-", dir=self.blocks.root))
        try:
            tree = tmp / "tree"
            tree.mkdir()
            await asyncio.to_thread(self._lay_out, tree, files)
            digest = manifest.digest(await asyncio.to_thread(tree_manifest, tree))
            archive = tmp / "tree.tar"
            await asyncio.to_thread(_tar, tree, archive)

            async def chunks() -> AsyncIterator[bytes]:
                f = await asyncio.to_thread(archive.open, "rb")
                try:
                    while chunk := await asyncio.to_thread(f.read, READ_CHUNK):
                        yield chunk
                finally:
                    f.close()

            await image_store.store_context(self.mgr, digest, chunks())
            return digest
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    def _lay_out(self, tree: Path, files: list[tuple[str, str, int]]) -> None:
        for filename, sha, mode in files:
            target = tree / filename.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            shutil.copyfile(self.blocks.block(sha), target)
            os.chmod(target, (mode or 0o644) & 0o777)


def _tar(tree: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(tree.rglob("*")):
            tar.add(entry, arcname=str(entry.relative_to(tree)), recursive=False)
