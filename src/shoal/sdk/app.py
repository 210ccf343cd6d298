"""``App``: the group every sandbox belongs to."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from shoal.exception import InvalidError
from shoal.sdk._sync import live_function, live_method, run_async, run_blocking
from shoal.sdk._unbuilt import AppUnbuilt, unimplemented
from shoal.sdk.dashboard import DashboardLink
from shoal.sdk.logs import AppLogs
from shoal.sdk.transport import default_client
from shoal.types import AppInfo, AppLifecycle, AppState
from shoal.wire import routes, times
from shoal.wire.apps import AppCreate, AppLookup, AppTags
from shoal.wire.base import dump

LOCAL_USER = "local"
"""Who created or stopped an app, as ``AppLifecycle`` says it: the daemon has no users."""
NO_BILLING = (
    "shoal keeps no cost or usage accounting of Functions, Servers or sandboxes; `shoal status` shows what runs"
    " now, and sb.logs / app.logs what ran"
)


class App(AppUnbuilt, DashboardLink):
    """A named group of sandboxes.

    Examples:
        app = shoal.App.lookup("sandbox-app", create_if_missing=True)
        sb = shoal.Sandbox.create(app=app)
    """

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        if name is not None and not isinstance(name, str):
            raise InvalidError("App name must be a string")
        self._name = name
        self._app_id: str | None = None
        self._options = kwargs

    def __repr__(self) -> str:
        return f"App({self._name!r}, app_id={self._app_id!r})"

    @property
    def name(self) -> str | None:
        """The app's name."""
        return self._name

    @property
    def description(self) -> str | None:
        """The app's name if it has one, else its id."""
        return self._name or self._app_id

    @property
    def app_id(self) -> str | None:
        """The app's id once it runs (``ap-…``)."""
        return self._app_id

    def _dashboard_page(self) -> str:
        return f"sandboxes?app={self._app_id}" if self._app_id else "apps"

    @live_function
    async def lookup(  # static: App.lookup(...)
        name: str,
        *,
        client: Any = None,
        environment_name: str | None = None,
        create_if_missing: bool = False,
    ) -> App:
        """The app called ``name``, created if asked and missing."""
        resp = await default_client().request(
            "POST",
            routes.path("apps", "lookup"),
            json_body=dump(AppLookup, name=name, create_if_missing=create_if_missing),
        )
        app = App(resp["name"])
        app._app_id = resp["app_id"]
        return app

    def _need_id(self, what: str) -> str:
        if self._app_id is None:
            raise InvalidError(
                f"App.{what} needs a running app: look it up with App.lookup(name) or run it with app.run()"
            )
        return self._app_id

    @live_method
    async def set_tags(self, tags: Mapping[str, str], *, client: Any = None) -> None:
        """Replace the app's tags with ``tags`` (not an update: tags left out are removed)."""
        app_id = self._need_id("set_tags")
        if not isinstance(tags, Mapping):
            raise InvalidError(f"tags must be a mapping of str to str, got {type(tags).__name__}")
        await default_client().request(
            "PUT", routes.path("apps", app_id, "tags"), json_body=dump(AppTags, tags=dict(tags))
        )

    @live_method
    async def get_tags(self, *, client: Any = None) -> dict[str, str]:
        """The app's tags."""
        details = await default_client().request("GET", routes.path("apps", self._need_id("get_tags")))
        return dict(details["tags"])

    @live_method
    async def info(self, refresh: bool = False) -> AppInfo:
        """What the daemon records of the app: its id, description and lifecycle (no Functions or Servers)."""
        d = await default_client().request("GET", routes.path("apps", self._need_id("info")))
        created = times.to_datetime(d["created_at_us"])
        stopped = None if d["stopped_at_us"] is None else times.to_datetime(d["stopped_at_us"])
        if d["ephemeral"]:
            state = AppState.STOPPED if stopped is not None and not d["sandboxes_running"] else AppState.EPHEMERAL
        else:
            state = AppState.DEPLOYED
        lifecycle = AppLifecycle(
            state=state,
            version=None,
            created_at=created,
            created_by=LOCAL_USER,
            deployed_at=None if d["ephemeral"] else created,
            deployed_by=None if d["ephemeral"] else LOCAL_USER,
            stopped_at=stopped,
            stopped_by=None if stopped is None else LOCAL_USER,
        )
        return AppInfo(
            app_id=d["app_id"], description=d["name"] or d["app_id"], lifecycle=lifecycle, functions={}, servers={}
        )

    @property
    def logs(self) -> AppLogs:
        """The logs of every sandbox of the app, merged in time order (``fetch``, ``tail``, ``stream``)."""
        return AppLogs(default_client(), self._need_id("logs"))

    @property
    def sandboxes(self) -> AppSandboxes:
        """What Modal keeps about the app's sandboxes as a group (``stats``: their cost)."""
        return AppSandboxes()

    @unimplemented(NO_BILLING)
    def stats(self, *, since: datetime.datetime | None = None, until: datetime.datetime | None = None) -> Any: ...

    @live_method
    async def stop(self, *, client: Any = None) -> None:
        """Stop the app: terminate every sandbox of it that runs (it can be looked up and used again after)."""
        if self._app_id is None:
            raise InvalidError("the app is not running: look it up with App.lookup(name) or run it with app.run()")
        await default_client().request("POST", routes.path("apps", self._app_id, "stop"))

    def run(self, **kwargs: Any) -> _AppRun:
        """Run the app for the duration of a ``with``/``async with`` block (an ephemeral app)."""
        return _AppRun(self)


class AppSandboxes:
    """``app.sandboxes``: Modal's statistics over an app's sandboxes."""

    @unimplemented(NO_BILLING)
    def stats(
        self,
        *,
        since: datetime.datetime,
        until: datetime.datetime | None = None,
        group_by_tags: Sequence[str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> Any: ...


class _AppRun:
    """Context manager of ``app.run()``: the app exists inside the block; its sandboxes stop after it."""

    def __init__(self, app: App) -> None:
        self._app = app

    async def _enter(self) -> App:
        tags = self._app._options.get("tags") or {}
        if not isinstance(tags, Mapping):
            raise InvalidError(f"App(tags=) must be a mapping of str to str, got {type(tags).__name__}")
        resp = await default_client().request(
            "POST", routes.path("apps"), json_body=dump(AppCreate, name=self._app.name, tags=dict(tags))
        )
        self._app._app_id = resp["app_id"]
        return self._app

    async def _exit(self) -> None:
        if self._app._app_id is not None:
            await default_client().request("POST", routes.path("apps", self._app._app_id, "stop"))
            self._app._app_id = None

    def __enter__(self) -> App:
        return run_blocking(self._enter())

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        run_blocking(self._exit())

    async def __aenter__(self) -> App:
        return await run_async(self._enter())

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        await run_async(self._exit())
