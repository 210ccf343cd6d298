"""The pieces under the volume and secret APIs, on real files and a real SQLite database (no daemon)."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
import time

import pytest

from shoal.exception import AlreadyExistsError, DataLossError, InvalidError, NotFoundError
from shoal.secrets.keyring import Keyring
from shoal.util import safefs
from shoal.volumes import files
from shoal.volumes.store import EPHEMERAL_TTL, VolumeStore
from shoal.wire import paths

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="gives files to the sandboxes' uid (needs root)")


# ------------------------------------------------------------------ paths


def test_split_refuses_escapes_and_normalises():
    assert paths.split("") == [] and paths.split("/") == [] and paths.split("./.") == []
    assert paths.split("/a//b/./c/") == ["a", "b", "c"]
    for bad in ("..", "a/../b", "../x", "a/..", "nul\x00", "x" * 256, "a/" * 2100):
        with pytest.raises(paths.PathError):
            paths.split(bad)


def test_openat2_never_follows_links(tmp_path):
    inside = tmp_path / "vol"
    (inside / "d").mkdir(parents=True)
    (inside / "d" / "f").write_text("in")
    outside = tmp_path / "outside.txt"
    outside.write_text("host")
    (inside / "abs").symlink_to(outside)
    (inside / "rel").symlink_to("d")  # even a link that stays inside is refused
    (inside / "up").symlink_to("../outside.txt")
    fd = os.open(inside, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for path in ("abs", "rel/f", "up", "d/../../outside.txt"):
            with pytest.raises(OSError) as err:
                safefs.openat2(fd, path, os.O_RDONLY)
            assert err.value.errno in (errno.ELOOP, errno.EXDEV), path
        f, st = safefs.open_regular(fd, ["d", "f"])
        try:
            assert os.read(f, 10) == b"in" and st.st_size == 2
        finally:
            os.close(f)
    finally:
        os.close(fd)


def test_open_regular_never_opens_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        start = time.monotonic()
        with pytest.raises(OSError) as err:
            safefs.open_regular(fd, ["fifo"])  # a plain open() would block until a writer came
        assert err.value.errno == errno.EINVAL and time.monotonic() - start < 1
        with pytest.raises(IsADirectoryError):
            safefs.open_regular(fd, [])
    finally:
        os.close(fd)


@root_only
def test_make_dirs_gives_new_directories_to_the_sandbox_user(tmp_path):
    (tmp_path / "exists").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "exists")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(safefs.make_dirs(fd, ["exists", "new", "deeper"], 100000, 100000))
        assert (tmp_path / "exists").stat().st_uid == 0  # existing directories are left alone
        for p in ("exists/new", "exists/new/deeper"):
            st = (tmp_path / p).stat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (100000, 100000, 0o755)
        with pytest.raises(OSError) as err:
            safefs.make_dirs(fd, ["link", "x"], 100000, 100000)
        assert err.value.errno == errno.ELOOP
        assert not (tmp_path / "exists" / "x").exists()
    finally:
        os.close(fd)


def test_remove_tree_removes_links_not_their_targets(tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    (tree / "a" / "to-canary").symlink_to(canary)
    (tree / "a" / "to-root").symlink_to("/")
    os.mkfifo(tree / "a" / "fifo")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        safefs.remove_tree(fd, "tree")
    finally:
        os.close(fd)
    assert not tree.exists()
    assert (canary / "keep.txt").read_text() == "keep"


def test_remove_tree_refuses_trees_deeper_than_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(safefs, "MAX_DEPTH", 8)
    deep = tmp_path / "deep"
    p = deep
    for _ in range(10):
        p = p / "d"
    p.mkdir(parents=True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as err:
            safefs.remove_tree(fd, "deep")
        assert err.value.errno == errno.ELOOP
    finally:
        os.close(fd)


def test_walk_lists_links_without_descending(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("f")
    (tmp_path / "root").symlink_to("/")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = {rel: stat.S_IFMT(st.st_mode) for rel, st in safefs.walk(fd, [], recursive=True)}
    finally:
        os.close(fd)
    assert found == {"d": stat.S_IFDIR, "d/f": stat.S_IFREG, "root": stat.S_IFLNK}


def test_fs_errors_never_name_host_paths():
    err = files.fs_error(OSError(errno.ELOOP, "loop", "/var/lib/shoal/volumes/vo-x/root/a"), "a/b")
    assert isinstance(err, InvalidError) and "/var/lib" not in str(err) and "'/a/b'" in str(err)
    assert isinstance(files.fs_error(OSError(errno.ENOENT, "x"), "gone"), NotFoundError)


# ------------------------------------------------------------------ store


@pytest.fixture
def store(tmp_path) -> VolumeStore:
    db = sqlite3.connect(tmp_path / "state.db", isolation_level=None, check_same_thread=False)
    return VolumeStore(db, tmp_path / "volumes", 100000)


@root_only
def test_store_lifecycle_and_names(store):
    row = store.create("data", allow_existing=False)
    assert store.create("data", allow_existing=True).id == row.id
    with pytest.raises(AlreadyExistsError):
        store.create("data", allow_existing=False)
    with pytest.raises(NotFoundError):
        store.lookup("other", create_if_missing=False)
    assert store.lookup("other", create_if_missing=True).name == "other"
    root = store.root_path(row.id)
    assert root.stat().st_uid == 100000 and stat.S_IMODE(root.stat().st_mode) == 0o755
    store.rename("data", "renamed")
    assert store.by_name("data") is None and store.by_name("renamed").id == row.id  # type: ignore[union-attr]
    with pytest.raises(AlreadyExistsError):
        store.rename("renamed", "other")
    assert [r.name for r in store.all()] == ["other", "renamed"]
    store.delete_by_name("renamed", allow_missing=False)
    assert not root.exists()
    store.empty_trash()
    assert list(store.trash.iterdir()) == []
    store.delete_by_name("renamed", allow_missing=True)
    with pytest.raises(NotFoundError):
        store.get("vo-notanid")


@root_only
def test_ephemeral_volumes_without_heartbeats_are_deleted(store):
    kept = store.create_ephemeral()
    lost = store.create_ephemeral()
    store.db.execute("UPDATE volumes SET heartbeat_at = ? WHERE id = ?", (time.time() - EPHEMERAL_TTL - 1, lost.id))
    assert store.all() == []  # ephemeral volumes are not listed
    assert store.prune_ephemeral() == [lost.id]
    with pytest.raises(NotFoundError):
        store.get(lost.id)
    store.heartbeat(kept.id)
    assert store.get(kept.id).ephemeral


@root_only
def test_recover_clears_staging_and_keeps_orphans_with_data(store):
    row = store.create("v", allow_existing=False)
    (store.base / row.id / "staging" / "tmp-half").write_bytes(b"half an upload")
    empty_orphan = store.base / "vo-EmptyOrphan0000000000000"
    (empty_orphan / "root").mkdir(parents=True)
    full_orphan = store.base / "vo-FullOrphan00000000000000"
    (full_orphan / "root").mkdir(parents=True)
    (full_orphan / "root" / "precious").write_text("data")
    store.recover()
    assert list((store.base / row.id / "staging").iterdir()) == []
    assert not empty_orphan.exists()
    assert (full_orphan / "root" / "precious").read_text() == "data"


def test_empty_trash_soon_runs_once_at_a_time(store):
    store.empty_trash_soon()
    store.empty_trash_soon()
    assert store._trash_thread is not None
    store._trash_thread.join(10)
    assert not any(t.name == "shoal-volume-trash" for t in threading.enumerate())


# ------------------------------------------------------------------ keyring


def test_keyring_seals_with_a_0600_key_and_binds_context(tmp_path):
    ring = Keyring(tmp_path / "secrets.key")
    key = tmp_path / "secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_size == 32
    sealed = ring.seal_env({"API_KEY": "value-123"}, "st-a")
    assert "value-123" not in sealed
    assert ring.open_env(sealed, "st-a") == {"API_KEY": "value-123"}
    assert ring.seal_env({"A": "b"}, "x") != ring.seal_env({"A": "b"}, "x")  # a fresh nonce every time
    with pytest.raises(DataLossError):
        ring.open_env(sealed, "st-b")  # moved to another row
    tampered = bytearray(ring.seal(b"data", "c"))
    tampered[-1] ^= 1
    with pytest.raises(DataLossError):
        ring.open(bytes(tampered), "c")
    again = Keyring(key)  # the same key is loaded, not replaced
    assert again.open_env(sealed, "st-a") == {"API_KEY": "value-123"}
    key.chmod(0o644)
    Keyring(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key.write_bytes(b"short")
    with pytest.raises(DataLossError):
        Keyring(key)
