"""Volumes across a cluster (decision 0078): a node whose sandbox mounts another node's volume keeps a copy of it,
brought in step with the volume's home when a sandbox starts with it or reloads it, and sent back when the
sandbox ends — Modal's commit-and-reload semantics, with the home's copy as the committed state.

What travels is files and directories: a file changed on both sides since they were last in step is the last
writer's (the home's copy when pulling into a copy a sandbox has not changed, the copy's when it is sent back).
Symbolic links, and directories left empty, do not leave the node they were made on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from shoal.exception import Error, NotFoundError
from shoal.util import safefs
from shoal.volumes import files
from shoal.volumes.store import VolumeStore

if TYPE_CHECKING:
    from shoal.engine.sandbox import Sandbox

log = logging.getLogger(__name__)

SAME_SECOND = 2.0
"""A home file whose mtime (whole seconds) is this close to the last pull may have changed since, unseen."""
IDLE_SECONDS = 600.0
"""A copy no sandbox has used for this long is removed (``prune``)."""
READ_CHUNK = 1 << 20


class VolumeHome(Protocol):
    """How a node reaches the node that holds a volume (the cluster's API)."""

    async def home_of(self, volume_id: str) -> str:
        """The name of the node that holds ``volume_id``; NotFoundError where none does."""
        ...

    def entries(self, node: str, volume_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every entry of the volume, with ``mode`` and ``mtime_ns``."""
        ...

    def read(self, node: str, volume_id: str, path: str) -> AsyncIterator[bytes]:
        """A file's bytes."""
        ...

    async def upload(self, node: str, volume_id: str, body: AsyncIterator[bytes]) -> None:
        """Write a batch of files (the upload format of ``PUT /v1/volumes/{id}/files``), replacing what is there."""
        ...

    async def remove(self, node: str, volume_id: str, path: str) -> None:
        """Remove a file (gone already: nothing)."""
        ...


Stamp = list[int]
"""A local file as last seen: [size, mtime_ns, ctime_ns, inode]."""


class VolumeReplicas:
    """This node's copies of other nodes' volumes."""

    def __init__(self, store: VolumeStore, home: VolumeHome) -> None:
        self.store = store
        self.home = home
        self._locks: dict[str, asyncio.Lock] = {}
        self._used_at: dict[str, float] = {}

    def _lock(self, volume_id: str) -> asyncio.Lock:
        return self._locks.setdefault(volume_id, asyncio.Lock())

    def is_replica(self, volume_id: str) -> bool:
        row = self.store.find(volume_id)
        return row is not None and row.home is not None

    async def ensure(self, volume_id: str) -> None:
        """Make ``volume_id`` mountable here: this node's own volume, or a copy of another node's brought in step
        with it.  NotFoundError where no node holds it."""
        row = self.store.find(volume_id)
        if row is not None and row.home is None:
            return
        self._used_at[volume_id] = time.monotonic()
        async with self._lock(volume_id):
            row = self.store.find(volume_id)
            if row is not None and row.home is None:
                return
            if row is None:
                node = await self.home.home_of(volume_id)
                row = self.store.create_replica(volume_id, node)
                log.info("volume %s: copying it from node %s", volume_id, node)
            assert row.home is not None
            await self._pull(volume_id, row.home)

    async def reload(self, volume_id: str) -> None:
        """``sb.reload_volumes()`` for a copy: take in what its home holds now."""
        row = self.store.find(volume_id)
        if row is None or row.home is None:
            return
        async with self._lock(volume_id):
            await self._pull(volume_id, row.home)

    async def sandbox_ended(self, sb: Sandbox) -> None:
        """Send what ``sb`` changed in its copies back to their homes (its container is gone)."""
        for mount in sb.spec.request.volumes:
            row = self.store.find(mount.volume_id)
            if row is None or row.home is None or mount.read_only:
                continue
            self._used_at[mount.volume_id] = time.monotonic()
            async with self._lock(mount.volume_id):
                try:
                    await self._push(mount.volume_id, row.home)
                except (Error, OSError) as exc:
                    # The copy keeps the changes (its record still differs): the next sandbox's end sends them.
                    log.error(
                        "volume %s: sending sandbox %s's changes to node %s failed: %s",
                        mount.volume_id,
                        sb.id,
                        row.home,
                        exc,
                    )

    def prune(self, in_use: set[str]) -> None:
        """Remove copies no sandbox mounts and none has used for ``IDLE_SECONDS`` (their changes were sent)."""
        now = time.monotonic()
        for row in self.store.replicas():
            if row.id in in_use or self._lock(row.id).locked():
                continue
            if now - self._used_at.setdefault(row.id, now) < IDLE_SECONDS:
                continue
            log.info("volume %s: removing this node's unused copy of it", row.id)
            self.store.delete(row.id)
            self._used_at.pop(row.id, None)
            self._locks.pop(row.id, None)

    # ---------------------------------------------------------------- in step

    def _base(self, volume_id: str) -> dict[str, Any]:
        raw = self.store.replica_base(volume_id)
        base: dict[str, Any] = json.loads(raw) if raw else {}
        return {"local": base.get("local") or {}, "home": base.get("home") or {}, "pulled_at": base.get("pulled_at", 0)}

    def _scan(self, volume_id: str) -> dict[str, Stamp]:
        """Every regular file of the copy as it is now (runs in a thread)."""
        found: dict[str, Stamp] = {}
        with self.store.open(volume_id) as vol:
            for rel, st in safefs.walk(vol.root, [], recursive=True):
                if stat.S_ISREG(st.st_mode):
                    found[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        return found

    def _stamps(self, volume_id: str, paths: list[str]) -> dict[str, Stamp]:
        """``paths`` of the copy as they are now, those that are regular files (runs in a thread)."""
        found: dict[str, Stamp] = {}
        with self.store.open(volume_id) as vol:
            for path in paths:
                parts = files.parts_of(path)
                try:
                    pfd = safefs.open_dir(vol.root, parts[:-1])
                except OSError:
                    continue
                try:
                    st = safefs.lstat_at(pfd, parts[-1])
                finally:
                    os.close(pfd)
                if st is not None and stat.S_ISREG(st.st_mode):
                    found[path] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        return found

    async def _pull(self, volume_id: str, node: str) -> None:
        base = self._base(volume_id)
        started = time.time()
        try:
            listing = [e async for e in self.home.entries(node, volume_id)]
        except NotFoundError:
            log.info("volume %s: node %s no longer holds it", volume_id, node)
            raise
        now = await asyncio.to_thread(self._scan, volume_id)
        # What the copy's sandboxes changed or removed since it was last in step stays theirs, to be sent back.
        changed_here = {p for p, s in now.items() if base["local"].get(p) != s}
        changed_here |= {p for p in base["local"] if p not in now}
        home_files = {e["path"]: e for e in listing if e.get("type") == files.FILE_TYPES[stat.S_IFREG]}
        dirs = [e["path"] for e in listing if e.get("type") == files.FILE_TYPES[stat.S_IFDIR]]
        fetch = [
            p
            for p, e in home_files.items()
            if p not in changed_here
            and (
                p not in now
                or base["home"].get(p) != [e["size"], e.get("mtime_ns", e["mtime"])]
                or ("mtime_ns" not in e and e["mtime"] >= base["pulled_at"] - SAME_SECOND)
            )
        ]
        gone = [p for p in base["home"] if p not in home_files and p in now and p not in changed_here]
        with self.store.open(volume_id) as vol:
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.close(safefs.make_dirs(vol.root, files.parts_of(d), vol.uid, vol.gid))
            for p in gone:
                with contextlib.suppress(Error):
                    await asyncio.to_thread(files.remove, vol, p, False)
            if fetch:
                batch = files.UploadBatch(vol, force=True)
                try:
                    for p in fetch:
                        fd, parts = batch.open_file(p)
                        try:
                            async for chunk in self.home.read(node, volume_id, p):
                                await asyncio.to_thread(batch.write, fd, chunk)
                        except BaseException:
                            batch.close_file(fd, parts, 0o600)
                            raise
                        batch.close_file(fd, parts, int(home_files[p].get("mode", 0o644)))
                    await asyncio.to_thread(batch.commit)
                finally:
                    batch.abort()
        local = {p: s for p, s in base["local"].items() if p not in gone}
        local.update(await asyncio.to_thread(self._stamps, volume_id, fetch))
        record = {
            "local": local,
            "home": {p: [e["size"], e.get("mtime_ns", e["mtime"])] for p, e in home_files.items()},
            "pulled_at": started,
        }
        self.store.set_replica_base(volume_id, json.dumps(record))
        log.info(
            "volume %s: in step with node %s (%d files fetched, %d removed) in %.1f ms",
            volume_id,
            node,
            len(fetch),
            len(gone),
            (time.time() - started) * 1000,
        )

    async def _push(self, volume_id: str, node: str) -> None:
        base = self._base(volume_id)
        now = await asyncio.to_thread(self._scan, volume_id)
        changed = sorted(p for p, s in now.items() if base["local"].get(p) != s)
        removed = sorted(p for p in base["local"] if p not in now)
        if changed:
            await self.home.upload(node, volume_id, self._frames(volume_id, changed))
        for p in removed:
            await self.home.remove(node, volume_id, p)
        base["local"] = now
        for p in removed:
            base["home"].pop(p, None)
        self.store.set_replica_base(volume_id, json.dumps(base))
        if changed or removed:
            log.info(
                "volume %s: sent %d changed and %d removed files to node %s",
                volume_id,
                len(changed),
                len(removed),
                node,
            )

    async def _frames(self, volume_id: str, paths: list[str]) -> AsyncIterator[bytes]:
        """The upload body for ``paths`` of the copy (a file that went away meanwhile is left out)."""
        with self.store.open(volume_id) as vol:
            for p in paths:
                try:
                    fd, st = safefs.open_regular(vol.root, files.parts_of(p))
                except OSError:
                    continue
                with os.fdopen(fd, "rb", buffering=0) as f:
                    header = json.dumps({"path": p, "mode": st.st_mode & 0o7777, "size": st.st_size}).encode()
                    yield len(header).to_bytes(4, "big") + header
                    left = st.st_size
                    while left:
                        chunk = await asyncio.to_thread(f.read, min(READ_CHUNK, left))
                        if not chunk:  # shorter than it was: the batch is not committed, and is sent again next time
                            raise OSError(f"{p} changed while it was being sent")
                        yield chunk
                        left -= len(chunk)
        yield (0).to_bytes(4, "big")
