"""Process stdio: ``StreamReader`` (stdout/stderr), ``StreamWriter`` (stdin), ``StreamType``."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import enum
import subprocess
import sys
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Generic, TypeVar, cast

import aiohttp

from shoal.exception import ConnectionError, InvalidError
from shoal.sdk._sync import iterate_async, iterate_blocking, live_method
from shoal.sdk.transport import Client

T = TypeVar("T", str, bytes)
RESUME_ATTEMPTS = 8
DRAIN_CHUNK = 1 << 20


class StreamType(enum.Enum):
    """Where a process's output goes: kept for reading (PIPE), dropped, or printed locally (STDOUT)."""

    DEVNULL = subprocess.DEVNULL
    PIPE = subprocess.PIPE
    STDOUT = subprocess.STDOUT


class StreamReader(Generic[T]):
    """A process's stdout or stderr.

    ``read()`` returns everything until the stream ends; iterating yields
    chunks as they arrive (lines when line-buffered, and always for a
    sandbox's entrypoint).  Works with ``for`` and ``async for``.
    """

    def __init__(
        self,
        client: Client,
        path: str,
        file_descriptor: int,
        *,
        text: bool,
        by_line: bool,
        stream_type: StreamType = StreamType.PIPE,
    ) -> None:
        self._client = client
        self._path = path
        self._fd = file_descriptor
        self._text = text
        self._by_line = by_line
        self._type = stream_type
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if text else None
        self._partial: str | bytes = "" if text else b""
        self._ready: deque[T] = deque()
        self._raw: AsyncGenerator[bytes, None] | None = None
        self._eof = False
        self._finished = False
        self._done = asyncio.Event()
        self._next_sync: Iterator[T] | None = None
        self._next_async: AsyncIterator[T] | None = None

    @property
    def file_descriptor(self) -> int:
        """1 for stdout, 2 for stderr."""
        return self._fd

    def _check_readable(self) -> None:
        if self._type == StreamType.DEVNULL:
            raise ValueError("read is not supported for a stream configured with StreamType.DEVNULL")
        if self._type == StreamType.STDOUT:
            raise InvalidError("Output can only be retrieved using the PIPE stream type.")

    async def _raw_chunks(self) -> AsyncGenerator[bytes, None]:
        """Bytes from the current offset until the stream ends, resuming after dropped connections."""
        failures = 0
        while not self._eof:
            try:
                async for chunk in self._client.stream("GET", self._path, params={"offset": str(self._offset)}):
                    self._offset += len(chunk)
                    failures = 0
                    yield chunk
                self._eof = True
            except (
                aiohttp.ClientPayloadError,
                aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError,
                ConnectionError,
            ) as e:
                failures += 1
                if failures > RESUME_ATTEMPTS:
                    if isinstance(e, ConnectionError):
                        raise
                    raise ConnectionError(
                        f"reading the output failed {failures} times in a row ({e}): did the daemon stop or restart?"
                    ) from e
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
        self._done.set()

    def _decode(self, chunk: bytes, final: bool = False) -> str | bytes:
        if self._decoder is None:
            return chunk
        return self._decoder.decode(chunk, final)

    async def _items(self) -> AsyncIterator[T]:
        """Decoded chunks, or lines when line-buffered.

        State lives on the reader, so a loop that stops early and a later
        ``read()`` see every byte exactly once.  A consumer that stops early
        (or is cancelled mid-read) releases the connection; the next read
        reopens it at the byte offset reached.
        """
        try:
            while True:
                while self._ready:
                    yield self._ready.popleft()
                if self._finished:
                    return
                if self._raw is None:
                    self._raw = self._raw_chunks()
                try:
                    chunk = await self._raw.__anext__()
                except StopAsyncIteration:
                    tail = self._decode(b"", final=True)
                    rest = self._partial + tail  # type: ignore[operator]
                    self._partial = "" if self._text else b""
                    if rest:
                        self._ready.append(cast(T, rest))
                    self._finished = True
                    continue
                except BaseException:
                    self._raw = None  # the generator ended with the exception; resume from the offset next time
                    raise
                self._take(chunk)
        finally:
            raw, self._raw = self._raw, None
            if raw is not None and not self._finished:
                await raw.aclose()

    def _take(self, chunk: bytes) -> None:
        piece = self._decode(chunk)
        if not self._by_line:
            if piece:
                self._ready.append(cast(T, piece))
            return
        buf = self._partial + piece  # type: ignore[operator]
        sep = "\n" if self._text else b"\n"
        start = 0
        while True:
            nl = buf.find(sep, start)  # type: ignore[arg-type]
            if nl < 0:
                break
            self._ready.append(cast(T, buf[start : nl + 1]))
            start = nl + 1
        self._partial = buf[start:]

    @live_method
    async def read(self) -> T:
        """Everything from here until the stream ends (``""``/``b""`` once it has ended)."""
        self._check_readable()
        parts = [item async for item in self._items()]
        empty: str | bytes = "" if self._text else b""
        return cast(T, empty.join(parts))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[T]:
        self._check_readable()
        return iterate_blocking(self._items())

    def __aiter__(self) -> AsyncIterator[T]:
        self._check_readable()
        return iterate_async(self._items())

    def __next__(self) -> T:
        """The next chunk (line when line-buffered): ``next(p.stdout)``; ``StopIteration`` at the end."""
        if self._next_sync is None:
            self._next_sync = iter(self)
        return next(self._next_sync)

    async def __anext__(self) -> T:
        """The next chunk, from any event loop: ``await anext(p.stdout)``; ``StopAsyncIteration`` at the end."""
        if self._next_async is None:
            self._next_async = aiter(self)
        return await anext(self._next_async)

    def close(self) -> None:
        """Stop reading: release the connection that ``next()`` holds open (a later read starts a new one)."""
        it, self._next_sync = self._next_sync, None
        if isinstance(it, Generator):
            it.close()

    async def aclose(self) -> None:
        """``close()`` for ``await anext(...)``."""
        it, self._next_async = self._next_async, None
        if isinstance(it, AsyncGenerator):
            await it.aclose()

    async def _print_to(self, out: str) -> None:
        """Copy the stream to the local stdout/stderr (StreamType.STDOUT)."""
        target = sys.stdout if out == "stdout" else sys.stderr
        async for item in self._items():
            text = item if isinstance(item, str) else item.decode(errors="replace")
            target.write(text)
            target.flush()

    async def _wait_done(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), timeout)


