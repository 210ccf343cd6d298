"""The web dashboard: a loopback HTTP listener of the daemon, behind a login token.

It serves the single-page UI (``static/``: plain ES modules, and xterm.js that ``make setup`` vendors), the
daemon's own API under ``/api`` (the same routes the SDK and CLI use, allowed by the dashboard's session
cookie instead of the bearer token), a terminal into a sandbox over a WebSocket (``shoal.server.terminal``),
and ``/metrics``.

Who may use it: whoever holds the token in ``<data dir>/dashboard-token`` (0600; ``shoal dashboard`` prints
the login URL).  ``/login?token=…`` trades it for a session cookie (HttpOnly, SameSite=Strict) derived from
the token.  Requests must name the listener itself in ``Host`` (a DNS-rebinding page cannot), WebSockets must
come from the dashboard's own origin, and sandboxes cannot reach host addresses at all (decision 0016).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from shoal.engine.manager import Manager
from shoal.server import cluster, routes, terminal
from shoal.server.app import METRICS_PATH, build_app, metrics
from shoal.server.registry import Handler
from shoal.util import loopback

log = logging.getLogger(__name__)

TOKEN_FILE = "dashboard-token"
COOKIE = "shoal_dashboard"
STATIC = Path(__file__).parent / "static"


class DashboardAuth:
    """The login token (made on first use, 0600) and the session cookie's value derived from it."""

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / TOKEN_FILE
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        self.token = path.read_text().strip()
        self.session = hmac.new(self.token.encode(), b"dashboard session", hashlib.sha256).hexdigest()
        self.hosts: set[str] = set()
        """``Host`` values that name this listener."""

    def allows(self, request: web.Request) -> bool:
        """Whether the request carries the session cookie or the token as a bearer."""
        cookie = request.cookies.get(COOKIE, "")
        bearer = request.headers.get("Authorization", "")
        return hmac.compare_digest(cookie.encode(), self.session.encode()) or hmac.compare_digest(
            bearer.encode(), f"Bearer {self.token}".encode()
        )


AUTH = web.AppKey("dashboard_auth", DashboardAuth)

_LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>shoal dashboard</title>
<body style="font-family: system-ui, sans-serif; margin: 4rem auto; max-width: 36rem; color: #1d2430">
<h1>shoal dashboard</h1><p>{message}</p>
<p>On the daemon's host, <code>shoal dashboard</code> prints the URL that signs you in.</p></body>"""


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    auth = request.app[AUTH]
    if request.host not in auth.hosts:
        return web.Response(status=421, text="this listener answers only to its own loopback address\n")
    if request.path == "/login":
        response: web.StreamResponse = await handler(request)
        return response
    public = request.path == METRICS_PATH and request.app[routes.MANAGER].cfg.metrics_public
    if not public and not auth.allows(request):
        if request.method == "GET" and (request.path == "/" or "text/html" in request.headers.get("Accept", "")):
            return web.Response(text=_LOGIN_PAGE.format(message="You are not signed in."), content_type="text/html")
        return web.json_response({"error": {"type": "AuthError", "message": "sign in to the dashboard"}}, status=401)
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"http://{request.host}":
        return web.json_response({"error": {"type": "AuthError", "message": "cross-origin request"}}, status=403)
    response = await handler(request)
    return response


async def _login(request: web.Request) -> web.StreamResponse:
    auth = request.app[AUTH]
    given = request.query.get("token", "")
    if not hmac.compare_digest(given.encode(), auth.token.encode()):
        page = _LOGIN_PAGE.format(message="That login link is not (or no longer) valid.")
        return web.Response(status=401, text=page, content_type="text/html")
    resp = web.HTTPSeeOther("/")
    resp.set_cookie(COOKIE, auth.session, httponly=True, samesite="Strict", path="/")
    raise resp


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


@dataclass
class Dashboard:
    """A running dashboard listener."""

    runner: web.AppRunner
    url: str
    auth: DashboardAuth

    @property
    def login_url(self) -> str:
        return f"{self.url}/login?token={self.auth.token}"

    async def close(self) -> None:
        await self.runner.cleanup()


def build(manager: Manager, auth: DashboardAuth) -> web.Application:
    """The dashboard's application: the UI, ``/api`` (the daemon's API), the terminal, ``/metrics``."""
    app = web.Application(middlewares=[_guard])
    app[AUTH] = auth
    app[routes.MANAGER] = manager
    app.router.add_get("/login", _login)
    app.router.add_get("/", _index)
    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_get("/terminal/{sandbox_id}", terminal.websocket)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    # Calls it passes to the other nodes of a cluster carry the cluster's token (the daemon's API token).
    token = manager.cfg.token_path.read_text().strip() if manager.cfg.token_path.exists() else ""
    cluster.install(app, manager, token)  # the terminal of a sandbox another node runs
    app.add_subapp("/api/", build_app(manager, "", trusted=True, cluster_token=token or None))
    return app


async def start(manager: Manager, address: str) -> Dashboard:
    """Listen on ``address`` (loopback HOST:PORT; a port in use falls back to any free one, said in the log)."""
    host, port = loopback.split(address, "dashboard")
    auth = DashboardAuth(manager.cfg.data_dir)
    sock, url = loopback.listen(host, port, "dashboard", log)
    bound = sock.getsockname()[1]
    auth.hosts = {url.removeprefix("http://"), f"localhost:{bound}"}
    runner = web.AppRunner(build(manager, auth), handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    log.info("dashboard on %s (`shoal dashboard` prints the login URL)", url)
    return Dashboard(runner, url, auth)
