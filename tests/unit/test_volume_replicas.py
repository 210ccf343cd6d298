"""A node's copy of another node's volume (``shoal.engine.replicas``, decision 0078) on two real volume stores: the
home is reached in-process through its own file operations instead of over HTTP (``test_cluster`` runs the HTTP
way, between real daemons)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shoal.engine.replicas import VolumeReplicas
from shoal.exception import NotFoundError
from shoal.server.routes_volumes import _receive
from shoal.volumes import files
from shoal.volumes.store import VolumeStore
from shoal.wire.volumes import VolumeMount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="gives files to the sandboxes' uid (needs root)")


def _store(base: Path) -> VolumeStore:
    base.mkdir()
    db = sqlite3.connect(base / "state.db", isolation_level=None, check_same_thread=False)
    return VolumeStore(db, base / "volumes", 100000)


class _Home:
    """``VolumeHome`` over a store of this process (the node called ``home``)."""

    def __init__(self, store: VolumeStore) -> None:
        self.store = store

    async def home_of(self, volume_id: str) -> str:
        self.store.get(volume_id)
        return "home"

    async def entries(self, node: str, volume_id: str) -> AsyncIterator[dict[str, Any]]:
        with self.store.open(volume_id) as vol:
            for e in list(files.list_entries(vol, "/", True, detail=True)):
                yield e

    async def read(self, node: str, volume_id: str, path: str) -> AsyncIterator[bytes]:
        with self.store.open(volume_id) as vol:
            fd, _ = files.open_for_read(vol, path)
        with os.fdopen(fd, "rb") as f:
            yield f.read()

    async def upload(self, node: str, volume_id: str, body: AsyncIterator[bytes]) -> None:
        reader = asyncio.StreamReader()
        async for chunk in body:
            reader.feed_data(chunk)
        reader.feed_eof()
        with self.store.open(volume_id) as vol:
            batch = files.UploadBatch(vol, force=True)
            try:
                await _receive(reader, batch)
                batch.commit()
            finally:
                batch.abort()

    async def remove(self, node: str, volume_id: str, path: str) -> None:
        with self.store.open(volume_id) as vol, contextlib.suppress(NotFoundError):
            files.remove(vol, path, False)


def _put(store: VolumeStore, volume_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
    with store.open(volume_id) as vol:
        batch = files.UploadBatch(vol, force=True)
        fd, parts = batch.open_file(path)
        batch.write(fd, data)
        batch.close_file(fd, parts, mode)
        batch.commit()


def test_a_copy_keeps_in_step_both_ways(tmp_path):
    home_store, here = _store(tmp_path / "home"), _store(tmp_path / "here")
    vid = home_store.create("data", allow_existing=False).id
    _put(home_store, vid, "a.txt", b"home a\n")
    _put(home_store, vid, "bin/run", b"#!/bin/sh\n", 0o755)
    _put(home_store, vid, "b.txt", b"home b\n")
    replicas = VolumeReplicas(here, _Home(home_store))
    copy_root = here.root_path(vid)
    sandbox = SimpleNamespace(
        id="sb-x", spec=SimpleNamespace(request=SimpleNamespace(volumes=[VolumeMount(volume_id=vid, path="/data")]))
    )

    async def scenario() -> None:
        await replicas.ensure(vid)
        assert (copy_root / "a.txt").read_bytes() == b"home a\n"
        assert (copy_root / "bin" / "run").stat().st_mode & 0o777 == 0o755
        assert here.by_name("data") is None and here.all() == []  # a copy is not this node's volume
        # The sandbox changes a, removes b and adds c; meanwhile the home gets d and loses bin/run.
        (copy_root / "a.txt").write_bytes(b"copy a\n")
        (copy_root / "b.txt").unlink()
        (copy_root / "c.txt").write_bytes(b"copy c\n")
        _put(home_store, vid, "d.txt", b"home d\n")
        with home_store.open(vid) as vol:
            files.remove(vol, "bin/run", False)
        await replicas.reload(vid)  # takes in d and the removal, keeps what the sandbox did
        assert (copy_root / "d.txt").read_bytes() == b"home d\n"
        assert not (copy_root / "bin" / "run").exists()
        assert (copy_root / "a.txt").read_bytes() == b"copy a\n" and not (copy_root / "b.txt").exists()
        await replicas.sandbox_ended(sandbox)  # type: ignore[arg-type]
        home = home_store.root_path(vid)
        assert (home / "a.txt").read_bytes() == b"copy a\n"
        assert (home / "c.txt").read_bytes() == b"copy c\n"
        assert (home / "d.txt").read_bytes() == b"home d\n"
        assert not (home / "b.txt").exists()
        # Nothing changed since: ending again sends nothing (the home's own later change stays).
        _put(home_store, vid, "a.txt", b"home a again\n")
        await replicas.sandbox_ended(sandbox)  # type: ignore[arg-type]
        assert (home / "a.txt").read_bytes() == b"home a again\n"
        await replicas.reload(vid)
        assert (copy_root / "a.txt").read_bytes() == b"home a again\n"
        with pytest.raises(NotFoundError):
            await replicas.ensure("vo-" + "x" * 22)

    asyncio.run(scenario())
    replicas.prune(in_use={vid})
    assert here.find(vid) is not None
    replicas._used_at[vid] -= 3600
    replicas.prune(in_use=set())
    assert here.find(vid) is None
