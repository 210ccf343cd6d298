"""Volumes: lifecycle, the data API with no sandbox running, and mounting into sandboxes.

Every test uses its own uniquely named volumes and deletes them; sandboxes are
terminated in ``finally`` blocks.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shoal
import shoal as modal
from shoal.exception import AlreadyExistsError, InvalidError, NotFoundError
from shoal.volume import FileEntry, FileEntryType


def _name(prefix: str = "vol") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def vol(daemon) -> Iterator[shoal.Volume]:
    name = _name()
    v = shoal.Volume.from_name(name, create_if_missing=True)
    v.hydrate()
    yield v
    shoal.Volume.objects.delete(name, allow_missing=True)


def _volume_dir(daemon, v: shoal.Volume) -> Path:
    return daemon.data_dir / "volumes" / v.object_id / "root"


def _upload(v: shoal.Volume, files: dict[str, bytes], force: bool = False) -> None:
    with v.batch_upload(force=force) as batch:
        for path, data in files.items():
            batch.put_file(io.BytesIO(data), path)


def _read(v: shoal.Volume, path: str) -> bytes:
    return b"".join(v.read_file(path))


# ------------------------------------------------------------------ lifecycle


def test_from_name_is_lazy_and_create_if_missing_creates(daemon):
    name = _name()
    missing = shoal.Volume.from_name(name)
    assert missing.name == name and not missing.is_hydrated
    with pytest.raises(NotFoundError, match=name):
        missing.listdir("/")
    created = shoal.Volume.from_name(name, create_if_missing=True)
    try:
        assert created.listdir("/") == []
        assert created.object_id.startswith("vo-")
        # Another handle finds the same volume.
        assert shoal.Volume.from_name(name).hydrate().object_id == created.object_id
        assert shoal.Volume.from_id(created.object_id).listdir("/") == []
        info = created.info()
        assert info.name == name and info.created_at.timestamp() <= time.time() and info.created_by is None
    finally:
        shoal.Volume.objects.delete(name)
    with pytest.raises(NotFoundError):
        shoal.Volume.from_id(created.object_id).listdir("/")
    with pytest.raises(InvalidError, match="version"):
        shoal.Volume.from_name(name, version=3)


def test_objects_create_list_rename_delete(daemon):
    a, b = _name("objs"), _name("objs")
    shoal.Volume.objects.create(a)
    try:
        with pytest.raises(AlreadyExistsError):
            shoal.Volume.objects.create(a)
        shoal.Volume.objects.create(a, allow_existing=True)
        names = [v.name for v in shoal.Volume.objects.list()]
        assert a in names
        assert len(shoal.Volume.objects.list(max_objects=1)) == 1
        _upload(shoal.Volume.from_name(a), {"kept.txt": b"kept"})
        shoal.Volume.rename(a, b)
        with pytest.raises(NotFoundError):
            shoal.Volume.from_name(a).hydrate()
        assert _read(shoal.Volume.from_name(b), "kept.txt") == b"kept"  # content follows the name
        shoal.Volume.objects.create(a)
        with pytest.raises(AlreadyExistsError):
            shoal.Volume.rename(b, a)
    finally:
        shoal.Volume.objects.delete(a, allow_missing=True)
        shoal.Volume.objects.delete(b, allow_missing=True)
    with pytest.raises(NotFoundError):
        shoal.Volume.objects.delete(b)
    shoal.Volume.objects.delete(b, allow_missing=True)
    assert b not in [v.name for v in shoal.Volume.objects.list()]
    with pytest.raises(InvalidError, match="invalid volume name"):
        shoal.Volume.objects.create("bad name!")


def test_deprecated_delete_warns(daemon):
    name = _name()
    shoal.Volume.objects.create(name)
    with pytest.warns(shoal.exception.DeprecationError):
        shoal.Volume.delete(name)
    with pytest.raises(NotFoundError):
        shoal.Volume.from_name(name).hydrate()


def test_deleting_a_volume_removes_its_files(daemon):
    name = _name()
    v = shoal.Volume.from_name(name, create_if_missing=True)
    _upload(v, {"a/b/c.txt": b"x" * 1000})
    d = _volume_dir(daemon, v)
    assert d.is_dir()
    shoal.Volume.objects.delete(name)
    assert not d.exists()
    deadline = time.monotonic() + 10
    while any((daemon.data_dir / "volumes" / ".trash").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any((daemon.data_dir / "volumes" / ".trash").iterdir())


def test_ephemeral_volume_sync_and_async(daemon):
    with shoal.Volume.ephemeral(_heartbeat_sleep=60) as v:  # Modal's private heartbeat period: no heartbeat here
        assert v.listdir("/") == []
        _upload(v, {"x.txt": b"x"})
        volume_id = v.object_id
        assert v.name is None
        assert volume_id not in [x.object_id for x in shoal.Volume.objects.list()]  # not a named volume
    with pytest.raises(NotFoundError):
        shoal.Volume.from_id(volume_id).hydrate()
    assert not (daemon.data_dir / "volumes" / volume_id).exists()

    async def main() -> str:
        async with shoal.Volume.ephemeral() as v:
            assert await v.listdir.aio("/") == []
            async with v.batch_upload() as batch:
                batch.put_file(io.BytesIO(b"async"), "a.txt")
            chunks = [c async for c in v.read_file.aio("a.txt")]
            assert b"".join(chunks) == b"async"
            return v.object_id

    volume_id = asyncio.run(main())
    with pytest.raises(NotFoundError):
        shoal.Volume.from_id(volume_id).hydrate()


def test_volume_usage_is_reported(daemon, vol):
    _upload(vol, {"big.bin": os.urandom(1 << 20), "small/a": b"a"})
    [item] = [i for i in _cli_json("volume", "ls") if i["name"] == vol.name]
    assert item["size_bytes"] >= 1 << 20


def _cli_json(*args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "shoal", *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "SHOAL_NO_AUTOSTART": "1"},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ------------------------------------------------------------------ data API


def test_batch_upload_paths_fileobjs_directories_and_modes(daemon, vol, tmp_path):
    local = tmp_path / "local.txt"
    local.write_text("from a path")
    local.chmod(0o600)
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "top.txt").write_text("top")
    (tree / "sub" / "mid.txt").write_text("mid")
    (tree / "sub" / "deeper" / "low.txt").write_text("low")
    flat = tmp_path / "flat"
    (flat / "ignored").mkdir(parents=True)
    (flat / "only.txt").write_text("only")
    (flat / "ignored" / "no.txt").write_text("no")
    with vol.batch_upload() as batch:
        batch.put_file(local, "/remote.txt")
        batch.put_file(str(local), "as-str.txt", mode=0o640)
        batch.put_file(io.BytesIO(b"\x00\x01binary"), "bin/blob")
        batch.put_file(io.BytesIO(b"exec"), "bin/run.sh", mode=0o755)
        batch.put_directory(tree, "/remote_dir")
        batch.put_directory(str(flat), "flat", recursive=False)
    assert _read(vol, "remote.txt") == b"from a path"
    assert _read(vol, "/as-str.txt") == b"from a path"
    assert _read(vol, "bin/blob") == b"\x00\x01binary"
    assert _read(vol, "remote_dir/sub/deeper/low.txt") == b"low"
    assert _read(vol, "flat/only.txt") == b"only"
    with pytest.raises(FileNotFoundError):
        _read(vol, "flat/ignored/no.txt")
    root = _volume_dir(daemon, vol)
    modes = {p: (root / p).stat().st_mode & 0o777 for p in ("remote.txt", "as-str.txt", "bin/blob", "bin/run.sh")}
    assert modes == {"remote.txt": 0o600, "as-str.txt": 0o640, "bin/blob": 0o644, "bin/run.sh": 0o755}
    # Everything belongs to the sandbox's root user (host uid 100000), directories included.
    for p in ("remote.txt", "bin", "bin/blob", "remote_dir/sub/deeper", "remote_dir/sub/deeper/low.txt"):
        st = (root / p).stat()
        assert (st.st_uid, st.st_gid) == (100000, 100000), p
    assert (root / "bin").stat().st_mode & 0o777 == 0o755
    # Nothing is left in staging.
    assert list((root.parent / "staging").iterdir()) == []


def test_batch_upload_refuses_overwrites_unless_forced(daemon, vol):
    _upload(vol, {"a.txt": b"one", "dir/x": b"x"})
    with pytest.raises(FileExistsError, match=r"a\.txt"):
        _upload(vol, {"new.txt": b"n", "a.txt": b"two"})
    assert _read(vol, "a.txt") == b"one"
    with pytest.raises(FileNotFoundError):
        _read(vol, "new.txt")  # the batch is all or nothing
    _upload(vol, {"a.txt": b"two"}, force=True)
    assert _read(vol, "a.txt") == b"two"
    with pytest.raises(InvalidError, match="directory"):
        _upload(vol, {"dir": b"not a dir"}, force=True)  # directories are never overwritten
    with pytest.raises(InvalidError, match="parent"):
        _upload(vol, {"a.txt/inside": b"x"})
    with pytest.raises(ValueError, match="cannot end with /"), vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"x"), "dir/")
    with pytest.raises(InvalidError, match=r"\.\."), vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"x"), "../escape")
    # An exception inside the block uploads nothing.
    with pytest.raises(RuntimeError), vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"x"), "never.txt")
        raise RuntimeError
    with pytest.raises(FileNotFoundError):
        _read(vol, "never.txt")


def test_read_file_streams_and_read_into_fileobj(daemon, vol):
    data = os.urandom(5 << 20) + b"tail"
    _upload(vol, {"data.bin": data, "empty": b""})
    chunks = list(vol.read_file("data.bin"))
    assert len(chunks) > 1 and b"".join(chunks) == data
    buf = io.BytesIO()
    progress: list[int] = []
    assert vol.read_file_into_fileobj("data.bin", buf, progress_cb=lambda advance: progress.append(advance)) == len(
        data
    )
    assert buf.getvalue() == data and sum(progress) == len(data)
    assert _read(vol, "empty") == b""
    with pytest.raises(FileNotFoundError):
        _read(vol, "missing.bin")
    with pytest.raises(FileNotFoundError):
        vol.read_file_into_fileobj("missing.bin", io.BytesIO())
    with pytest.raises(InvalidError, match="directory"):
        _read(vol, "/")


def test_listdir_and_iterdir(daemon, vol):
    _upload(vol, {"a.txt": b"aa", "d/b.txt": b"bbb", "d/e/c.txt": b"c"})
    top = vol.listdir("/")
    assert sorted((e.path, e.type) for e in top) == [("a.txt", FileEntryType.FILE), ("d", FileEntryType.DIRECTORY)]
    assert all(isinstance(e, FileEntry) for e in top)
    a = next(e for e in top if e.path == "a.txt")
    assert a.size == 2 and abs(a.mtime - time.time()) < 120
    assert sorted(e.path for e in vol.listdir("d", recursive=True)) == ["d/b.txt", "d/e", "d/e/c.txt"]
    assert sorted(e.path for e in vol.iterdir("/")) == ["a.txt", "d", "d/b.txt", "d/e", "d/e/c.txt"]
    assert [e.path for e in vol.listdir("d/b.txt")] == ["d/b.txt"]  # a file lists itself
    with pytest.raises(NotFoundError):
        vol.listdir("nope")
    with pytest.raises(InvalidError, match="Glob"):
        vol.listdir("d/*")
    with pytest.raises(InvalidError, match="recursive=True"):
        vol.listdir("d/**")

    async def main() -> list[str]:
        return sorted([e.path async for e in vol.iterdir.aio("d", recursive=False)])

    assert asyncio.run(main()) == ["d/b.txt", "d/e"]


def test_remove_file(daemon, vol):
    _upload(vol, {"a.txt": b"a", "d/b.txt": b"b", "d/e/c.txt": b"c"})
    vol.remove_file("a.txt")
    with pytest.raises(FileNotFoundError):
        vol.remove_file("a.txt")
    with pytest.raises(InvalidError, match="recursive=True"):
        vol.remove_file("d")
    vol.remove_file("/d", recursive=True)
    assert vol.listdir("/") == []
    _upload(vol, {"empty/x": b""})
    vol.remove_file("empty/x")
    vol.remove_file("empty")  # an empty directory needs no recursive=True
    with pytest.raises(InvalidError, match="root"):
        vol.remove_file("/", recursive=True)


def test_copy_files(daemon, vol):
    _upload(vol, {"a.txt": b"a", "b.txt": b"b", "dir/x.txt": b"x", "dir/sub/y.txt": b"y", "dest/keep": b""})
    vol.copy_files(["a.txt"], "a-copy.txt")
    assert _read(vol, "a-copy.txt") == b"a"
    vol.copy_files(["a.txt", "b.txt"], "dest")
    assert _read(vol, "dest/a.txt") == b"a" and _read(vol, "dest/b.txt") == b"b"
    vol.copy_files(["b.txt"], "a-copy.txt")  # cp overwrites a file
    assert _read(vol, "a-copy.txt") == b"b"
    with pytest.raises(InvalidError, match="directory"):
        vol.copy_files(["a.txt", "b.txt"], "not-a-dir")
    with pytest.raises(InvalidError, match="recursive=True"):
        vol.copy_files(["dir"], "dir2")
    vol.copy_files(["dir"], "dir2", recursive=True)
    assert _read(vol, "dir2/sub/y.txt") == b"y"
    vol.copy_files(["dir"], "dest", recursive=True)
    assert _read(vol, "dest/dir/x.txt") == b"x"
    with pytest.raises(InvalidError, match="into itself"):
        vol.copy_files(["dir"], "dir/sub", recursive=True)
    with pytest.raises(NotFoundError):
        vol.copy_files(["missing"], "x")
    root = _volume_dir(daemon, vol)
    assert (root / "dir2" / "sub" / "y.txt").stat().st_uid == 100000
    assert list((root.parent / "staging").iterdir()) == []


def test_read_only_handles_refuse_writes(daemon, vol):
    ro = vol.read_only()
    assert ro.object_id == vol.object_id
    for call in (
        lambda: ro.batch_upload(),
        lambda: ro.remove_file("x"),
        lambda: ro.copy_files(["a"], "b"),
    ):
        with pytest.raises(InvalidError, match="Read-only"):
            call()
    assert ro.listdir("/") == []


# ------------------------------------------------------------------ mounting


@pytest.mark.usefixtures("each_runtime")
def test_seed_volume_example(daemon):
    app = modal.App.lookup("sandbox-app", create_if_missing=True)
    name = _name("my-volume")
    try:
        volume = modal.Volume.from_name(name, create_if_missing=True)

        sb = modal.Sandbox.create(
            volumes={"/data": volume},
            app=app,
        )

        # Files written to /data persist across sandboxes
        sb.exec("bash", "-c", "echo 'hello' > /data/output.txt").wait()

        sb.terminate()
        sb2 = modal.Sandbox.create(volumes={"/data": volume}, app=app)
        try:
            assert sb2.exec("cat", "/data/output.txt").stdout.read() == "hello\n"
        finally:
            sb2.terminate()
        assert _read(volume, "output.txt") == b"hello\n"
    finally:
        modal.Volume.objects.delete(name, allow_missing=True)


@pytest.mark.usefixtures("each_runtime")
def test_seed_ephemeral_volume_example(daemon, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("local.txt").write_text("local contents\n")
    Path("local_dir").mkdir()
    Path("local_dir/one.txt").write_text("one\n")
    app = modal.App.lookup("sandbox-app", create_if_missing=True)

    # Ephemeral volume (auto-cleanup)
    with modal.Volume.ephemeral() as vol:
        # Upload files
        with vol.batch_upload() as batch:
            batch.put_file("local.txt", "/remote.txt")
            batch.put_directory("./local_dir", "/remote_dir")

        sb = modal.Sandbox.create(
            volumes={"/data": vol},
            app=app,
        )

        # Work with files
        sb.exec("cat", "/data/remote.txt").wait()
        assert sb.exec("cat", "/data/remote_dir/one.txt").stdout.read() == "one\n"
        sb.exec("bash", "-c", "cat /data/remote.txt > /data/output.txt").wait()

        sb.terminate()
        sb.wait(raise_on_termination=False)

        # Read files after sandbox terminates
        for chunk in vol.read_file("output.txt"):
            print(chunk)
        volume_id = vol.object_id

    assert capsys.readouterr().out == "b'local contents\\n'\n"
    with pytest.raises(NotFoundError):
        modal.Volume.from_id(volume_id).hydrate()


def test_two_sandboxes_share_one_volume_at_once(app, vol):
    a = shoal.Sandbox.create(app=app, volumes={"/shared": vol}, timeout=120)
    b = shoal.Sandbox.create(app=app, volumes={"/mnt/other": vol}, timeout=120)
    try:
        assert a.exec("bash", "-c", "echo from-a > /shared/a.txt").wait() == 0
        assert b.exec("cat", "/mnt/other/a.txt").stdout.read() == "from-a\n"
        assert b.exec("bash", "-c", "echo from-b >> /mnt/other/a.txt").wait() == 0
        assert a.exec("cat", "/shared/a.txt").stdout.read() == "from-a\nfrom-b\n"
        # The API sees the sandboxes' writes while they run, and they see the API's.
        assert _read(vol, "a.txt") == b"from-a\nfrom-b\n"
        _upload(vol, {"from-api.txt": b"api"})
        assert a.exec("cat", "/shared/from-api.txt").stdout.read() == "api"
        # Files a sandbox makes belong to its root user; what the API uploaded it can change.
        p = a.exec(
            "bash", "-c", "stat -c '%u:%g %a' /shared/a.txt /shared/from-api.txt; echo more >> /shared/from-api.txt"
        )
        assert p.stdout.read() == "0:0 644\n0:0 644\n" and p.wait() == 0
    finally:
        a.terminate()
        b.terminate()


def test_read_only_mount_is_enforced(app, vol):
    _upload(vol, {"ro.txt": b"read me"})
    sb = shoal.Sandbox.create(app=app, volumes={"/ro": vol.read_only()})
    try:
        assert sb.exec("cat", "/ro/ro.txt").stdout.read() == "read me"
        p = sb.exec("bash", "-c", "echo x > /ro/new.txt")
        assert p.wait() != 0 and "Read-only file system" in p.stderr.read()
        p = sb.exec("bash", "-c", "rm /ro/ro.txt")
        assert p.wait() != 0
        p = sb.exec("mount", "-o", "remount,rw", "/ro")
        assert p.wait() != 0
        p = sb.exec("bash", "-c", "echo x > /ro/new.txt")
        assert p.wait() != 0
        assert _read(vol, "ro.txt") == b"read me"
        with pytest.raises(FileNotFoundError):
            _read(vol, "new.txt")
    finally:
        sb.terminate()


def test_sub_path_mounts_only_that_directory(app, vol):
    _upload(vol, {"top.txt": b"top", "projects/p1/readme": b"p1"})
    sb = shoal.Sandbox.create(
        app=app,
        volumes={
            "/p1": vol.with_mount_options(sub_path="projects/p1"),
        },
    )
    try:
        assert sb.exec("ls", "/p1").stdout.read() == "readme\n"
        assert sb.exec("bash", "-c", "echo new > /p1/new.txt").wait() == 0
        assert sb.exec("bash", "-c", "ls /p1/..").stdout.read() != "top.txt\n"
    finally:
        sb.terminate()
    assert _read(vol, "projects/p1/new.txt") == b"new\n"
    # A missing sub_path is created, owned by the sandbox's root.
    sb = shoal.Sandbox.create(app=app, volumes={"/fresh": vol.with_mount_options(sub_path="/made/here")})
    try:
        assert sb.exec("bash", "-c", "touch /fresh/ok && stat -c %u /fresh").stdout.read() == "0\n"
    finally:
        sb.terminate()
    assert [e.path for e in vol.listdir("made/here")] == ["made/here/ok"]


def test_sync_commit_reload_and_reload_volumes(app, vol):
    sb = shoal.Sandbox.create(app=app, volumes={"/data": vol})
    try:
        sb.exec("bash", "-c", "echo 'data' > /data/file.txt").wait()
        assert sb.exec("sync", "/data").wait() == 0  # Persist changes immediately
        assert _read(vol, "file.txt") == b"data\n"
        vol.commit()
        vol.reload()
        _upload(vol, {"later.txt": b"later"})
        sb.reload_volumes()
        assert sb.exec("cat", "/data/later.txt").stdout.read() == "later"
    finally:
        sb.terminate()
    with pytest.raises(shoal.exception.ConflictError):
        sb.reload_volumes()
    with pytest.raises(RuntimeError):
        shoal.Volume.from_name(_name()).commit()


def test_mount_validation(app, vol):
    with pytest.raises(InvalidError, match="volumes"):
        shoal.Sandbox.create(app=app, volumes={"/data": "not a volume"})
    with pytest.raises(InvalidError, match="absolute"):
        shoal.Sandbox.create(app=app, volumes={"data": vol})
    with pytest.raises(InvalidError, match="mounted"):
        shoal.Sandbox.create(app=app, volumes={"/a": vol, "/b": vol.read_only()})
    with pytest.raises(InvalidError, match="reserved"):
        shoal.Sandbox.create(app=app, volumes={"/proc/x": vol})
    with pytest.raises(InvalidError, match="'/'"):
        shoal.Sandbox.create(app=app, volumes={"/": vol})
    with pytest.raises(NotFoundError):
        shoal.Sandbox.create(app=app, volumes={"/data": shoal.Volume.from_name(_name())})
    with pytest.raises(InvalidError, match=r"\.\."):
        vol.with_mount_options(sub_path="../x")


# ------------------------------------------------------------------ restarts


def test_volume_data_survives_a_daemon_restart(own_daemon):
    app = shoal.App.lookup("volume-restart", create_if_missing=True)
    name = _name()
    v = shoal.Volume.from_name(name, create_if_missing=True)
    _upload(v, {"before.txt": b"before"})
    sb = shoal.Sandbox.create(app=app, volumes={"/data": v}, timeout=120)
    try:
        sb.exec("bash", "-c", "echo written > /data/in-sandbox.txt").wait()
        own_daemon.restart(signal.SIGKILL)
        # The running sandbox keeps its mount; the API still finds the volume by name.
        assert sb.exec("cat", "/data/before.txt").stdout.read() == "before"
        v2 = shoal.Volume.from_name(name)
        assert _read(v2, "in-sandbox.txt") == b"written\n"
        assert v2.object_id == v.object_id
    finally:
        sb.terminate()
    own_daemon.restart()
    assert _read(shoal.Volume.from_name(name), "before.txt") == b"before"
    shoal.Volume.objects.delete(name)


class _StallingReader(io.RawIOBase):
    """A file of ``total`` bytes that hands out ``first`` of them, then blocks until released (mid-upload)."""

    def __init__(self, first: int, total: int) -> None:
        self.first = first
        self.total = total
        self.pos = 0
        self.stalled = threading.Event()
        self.release = threading.Event()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = self.total + offset if whence == os.SEEK_END else offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.first:
            self.stalled.set()
            self.release.wait(60)
            return b""
        n = min(n if n > 0 else self.first, self.first - self.pos)
        self.pos += n
        return b"n" * n


def test_kill_9_mid_upload_commits_nothing(own_daemon):
    name = _name()
    v = shoal.Volume.from_name(name, create_if_missing=True)
    _upload(v, {"file.bin": b"old contents"})
    staging = own_daemon.data_dir / "volumes" / v.object_id / "staging"
    reader = _StallingReader(first=8 << 20, total=64 << 20)

    # A batch: one whole small file, then a big file of which only part arrives.
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            with v.batch_upload(force=True) as batch:
                batch.put_file(io.BytesIO(b"complete"), "other.txt")
                batch.put_file(reader, "file.bin")  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=upload)
    t.start()
    assert reader.stalled.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the daemon has received bytes of the big file
        temps = list(staging.iterdir())
        if len(temps) == 2 and max(p.stat().st_size for p in temps) > 0:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the upload never reached the daemon: {list(staging.iterdir())}")
    own_daemon.stop(signal.SIGKILL)
    reader.release.set()
    t.join(30)
    assert errors, "the upload should have failed"
    own_daemon.start()
    v2 = shoal.Volume.from_name(name)
    assert _read(v2, "file.bin") == b"old contents"
    with pytest.raises(FileNotFoundError):
        _read(v2, "other.txt")
    assert list(staging.iterdir()) == []
    shoal.Volume.objects.delete(name)
