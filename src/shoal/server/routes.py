"""The daemon's HTTP operations.  Thin: parse, call the engine, shape the answer."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import time
import tracemalloc
from typing import Any

from aiohttp import web

from shoal.engine import logs, readiness
from shoal.engine.manager import Manager
from shoal.engine.process import ENTRYPOINT_ID
from shoal.engine.sandbox import RUNNING
from shoal.exception import ConflictError, Error, InvalidError, NotFoundError
from shoal.server import errors, image_wire
from shoal.server.registry import Route, RouteTable, openapi
from shoal.store.state import AppRow
from shoal.wire.apps import AppCreate, AppDetails, AppInfo, AppList, AppLookup, AppTags
from shoal.wire.base import Done
from shoal.wire.cluster import AppMirror, ClusterInfo, SecretMirror
from shoal.wire.images import ImageId, ImageList, ImageRef, ImageSummary, ImportRootfs
from shoal.wire.sandboxes import (
    ConnectCredentials,
    ConnectTokenRequest,
    CreateSandbox,
    ExecInfo,
    ExecList,
    ExecRequest,
    LogEntries,
    LogEntry,
    NetworkPolicy,
    OutboundPolicyUpdate,
    PercentileStats,
    Readiness,
    SandboxInfo,
    SandboxList,
    SandboxName,
    SandboxStats,
    SandboxUsage,
    StdinOffset,
    Tags,
    TagsUpdate,
    TerminalSize,
    TunnelList,
    WaitResult,
)
from shoal.wire.status import DaemonStatus, DashboardInfo, GatewayEnv, StatusImage
from shoal.wire.times import micros
from shoal.wire.version import __version__ as version

TABLE = RouteTable()
"""The routes this module serves."""

MANAGER = web.AppKey("manager", Manager)
API = web.AppKey("api", list[Route])
"""Every route the app serves (for its OpenAPI document)."""
MAX_WAIT = 60.0


def _mgr(request: web.Request) -> Manager:
    return request.app[MANAGER]


def _float(request: web.Request, name: str, default: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidError(f"query parameter {name} must be a number, got {raw!r}") from None
    return max(0.0, min(value, high))


def query_int(request: web.Request, name: str, default: int) -> int:
    """A non-negative integer query parameter, or ``default`` when absent; InvalidError otherwise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidError(f"query parameter {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise InvalidError(f"query parameter {name} must not be negative")
    return value


# ------------------------------------------------------------------ meta


@TABLE.route("GET", "/openapi.json", summary="This API's OpenAPI document")
async def get_openapi(request: web.Request) -> dict[str, Any]:
    return openapi(version, request.app[API])


@TABLE.route("GET", "/v1/status", summary="Daemon status", response=DaemonStatus)
async def status(request: web.Request) -> DaemonStatus:
    mgr = _mgr(request)
    running = [sb for sb in mgr.sandboxes.values() if sb.state is RUNNING]
    return DaemonStatus(
        version=version,
        pid=os.getpid(),
        runtime=mgr.runtime.name,
        runtime_path=mgr.runtime.binary,
        data_dir=str(mgr.cfg.data_dir),
        socket=str(mgr.cfg.socket),
        sandboxes_running=len(running),
        images=[
            StatusImage(image_id=row.id, kind=row.recipe.get("kind"), created_at_us=micros(row.created_at))
            for row in mgr.images.list()
        ],
        idmap={"host_id": mgr.cfg.idmap.host_id, "size": mgr.cfg.idmap.size},
        tunnel_ca=mgr.network.ca_path,
        tunnels=mgr.network.routing_status(),
        gpu=mgr.gpus.status(mgr.gpu_holders()),
        warm_pool=mgr.pool.status(),
        capacity=mgr.capacity(),
        uid_ranges=mgr.uid_ranges(),
        runtimes=mgr.runtime_status(),
        cluster=_cluster(mgr),
    )


def _clustered(request: web.Request) -> Manager:
    """The daemon, for a route only a cluster's nodes call one another with."""
    mgr = _mgr(request)
    if mgr.cluster is None:
        raise InvalidError("this daemon is not in a cluster (shoal serve --ray)")
    return mgr


def _cluster(mgr: Manager) -> ClusterInfo:
    return mgr.cluster.view() if mgr.cluster is not None else ClusterInfo(enabled=False)


@TABLE.route(
    "GET",
    "/v1/cluster",
    summary="The nodes of the cluster this daemon belongs to (shoal serve --ray), alive or not",
    response=ClusterInfo,
)
async def cluster(request: web.Request) -> ClusterInfo:
    return _cluster(_mgr(request))


@TABLE.route(
    "PUT",
    "/v1/cluster/apps/{app_id}",
    summary="Make an app of the cluster known here, under its id (the node that places a create sends it)",
    body=AppMirror,
    response=AppInfo,
)
async def mirror_app(request: web.Request, body: AppMirror) -> AppInfo:
    mgr = _clustered(request)
    app_id = request.match_info["app_id"]
    return AppInfo(app_id=app_id, name=mgr.mirror_app(app_id, body.name, body.ephemeral))


@TABLE.route(
    "PUT",
    "/v1/cluster/secrets/{secret_id}",
    summary="Hold a secret of the cluster here, under its id (the node that places a create that names it sends it)",
    body=SecretMirror,
    query={"held": "1: update a mirror this node holds, and make none"},
    response=Done,
)
async def mirror_secret(request: web.Request, body: SecretMirror) -> Done:
    mgr = _clustered(request)
    home = body.home or request.headers.get("X-Shoal-Forwarded")
    if not home:
        raise InvalidError("say which node holds the secret (home)")
    held_only = request.query.get("held", "") in ("1", "true")
    mgr.secrets.mirror(request.match_info["secret_id"], body.name, body.env, body.updated_at, home, held_only)
    return Done()


@TABLE.route(
    "DELETE",
    "/v1/cluster/secrets/{secret_id}",
    summary="Drop this node's mirror of a secret of the cluster (deleted on the node that held it)",
    response=Done,
)
async def forget_secret(request: web.Request) -> Done:
    _clustered(request).secrets.forget_mirror(request.match_info["secret_id"])
    return Done()


@TABLE.route(
    "GET",
    "/v1/dashboard",
    summary="Where the web dashboard listens, and the URL that signs a browser in (the secret token included)",
    response=DashboardInfo,
)
async def dashboard_info(request: web.Request) -> DashboardInfo:
    board = _mgr(request).dashboard
    if board is None:
        raise NotFoundError("this daemon runs no dashboard: do not pass --dashboard off (or $SHOAL_DASHBOARD=off)")
    return DashboardInfo(url=board[0], login_url=board[1])


@TABLE.route(
    "GET",
    "/v1/gateway",
    summary="What points the official modal client at this daemon's gateway (the secret token included)",
    response=GatewayEnv,
)
async def gateway_env(request: web.Request) -> GatewayEnv:
    env = _mgr(request).gateway_env
    if env is None:
        raise NotFoundError(
            "this daemon runs no gateway for the official modal client: install the `gateway` extra"
            " (pip install 'shoal[gateway]') and do not pass --gateway off"
        )
    return GatewayEnv(env=env)


@TABLE.route(
    "GET",
    "/v1/debug/memory",
    summary=(
        "The daemon's memory after a full garbage collection: RSS, open descriptors, the sandboxes and processes"
        " it holds in memory, and (when it runs with PYTHONTRACEMALLOC set) the bytes Python has allocated"
    ),
    query={"top": "with tracing on: the N allocation sites holding the most (default 0)"},
)
async def debug_memory(request: web.Request) -> dict[str, Any]:
    mgr = _mgr(request)
    gc.collect()
    answer: dict[str, Any] = {
        "rss_bytes": _rss_bytes(),
        "fds": len(os.listdir("/proc/self/fd")),
        "sandboxes_in_memory": len(mgr.sandboxes),
        "processes_in_memory": sum(len(sb.processes) for sb in mgr.sandboxes.values()),
        "traced_bytes": None,
    }
    if tracemalloc.is_tracing():
        answer["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        top = min(query_int(request, "top", 0), 100)
        if top:
            stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
            answer["top"] = [{"site": str(s.traceback), "bytes": s.size, "count": s.count} for s in stats]
    return answer


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


LOG_QUERY = {
    "since_us": "microseconds since the UNIX epoch of the first entry (inclusive)",
    "until_us": "microseconds since the UNIX epoch past the last entry (exclusive)",
    "source": "stdout, stderr or system (default: all)",
    "search": "only entries containing this text",
    "tail": "only the last N entries",
}


def _log_query(request: web.Request) -> dict[str, Any]:
    """The filters of a logs request, checked, as ``logs.read`` takes them."""
    q = request.query
    source = q.get("source") or None
    if source is not None and source not in logs.SOURCES:
        raise InvalidError(f"source must be one of {', '.join(logs.SOURCES)}, got {source!r}")
    tail = query_int(request, "tail", 0) if "tail" in q else None
    if tail is not None and tail < 1:
        raise InvalidError("tail must be at least 1")
    return {
        "since": query_int(request, "since_us", 0) if "since_us" in q else None,
        "until": query_int(request, "until_us", 0) if "until_us" in q else None,
        "source": source,
        "search": q.get("search", ""),
        "tail": tail,
    }


# ------------------------------------------------------------------ apps


@TABLE.route("POST", "/v1/apps/lookup", summary="Find an app by name (App.lookup)", body=AppLookup, response=AppInfo)
async def lookup_app(request: web.Request, body: AppLookup) -> AppInfo:
    app_id, name = _mgr(request).lookup_app(body.name, body.create_if_missing)
    return AppInfo(app_id=app_id, name=name)


@TABLE.route("POST", "/v1/apps", summary="Create an ephemeral app (app.run())", body=AppCreate, response=AppInfo)
async def create_app(request: web.Request, body: AppCreate) -> AppInfo:
    mgr = _mgr(request)
    app_id = mgr.create_ephemeral_app(body.name)
    if body.tags:
        mgr.set_app_tags(app_id, body.tags)
    return AppInfo(app_id=app_id, name=body.name)


@TABLE.route("POST", "/v1/apps/{app_id}/stop", summary="Stop an app: terminate its sandboxes", response=Done)
async def stop_app(request: web.Request) -> Done:
    await _mgr(request).stop_app(request.match_info["app_id"])
    return Done()


def _app_details(mgr: Manager, row: AppRow) -> AppDetails:
    return AppDetails(
        app_id=row.id,
        name=row.name,
        ephemeral=row.ephemeral,
        created_at_us=micros(row.created_at),
        stopped_at_us=None if row.stopped_at is None else micros(row.stopped_at),
        tags=row.tags,
        sandboxes_running=mgr.running_in_app(row.id),
    )


@TABLE.route("GET", "/v1/apps", summary="Every app, newest first", response=AppList)
async def list_apps(request: web.Request) -> AppList:
    mgr = _mgr(request)
    return AppList(apps=[_app_details(mgr, row) for row in mgr.state.app_rows()])


@TABLE.route("GET", "/v1/apps/{app_id}", summary="What the daemon records of an app (app.info())", response=AppDetails)
async def get_app(request: web.Request) -> AppDetails:
    mgr = _mgr(request)
    return _app_details(mgr, mgr.app(request.match_info["app_id"]))


@TABLE.route("PUT", "/v1/apps/{app_id}/tags", summary="Replace an app's tags", body=AppTags, response=Done)
async def set_app_tags(request: web.Request, body: AppTags) -> Done:
    _mgr(request).set_app_tags(request.match_info["app_id"], body.tags)
    return Done()


@TABLE.route(
    "GET",
    "/v1/apps/{app_id}/logs",
    summary="The logs of every sandbox of an app (app.logs), merged in time order, each entry naming its sandbox",
    query=LOG_QUERY,
    response=LogEntries,
)
async def get_app_logs(request: web.Request) -> LogEntries:
    sources = _mgr(request).app_log_sources(request.match_info["app_id"])
    query = _log_query(request)

    def read_all() -> list[LogEntry]:
        merged = [
            LogEntry(timestamp_us=e.micros, source=e.source, message=e.message, sandbox_id=sandbox_id)
            for sandbox_id, data_dir, streams in sources
            for e in logs.read(data_dir, streams, **query)
        ]
        merged.sort(key=lambda e: e.timestamp_us)
        tail = query["tail"]
        return merged[-tail:] if tail is not None else merged[: logs.LIMIT]

    return LogEntries(entries=await asyncio.to_thread(read_all))


# ------------------------------------------------------------------ images


@TABLE.route(
    "POST",
    "/v1/images/resolve",
    summary="Resolve (and build if needed) an image; streams build logs as NDJSON",
    body=ImageRef,
    content_type="application/x-ndjson",
)
async def resolve_image(request: web.Request, body: ImageRef) -> web.StreamResponse:
    mgr = _mgr(request)
    lines: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(mgr.images.resolve(body, lines.put_nowait))
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    while not task.done() or not lines.empty():
        getter = asyncio.ensure_future(lines.get())
        await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            await resp.write(json.dumps(image_wire.line_for(getter.result())).encode() + b"\n")
        else:
            getter.cancel()
    try:
        image_id, cfg = task.result()
        final: dict[str, Any] = {"image_id": image_id, "python": cfg.python}
    except Exception as exc:
        final = image_wire.final_for_error(exc)
    await resp.write(json.dumps(final).encode() + b"\n")
    await resp.write_eof()
    return resp


@TABLE.route(
    "POST",
    "/v1/images/import",
    summary="Import a root filesystem directory of the host as an image",
    body=ImportRootfs,
    response=ImageId,
)
async def import_image(request: web.Request, body: ImportRootfs) -> ImageId:
    return ImageId(image_id=await _mgr(request).images.import_rootfs(body))


@TABLE.route("GET", "/v1/images", summary="List images", response=ImageList)
async def list_images(request: web.Request) -> ImageList:
    mgr = _mgr(request)
    return ImageList(
        images=[
            ImageSummary(
                image_id=r.id, recipe=r.recipe, created_at_us=micros(r.created_at), layers=r.config.get("layers", [])
            )
            for r in mgr.images.list()
        ]
    )


# ------------------------------------------------------------------ sandboxes


@TABLE.route("POST", "/v1/sandboxes", summary="Create a sandbox", body=CreateSandbox, response=SandboxInfo)
async def create_sandbox(request: web.Request, body: CreateSandbox) -> SandboxInfo:
    if body.sidecar_of is not None or body.sidecar_name is not None:
        raise InvalidError("sidecars are made with POST /v1/sandboxes/{sandbox_id}/sidecars")
    if body.persistent_of is not None:
        raise InvalidError("persistent_of is set by the daemon: create a persistent sandbox with persistent=true")
    mgr = _mgr(request)
    if body.persistent:
        sb = await mgr.persistents.create(body, lambda line: None)
        return mgr.persistents.info(sb.id)
    sb = await mgr.create(body, lambda line: None)
    return sb.info()


@TABLE.route(
    "GET",
    "/v1/sandboxes",
    summary="List sandboxes, newest first",
    query={
        "app_id": "only this app's",
        "tag": "key=value; repeat for several (all must match)",
        "include_finished": "1 to include finished sandboxes",
    },
    response=SandboxList,
)
async def list_sandboxes(request: web.Request) -> SandboxList:
    tags: dict[str, str] = {}
    for item in request.query.getall("tag", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidError(f"tag filter {item!r} must be key=value")
        tags[key] = value
    include = request.query.get("include_finished", "") in ("1", "true")
    items = _mgr(request).list(request.query.get("app_id"), tags, include)
    return SandboxList(sandboxes=items)


@TABLE.route("GET", "/v1/sandboxes/{sandbox_id}", summary="One sandbox", response=SandboxInfo)
async def get_sandbox(request: web.Request) -> SandboxInfo:
    mgr = _mgr(request)
    sandbox_id = request.match_info["sandbox_id"]
    if mgr.persistents.record(sandbox_id) is not None:
        return mgr.persistents.info(sandbox_id)
    return mgr.get(sandbox_id).info()


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/wait",
    summary="Wait (long poll) until the sandbox finishes",
    response=SandboxInfo,
    query={"timeout": "seconds to wait at most (default 10, at most 60)"},
)
async def wait_sandbox(request: web.Request) -> SandboxInfo:
    mgr = _mgr(request)
    if mgr.persistents.record(request.match_info["sandbox_id"]) is not None:
        return await mgr.persistents.wait(request.match_info["sandbox_id"], _float(request, "timeout", 10.0, MAX_WAIT))
    sb = mgr.get(request.match_info["sandbox_id"])
    timeout = _float(request, "timeout", 10.0, MAX_WAIT)
    deadline = time.monotonic() + timeout
    if not sb.finished.is_set() and timeout > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sb.finished.wait(), timeout)
    if sb.finished.is_set():
        await mgr.volumes_sent(sb, deadline - time.monotonic())
    return sb.info()


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/ready",
    summary=(
        'Wait (long poll) until the sandbox\'s readiness probe succeeds: {"ready": bool}; InvalidError without a'
        " probe, ConflictError once the sandbox has finished"
    ),
    query={"timeout": "seconds to wait at most (default 10, at most 60)"},
    response=Readiness,
)
async def wait_ready(request: web.Request) -> Readiness:
    mgr = _mgr(request)
    sb = mgr.get(request.match_info["sandbox_id"])
    return Readiness(ready=await readiness.wait_ready(mgr, sb, _float(request, "timeout", 10.0, MAX_WAIT)))


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/logs",
    summary="The sandbox's logs: its entrypoint's output as timestamped lines, and lifecycle events",
    query=LOG_QUERY,
    response=LogEntries,
)
async def get_logs(request: web.Request) -> LogEntries:
    sb = _mgr(request).get(request.match_info["sandbox_id"])
    streams = {fd: sb.out_dir / f"{ENTRYPOINT_ID}.{fd}" for fd in (1, 2)}
    entries = await asyncio.to_thread(logs.read, sb.data_dir, streams, **_log_query(request))
    return LogEntries(entries=[LogEntry(timestamp_us=e.micros, source=e.source, message=e.message) for e in entries])


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/connect_tokens",
    summary=(
        "A token for the authenticating HTTPS proxy in front of a sandbox port: {url, token}; requests that show it"
        " reach the port with X-Verified-User-Data set to user_metadata"
    ),
    body=ConnectTokenRequest,
    response=ConnectCredentials,
)
async def create_connect_token(request: web.Request, body: ConnectTokenRequest) -> ConnectCredentials:
    mgr = _mgr(request)
    sb = mgr.get(request.match_info["sandbox_id"])
    if sb.state != RUNNING:
        raise ConflictError(f"Sandbox {sb.id} is not running: nothing can connect to it")
    url, token = await mgr.network.create_connect_token(sb.id, body.port, body.user_metadata, sb.touch)
    return ConnectCredentials(url=url, token=token)


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/network_policy",
    summary=(
        "Replace a running sandbox's outbound allowlists (both null: open) and cut the connections the new policy"
        " does not allow"
    ),
    body=NetworkPolicy,
    response=Done,
)
async def set_network_policy(request: web.Request, body: NetworkPolicy) -> Done:
    mgr = _mgr(request)
    sb = mgr.get(request.match_info["sandbox_id"])
    if sb.state != RUNNING:
        raise ConflictError(f"Sandbox {sb.id} is not running: its network policy can no longer change")
    await mgr.network.set_policy(sb.id, body.outbound_cidr_allowlist, body.outbound_domain_allowlist)
    return Done()


