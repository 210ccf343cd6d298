"""``shoal serve``: start-up, the listeners, and graceful shutdown.

Shutdown stops accepting requests and closes agent connections without
touching sandboxes: they keep running and the next daemon re-adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
from typing import Any

from aiohttp import web

from shoal.cluster.membership import Membership
from shoal.engine.config import Config
from shoal.engine.manager import Manager
from shoal.exception import InvalidError
from shoal.server.app import build_app
from shoal.server.cluster import ROUTER, ClusterRouter
from shoal.util import limits
from shoal.wire.version import __version__ as version

log = logging.getLogger(__name__)


LOCK_NAME = "shoald.lock"


def lock_dirs(cfg: Config) -> list[int]:
    """Hold exclusive locks on the runtime and data dirs for the daemon's lifetime.

    Two daemons on one runtime or data dir would each take the other's
    containers for strays and delete them.
    """
    fds: list[int] = []
    for d in (cfg.runtime_dir, cfg.data_dir):
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            for held in fds:
                os.close(held)
            raise InvalidError(
                f"another shoal daemon (pid {other}) is using {d}; stop it first or choose other directories"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        fds.append(fd)
    return fds


def load_token(cfg: Config) -> str:
    """The TCP bearer token, created (0600) on first use."""
    path = cfg.token_path
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


async def _start_gateway(manager: Manager, cfg: Config, cluster: tuple[ClusterRouter, str] | None) -> Any:
    """The gateway for the official modal client, unless it is off or its extra is missing (said in the log);
    ``cluster``: the API's cluster router and the cluster's token, where the daemon is in one."""
    if cfg.gateway is None:
        return None
    try:
        from shoal.gateway import server as gateway
    except ImportError as exc:
        log.info("no gateway for the official modal client (%s): install shoal[gateway]", exc)
        return None
    try:
        gw = await gateway.start(manager, cfg.gateway, cluster)
    except (OSError, ValueError) as exc:
        log.warning("no gateway for the official modal client: %s", exc)
        return None
    manager.gateway_env = gw.env()
    return gw


async def _start_dashboard(manager: Manager, cfg: Config) -> Any:
    """The web dashboard, unless it is off or cannot listen (said in the log)."""
    if cfg.dashboard is None:
        return None
    from shoal.server import dashboard

    try:
        board = await dashboard.start(manager, cfg.dashboard)
    except (OSError, ValueError) as exc:
        log.warning("no dashboard: %s", exc)
        return None
    manager.dashboard = (board.url, board.login_url)
    return board


async def _join_cluster(manager: Manager, cfg: Config) -> Membership:
    """Register this daemon with the Ray cluster at ``--ray`` (decision 0077)."""
    assert cfg.ray_address is not None and cfg.advertise_url is not None
    membership = Membership(
        cfg.ray_address,
        {
            "name": cfg.node_name,
            "url": cfg.advertise_url,
            "labels": cfg.node_labels,
            "max_sandboxes": cfg.max_sandboxes,
            "version": version,
        },
        manager.live_count,
    )
    await membership.start()
    return membership


async def serve(cfg: Config, ready: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    # Before anything is created: what the daemon writes (state, WAL, outputs, bundles) is for root alone.
    # Files meant for sandboxes get their modes explicitly.
    os.umask(0o077)
    limits.raise_nofile()
    locks = lock_dirs(cfg)
    manager = Manager(cfg)
    await manager.start()
    if cfg.ray_address is not None:
        # Before the API listens: whoever finds it answering finds it in the cluster too.
        try:
            manager.cluster = await _join_cluster(manager, cfg)
        except BaseException:
            await manager.close()
            raise
    token = load_token(cfg)
    app = build_app(manager, token)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    sock_path = cfg.socket
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    old_umask = os.umask(0o177)
    try:
        site: web.BaseSite = web.UnixSite(runner, str(sock_path))
        await site.start()
    finally:
        os.umask(old_umask)
    os.chmod(sock_path, 0o600)
    if cfg.tcp_port is not None:
        tcp = web.TCPSite(runner, cfg.tcp_host or "127.0.0.1", cfg.tcp_port)
        await tcp.start()
        log.info(
            "listening on http://%s:%d (bearer token in %s)",
            cfg.tcp_host or "127.0.0.1",
            cfg.tcp_port,
            cfg.token_path,
        )
    gateway = await _start_gateway(manager, cfg, (app[ROUTER], token) if manager.cluster is not None else None)
    board = await _start_dashboard(manager, cfg)
    log.info("shoal daemon ready on %s (runtime %s)", sock_path, manager.runtime.name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down; sandboxes keep running")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if gateway is not None:
            await gateway.close()
        if board is not None:
            await board.close()
        await runner.cleanup()
        if manager.cluster is not None:
            await manager.cluster.close()
        await manager.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        for fd in locks:
            os.close(fd)
