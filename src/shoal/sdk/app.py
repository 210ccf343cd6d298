"""``App``: the group every sandbox belongs to."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from shoal.exception import InvalidError
from shoal.sdk._sync import live_function, live_method, run_async, run_blocking
from shoal.sdk._unbuilt import AppUnbuilt
from shoal.sdk.transport import default_client
from shoal.wire import routes
from shoal.wire.apps import AppCreate, AppLookup
from shoal.wire.base import dump


class App(AppUnbuilt):
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

    @live_method
    async def stop(self, *, client: Any = None) -> None:
        """Stop the app: terminate every sandbox of it that runs (it can be looked up and used again after)."""
        if self._app_id is None:
            raise InvalidError("the app is not running: look it up with App.lookup(name) or run it with app.run()")
        await default_client().request("POST", routes.path("apps", self._app_id, "stop"))

    def run(self, **kwargs: Any) -> _AppRun:
        """Run the app for the duration of a ``with``/``async with`` block (an ephemeral app)."""
        return _AppRun(self)


class _AppRun:
    """Context manager of ``app.run()``: the app exists inside the block; its sandboxes stop after it."""

    def __init__(self, app: App) -> None:
        self._app = app

    async def _enter(self) -> App:
        resp = await default_client().request(
            "POST", routes.path("apps"), json_body=dump(AppCreate, name=self._app.name)
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
