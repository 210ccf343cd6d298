"""The daemon's named-secret operations.  No operation answers with a secret's values."""

from __future__ import annotations

from aiohttp import web

from shoal.secrets.store import SecretStore
from shoal.server.registry import RouteTable
from shoal.server.routes import MANAGER
from shoal.wire.base import Done
from shoal.wire.secrets import SecretCreate, SecretInfo, SecretList, SecretLookup, SecretUpdate

TABLE = RouteTable()
"""The routes this module serves."""


def _store(request: web.Request) -> SecretStore:
    return request.app[MANAGER].secrets


@TABLE.route(
    "POST",
    "/v1/secrets",
    summary="Create a named secret (Secret.objects.create)",
    body=SecretCreate,
    response=SecretInfo,
)
async def create_secret(request: web.Request, body: SecretCreate) -> SecretInfo:
    return _store(request).create(body.name, body.env, body.allow_existing).info()


@TABLE.route(
    "GET", "/v1/secrets", summary="List named secrets, newest first (names only, never values)", response=SecretList
)
async def list_secrets(request: web.Request) -> SecretList:
    return SecretList(secrets=[row.info() for row in _store(request).all()])


@TABLE.route(
    "POST",
    "/v1/secrets/lookup",
    summary="Find a named secret (Secret.from_name), checking that it holds required_keys",
    body=SecretLookup,
    response=SecretInfo,
)
async def lookup_secret(request: web.Request, body: SecretLookup) -> SecretInfo:
    return _store(request).lookup(body.name, body.required_keys).info()


@TABLE.route("GET", "/v1/secrets/{secret_id}", summary="One secret (never its values)", response=SecretInfo)
async def get_secret(request: web.Request) -> SecretInfo:
    return _store(request).get(request.match_info["secret_id"]).info()


@TABLE.route(
    "PATCH",
    "/v1/secrets/{secret_id}",
    summary="Add or replace keys of a secret (secret.update)",
    body=SecretUpdate,
    response=SecretInfo,
)
async def update_secret(request: web.Request, body: SecretUpdate) -> SecretInfo:
    return _store(request).update(request.match_info["secret_id"], body.env).info()


@TABLE.route(
    "DELETE",
    "/v1/secrets/by-name/{name}",
    summary="Delete a named secret (Secret.objects.delete)",
    query={"allow_missing": "1: no error if there is no such secret"},
    response=Done,
)
async def delete_secret(request: web.Request) -> Done:
    _store(request).delete_by_name(request.match_info["name"], request.query.get("allow_missing", "") in ("1", "true"))
    return Done()
