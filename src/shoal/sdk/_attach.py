"""The client side of the daemon's attach call: one process in a sandbox, its stdin and output in one request.

See ``shoal.server.attach`` for the wire format.  The request body is fed from a bounded queue (so an upload
never holds more than a few chunks in memory) while the response's records are read as they arrive.  The
process lives as long as the request: closing an ``Attached`` early makes the daemon stop it.

Trust: the daemon frames the records, so their structure is trusted; what is inside a stdout or stderr record
came from the sandbox and is treated by the callers as hostile bytes.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from shoal.exception import ConnectionError
from shoal.sdk.transport import Client, error_from
from shoal.wire import routes

STDOUT, STDERR, EXIT = 1, 2, 3
_RECORD = struct.Struct("<BI")
MAX_RECORD = 16 << 20
"""Largest record the daemon sends (it sends at most 1 MiB); anything bigger means a broken stream."""
QUEUE_DEPTH = 4
"""Stdin chunks that may wait to be sent."""
FINISH_TIMEOUT = 30.0
"""How long the end of a response may take once the process has exited."""


class Attached:
    """A process started through ``POST /v1/sandboxes/{id}/attach``.

    Use: ``await start()``, then ``await write(...)`` / ``await close_stdin()`` and ``async for kind, data in
    records()`` (stdout and stderr as they come; the exit ends the iteration and sets ``returncode``), then
    ``await finish()``; on any other way out, ``await aclose()``.
    """

    def __init__(self, client: Client, sandbox_id: str, argv: list[str], *, workdir: str | None = None) -> None:
        self._client = client
        self._sandbox_id = sandbox_id
        self._spec = {"args": argv, "workdir": workdir, "stdout": "pipe", "stderr": "pipe"}
        self._queue: asyncio.Queue[bytes | memoryview | None] = asyncio.Queue(QUEUE_DEPTH)
        self._stdin_closed = False
        self._resp: aiohttp.ClientResponse | None = None
        self._closed: asyncio.Future[None] | None = None
        self.returncode: int | None = None
        """The process's return code, once ``records()`` has ended."""
        self.sandbox_finished = False
        """Whether the sandbox had finished when the process ended (the sandbox stopped under it)."""
        self.exec_id = ""

    async def _body(self, head: bytes) -> AsyncIterator[bytes | memoryview]:
        yield head  # the request's headers leave with the first chunk, so this one must be ready at once
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def start(self) -> None:
        """Start the process.  Raises the daemon's error (NotFoundError, ConflictError, ...) if it cannot."""
        spec = json.dumps(self._spec).encode()
        url = self._client.base_url + routes.path("sandboxes", self._sandbox_id, "attach")
        for attempt in (1, 2):
            try:
                resp = await self._client._get_session().post(
                    url,
                    data=self._body(struct.pack("<I", len(spec)) + spec),
                    headers={"Content-Type": "application/octet-stream"},
                )
                break
            except aiohttp.ClientConnectorError as e:
                if attempt == 1 and await self._client._maybe_start_daemon(e):
                    continue
                raise self._client._unreachable(e) from e
            except aiohttp.ClientError as e:  # reset or closed before the response (a daemon restarted)
                raise self._client._unreachable(e) from e
        if resp.status >= 400:
            body = await resp.read()
            resp.release()
            raise error_from(resp.status, body)
        self._resp = resp
        # aiohttp can miss the end of a streamed response whose connection drops while the request body is
        # still open (a restarted daemon): the connection's own "closed" future is watched as well.
        conn = resp.connection
        self._closed = conn.protocol.closed if conn is not None and conn.protocol is not None else None
        if self._closed is not None:
            # Its exception (the connection was lost) is reported through the reads; never left unretrieved.
            self._closed.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.exec_id = resp.headers.get("X-Shoal-Exec-Id", "")

    async def _next_chunk(self, content: aiohttp.StreamReader) -> bytes:
        """The next bytes of the response; ``b""`` at its end, also when the connection is gone."""
        data = content.read_nowait()
        if data or content.at_eof() or self._closed is None:
            return data or await content.readany()
        read = asyncio.ensure_future(content.readany())
        try:
            await asyncio.wait((read, self._closed), return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                # The connection is closed: what was still in flight is delivered promptly, or never.
                await asyncio.wait((read,), timeout=1.0)
            if not read.done():
                return b""
            return read.result()
        finally:
            if not read.done():
                read.cancel()
            if self._closed.done() and not self._closed.cancelled():
                self._closed.exception()  # retrieved: the loss is reported through the read above

    async def write(self, data: bytes | memoryview) -> None:
        """Queue bytes for the process's stdin (waits while the queue is full)."""
        if self._stdin_closed:
            raise ValueError("stdin is closed")
        if len(data):
            await self._queue.put(data)

    async def close_stdin(self) -> None:
        """End the process's stdin (once everything queued is sent)."""
        if not self._stdin_closed:
            self._stdin_closed = True
            await self._queue.put(None)

    async def records(self) -> AsyncIterator[tuple[int, memoryview]]:
        """``(STDOUT | STDERR, bytes)`` as the process writes them, until it exits (``returncode`` is then set).

        The bytes are views into what was received (no copy); keep them, or copy them, as needed.
        """
        resp = self._resp
        assert resp is not None, "start() first"
        head = bytearray()
        kind, left = 0, -1  # the record being read and its bytes still to come (-1: reading a header)
        exit_info = bytearray()
        try:
            while True:
                chunk = await self._next_chunk(resp.content)
                if not chunk:
                    raise ConnectionError(
                        "the shoal daemon ended a sandbox operation without its exit status (did it stop or"
                        " restart?): run the operation again"
                    )
                view = memoryview(chunk)
                pos = 0
                while pos < len(view):
                    if left < 0:
                        take = min(_RECORD.size - len(head), len(view) - pos)
                        head += view[pos : pos + take]
                        pos += take
                        if len(head) < _RECORD.size:
                            break
                        kind, left = _RECORD.unpack(head)
                        head.clear()
                        if left > MAX_RECORD or kind not in (STDOUT, STDERR, EXIT):
                            raise ConnectionError(f"malformed record from the daemon (kind {kind}, {left} bytes)")
                    take = min(left, len(view) - pos)
                    piece = view[pos : pos + take]
                    pos += take
                    left -= take
                    if kind == EXIT:
                        exit_info += piece
                        if left == 0:
                            info: dict[str, Any] = json.loads(exit_info)
                            code = info.get("returncode")
                            self.returncode = int(code) if code is not None else -1
                            self.sandbox_finished = bool(info.get("sandbox_finished"))
                            return
                    elif take:
                        yield kind, piece
                    if left == 0:
                        left = -1
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            raise ConnectionError(
                "the connection to the shoal daemon broke off during a sandbox operation (did the daemon stop or"
                f" restart?): run the operation again ({e})"
            ) from e

    async def finish(self) -> None:
        """After the exit: end the request body, read the response's end and release the connection."""
        resp = self._resp
        if resp is None or self.returncode is None:
            await self.aclose()
            return
        try:
            await self.close_stdin()
            async with asyncio.timeout(FINISH_TIMEOUT):
                rest = await resp.content.read()
            if rest:
                raise ConnectionError("the daemon sent data after a process's exit")
        except aiohttp.ClientError as e:
            await self.aclose()
            raise ConnectionError(f"the connection to the daemon failed after the process's exit ({e})") from e
        except BaseException:
            await self.aclose()
            raise
        self._resp = None
        resp.release()

    async def aclose(self) -> None:
        """Drop the request: if the process has not exited, the daemon stops it.  Idempotent."""
        self._stdin_closed = True
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()
