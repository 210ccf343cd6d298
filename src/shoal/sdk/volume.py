"""``Volume``: a persistent directory that sandboxes mount and that the API can read and write directly.

Examples:
    vol = shoal.Volume.from_name("my-volume", create_if_missing=True)
    with vol.batch_upload() as batch:
        batch.put_file("local.txt", "/remote.txt")
    sb = shoal.Sandbox.create(volumes={"/data": vol}, app=app)
    for chunk in vol.read_file("remote.txt"):
        print(chunk)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import PurePosixPath
from types import TracebackType
from typing import IO, Any

from shoal.exception import (
    DeprecationError,
    InvalidError,
    NotFoundError,
    ServiceError,
)
from shoal.sdk._listing import filter_listing
from shoal.sdk._sync import live_function, live_method, live_method_generator, run_async, run_blocking
from shoal.sdk.dashboard import DashboardLink
from shoal.sdk.transport import Client, default_client
from shoal.sdk.volume_upload import VolumeUploadBatch
from shoal.types import FileEntry, FileEntryType, VolumeInfo
from shoal.wire import routes, times
from shoal.wire.base import dump
from shoal.wire.volumes import CopyFiles, RemoveFile, VolumeCreate, VolumeLookup, VolumeRename

HEARTBEAT_SECONDS = 60.0
"""How often an ephemeral volume tells the daemon its client is alive (the daemon waits 15 minutes)."""
UPLOAD_CHUNK = 1 << 20
READ_CHUNK = 1 << 20


def _read_only_error() -> InvalidError:
    return InvalidError("Read-only Volume can not be written to")


def _check_glob(path: str) -> None:
    if path.endswith("**"):
        raise InvalidError("Glob patterns in `Volume.listdir()` are not supported: pass recursive=True instead")
    if path.endswith("*"):
        raise InvalidError("Glob patterns in `Volume.listdir()` are not supported: remove the glob `*` suffix")


class _Ref:
    """What a volume handle refers to; shared by the handles ``with_mount_options`` derives."""

    def __init__(
        self,
        *,
        name: str | None = None,
        volume_id: str | None = None,
        create_if_missing: bool = False,
        version: int | None = None,
    ) -> None:
        self.name = name
        self.volume_id = volume_id
        self.create_if_missing = create_if_missing
        self.version = version
        self.info: dict[str, Any] | None = None
        self.lock: asyncio.Lock | None = None

    def absorb(self, info: dict[str, Any]) -> None:
        self.info = info
        self.volume_id = info["volume_id"]
        self.name = info.get("name")


class _VolumeManager:
    """``Volume.objects``: manage named volumes."""

    @live_function
    async def create(
        name: str,
        *,
        version: int | None = None,
        allow_existing: bool = False,
        environment_name: str | None = None,
        client: Any = None,
    ) -> None:
        """Create a named volume; AlreadyExistsError if it exists (unless ``allow_existing``)."""
        if version is not None and version not in (1, 2):
            raise InvalidError("VolumeFS version must be either 1 or 2")
        await default_client().request(
            "POST",
            routes.path("volumes"),
            json_body=dump(VolumeCreate, name=name, allow_existing=allow_existing, version=version),
            idempotent=False,
        )

    @live_function
    async def list(
        *,
        max_objects: int | None = None,
        created_before: datetime | str | None = None,
        environment_name: str = "",
        client: Any = None,
    ) -> list[Volume]:
        """Named volumes, newest first."""
        resp = await default_client().request("GET", routes.path("volumes"))
        return [Volume._hydrated(i) for i in filter_listing(resp["volumes"], max_objects, created_before)]

    @live_function
    async def delete(
        name: str, *, allow_missing: bool = False, environment_name: str | None = None, client: Any = None
    ) -> None:
        """Delete a named volume and everything in it."""
        params = {"allow_missing": "1"} if allow_missing else None
        await default_client().request(
            "DELETE", routes.path("volumes", "by-name", name), params=params, idempotent=False
        )


class Volume(DashboardLink):
    """A persistent, shareable directory.

    Examples:
        vol = shoal.Volume.from_name("my-volume", create_if_missing=True)
        sb = shoal.Sandbox.create(volumes={"/data": vol}, app=app)
        sb.exec("bash", "-c", "echo hello > /data/out.txt").wait()
        print(b"".join(vol.read_file("out.txt")))
    """

    objects = _VolumeManager()

    def __init__(self, ref: _Ref, *, read_only: bool = False, sub_path: str | None = None, rep: str = "") -> None:
        self._ref = ref
        self._read_only = read_only
        self._sub_path = sub_path
        self._rep = rep or (f"Volume.from_name({ref.name!r})" if ref.name else f"Volume({ref.volume_id})")

    def __repr__(self) -> str:
        return self._rep

    @staticmethod
    def _hydrated(info: dict[str, Any]) -> Volume:
        ref = _Ref(name=info.get("name"), volume_id=info["volume_id"])
        ref.absorb(info)
        return Volume(ref)

    # ------------------------------------------------------------------ references

    @staticmethod
    def from_name(
        name: str,
        *,
        namespace: Any = None,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        version: int | None = None,
        create_options: Any = None,
        client: Any = None,
    ) -> Volume:
        """A lazy reference to the volume called ``name``: resolved (and created if asked) on first use."""
        if not isinstance(name, str) or not name:
            raise InvalidError("Volume name must be a non-empty string")
        if version is not None and version not in (1, 2):
            raise InvalidError("VolumeFS version must be either 1 or 2")
        return Volume(_Ref(name=name, create_if_missing=create_if_missing, version=version))

    @staticmethod
    def from_id(volume_id: str, client: Any = None) -> Volume:
        """A lazy reference to a volume by its id (``vo-…``)."""
        return Volume(_Ref(volume_id=volume_id), rep=f"Volume.from_id({volume_id!r})")

    @classmethod
    def ephemeral(
        cls,
        client: Any = None,
        environment_name: str | None = None,
        version: int | None = None,
        create_options: Any = None,
        _heartbeat_sleep: float = 300,
    ) -> _EphemeralVolume:
        """A nameless volume for the duration of a ``with``/``async with`` block; removed when it exits.

        Examples:
            with shoal.Volume.ephemeral() as vol:
                assert vol.listdir("/") == []
        """
        return _EphemeralVolume()

    @live_function
    async def rename(old_name: str, new_name: str, *, client: Any = None, environment_name: str | None = None) -> None:
        """Rename a named volume (its content stays where it is)."""
        await default_client().request(
            "POST",
            routes.path("volumes", "rename"),
            json_body=dump(VolumeRename, old_name=old_name, new_name=new_name),
            idempotent=False,
        )

    @live_function
    async def delete(name: str, client: Any = None, environment_name: str | None = None) -> None:
        """Deprecated: use ``Volume.objects.delete``."""
        warnings.warn(
            "Volume.delete is deprecated (2025-08-06); use Volume.objects.delete", DeprecationError, stacklevel=3
        )
        await Volume.objects.delete.aio(name)

    # ------------------------------------------------------------------ handle

    @property
    def client(self) -> Client:
        """The client this object reaches the daemon with (Modal's ``.client``): pass it as ``client=`` to
        other calls."""
        return default_client()

    @property
    def name(self) -> str | None:
        """The volume's name (None for ephemeral volumes)."""
        return self._ref.name

    @property
    def object_id(self) -> str:
        """The volume's id (``vo-…``); the volume must have been used or hydrated."""
        if self._ref.volume_id is None:
            raise InvalidError(f"{self._rep} is not hydrated yet: call .hydrate() or use it first")
        return self._ref.volume_id

    def _dashboard_page(self) -> str:
        return f"volumes/{self.object_id}"

    @property
    def is_hydrated(self) -> bool:
        """Whether the daemon has resolved this reference."""
        return self._ref.info is not None

    def with_mount_options(
        self, *, read_only: bool | None = None, sub_path: str | PurePosixPath | None = None
    ) -> Volume:
        """The same volume, mounted read-only and/or only its ``sub_path`` directory."""
        sub = self._sub_path if sub_path is None else PurePosixPath(sub_path).as_posix()
        if sub is not None and ".." in sub.split("/"):
            raise InvalidError(f"sub_path must not contain '..': {sub!r}")
        ro = self._read_only if read_only is None else bool(read_only)
        return Volume(self._ref, read_only=ro, sub_path=sub, rep=self._rep)

    def read_only(self) -> Volume:
        """The same volume, mounted read-only; writes through this handle raise InvalidError."""
        return self.with_mount_options(read_only=True)

    def _client(self) -> Client:
        return default_client()

    async def _hydrate(self) -> str:
        ref = self._ref
        if ref.info is not None:
            assert ref.volume_id is not None
            return ref.volume_id
        if ref.lock is None:
            ref.lock = asyncio.Lock()
        async with ref.lock:
            if ref.info is None:
                if ref.volume_id is not None:
                    info = await self._client().request("GET", routes.path("volumes", ref.volume_id))
                else:
                    info = await self._client().request(
                        "POST",
                        routes.path("volumes", "lookup"),
                        json_body=dump(
                            VolumeLookup, name=ref.name, create_if_missing=ref.create_if_missing, version=ref.version
                        ),
                    )
                ref.absorb(info)
        assert ref.volume_id is not None
        return ref.volume_id

    @live_method
    async def hydrate(self, client: Any = None) -> Volume:
        """Resolve the reference now (NotFoundError if there is no such volume)."""
        await self._hydrate()
        return self

    @live_method
    async def info(self) -> VolumeInfo:
        """The volume's name and creation time."""
        await self._hydrate()
        info = self._ref.info or {}
        return VolumeInfo(
            name=info.get("name"),
            created_at=times.to_datetime(info["created_at_us"]).astimezone(),
            created_by=None,
        )

    @live_method
    async def commit(self) -> None:
        """Make the volume's changes durable (they are visible to every sandbox at once)."""
        try:
            volume_id = await self._hydrate()
            await self._client().request("POST", routes.path("volumes", volume_id, "commit"))
        except NotFoundError as exc:
            raise RuntimeError(str(exc)) from None

    @live_method
    async def reload(self) -> None:
        """Pick up the latest committed state (shoal's volumes are always current: this checks the volume exists)."""
        try:
            volume_id = await self._hydrate()
            await self._client().request("GET", routes.path("volumes", volume_id))
        except NotFoundError as exc:
            raise RuntimeError(str(exc)) from None

    # ------------------------------------------------------------------ data

    @live_method_generator
    async def iterdir(self, path: str, *, recursive: bool = True) -> AsyncIterator[FileEntry]:
        """Entries under ``path`` (a file's own entry for a file path), everything below with ``recursive``."""
        _check_glob(path)
        volume_id = await self._hydrate()
        params = {"path": path, "recursive": "1" if recursive else "0"}
        buf = b""
        ended = False
        async for chunk in self._client().stream("GET", routes.path("volumes", volume_id, "entries"), params=params):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                item = json.loads(line)
                if item.get("end"):
                    ended = True
                    continue
                yield FileEntry(item["path"], FileEntryType(item["type"]), int(item["mtime"]), int(item["size"]))
        if not ended:
            raise ServiceError("the listing was interrupted; try again")

    @live_method
    async def listdir(self, path: str, *, recursive: bool = False) -> list[FileEntry]:
        """Entries under ``path`` as a list (see ``iterdir``)."""
        return [e async for e in self.iterdir.aio(path, recursive=recursive)]

    async def _read_stream(self, path: str) -> AsyncIterator[bytes]:
        volume_id = await self._hydrate()
        stream = self._client().stream("GET", routes.path("volumes", volume_id, "files"), params={"path": path})
        pending: list[bytes] = []
        size = 0
        try:
            async for chunk in stream:
                pending.append(chunk)
                size += len(chunk)
                if size >= READ_CHUNK:
                    yield b"".join(pending)
                    pending, size = [], 0
        except NotFoundError as exc:
            raise FileNotFoundError(str(exc)) from None
        if pending:
            yield b"".join(pending)

    @live_method_generator
    async def read_file(self, path: str) -> AsyncIterator[bytes]:
        """The file's content in chunks.  FileNotFoundError if there is no such file."""
        async for chunk in self._read_stream(path):
            yield chunk

    @live_method
    async def read_file_into_fileobj(
        self, path: str, fileobj: IO[bytes], progress_cb: Callable[..., Any] | None = None
    ) -> int:
        """Write the file's content into ``fileobj``; returns the number of bytes."""
        total = 0
        async for chunk in self._read_stream(path):
            fileobj.write(chunk)
            total += len(chunk)
            if progress_cb is not None:
                progress_cb(advance=len(chunk))
        return total

    @live_method
    async def remove_file(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a directory (with everything in it when ``recursive``)."""
        if self._read_only:
            raise _read_only_error()
        volume_id = await self._hydrate()
        try:
            await self._client().request(
                "POST",
                routes.path("volumes", volume_id, "remove"),
                json_body=dump(RemoveFile, path=path, recursive=recursive),
            )
        except NotFoundError as exc:
            raise FileNotFoundError(str(exc)) from None

    @live_method
    async def copy_files(self, src_paths: Sequence[str], dst_path: str, recursive: bool = False) -> None:
        """Copy within the volume with ``cp`` semantics (into ``dst_path`` if it is a directory)."""
        if self._read_only:
            raise _read_only_error()
        if isinstance(src_paths, str):
            raise InvalidError("src_paths must be a list of paths, e.g. ['a.txt']")
        volume_id = await self._hydrate()
        await self._client().request(
            "POST",
            routes.path("volumes", volume_id, "copy"),
            json_body=dump(CopyFiles, src_paths=list(src_paths), dst_path=dst_path, recursive=recursive),
            idempotent=False,
        )

    def batch_upload(self, force: bool = False) -> VolumeUploadBatch:
        """A batch of uploads, sent when the ``with`` block exits without an error.

        Examples:
            with vol.batch_upload() as batch:
                batch.put_file("local.txt", "/remote.txt")
                batch.put_directory("./local_dir", "/remote_dir")
                batch.put_file(io.BytesIO(b"data"), "/foobar")
        """
        if self._read_only:
            raise _read_only_error()
        return VolumeUploadBatch(self, force)


class _EphemeralVolume:
    """Context manager of ``Volume.ephemeral()``."""

    def __init__(self) -> None:
        self._volume: Volume | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def _enter(self) -> Volume:
        info = await default_client().request("POST", routes.path("volumes", "ephemeral"), idempotent=False)
        self._volume = Volume._hydrated(info)
        self._volume._rep = "Volume.ephemeral()"
        self._heartbeat = asyncio.create_task(self._beat(info["volume_id"]))
        return self._volume

    @staticmethod
    async def _beat(volume_id: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            with contextlib.suppress(ServiceError, OSError):
                await default_client().request("POST", routes.path("volumes", volume_id, "heartbeat"))

    async def _exit(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._volume is not None:
            with contextlib.suppress(NotFoundError):
                await default_client().request("DELETE", routes.path("volumes", self._volume.object_id))
            self._volume = None

    def __enter__(self) -> Volume:
        return run_blocking(self._enter())

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        run_blocking(self._exit())

    async def __aenter__(self) -> Volume:
        return await run_async(self._enter())

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        await run_async(self._exit())


async def mounts_body(volumes: Any) -> list[dict[str, Any]]:
    """The ``volumes`` of a create request: each mount path → a hydrated volume id and its mount options."""
    if not volumes:
        return []
    if not isinstance(volumes, dict):
        raise InvalidError("volumes must be a dict of mount path → shoal.Volume, e.g. {'/data': vol}")
    out: list[dict[str, Any]] = []
    for path, vol in volumes.items():
        mount = path.as_posix() if isinstance(path, PurePosixPath) else path
        if not isinstance(mount, str) or not mount.startswith("/"):
            raise InvalidError(f"volumes: mount paths must be absolute, e.g. '/data'; got {path!r}")
        if not isinstance(vol, Volume):
            raise InvalidError(f"volumes: {mount!r} must map to a shoal.Volume, got {type(vol).__name__}")
    for path, vol in volumes.items():
        mount = path.as_posix() if isinstance(path, PurePosixPath) else path
        volume_id = await vol._hydrate()
        if any(m["volume_id"] == volume_id for m in out):
            raise InvalidError(f"{vol!r} is mounted at two paths; a volume can be mounted once per sandbox")
        out.append({"path": mount, "volume_id": volume_id, "read_only": vol._read_only, "sub_path": vol._sub_path})
    return out