class StreamWriter:
    """A process's stdin: ``write``/``write_eof`` buffer locally; ``drain()`` sends."""

    def __init__(
        self, client: Client, path: str, limit: int, *, offset: int | None = 0, ask_each_drain: bool = False
    ) -> None:
        """``offset``: how much of the stream was written before this writer (0 for a process it starts);
        None when another handle may have written (a sandbox found with ``from_id``): the daemon is asked.
        ``ask_each_drain``: ask before every drain (a persistent sandbox's stdin, which each session restarts)."""
        self._client = client
        self._path = path
        self._limit = limit
        self._buffer = bytearray()
        self._sent = offset
        self._ask_each_drain = ask_each_drain
        self._eof = False
        self._eof_sent = False

    def write(self, data: bytes | bytearray | memoryview | str) -> None:
        """Queue ``data`` (str is encoded as UTF-8); ``drain()`` sends it."""
        if self._eof:
            raise ValueError("Stdin is closed. Cannot write to it.")
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data argument must be a bytes-like object or str, not {type(data).__name__}")
        if len(self._buffer) + len(data) > self._limit:
            raise BufferError("Buffer size exceed limit. Call drain to flush the buffer.")
        self._buffer += data

    def write_eof(self) -> None:
        """Close stdin once the buffer is drained (EOF travels with the next ``drain()``)."""
        self._eof = True

    @live_method
    async def drain(self) -> None:
        """Send buffered bytes (and EOF if ``write_eof`` was called).  Safe to retry."""
        if not self._buffer and (not self._eof or self._eof_sent):
            return
        if self._sent is None or self._ask_each_drain:
            self._sent = int((await self._client.request("GET", self._path))["offset"])
        while True:
            data = bytes(self._buffer[:DRAIN_CHUNK])
            last = len(data) == len(self._buffer)
            eof = self._eof and last
            params = {"offset": str(self._sent), "eof": "1" if eof else "0"}
            await self._client.request("POST", self._path, params=params, data=data)
            self._sent += len(data)
            del self._buffer[: len(data)]
            if last:
                break
        if self._eof:
            self._eof_sent = True
