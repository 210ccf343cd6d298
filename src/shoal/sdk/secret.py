"""``Secret``: environment variables given to a sandbox and its processes.

Secrets made with ``from_dict``, ``from_dotenv`` or ``from_local_environ`` travel
with the request that uses them; named secrets (``from_name``) stay in the
daemon, sealed at rest, and only their ids cross the API: no call returns a
secret's values.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any

from shoal.exception import InvalidError
from shoal.sdk._listing import filter_listing
from shoal.sdk._sync import live_function, live_method
from shoal.sdk.dashboard import DashboardLink
from shoal.sdk.transport import Client, default_client
from shoal.types import SecretInfo
from shoal.wire import routes, times
from shoal.wire.base import dump
from shoal.wire.secrets import SecretCreate, SecretLookup, SecretUpdate


def _check_env_dict(env_dict: Any, what: str) -> dict[str, str]:
    if not isinstance(env_dict, dict):
        raise InvalidError(f"{what} expects a dict of str to str")
    out: dict[str, str] = {}
    for k, v in env_dict.items():
        if v is None:
            continue
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidError(f"{what} values must be str (or None); {k!r} has {type(v).__name__}")
        out[k] = v
    return out


class _SecretManager:
    """``Secret.objects``: manage named secrets."""

    @live_function
    async def create(
        name: str,
        env_dict: dict[str, str],
        *,
        allow_existing: bool = False,
        environment_name: str | None = None,
        client: Any = None,
    ) -> None:
        """Store a named secret; AlreadyExistsError if it exists (unless ``allow_existing``: then it is kept)."""
        env = _check_env_dict(env_dict, "Secret.objects.create")
        await default_client().request(
            "POST",
            routes.path("secrets"),
            json_body=dump(SecretCreate, name=name, env=env, allow_existing=allow_existing),
            idempotent=False,
        )

    @live_function
    async def list(
        *,
        max_objects: int | None = None,
        created_before: datetime | str | None = None,
        environment_name: str = "",
        client: Any = None,
    ) -> list[Secret]:
        """Named secrets, newest first."""
        items = (await default_client().request("GET", routes.path("secrets")))["secrets"]
        items = filter_listing(items, max_objects, created_before)
        out = []
        for item in items:
            secret = Secret({}, name=item["name"])
            secret._info = item
            out.append(secret)
        return out

    @live_function
    async def delete(
        name: str, *, allow_missing: bool = False, environment_name: str | None = None, client: Any = None
    ) -> None:
        """Delete a named secret (running sandboxes keep the values they started with)."""
        params = {"allow_missing": "1"} if allow_missing else None
        await default_client().request(
            "DELETE", routes.path("secrets", "by-name", name), params=params, idempotent=False
        )


class Secret(DashboardLink):
    """A set of environment variables.

    Examples:
        sb = shoal.Sandbox.create(secrets=[shoal.Secret.from_dict({"API_KEY": "xxx"})], app=app)
        sb = shoal.Sandbox.create(secrets=[shoal.Secret.from_name("api-keys", required_keys=["API_KEY"])], app=app)
    """

    objects = _SecretManager()

    def __init__(self, env: dict[str, str], *, name: str | None = None, required_keys: list[str] | None = None) -> None:
        self._env = env
        self._name = name
        self._required_keys = list(required_keys or [])
        self._info: dict[str, Any] | None = None
        self._lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"Secret(keys={sorted(self._env)})" if self._name is None else f"Secret.from_name({self._name!r})"

    @staticmethod
    def from_dict(env_dict: dict[str, str | None] | None = None) -> Secret:
        """A secret from a dict (``None`` values are dropped)."""
        return Secret(_check_env_dict(env_dict or {}, "Secret.from_dict"))

    @staticmethod
    def from_local_environ(env_keys: list[str]) -> Secret:
        """A secret copied from this process's environment."""
        missing = [k for k in env_keys if k not in os.environ]
        if missing:
            raise InvalidError(f"Secret.from_local_environ: not set in the local environment: {', '.join(missing)}")
        return Secret({k: os.environ[k] for k in env_keys})

    @staticmethod
    def from_dotenv(
        path: str | os.PathLike[str] | None = None, *, filename: str = ".env", client: Any = None
    ) -> Secret:
        """A secret from a ``.env`` file: ``path``'s directory (or the cwd) and its parents are searched."""
        start = Path(path) if path is not None else Path.cwd()
        if start.is_file():
            start = start.parent
        for d in [start, *start.parents]:
            candidate = d / filename
            if candidate.is_file():
                return Secret(parse_dotenv(candidate.read_text()))
        return Secret({})

    @staticmethod
    def from_name(
        name: str,
        *,
        namespace: Any = None,
        environment_name: str | None = None,
        required_keys: list[str] | None = None,
        client: Any = None,
    ) -> Secret:
        """A lazy reference to a named secret stored by the daemon, checked on first use.

        NotFoundError on use if it does not exist or lacks one of ``required_keys``.
        """
        if not isinstance(name, str) or not name:
            raise InvalidError("Secret name must be a non-empty string")
        keys = list(required_keys or [])
        if not all(isinstance(k, str) for k in keys):
            raise InvalidError("required_keys must be a list of strings")
        return Secret({}, name=name, required_keys=keys)

    @property
    def client(self) -> Client:
        """The client this object reaches the daemon with (Modal's ``.client``): pass it as ``client=`` to
        other calls."""
        return default_client()

    @property
    def name(self) -> str | None:
        """The secret's name (None for secrets made from a dict, a .env file or the environment)."""
        return self._name

    @property
    def object_id(self) -> str:
        """A named secret's id (``st-…``), once it has been used or hydrated."""
        if self._info is None:
            raise InvalidError(f"{self!r} is not hydrated yet: call .hydrate() or use it first")
        return str(self._info["secret_id"])

    def _dashboard_page(self) -> str:
        return "secrets"

    async def _hydrate(self) -> str:
        if self._name is None:
            raise InvalidError("only named secrets (Secret.from_name) live in the daemon")
        if self._info is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._info is None:
                    self._info = await default_client().request(
                        "POST",
                        routes.path("secrets", "lookup"),
                        json_body=dump(SecretLookup, name=self._name, required_keys=self._required_keys),
                    )
        return self.object_id

    @live_method
    async def hydrate(self, client: Any = None) -> Secret:
        """Resolve a named secret now (NotFoundError if missing or without a required key)."""
        if self._name is not None:
            await self._hydrate()
        return self

    @live_method
    async def info(self, refresh: bool = False) -> SecretInfo:
        """A named secret's name and creation time (``refresh``: Modal's cache switch; shoal asks the daemon
        the first time and the secret's name and creation time never change after)."""
        await self._hydrate()
        assert self._info is not None
        return SecretInfo(
            name=self._name,
            created_at=times.to_datetime(self._info["created_at_us"]).astimezone(),
            created_by=None,
        )

    @live_method
    async def update(self, env_dict: dict[str, str]) -> None:
        """Add or replace keys (a named secret is changed in the daemon; sandboxes already started keep theirs)."""
        env = _check_env_dict(env_dict, "Secret.update")
        if self._name is None:
            self._env.update(env)
            return
        secret_id = await self._hydrate()
        self._info = await default_client().request(
            "PATCH", routes.path("secrets", secret_id), json_body=dump(SecretUpdate, env=env)
        )

    def _as_env(self) -> dict[str, str]:
        """The values this secret carries itself (a named secret's stay in the daemon)."""
        return dict(self._env)


async def secret_ids(secrets: Collection[Secret] | None) -> list[str]:
    """The ids of the named secrets among ``secrets`` (hydrating them), in order."""
    out: list[str] = []
    for s in secrets or ():
        if isinstance(s, Secret) and s._name is not None:
            out.append(await s._hydrate())
    return out


def parse_dotenv(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
            if raw.strip().split("=", 1)[1].strip().startswith('"'):
                value = value.encode().decode("unicode_escape")
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key.strip()] = value
    return out