@TABLE.route(
    "PUT",
    "/v1/sandboxes/{sandbox_id}/outbound_policy",
    summary="Replace the header replacements of a running sandbox created with an outbound policy",
    body=OutboundPolicyUpdate,
    response=Done,
)
async def update_outbound_policy(request: web.Request, body: OutboundPolicyUpdate) -> Done:
    mgr = _mgr(request)
    sb = mgr.get(request.match_info["sandbox_id"])
    if sb.state != RUNNING:
        raise ConflictError(f"Sandbox {sb.id} is not running: its outbound policy can no longer change")
    await mgr.network.set_outbound_headers(sb.id, [r.model_dump(mode="json") for r in body.outbound_headers])
    return Done()


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/terminate",
    summary="Terminate a sandbox",
    response=SandboxInfo,
)
async def terminate_sandbox(request: web.Request) -> SandboxInfo:
    mgr = _mgr(request)
    if mgr.persistents.record(request.match_info["sandbox_id"]) is not None:
        await mgr.persistents.terminate(request.match_info["sandbox_id"])
        return mgr.persistents.info(request.match_info["sandbox_id"])
    sb = mgr.get(request.match_info["sandbox_id"])
    await sb.terminate()
    return sb.info()


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/tunnels",
    summary="The sandbox's tunnels, once up (SandboxTimeoutError if not within the timeout)",
    query={"timeout": "seconds to wait at most (default 50, at most 60)"},
    response=TunnelList,
)
async def get_tunnels(request: web.Request) -> TunnelList:
    mgr = _mgr(request)
    sb = mgr.get(request.match_info["sandbox_id"])
    timeout = _float(request, "timeout", 50.0, MAX_WAIT)
    return TunnelList.model_validate({"tunnels": await mgr.network.tunnels_of(sb.id, sb.finished, timeout)})


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/tunnels/{port}",
    summary="Open an encrypted tunnel to a port that was not declared at create",
    response=TunnelList,
)
async def add_tunnel(request: web.Request) -> TunnelList:
    mgr = _mgr(request)
    sb = mgr.get(request.match_info["sandbox_id"])
    raw = request.match_info["port"]
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise InvalidError(f"{raw!r} is not a port number (1-65535)")
    if sb.state is not RUNNING:
        raise ConflictError("the sandbox has finished: it cannot open tunnels")
    await mgr.network.add_tunnel(sb.id, int(raw), sb.touch)
    return TunnelList.model_validate({"tunnels": await mgr.network.tunnels_of(sb.id, sb.finished, 5.0)})


