"""Sidecars of running sandboxes (``shoal.engine.sidecars``): ``sb._experimental_sidecars``."""

from __future__ import annotations

from aiohttp import web

from shoal.engine import sidecars
from shoal.server.registry import RouteTable
from shoal.server.routes import MANAGER
from shoal.wire.sandboxes import CreateSidecar, SidecarInfo, SidecarList

TABLE = RouteTable()
"""The routes this module serves."""


def _terminated(request: web.Request) -> bool:
    return request.query.get("include_terminated", "") in ("1", "true")


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/sidecars",
    summary="Start a sidecar beside a running sandbox: its own image, process and outbound policy, reached by name",
    body=CreateSidecar,
    response=SidecarInfo,
)
async def create_sidecar(request: web.Request, body: CreateSidecar) -> SidecarInfo:
    sb = await request.app[MANAGER].sidecars.create(request.match_info["sandbox_id"], body)
    return sidecars.info(sb)


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/sidecars",
    summary="A sandbox's sidecars, oldest first",
    query={"include_terminated": "1 to include sidecars that ended"},
    response=SidecarList,
)
async def list_sidecars(request: web.Request) -> SidecarList:
    found = request.app[MANAGER].sidecars.of(request.match_info["sandbox_id"], _terminated(request))
    return SidecarList(sidecars=[sidecars.info(sb) for sb in found])


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/sidecars/{name}",
    summary="A sandbox's sidecar by name",
    query={"include_terminated": "1 to find one that ended"},
    response=SidecarInfo,
)
async def get_sidecar(request: web.Request) -> SidecarInfo:
    mgr = request.app[MANAGER]
    sb = mgr.sidecars.get(request.match_info["sandbox_id"], request.match_info["name"], _terminated(request))
    return sidecars.info(sb)
