"""Persistent sandboxes (``shoal.engine.persistent``): pause and resume, and calls to a persistent sandbox's
object id sent on to the session that answers them (``sessions``, a middleware)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from shoal.exception import Error, InvalidError
from shoal.server.registry import RouteTable
from shoal.server.routes import MANAGER, error_response
from shoal.wire.sandboxes import SandboxInfo

TABLE = RouteTable()
"""The routes this module serves."""

_BASE = "/v1/sandboxes/{sandbox_id}"

OWN = {
    f"GET {_BASE}",
    f"GET {_BASE}/wait",
    f"POST {_BASE}/terminate",
    f"POST {_BASE}/pause",
    f"POST {_BASE}/resume",
}
"""Routes that answer for the persistent sandbox itself (not one of its sessions)."""

REFUSED = {
    f"PUT {_BASE}/tags": "Tags aren't supported for persistent Sandboxes yet.",
    f"POST {_BASE}/network_policy": "Updating network access isn't supported for persistent Sandboxes yet.",
    f"POST {_BASE}/mounts": "Mounting images isn't supported for persistent Sandboxes yet.",
    f"POST {_BASE}/unmount": "Mounting images isn't supported for persistent Sandboxes yet.",
    f"POST {_BASE}/memory_snapshot": "Memory snapshots aren't supported for persistent Sandboxes.",
}
"""What modal 1.6 does not do for a persistent sandbox, with its words."""

STARTS_SESSION_GET = {f"GET {_BASE}/tunnels", f"GET {_BASE}/execs/{{exec_id}}/stdin"}
"""Reads that need a running session (other reads go to the last session when it is paused): tunnels, and where
stdin stands, which a writer asks just before it writes (to the running session)."""


@TABLE.route(
    "POST",
    f"{_BASE}/pause",
    summary="Pause a persistent sandbox: its session ends, its files are kept for the next",
    response=SandboxInfo,
)
async def pause(request: web.Request) -> SandboxInfo:
    ps = request.app[MANAGER].persistents
    sandbox_id = request.match_info["sandbox_id"]
    await ps.pause(sandbox_id)
    return ps.info(sandbox_id)


@TABLE.route(
    "POST",
    f"{_BASE}/resume",
    summary="Resume a paused persistent sandbox: a new session from the files the last one left",
    response=SandboxInfo,
)
async def resume(request: web.Request) -> SandboxInfo:
    ps = request.app[MANAGER].persistents
    sandbox_id = request.match_info["sandbox_id"]
    await ps.resume(sandbox_id)
    return ps.info(sandbox_id)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Send a call addressed to a persistent sandbox's object id to the session that answers it."""
    sandbox_id = request.match_info.get("sandbox_id")
    ps = request.app[MANAGER].persistents
    if sandbox_id is None or ps.record(sandbox_id) is None:
        return await handler(request)
    resource = request.match_info.route.resource
    key = f"{request.method} {resource.canonical if resource is not None else ''}"
    if key in OWN:
        return await handler(request)
    if key in REFUSED:
        return error_response(InvalidError(REFUSED[key]))
    start = request.method != "GET" or key in STARTS_SESSION_GET
    try:
        session = await ps.session_for(sandbox_id, request.match_info.get("exec_id"), start=start)
    except Error as exc:
        return error_response(exc)
    request.match_info["sandbox_id"] = session.id
    return await handler(request)
