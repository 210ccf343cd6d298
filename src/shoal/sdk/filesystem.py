"""``sb.filesystem``: Modal's filesystem namespace (read/write text and bytes, copy to and from local files, list,
stat, make directories, remove, watch).

Each call runs shoal's filesystem tool inside the sandbox (see ``shoal.sdk._fstool``): paths resolve in the
sandbox's own root, so no sandbox path (``..``, symlinks, ``/proc/1/root``) can reach a host file.  Only the
local side of ``copy_to_local``/``copy_from_local`` touches this machine's files, at the paths the caller gives.
Large files stream in chunks: neither this process nor the daemon holds a whole file in memory, except
``read_bytes``/``read_text``, which return it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

from shoal.exception import SandboxFilesystemError
from shoal.sdk import _fstool as tool
from shoal.sdk._sync import live_method, live_method_generator
from shoal.sdk.transport import Client
from shoal.types import FileInfo, FileWatchEvent, FileWatchEventType


async def _chunks(data: memoryview) -> AsyncIterator[memoryview]:
    for start in range(0, len(data), tool.UPLOAD_CHUNK):
        yield data[start : start + tool.UPLOAD_CHUNK]


def _open_beside(target: Path) -> tuple[Path, BinaryIO]:
    """A new temporary file in ``target``'s directory (created if missing), to be renamed onto ``target``."""
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.shoal-{secrets.token_hex(4)}"
    return tmp, open(tmp, "xb")


READ_SEGMENT = 256 << 20
"""Bytes of a file read by one run of the tool."""


