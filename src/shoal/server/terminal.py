"""A terminal into a sandbox over a WebSocket (the dashboard's): a shell on a pseudo-terminal in the sandbox.

Frames from the browser: binary, or text ``{"type": "input", "data": "…"}``, are keys for the terminal;
text ``{"type": "resize", "rows": R, "cols": C}`` resizes it.  Frames to the browser: binary, what the
terminal shows; at the end one text ``{"type": "exit", "code": N}``.  Closing the socket hangs the shell up
(SIGHUP), as closing a terminal window does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid

from aiohttp import WSMsgType, web

from shoal.engine.process import Process
from shoal.engine.sandbox import RUNNING, Sandbox
from shoal.exception import ConflictError, Error, InvalidError
from shoal.server import cluster, routes
from shoal.wire.sandboxes import INTERACTIVE_SHELL, ExecRequest, TerminalSize

MAX_INPUT = 1 << 16
"""Bytes of keys one frame may carry (a paste)."""


def _size(request: web.Request) -> tuple[int, int]:
    try:
        size = TerminalSize(rows=int(request.query.get("rows", 24)), cols=int(request.query.get("cols", 80)))
    except ValueError:
        raise InvalidError("rows and cols must be whole numbers from 1 to 10000") from None
    return size.rows, size.cols


async def _show(ws: web.WebSocketResponse, proc: Process) -> None:
    """Send the terminal's output as it comes, then how the shell ended."""
    async for data in proc.streams[0].follow():
        await ws.send_bytes(data)
    await proc.wait(None)
    await ws.send_str(json.dumps({"type": "exit", "code": proc.returncode}))
    await ws.close()


async def _keys(ws: web.WebSocketResponse, sb: Sandbox, exec_id: str) -> None:
    """Forward the browser's keys and window sizes until it goes away."""
    offset = 0
    async for msg in ws:
        data: bytes | None = None
        if msg.type == WSMsgType.BINARY:
            data = msg.data
        elif msg.type == WSMsgType.TEXT:
            try:
                frame = json.loads(msg.data)
                if frame.get("type") == "input":
                    data = str(frame["data"]).encode()
                elif frame.get("type") == "resize":
                    size = TerminalSize(rows=frame["rows"], cols=frame["cols"])
                    sb.resize(exec_id, size.rows, size.cols)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a malformed frame is dropped; the terminal goes on
        if data:
            offset = await sb.write_stdin(exec_id, offset, data[:MAX_INPUT], False)


async def websocket(request: web.Request) -> web.StreamResponse:
    """``GET /terminal/{sandbox_id}?rows=&cols=`` (the dashboard's) and ``GET /v1/sandboxes/{sandbox_id}/terminal``
    (the API's): a shell in a running sandbox, over a WebSocket."""
    mgr = request.app[routes.MANAGER]
    sandbox_id = request.match_info["sandbox_id"]
    passed_on = cluster.FORWARDED in request.headers
    if mgr.cluster is not None and not passed_on and not mgr.knows(sandbox_id) and cluster.ROUTER in request.app:
        # The dashboard's terminal of a sandbox another node runs: that node's API terminal, passed through.  (The
        # API's own route gets here only for this node's sandboxes: its cluster step passes the others on.)
        router = request.app[cluster.ROUTER]
        node = await router.locate(sandbox_id)
        if node is not None and node.alive:
            return await router.proxy_websocket(
                request, node, f"/v1/sandboxes/{sandbox_id}/terminal?{request.query_string}"
            )
    try:
        sb = mgr.get(sandbox_id)
        if sb.state != RUNNING:
            raise ConflictError(f"Sandbox {sb.id} is not running")
        rows, cols = _size(request)
        exec_id = f"terminal-{uuid.uuid4().hex[:16]}"
        req = ExecRequest(
            exec_id=exec_id,
            args=list(INTERACTIVE_SHELL),
            env={"TERM": "xterm-256color"},
            pty=True,
            pty_size=(rows, cols),
        )
        proc = await mgr.exec(sb.id, req)
    except Error as exc:
        return routes.error_response(exc)
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_INPUT * 2)
    await ws.prepare(request)
    show = asyncio.ensure_future(_show(ws, proc))
    try:
        with contextlib.suppress(Error):
            await _keys(ws, sb, exec_id)
    finally:
        if not proc.exited:
            with contextlib.suppress(Error):
                sb.signal(exec_id, signal.SIGHUP)
        if not show.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(show), 2.0)
            show.cancel()
    return ws
