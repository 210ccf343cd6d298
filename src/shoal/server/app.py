"""The aiohttp application: routes, validation, errors and authentication."""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler
from pydantic import BaseModel, ValidationError

from shoal.engine.manager import Manager
from shoal.engine.metrics import CONTENT_TYPE
from shoal.exception import AuthError, Error, InvalidError
from shoal.server import (
    attach,
    cluster,
    cluster_images,
    cluster_secrets,
    cluster_volumes,
    errors,
    routes,
    routes_images,
    routes_persistent,
    routes_secrets,
    routes_sidecars,
    routes_snapshots,
    routes_volumes,
    terminal,
)
from shoal.server.registry import Handler, Route, install
from shoal.wire.base import validation_message

log = logging.getLogger(__name__)

TOKEN = web.AppKey("token", str)
TRUSTED = web.AppKey("trusted", bool)
"""The app is mounted where its parent has already checked who is asking (the dashboard's ``/api``)."""
ROUTES: list[Route] = [
    *routes.TABLE.routes,
    *attach.TABLE.routes,
    *routes_images.TABLE.routes,
    *routes_secrets.TABLE.routes,
    *routes_sidecars.TABLE.routes,
    *routes_persistent.TABLE.routes,
    *routes_snapshots.TABLE.routes,
    *routes_volumes.TABLE.routes,
    *cluster_secrets.TABLE.routes,
]
"""Every route the daemon serves, module by module."""
MAX_BODY = 64 << 20
"""Largest request body the daemon reads whole, in bytes (64 MiB): every JSON body, and one stdin write.

A larger body gets 413 with an ``InvalidError`` naming this limit: before any of it is read when its
Content-Length (or an ``Expect: 100-continue``) announces it, else as soon as more than this has arrived (a gzip
body counts inflated), so a larger body is never held whole.  The image recipe model's own bounds (1000 steps of at
most 64 KiB of arguments each) come to about 63 MiB of JSON.  Routes that stream their body (build-context and volume
uploads, attach) read it in chunks under their own limits.  A malformed body (not UTF-8, not JSON, nested too deep
for the parser, or of the wrong shape) gets 400 with an ``InvalidError``; no client input gets a 5xx.
"""


def _error(exc: Error, status: int) -> web.Response:
    return web.json_response(errors.body_for(exc), status=status)


def _too_large(size: int | None) -> web.Response:
    limit = f"{MAX_BODY} bytes ({MAX_BODY >> 20} MiB)"
    message = f"the request body is {size} bytes; the limit is {limit}" if size else f"the request body is over {limit}"
    return _error(InvalidError(message), web.HTTPRequestEntityTooLarge.status_code)


def _announced_too_large(request: web.BaseRequest) -> bool:
    return request.content_length is not None and request.content_length > MAX_BODY


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate: a pair is one character, a lone one is not text.  Lone ones are refused,
"surrogateescape" bytes (U+DC80-U+DCFF) included: fields such as tags, environment values and working directories
would store them and fail later as 500s (a sandbox whose tags no longer serialize, an exec stuck half-started)."""


def _parse_json(raw: bytes) -> Any:
    """A JSON body; InvalidError for anything that is not UTF-8 JSON within the parser's nesting limit."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidError(f"the request body must be UTF-8 JSON (invalid UTF-8 at byte {exc.start})") from None
    try:
        payload = json.loads(text)
    except RecursionError:
        raise InvalidError("the request body is JSON nested too deeply") from None
    except ValueError as exc:
        raise InvalidError(f"the request body must be JSON ({str(exc)[:200]})") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_text(payload)
    return payload


def _check_text(payload: Any) -> None:
    """Refuse strings holding a lone surrogate (valid JSON, but not UTF-8 text)."""
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidError("the request body holds a lone surrogate (a \\u escape that is not text)") from None


def _wrap(r: Route) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            if r.limits_body and _announced_too_large(request):
                return _too_large(request.content_length)
            if r.body is not None:
                payload = _parse_json(await request.read())
                try:
                    body = r.body.model_validate(payload)
                except ValidationError as exc:
                    raise InvalidError(validation_message(exc)) from None
                result: Any = await r.handler(request, body)
            else:
                result = await r.handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _too_large(None)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # a redirect, not an error
            if exc.status >= 500:
                log.error("%s %s failed: %s", request.method, request.path, exc)
            return _error(errors.from_http(exc.status, exc.text or exc.reason), exc.status)
        except Error as exc:
            return routes.error_response(exc)
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            return routes.error_response(exc)
        if isinstance(result, web.StreamResponse):
            return result
        if isinstance(result, BaseModel):
            return web.Response(body=result.model_dump_json(), content_type="application/json")
        return web.json_response(result)

    handler.__name__ = r.handler.__name__
    return handler


def _expect(r: Route) -> Handler:
    """``Expect: 100-continue``: refuse a body over the limit before the client sends it."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if r.limits_body and _announced_too_large(request):
            return _too_large(request.content_length)
        await _default_expect_handler(request)  # "100 Continue"
        return None

    return expect


def _is_local(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    public = request.path == METRICS_PATH and request.app[routes.MANAGER].cfg.metrics_public
    if not _is_local(request) and not public and not request.app[TRUSTED]:
        expected = request.app[TOKEN]
        given = request.headers.get("Authorization", "")
        if not expected or not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            return routes.error_response(AuthError("missing or wrong bearer token (see `shoal status` on the host)"))
    response: web.StreamResponse = await handler(request)
    return response


@web.middleware
async def _framework_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method) as JSON error bodies, like every other error."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(errors.from_http(exc.status, exc.text or exc.reason), exc.status)
    return response


METRICS_PATH = "/metrics"


async def metrics(request: web.Request) -> web.Response:
    """Prometheus' scrape: the daemon's metrics in the text format (``shoal.engine.metrics``)."""
    body = request.app[routes.MANAGER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def build_app(
    manager: Manager, token: str, *, trusted: bool = False, cluster_token: str | None = None
) -> web.Application:
    """The daemon's web application; ``trusted``: for mounting under an app that checks callers itself;
    ``cluster_token``: the bearer token of the cluster's nodes, where ``token`` is not it (the dashboard's API)."""
    app = web.Application(
        middlewares=[_framework_errors, _auth, cluster.route, routes_persistent.sessions], client_max_size=MAX_BODY
    )
    app[routes.MANAGER] = manager
    app[TOKEN] = token
    app[TRUSTED] = trusted
    app[routes.API] = ROUTES
    install(app, ROUTES, _wrap, _expect)
    app.router.add_get(METRICS_PATH, metrics)
    attach.install(app)
    app.router.add_get("/v1/sandboxes/{sandbox_id}/terminal", terminal.websocket)  # a shell, over a WebSocket
    router = cluster.install(app, manager, cluster_token or token)
    if manager.cluster is not None:
        router.volumes = cluster_volumes.install(router)
        router.secrets = cluster_secrets.ClusterSecrets(router)
        cluster_images.install(router)
    return app
