"""``POST /v1/sandboxes/{id}/attach``: run a process for the length of one request, stdin in, output out.

The filesystem API's operations each need a process with its stdin and its output; with the separate exec,
stdin, output and wait calls that is four or five requests per operation.  Here it is one, full duplex:

- request body: ``u32 n (little-endian) | n bytes of ExecRequest JSON | the process's stdin ...``; the end of
  the body closes stdin;
- response: records ``u8 kind | u32 n (little-endian) | n bytes`` as the process produces them: kind 1 stdout,
  2 stderr, 3 the exit (JSON ``{"exec_id", "returncode", "sandbox_finished"}``), always last.  Problems found
  before the process starts (no such sandbox, sandbox finished, bad request) are ordinary JSON errors.
- the response ends once the request body has ended too: a client that sees the exit ends its body (stdin
  sent after the exit is dropped), which leaves the connection clean for reuse.

The process is bound to the request: when the client goes away (its body breaks off, or the response cannot be
written), stdin is closed and the process is killed after ``KILL_GRACE`` seconds if it has not ended by then.
When the daemon stops, its sessions are cut off without an exit record (the client sees a broken connection, not
an end the process never had); the next daemon kills the processes they leave, which it does not know.

Trust: the caller is an authenticated API client.  The process's output is the sandbox's (hostile) bytes; they
are carried inside records this module frames, so nothing a sandbox prints can end the response early or forge
an exit.  Output is read from the process's stored streams, so memory stays bounded whatever the sandbox sends,
and the stored bytes are deleted once delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from shoal.engine.process import SIGKILL, Process
from shoal.engine.sandbox import Sandbox
from shoal.exception import InvalidError
from shoal.server.registry import RouteTable
from shoal.server.routes import MANAGER
from shoal.wire.sandboxes import ExecRequest, SandboxState

TABLE = RouteTable()
"""The routes this module serves."""

STDOUT, STDERR, EXIT = 1, 2, 3
"""Record kinds."""
RECORD = struct.Struct("<BI")
MAX_SPEC = 1 << 20
"""Largest exec request at the head of the body."""
CHUNK = 1 << 20
"""Most output bytes per record."""
KILL_GRACE = 2.0
"""Seconds an abandoned process gets to end by itself once its stdin is closed."""

SESSIONS = web.AppKey("attach_sessions", set["_Session"])
"""The attach sessions in progress, so a stopping daemon can cut them off."""

_reapers: set[asyncio.Task[None]] = set()


async def _read_spec(body: Any) -> ExecRequest:
    try:
        (n,) = struct.unpack("<I", await body.readexactly(4))
        if n > MAX_SPEC:
            raise InvalidError(f"the exec request at the head of the body is {n} bytes; the limit is {MAX_SPEC}")
        return ExecRequest.model_validate_json(await body.readexactly(n))
    except asyncio.IncompleteReadError:
        raise InvalidError("the body must start with a u32 length and an exec request (JSON)") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise InvalidError(problems) from None


class _Session:
    """One attached process: pumps the body into stdin while streaming output records back."""

    def __init__(self, sb: Sandbox, proc: Process, body: Any, resp: web.StreamResponse) -> None:
        self.sb = sb
        self.proc = proc
        self.body = body
        self.resp = resp
        self.client_gone = False
        self.stopping = False
        """The daemon is stopping: leave the process as it is (stdin open) for the next daemon."""
        handler = asyncio.current_task()
        assert handler is not None
        self.handler = handler

    def cut_off(self) -> None:
        """End this session without an exit record, leaving the process alone (the daemon is stopping)."""
        self.stopping = True
        self.handler.cancel()

    async def run(self) -> None:
        handler = self.handler
        pump = asyncio.create_task(self._pump_stdin(handler))
        finished = False
        try:
            await self._stream_output()
            await self.proc.wait(None)
            exit_info = {
                "exec_id": self.proc.id,
                "returncode": self.proc.returncode,
                "sandbox_finished": self.sb.state is SandboxState.FINISHED,
            }
            await self._record(EXIT, json.dumps(exit_info).encode())
            # The response ends only after the request body has (the client ends it on seeing the exit), so the
            # connection is left clean for its next request.
            await pump
            await self.resp.write_eof()
            finished = True
            for stream in self.proc.streams:
                stream.discard()  # delivered once, through this response: nothing to keep on disk
            self.sb.forget(self.proc.id)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            if not finished and not self.stopping:
                self._abandon()

    async def _pump_stdin(self, handler: asyncio.Task[Any]) -> None:
        offset = 0
        closed = False
        try:
            while True:
                data = await self.body.readany()
                if not data:
                    break
                closed = self.body.at_eof()  # a small body's end often comes with its data: one frame for both
                offset = await self.sb.write_stdin(self.proc.id, offset, data, closed)
                if closed:
                    return
        except Exception:
            # The body broke off (aiohttp raises its own payload and connection errors), or stdin could not be
            # delivered: either way this session is over.
            self.client_gone = True
        finally:
            if not closed and not self.stopping:
                with contextlib.suppress(Exception):
                    await self.sb.write_stdin(self.proc.id, offset, b"", True)
        if self.client_gone:
            handler.cancel()

    async def _stream_output(self) -> None:
        streams = self.proc.streams
        offsets = [0, 0]
        while True:
            progressed = False
            for i, stream in enumerate(streams):
                data = stream.read(offsets[i], CHUNK)
                if data:
                    await self._record(STDOUT + i, data)
                    offsets[i] += len(data)
                    progressed = True
            if progressed:
                continue
            open_streams = [(s, offsets[i]) for i, s in enumerate(streams) if not (s.eof and offsets[i] >= s.size)]
            if not open_streams:
                return
            waits = [asyncio.ensure_future(s.wait(off, None)) for s, off in open_streams]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    async def _record(self, kind: int, data: bytes) -> None:
        head = RECORD.pack(kind, len(data))
        if len(data) <= 65536:
            await self.resp.write(head + data)
        else:
            await self.resp.write(head)
            await self.resp.write(data)

    def _abandon(self) -> None:
        """The client went away: stdin is closed; kill the process unless it ends by itself soon."""
        if self.proc.exited:
            return

        async def reap() -> None:
            if not await self.proc.wait(KILL_GRACE):
                with contextlib.suppress(Exception):
                    self.sb.signal(self.proc.id, SIGKILL)

        task = asyncio.create_task(reap())
        _reapers.add(task)
        task.add_done_callback(_reapers.discard)


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/attach",
    summary=(
        "Run a process for the length of this request: the body is a u32 length, an exec request (JSON) and then"
        " the process's stdin; the response streams records (u8 kind, u32 length, bytes): 1 stdout, 2 stderr,"
        " 3 the exit as JSON"
    ),
    raw_body=True,
    content_type="application/octet-stream",
)
async def attach(request: web.Request) -> web.StreamResponse:
    mgr = request.app[MANAGER]
    sandbox_id = request.match_info["sandbox_id"]
    sb = mgr.get(sandbox_id)
    spec = await _read_spec(request.content)
    proc = await mgr.exec(sandbox_id, spec, persist=False)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "X-Shoal-Exec-Id": proc.id})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    session = _Session(sb, proc, request.content, resp)
    sessions = request.app[SESSIONS]
    sessions.add(session)
    try:
        await session.run()
    finally:
        sessions.discard(session)
    return resp


async def cut_off_sessions(app: web.Application) -> None:
    """``on_shutdown``: cut off every attach session before the server closes its connections."""
    sessions = app[SESSIONS]
    for session in [*sessions]:
        session.cut_off()


def install(app: web.Application) -> None:
    """Track attach sessions in ``app`` and cut them off when it shuts down."""
    sessions: set[_Session] = set()
    app[SESSIONS] = sessions
    app.on_shutdown.append(cut_off_sessions)
