"""``vol.batch_upload()``: files sent to a volume in one streamed request that lands whole or not at all.

The body is a sequence of frames: a 4-byte length, a JSON header (path, mode, size), then the file's bytes;
a zero length ends it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, TYPE_CHECKING, BinaryIO

import aiohttp

from shoal.exception import AlreadyExistsError, InvalidError
from shoal.sdk._sync import run_async, run_blocking
from shoal.sdk.transport import default_client, error_from
from shoal.wire import routes

if TYPE_CHECKING:
    from shoal.sdk.volume import Volume

UPLOAD_CHUNK = 1 << 20


@dataclass
class _Upload:
    remote: str
    mode: int
    path: Path | None = None
    fileobj: BinaryIO | None = None


class VolumeUploadBatch:
    """Files to upload to a volume; they appear together (or not at all) when the block exits."""

    def __init__(self, volume: Volume, force: bool) -> None:
        self._volume = volume
        self._force = force
        self._uploads: list[_Upload] = []

    def put_file(
        self, local_file: Path | str | BinaryIO | IO[bytes], remote_path: PurePosixPath | str, mode: int | None = None
    ) -> None:
        """Upload a local file or a file-like object to ``remote_path`` (parent directories are created)."""
        remote = str(remote_path)
        if remote.endswith("/"):
            raise ValueError(f"remote_path ({remote}) must refer to a file - cannot end with /")
        remote = PurePosixPath(remote).as_posix()
        if ".." in remote.split("/"):
            raise InvalidError(f"remote_path must not contain '..': {remote!r}")
        if isinstance(local_file, str | Path):
            self._uploads.append(_Upload(remote, -1 if mode is None else mode, path=Path(local_file)))
        else:
            self._uploads.append(_Upload(remote, 0o644 if mode is None else mode, fileobj=local_file))  # type: ignore[arg-type]

    def put_directory(self, local_path: Path | str, remote_path: PurePosixPath | str, recursive: bool = True) -> None:
        """Upload every file in a local directory (and below it with ``recursive``)."""
        local = Path(local_path)
        if not local.is_dir():
            raise InvalidError(f"put_directory: {local} is not a directory")
        remote = PurePosixPath(remote_path)
        if ".." in remote.parts:
            raise InvalidError(f"remote_path must not contain '..': {remote.as_posix()!r}")
        for sub in sorted(local.rglob("*") if recursive else local.glob("*")):
            if sub.is_file():
                self._uploads.append(_Upload((remote / sub.relative_to(local).as_posix()).as_posix(), -1, path=sub))

    async def _send(self) -> None:
        volume_id = await self._volume._hydrate()
        client = default_client()
        params = {"force": "1"} if self._force else None
        url = client.base_url + routes.path("volumes", volume_id, "files")
        for attempt in (1, 2):
            try:
                async with client._get_session().put(url, data=_frames(self._uploads), params=params) as resp:
                    body = await resp.read()
                break
            except aiohttp.ClientConnectorError as e:
                if attempt == 1 and await client._maybe_start_daemon(e):
                    continue
                raise client._unreachable(e) from e
            except aiohttp.ClientError as e:  # the daemon went away mid-upload: the batch is committed whole or not
                raise client._unreachable(e) from e
        if resp.status >= 400:
            err = error_from(resp.status, body)
            if isinstance(err, AlreadyExistsError):
                raise FileExistsError(str(err)) from None
            raise err

    def __enter__(self) -> VolumeUploadBatch:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if v is None:
            run_blocking(self._send())

    async def __aenter__(self) -> VolumeUploadBatch:
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if v is None:
            await run_async(self._send())


def _frame(remote: str, mode: int, size: int) -> bytes:
    header = json.dumps({"path": remote, "mode": mode & 0o7777, "size": size}).encode()
    return len(header).to_bytes(4, "big") + header


async def _frames(uploads: Iterable[_Upload]) -> AsyncIterator[bytes]:
    for up in uploads:
        if up.path is not None:
            with open(up.path, "rb") as f:  # noqa: ASYNC230 - local disk reads between network writes
                st = os.fstat(f.fileno())
                mode = st.st_mode & 0o777 if up.mode < 0 else up.mode
                yield _frame(up.remote, mode, st.st_size)
                remaining = st.st_size
                while remaining:
                    chunk = f.read(min(UPLOAD_CHUNK, remaining))
                    if not chunk:
                        raise InvalidError(f"{up.path} shrank while it was being uploaded")
                    remaining -= len(chunk)
                    yield chunk
        else:
            fobj = up.fileobj
            assert fobj is not None
            data: bytes | None = None
            try:
                start = fobj.tell()
                size = fobj.seek(0, os.SEEK_END) - start
                fobj.seek(start)
            except (OSError, AttributeError, ValueError):
                data = fobj.read()
                size = len(data)
            yield _frame(up.remote, up.mode, size)
            if data is not None:
                yield data
                continue
            remaining = size
            while remaining:
                chunk = fobj.read(min(UPLOAD_CHUNK, remaining))
                if not chunk:
                    raise InvalidError(f"a file object for {up.remote} ended early")
                remaining -= len(chunk)
                yield chunk
    yield (0).to_bytes(4, "big")