@TABLE.route(
    "GET",
    "/v1/usage",
    summary="The latest CPU and memory sample of each running sandbox (sampled every few seconds)",
    response=SandboxUsage,
)
async def usage(request: web.Request) -> SandboxUsage:
    latest = _mgr(request).usage.latest
    return SandboxUsage.model_validate(
        {
            "usage": {
                sandbox_id: {"at_us": micros(s.at), "cpu_cores": s.cpu_cores, "memory_bytes": s.memory_bytes}
                for sandbox_id, s in latest.items()
            }
        }
    )


def _epoch(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidError(f"query parameter {name} must be seconds since the epoch, got {raw!r}") from None
    if not 0 <= value < 1 << 40:
        raise InvalidError(f"query parameter {name} is out of range: {raw!r}")
    return value


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/stats",
    summary="What a sandbox used (CPU, memory) over a time range, from samples taken every few seconds",
    query={
        "since": "start of the range, seconds since the epoch (default: when the sandbox was created)",
        "until": "end of the range, exclusive (default: now)",
    },
    response=SandboxStats,
)
async def sandbox_stats(request: web.Request) -> SandboxStats:
    mgr = _mgr(request)
    sb = mgr.get(request.match_info["sandbox_id"])
    stats = mgr.usage.stats(sb, _epoch(request, "since"), _epoch(request, "until"))
    return SandboxStats(
        since_us=micros(stats.since),
        until_us=micros(stats.until),
        duration_seconds=stats.duration_seconds,
        percentile_stats={
            key: PercentileStats(unit=unit, percentiles=values) for key, (unit, values) in stats.percentiles.items()
        },
        samples=stats.samples,
        billed_cpu_core_seconds=stats.billed_cpu_core_seconds,
        billed_memory_gib_seconds=stats.billed_memory_gib_seconds,
    )