class SandboxFilesystem:
    """The files of one sandbox, as its own root user sees them.  Paths must be absolute.

    Errors inside the sandbox raise ``shoal.exception.SandboxFilesystem*Error`` (not builtin ``OSError``s);
    a sandbox that has stopped raises ``NotFoundError``.  Reads, writes and copies take regular files only: a
    FIFO, socket or device raises ``SandboxFilesystemError`` ("Not a regular file (a FIFO) ...") at once.

    Examples:
        sb.filesystem.write_text("hello\\n", "/tmp/hello.txt")
        sb.filesystem.read_text("/tmp/hello.txt")          # "hello\\n"
        [f.name for f in sb.filesystem.list_files("/tmp")]  # ["hello.txt"]
    """

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    def __repr__(self) -> str:
        return f"SandboxFilesystem({self._sandbox_id})"

    async def _run(self, op: str, path: str, args: list[str], **kwargs: Any) -> tool.ToolResult:
        tool.check_absolute(path, op)
        argv = [*args, *tool.path_args(path, legacy=False, op=op)]
        try:
            return await tool.run_tool(self._client, self._sandbox_id, argv, **kwargs)
        except tool.ToolFailed as failure:
            raise tool.filesystem_error(failure, path) from None

    async def _read(
        self, op: str, remote_path: str, sink: Callable[[memoryview], Awaitable[None]] | None = None
    ) -> bytes:
        """A file's bytes (or, with ``sink``, each chunk handed to it), read in segments of READ_SEGMENT bytes.

        Segments keep what the daemon stores of one process's output bounded (it keeps at most its
        ``max_output_bytes`` per process, and deletes each segment once delivered), whatever the file's size.
        """
        parts: list[bytes] = []
        offset = 0
        while True:
            args = ["read", "-o", str(offset), "-n", str(READ_SEGMENT)]
            result = await self._run(op, remote_path, args, max_stdout=None, sink=sink)
            if tool.read_trailer(result.stderr) != result.stdout_bytes:
                raise SandboxFilesystemError(
                    f"reading {remote_path} was cut short at byte {offset + result.stdout_bytes}"
                )
            parts.append(result.stdout)
            offset += result.stdout_bytes
            if result.stdout_bytes < READ_SEGMENT:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    @live_method
    async def read_bytes(self, remote_path: str) -> bytes:
        """The contents of a file in the sandbox."""
        return await self._read("read_bytes", remote_path)

    @live_method
    async def read_text(self, remote_path: str) -> str:
        """The contents of a file in the sandbox, decoded as UTF-8."""
        return (await self._read("read_text", remote_path)).decode("utf-8")

    async def _write(self, op: str, data: memoryview, remote_path: str) -> None:
        await self._run(op, remote_path, ["write", "-n", str(data.nbytes)], stdin=_chunks(data.cast("B")))

    @live_method
    async def write_bytes(self, data: bytes | bytearray | memoryview, remote_path: str) -> None:
        """Write ``data`` to a file in the sandbox (parents are created; an existing file is replaced atomically:
        readers see the old or the new contents, never a mix, and a failed write leaves the old file)."""
        tool.check_absolute(remote_path, "write_bytes")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("data must be bytes-like")
        await self._write("write_bytes", memoryview(data), remote_path)

    @live_method
    async def write_text(self, data: str, remote_path: str) -> None:
        """Write ``data`` (as UTF-8) to a file in the sandbox; see ``write_bytes``."""
        tool.check_absolute(remote_path, "write_text")
        if not isinstance(data, str):
            raise TypeError("data must be str")
        await self._write("write_text", memoryview(data.encode("utf-8")), remote_path)

    @live_method
    async def copy_from_local(self, local_path: str | os.PathLike[str], remote_path: str) -> None:
        """Copy a local file into the sandbox, streaming it (parents are created; see ``write_bytes``).

        Local problems raise builtins: ``FileNotFoundError``, ``IsADirectoryError``, ``PermissionError``.
        """
        tool.check_absolute(remote_path, "copy_from_local")
        f = await asyncio.to_thread(open, local_path, "rb")
        try:
            size = os.fstat(f.fileno()).st_size

            async def chunks() -> AsyncIterator[bytes]:
                left = size
                while left > 0:
                    chunk = await asyncio.to_thread(f.read, min(left, tool.UPLOAD_CHUNK))
                    if not chunk:
                        raise OSError(f"{local_path} shrank while it was being copied; nothing was written")
                    left -= len(chunk)
                    yield chunk

            await self._run("copy_from_local", remote_path, ["write", "-n", str(size)], stdin=chunks())
        finally:
            f.close()

    @live_method
    async def copy_to_local(self, remote_path: str, local_path: str | os.PathLike[str]) -> None:
        """Copy a file from the sandbox to a local path, streaming it.  The local file appears complete or not at
        all: it is written under a temporary name beside it and renamed into place (parents are created)."""
        tool.check_absolute(remote_path, "copy_to_local")
        target = Path(local_path)
        tmp, f = await asyncio.to_thread(_open_beside, target)
        try:

            async def sink(data: memoryview) -> None:
                await asyncio.to_thread(f.write, data)

            await self._read("copy_to_local", remote_path, sink=sink)
            await asyncio.to_thread(f.close)
            await asyncio.to_thread(os.replace, tmp, target)
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @live_method
    async def list_files(self, remote_path: str) -> list[FileInfo]:
        """The entries of a directory (sorted by name; symlinks are described, not followed)."""
        result = await self._run("list_files", remote_path, ["ls"])
        return tool.listing(result.stdout, remote_path)

    @live_method
    async def stat(self, remote_path: str) -> FileInfo:
        """What ``remote_path`` is; a symlink describes itself (``lstat``)."""
        result = await self._run("stat", remote_path, ["stat"])
        return tool.file_info(tool.parse_json(result.stdout, "entry"), remote_path)

    @live_method
    async def make_directory(self, remote_path: str, *, create_parents: bool = True) -> None:
        """Create a directory.  With ``create_parents`` (the default), missing parents too, and an existing
        directory is fine; without, the parent must exist and the path must not."""
        await self._run("make_directory", remote_path, ["mkdir", *(["-p"] if create_parents else [])])

    @live_method
    async def remove(self, remote_path: str, *, recursive: bool = False) -> None:
        """Remove a file, a symlink (never what it points to) or an empty directory; ``recursive=True`` removes a
        directory with everything in it."""
        await self._run("remove", remote_path, ["rm", *(["-r"] if recursive else [])])

    @live_method_generator
    async def watch(
        self,
        remote_path: str,
        *,
        filter: list[FileWatchEventType] | None = None,
        recursive: bool = False,
        timeout: int | None = None,
    ) -> AsyncIterator[FileWatchEvent]:
        """Changes under ``remote_path`` as they happen (a directory's entries; with ``recursive``, the whole
        tree), until ``timeout`` seconds pass (then the iteration just ends), the sandbox stops, or you stop
        iterating.  A symlink is followed: events name paths under its target."""
        tool.check_absolute(remote_path, "watch")
        path = tool.path_args(remote_path, legacy=False, op="watch")
        events = tool.watch_events(
            self._client,
            self._sandbox_id,
            path,
            recursive=recursive,
            timeout=timeout,
            filter=filter,
            on_failure=lambda failure: tool.filesystem_error(failure, remote_path),
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
