"""Route table: each handler declares its method, path, body and response models once.

The same table drives request validation and the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[..., Awaitable[Any]]


@dataclass
class Route:
    """One API operation."""

    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    query: dict[str, str] = field(default_factory=dict)
    """Query parameter name → description."""
    content_type: str = "application/json"
    raw_body: bool = False
    """The body is not JSON: the handler reads it itself (streamed, under its own limits, unless ``whole_body``)."""
    whole_body: bool = False
    """A raw body the handler reads whole (``request.read()``): the daemon's body limit applies to it."""

    @property
    def limits_body(self) -> bool:
        """Whether the daemon's body limit (``shoal.server.app.MAX_BODY``) applies: JSON bodies, routes that take
        none, and raw bodies read whole.  Streamed bodies (uploads, attach) are the route's own business."""
        return self.body is not None or not self.raw_body or self.whole_body


class RouteTable:
    """The routes of one module, in the order they are declared there; the app lists every table it serves."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        body: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        raw_body: bool = False,
        whole_body: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Declare a handler ``async def h(request, [body]) -> model | dict | StreamResponse``."""

        def declare(fn: Handler) -> Handler:
            self.routes.append(
                Route(method, path, fn, summary, body, response, query or {}, content_type, raw_body, whole_body)
            )
            return fn

        return declare


def openapi(version: str, routes: list[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "responses": {
                "default": {
                    "description": "error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
        }
        params = [
            {"name": seg.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
            for seg in r.path.split("/")
            if seg.startswith("{")
        ]
        params += [
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": desc,
                "schema": {"type": "string"},
            }
            for name, desc in r.query.items()
        ]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(r.body)}},
            }
        elif r.raw_body:
            op["requestBody"] = {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        ok: dict[str, Any] = {"description": "ok"}
        if r.response is not None:
            ok["content"] = {"application/json": {"schema": ref(r.response)}}
        elif r.content_type != "application/json":
            ok["content"] = {r.content_type: {"schema": {"type": "string", "format": "binary"}}}
        else:
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        op["responses"]["200"] = ok
        paths.setdefault(r.path, {})[r.method.lower()] = op
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                "required": ["type", "message"],
            }
        },
        "required": ["error"],
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "shoal daemon API", "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def install(
    app: web.Application,
    routes: list[Route],
    wrap: Callable[[Route], Handler],
    expect: Callable[[Route], Handler] | None = None,
) -> None:
    """Add ``routes`` to an aiohttp application, each wrapped by ``wrap``; ``expect(route)``, if given, answers
    a request's ``Expect: 100-continue`` before its body is sent."""
    for r in routes:
        app.router.add_route(r.method, r.path, wrap(r), expect_handler=expect(r) if expect else None)