@TABLE.route(
    "PUT",
    "/v1/sandboxes/{sandbox_id}/name",
    summary="Name a running sandbox created without one (once; Sandbox.from_name finds it then)",
    body=SandboxName,
    response=Done,
)
async def set_name(request: web.Request, body: SandboxName) -> Done:
    _mgr(request).set_name(request.match_info["sandbox_id"], body.name)
    return Done()


@TABLE.route(
    "PUT", "/v1/sandboxes/{sandbox_id}/tags", summary="Replace a sandbox's tags", body=TagsUpdate, response=Tags
)
async def set_tags(request: web.Request, body: TagsUpdate) -> Tags:
    _mgr(request).set_tags(request.match_info["sandbox_id"], body.tags)
    return Tags(tags=body.tags)


@TABLE.route(
    "GET",
    "/v1/apps/by-name/{app_name}/sandboxes/{name}",
    summary="The running sandbox with this name (Sandbox.from_name)",
    response=SandboxInfo,
)
async def sandbox_by_name(request: web.Request) -> SandboxInfo:
    ended = request.query.get("include_terminated") in ("1", "true")
    return _mgr(request).from_name(request.match_info["app_name"], request.match_info["name"], ended).info()


# ------------------------------------------------------------------ processes


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/execs",
    summary="Start a process",
    body=ExecRequest,
    response=ExecInfo,
)
async def create_exec(request: web.Request, body: ExecRequest) -> ExecInfo:
    mgr = _mgr(request)
    sandbox_id = request.match_info["sandbox_id"]
    proc = await mgr.exec(sandbox_id, body)
    return mgr.get(sandbox_id).exec_info(proc)


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/execs/{exec_id}/resize",
    summary="Set the size of a process's terminal (a pty=True process; it gets SIGWINCH)",
    body=TerminalSize,
    response=Done,
)
async def resize_exec(request: web.Request, body: TerminalSize) -> Done:
    sb = _mgr(request).get(request.match_info["sandbox_id"])
    sb.resize(request.match_info["exec_id"], body.rows, body.cols)
    return Done()


