"""``sb.open()`` → ``FileIO``, and the older ``sb.ls/mkdir/rm/watch``: Modal's alpha filesystem API.

A ``FileIO`` is one ``shoal-agent fs open`` process in the sandbox holding the open file, attached for as long
as the file is open; each method is one request/response exchange with it over the process's stdin and stdout
(format in ``agent/fstool.c``).  Paths resolve inside the sandbox (see ``shoal.sdk._fstool``); relative paths
resolve against the sandbox's working directory, as a process started there would see them.

Errors are builtin exceptions chosen by errno, as Modal's FileIO raises them: ``FileNotFoundError``,
``IsADirectoryError``, ``PermissionError``, ``FileExistsError``, ``NotADirectoryError``, ``OSError``.  Only regular
files open: a FIFO, socket or device is refused at once with ``OSError`` (``EINVAL``) saying what the path is,
instead of an open that would wait for a FIFO's other end or a read that never ends (``/dev/zero``).

Trust: the tool's answers are hostile input: records are bounded in size, an answer can never be longer than
what was asked for, and anything malformed ends the session with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

from shoal.exception import ConflictError, FilesystemExecutionError, NotFoundError
from shoal.sdk import _fstool as tool
from shoal.sdk._attach import STDOUT, Attached
from shoal.sdk._sync import live_method, run_async, run_blocking, sdk_loop
from shoal.sdk.transport import Client
from shoal.types import FileWatchEvent, FileWatchEventType

if TYPE_CHECKING:
    from _typeshed import OpenBinaryMode, OpenTextMode

T = TypeVar("T", str, bytes)

MAX_READ = 100 << 20
"""Most bytes one ``read(n)`` may ask for (Modal's limit; ``read()`` of a whole file has none)."""
MAX_WRITE = 1 << 30
"""Most bytes one ``write`` may carry (Modal's limit)."""
MAX_RECORD = 16 << 20
ALL = (1 << 64) - 1
_REQUEST = struct.Struct("<cBQI")
_HEAD = struct.Struct("<cI")
_background: set[asyncio.Task[None]] = set()


def _parse_mode(mode: object) -> tuple[bool, bool, bool]:
    """(readable, writable, binary) for a mode, with Modal's errors for invalid ones."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, not {type(mode).__name__}")
    if any(c not in "rwaxb+" for c in mode) or len(set(mode)) != len(mode):
        raise ValueError(f"Invalid file mode: {mode}")
    if sum(c in "rwax" for c in mode) != 1:
        raise ValueError("must have exactly one of create/read/write/append mode")
    return "r" in mode or "+" in mode, any(c in mode for c in "wax+"), "b" in mode


def _missing_tail(data: bytes) -> int:
    """How many bytes would complete a UTF-8 sequence cut off at the end of ``data``."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:
            continue
        need = 4 if b >= 0xF0 else 3 if b >= 0xE0 else 2 if b >= 0xC0 else 1
        return max(0, need - back)
    return 0


def _split_lines(data: T) -> list[T]:
    sep: Any = "\n" if isinstance(data, str) else b"\n"
    parts = data.split(sep)
    lines = [part + sep for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


class FileIO(Generic[T]):
    """A file open in a sandbox, from ``sb.open(path, mode)`` (Modal's alpha ``FileIO``).

    Text modes read and write ``str`` (UTF-8), binary modes (``b``) ``bytes``.  Writes reach the file at once
    (a process in the sandbox sees them immediately); ``close()`` or the ``with`` block ends the session.

    Examples:
        with sb.open("/tmp/notes.txt", "w") as f:
            f.write("one\\ntwo\\n")
        with sb.open("/tmp/notes.txt") as f:
            f.readline()     # "one\\n"
    """

    def __init__(self, att: Attached, path: str, mode: str) -> None:
        self._att = att
        self._path = path
        self._mode = mode
        self._readable, self._writable, self._binary = _parse_mode(mode)
        self._records: AsyncIterator[tuple[int, memoryview]] = att.records()
        self._buf = bytearray()
        self._stderr = bytearray()
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"FileIO({self._path!r}, {self._mode!r}{', closed' if self._closed else ''})"

    @staticmethod
    async def _open(client: Client, sandbox_id: str, path: str, mode: str) -> FileIO[Any]:
        _parse_mode(mode)
        argv = [tool.AGENT_PATH, "fs", "open", "-m", mode, *tool.path_args(path, legacy=True, op="open")]
        att = Attached(client, sandbox_id, argv)
        try:
            await att.start()
        except (NotFoundError, ConflictError):
            raise NotFoundError(tool.UNAVAILABLE) from None
        f: FileIO[Any] = FileIO(att, path, mode)
        try:
            await f._answer(0)
        except BaseException:
            f._closed = True
            await att.aclose()
            raise
        return f

    # ------------------------------------------------------------------ the session

    async def _take(self, n: int) -> bytes:
        """The next ``n`` bytes the tool wrote."""
        while len(self._buf) < n:
            try:
                kind, data = await anext(self._records)
            except StopAsyncIteration:
                await self._att.aclose()
                raise self._ended() from None
            if kind == STDOUT:
                self._buf += data
            else:
                self._stderr += data[: tool.MAX_STDERR - len(self._stderr)]
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _ended(self) -> Exception:
        self._closed = True
        if self._att.sandbox_finished:
            return NotFoundError(tool.UNAVAILABLE)
        detail = self._stderr.decode(errors="replace").strip()[-500:]
        return FilesystemExecutionError(f"the file's session in the sandbox ended unexpectedly {detail}".strip())

    async def _answer(self, limit: int) -> tuple[int, bytes]:
        """Read one answer: its data (at most ``limit`` bytes) and its value."""
        parts: list[bytes] = []
        got = 0
        while True:
            kind, n = _HEAD.unpack(await self._take(_HEAD.size))
            if n > MAX_RECORD:
                raise await self._broken()
            payload = await self._take(n)
            if kind == b"D":
                got += n
                if got > limit:
                    raise await self._broken()
                parts.append(payload)
            elif kind == b"K" and n == 8:
                return int.from_bytes(payload, "little"), b"".join(parts)
            elif kind == b"E":
                failure = tool.parse_failure(1, payload)
                raise tool.legacy_error(failure, self._path)
            else:
                raise await self._broken()

    async def _broken(self) -> Exception:
        self._closed = True
        await self._att.aclose()
        return FilesystemExecutionError("malformed answer from the sandbox's filesystem tool; the file was closed")

    async def _request(
        self, op: bytes, arg: int = 0, *, whence: int = 0, data: memoryview | None = None, limit: int = 0
    ) -> tuple[int, bytes]:
        async with self._lock:
            self._check_closed()
            size = data.nbytes if data is not None else 0
            await self._att.write(_REQUEST.pack(op, whence, arg & ALL, size))
            if data is not None:
                for start in range(0, size, tool.UPLOAD_CHUNK):
                    await self._att.write(data[start : start + tool.UPLOAD_CHUNK])
            return await self._answer(limit)

    # ------------------------------------------------------------------ checks

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed file")

    def _check_readable(self) -> None:
        if not self._readable:
            raise io.UnsupportedOperation("not readable")

    def _check_writable(self) -> None:
        if not self._writable:
            raise io.UnsupportedOperation("not writeable")

    def _decode(self, data: bytes) -> T:
        return cast(T, data if self._binary else data.decode("utf-8"))

    # ------------------------------------------------------------------ reading

    @live_method
    async def read(self, n: int | None = None) -> T:
        """Up to ``n`` bytes from the current position (text: ``n`` bytes' worth of characters, never a split
        one), or everything to the end of the file when ``n`` is None."""
        self._check_closed()
        self._check_readable()
        if n is not None and n > MAX_READ:
            raise ValueError("Read request payload exceeds 100 MiB limit")
        want = ALL if n is None or n < 0 else n
        _, data = await self._request(b"r", want, limit=want)
        if not self._binary and n is not None and (missing := _missing_tail(data)):
            _, more = await self._request(b"r", missing, limit=missing)
            data += more
        return self._decode(data)

    @live_method
    async def readline(self) -> T:
        """The next line, with its ``\\n`` (the rest of the file if it has none; empty at the end)."""
        self._check_closed()
        self._check_readable()
        _, data = await self._request(b"l", ALL, limit=ALL)
        return self._decode(data)

    @live_method
    async def readlines(self) -> list[T]:
        """The remaining lines, each with its ``\\n``."""
        self._check_closed()
        self._check_readable()
        _, data = await self._request(b"r", ALL, limit=ALL)
        return _split_lines(self._decode(data))

    # ------------------------------------------------------------------ writing

    @live_method
    async def write(self, data: bytes | str) -> None:
        """Write at the current position (the end, in append mode)."""
        self._check_closed()
        self._check_writable()
        if self._binary and isinstance(data, str):
            raise TypeError("Expected bytes when in binary mode")
        if not self._binary and isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("Expected str when in text mode")
        if isinstance(data, str):
            raw = memoryview(data.encode("utf-8"))
        elif isinstance(data, bytes | bytearray | memoryview):
            raw = memoryview(data).cast("B")
        else:
            raise TypeError(f"write() argument must be bytes or str, not {type(data).__name__}")
        if raw.nbytes > MAX_WRITE:
            raise ValueError("Write request payload exceeds 1 GiB limit")
        await self._request(b"w", data=raw)

    @live_method
    async def flush(self) -> None:
        """Make sure earlier writes have reached the file (they reach it as they are made)."""
        self._check_closed()
        self._check_writable()
        await self._request(b"f")

    @live_method
    async def seek(self, offset: int, whence: int = 0) -> None:
        """Move the position: ``whence`` 0 from the start, 1 from here, 2 from the end."""
        self._check_closed()
        if whence not in (0, 1, 2):
            raise ValueError(f"Invalid whence value: {whence}")
        await self._request(b"s", offset, whence=whence)

    # ------------------------------------------------------------------ closing

    @live_method
    async def close(self) -> None:
        """Close the file (and end its session in the sandbox).  Closing twice is fine."""
        if self._closed:
            return
        try:
            await self._request(b"c")
        finally:
            self._closed = True
            try:
                async for _ in self._records:
                    pass
                await self._att.finish()
            except BaseException:
                await self._att.aclose()
                raise

    def __enter__(self) -> FileIO[T]:
        self._check_closed()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> FileIO[T]:
        self._check_closed()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close.aio()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        # Dropped while open: end the session (closing the request makes the daemon stop the process).
        att = self._att
        with contextlib.suppress(RuntimeError):
            sdk_loop().call_soon_threadsafe(_in_background, att)


def _in_background(att: Attached) -> None:
    task = asyncio.ensure_future(att.aclose())
    _background.add(task)
    task.add_done_callback(_background.discard)


class FileOpener:
    """``sb.open(path, mode="r")``: open a file in the sandbox; ``await sb.open.aio(path, mode)`` in async code.

    ``mode`` is Python's: exactly one of ``r``, ``w``, ``a``, ``x``, optionally with ``b`` and ``+``.
    """

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    @overload
    def __call__(self, path: str, mode: OpenTextMode = "r") -> FileIO[str]: ...
    @overload
    def __call__(self, path: str, mode: OpenBinaryMode) -> FileIO[bytes]: ...
    def __call__(self, path: str, mode: str = "r") -> FileIO[Any]:
        return run_blocking(FileIO._open(self._client, self._sandbox_id, path, mode))

    @overload
    async def aio(self, path: str, mode: OpenTextMode = "r") -> FileIO[str]: ...
    @overload
    async def aio(self, path: str, mode: OpenBinaryMode) -> FileIO[bytes]: ...
    async def aio(self, path: str, mode: str = "r") -> FileIO[Any]:
        """The async form."""
        return await run_async(FileIO._open(self._client, self._sandbox_id, path, mode))


# ---------------------------------------------------------------------------------------------------- ls/mkdir/rm


async def _legacy(client: Client, sandbox_id: str, op: str, path: str, args: list[str]) -> tool.ToolResult:
    argv = [*args, *tool.path_args(path, legacy=True, op=op)]
    try:
        return await tool.run_tool(client, sandbox_id, argv)
    except tool.ToolFailed as failure:
        raise tool.legacy_error(failure, path) from None


async def ls(client: Client, sandbox_id: str, path: str) -> list[str]:
    """The names in a directory, sorted."""
    result = await _legacy(client, sandbox_id, "ls", path, ["ls"])
    entries = tool.parse_json(result.stdout, "listing")
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries
    ):
        raise FilesystemExecutionError("malformed listing from the sandbox's filesystem tool")
    return [e["name"] for e in entries]


async def mkdir(client: Client, sandbox_id: str, path: str, parents: bool) -> None:
    """Create a directory (with ``parents``: missing parents too, and an existing directory is fine)."""
    await _legacy(client, sandbox_id, "mkdir", path, ["mkdir", *(["-p"] if parents else [])])


async def rm(client: Client, sandbox_id: str, path: str, recursive: bool) -> None:
    """Remove a file, a symlink or an empty directory (with ``recursive``: a whole tree)."""
    await _legacy(client, sandbox_id, "rm", path, ["rm", *(["-r"] if recursive else [])])


async def watch(
    client: Client,
    sandbox_id: str,
    path: str,
    filter: list[FileWatchEventType] | None,
    recursive: bool | None,
    timeout: int | None,
) -> AsyncIterator[FileWatchEvent]:
    """Changes under ``path`` as they happen (see ``SandboxFilesystem.watch``)."""
    events = tool.watch_events(
        client,
        sandbox_id,
        tool.path_args(path, legacy=True, op="watch"),
        recursive=bool(recursive),
        timeout=timeout,
        filter=filter,
        on_failure=lambda failure: tool.legacy_error(failure, path),
    )
    async with contextlib.aclosing(events):
        async for event in events:
            yield event
