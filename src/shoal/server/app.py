"""The aiohttp application: routes, validation, errors and authentication."""

from __future__ import annotations

import hmac
import logging
import socket
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from shoal.engine.manager import Manager
from shoal.exception import AuthError, Error, InvalidError
from shoal.server import (
    attach,  # registers the attach route on import
    routes,
    routes_images,  # noqa: F401  (registers the image store routes on import)
    routes_secrets,  # noqa: F401  (registers the secret routes on import)
    routes_snapshots,  # noqa: F401  (registers the snapshot and image-mount routes on import)
    routes_volumes,  # noqa: F401  (registers the volume routes on import)
)
from shoal.server.registry import Handler, Route, install

log = logging.getLogger(__name__)

TOKEN = web.AppKey("token", str)
MAX_BODY = 64 << 20


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "request"
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _wrap(r: Route) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            if r.body is not None:
                try:
                    payload = await request.json()
                except ValueError:
                    raise InvalidError("the request body must be JSON") from None
                try:
                    body = r.body.model_validate(payload)
                except ValidationError as exc:
                    raise InvalidError(_validation_message(exc)) from None
                result: Any = await r.handler(request, body)
            else:
                result = await r.handler(request)
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


def _is_local(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not _is_local(request):
        expected = request.app[TOKEN]
        given = request.headers.get("Authorization", "")
        if not expected or not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            return routes.error_response(AuthError("missing or wrong bearer token (see `shoal status` on the host)"))
    response: web.StreamResponse = await handler(request)
    return response


def build_app(manager: Manager, token: str) -> web.Application:
    """The daemon's web application."""
    app = web.Application(middlewares=[_auth], client_max_size=MAX_BODY)
    app[routes.MANAGER] = manager
    app[TOKEN] = token
    install(app, _wrap)
    attach.install(app)
    return app