@TABLE.route("GET", "/v1/sandboxes/{sandbox_id}/execs", summary="List a sandbox's processes", response=ExecList)
async def list_execs(request: web.Request) -> ExecList:
    sb = _mgr(request).get(request.match_info["sandbox_id"])
    return ExecList(execs=sb.exec_infos())


@TABLE.route("GET", "/v1/sandboxes/{sandbox_id}/execs/{exec_id}", summary="One process", response=ExecInfo)
async def get_exec(request: web.Request) -> ExecInfo:
    sb = _mgr(request).get(request.match_info["sandbox_id"])
    return sb.exec_info(sb.process(request.match_info["exec_id"]))


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/execs/{exec_id}/wait",
    summary="Wait (long poll) for a process to end",
    response=WaitResult,
    query={"timeout": "seconds to wait at most (default 10, at most 60); 0 polls"},
)
async def wait_exec(request: web.Request) -> WaitResult:
    sb = _mgr(request).get(request.match_info["sandbox_id"])
    proc = sb.process(request.match_info["exec_id"])
    timeout = _float(request, "timeout", 10.0, MAX_WAIT)
    if not proc.exited and timeout > 0:
        await proc.wait(timeout)
    return WaitResult(done=proc.exited, returncode=proc.returncode)


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/execs/{exec_id}/output/{fd}",
    summary="Stream a process's stdout (fd 1) or stderr (fd 2) from a byte offset until it ends",
    query={"offset": "first byte to send (default 0)"},
    content_type="application/octet-stream",
)
async def read_output(request: web.Request) -> web.StreamResponse:
    sb = _mgr(request).get(request.match_info["sandbox_id"])
    proc = sb.process(request.match_info["exec_id"])
    fd = request.match_info["fd"]
    if fd not in ("1", "2"):
        raise InvalidError("fd must be 1 (stdout) or 2 (stderr)")
    stream = proc.streams[int(fd) - 1]
    offset = query_int(request, "offset", 0)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "X-Shoal-Offset": str(offset)})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    async for data in stream.follow(offset):
        await resp.write(data)
    await resp.write_eof()
    return resp


@TABLE.route(
    "GET",
    "/v1/sandboxes/{sandbox_id}/execs/{exec_id}/stdin",
    summary="How many bytes of a process's stdin the daemon has taken (where the next write starts)",
    response=StdinOffset,
)
async def stdin_offset(request: web.Request) -> StdinOffset:
    sb = _mgr(request).get(request.match_info["sandbox_id"])
    return StdinOffset(offset=await sb.stdin_offset(request.match_info["exec_id"]))


@TABLE.route(
    "POST",
    "/v1/sandboxes/{sandbox_id}/execs/{exec_id}/stdin",
    summary="Write to a process's stdin; offsets make retries safe",
    query={
        "offset": "stream offset of the first byte in the body",
        "eof": "1 to close stdin after the body",
    },
    raw_body=True,
    whole_body=True,
    response=StdinOffset,
)
async def write_stdin(request: web.Request) -> StdinOffset:
    sb = _mgr(request).get(request.match_info["sandbox_id"])
    offset = query_int(request, "offset", 0)
    eof = request.query.get("eof", "") in ("1", "true")
    data = await request.read()
    next_offset = await sb.write_stdin(request.match_info["exec_id"], offset, data, eof)
    return StdinOffset(offset=next_offset)


def error_response(exc: BaseException) -> web.Response:
    """A JSON error response for ``exc``."""
    status = errors.status_for(exc) if isinstance(exc, Error) else 500
    return web.json_response(errors.body_for(exc), status=status)
