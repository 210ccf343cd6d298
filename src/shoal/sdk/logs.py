"""``sb.logs``, ``app.logs`` and ``image.logs``: a sandbox's entrypoint output as timestamped lines and its lifecycle
events, those of every sandbox of an app merged in time order, and what an image's build steps printed (Modal's
logs API)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from shoal.exception import InvalidError
from shoal.sdk._sync import live_method_generator
from shoal.sdk.transport import Client
from shoal.types import LogEntry
from shoal.wire import routes, times

Source = Literal["stdout", "stderr", "system"]
SOURCES = ("stdout", "stderr", "system")


def _micros(value: object, what: str) -> str:
    if not isinstance(value, dt.datetime):
        raise InvalidError(f"{what} must be a datetime, got {type(value).__name__}")
    # A naive datetime is local time, as Python takes it; nothing is logged before 1970.
    return str(max(0, times.of_datetime(value)))


def _source(source: object) -> str | None:
    if source is not None and source not in SOURCES:
        raise InvalidError(f"source must be one of {', '.join(SOURCES)} or None, got {source!r}")
    return source


STREAM_POLL = 0.25
"""Seconds between two looks for new entries while streaming."""


class _Logs:
    """The logs of one object: what ``fetch``, ``tail`` and ``stream`` share."""

    _kind = ""

    def __init__(self, client: Client, object_id: str) -> None:
        self._client = client
        self._object_id = object_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._object_id})"

    async def _get(self, params: dict[str, str]) -> AsyncIterator[LogEntry]:
        path = routes.path(self._kind, self._object_id, "logs")
        answer = await self._client.request("GET", path, params=params)
        for item in answer["entries"]:
            sandbox_id = item.get("sandbox_id")
            yield LogEntry(
                message=item["message"],
                source=item["source"],
                timestamp=times.to_datetime(item["timestamp_us"]),
                object_id=self._object_id,
                context_ids=[sandbox_id] if sandbox_id and sandbox_id != self._object_id else [],
            )

    @live_method_generator
    async def fetch(
        self,
        *,
        since: dt.datetime,
        until: dt.datetime | None = None,
        source: Source | None = None,
        search_text: str = "",
    ) -> AsyncIterator[LogEntry]:
        """Entries from ``since`` (inclusive) to ``until`` (exclusive), of one ``source``, containing
        ``search_text``; oldest first, at most 10,000."""
        params: dict[str, Any] = {"since_us": _micros(since, "since")}
        if until is not None:
            params["until_us"] = _micros(until, "until")
        if _source(source) is not None:
            params["source"] = source
        if not isinstance(search_text, str):
            raise InvalidError("search_text must be a str")
        if search_text:
            params["search"] = search_text
        async for entry in self._get(params):
            yield entry

    @live_method_generator
    async def tail(self, entries: int = 100, *, source: Source | None = None) -> AsyncIterator[LogEntry]:
        """The last ``entries`` entries (of one ``source``), oldest first."""
        if not isinstance(entries, int) or isinstance(entries, bool) or not 1 <= entries <= 10_000:
            raise InvalidError(f"entries must be a whole number from 1 to 10000, got {entries!r}")
        params: dict[str, Any] = {"tail": str(entries)}
        if _source(source) is not None:
            params["source"] = source
        async for entry in self._get(params):
            yield entry

    @live_method_generator
    async def stream(self, timeout: float | None = None) -> AsyncIterator[LogEntry]:
        """New entries as they arrive (from now on), oldest first; ends once none came for ``timeout`` seconds
        (None: never, until the caller stops reading)."""
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0):
            raise InvalidError(f"timeout must be a number of seconds or None, got {timeout!r}")
        loop = asyncio.get_running_loop()
        since = times.of_datetime(dt.datetime.now(dt.UTC))
        last_new = loop.time()
        while True:
            got = False
            async for entry in self._get({"since_us": str(since)}):
                since = max(since, times.of_datetime(entry.timestamp) + 1)
                got = True
                yield entry
            if got:
                last_new = loop.time()
            elif timeout is not None and loop.time() - last_new >= timeout:
                return
            await asyncio.sleep(STREAM_POLL)


class SandboxLogs(_Logs):
    """The logs of one sandbox (``sb.logs``); kept after it ends, as long as its output is.

    Examples:
        for entry in sb.logs.tail(20):
            print(entry.timestamp, entry.source, entry.message)
        errors = list(sb.logs.fetch(since=started, source="stderr", search_text="Traceback"))
    """

    _kind = "sandboxes"


class AppLogs(_Logs):
    """The logs of every sandbox of an app (``app.logs``), merged in time order; each entry's ``context_ids``
    holds its sandbox's id.

    Examples:
        for entry in app.logs.tail(50, source="stderr"):
            print(entry.context_ids[0], entry.message)
    """

    _kind = "apps"


class _ResolvesImage(Protocol):
    async def _resolve(self, client: Client) -> str: ...


class ImageLogs:
    """What an image's build steps printed when they were built (``image.logs``), kept with the image; a step
    found in the cache shows the lines of the build that made it.  The image is built first if it is not yet.

    Examples:
        image = shoal.Image.debian_slim().pip_install("requests")
        for entry in image.logs.fetch():          # the last step's lines
            print(entry.message)
        print([e.message for e in image.logs.tail(20)])
    """

    def __init__(self, client: Client, image: _ResolvesImage) -> None:
        self._client = client
        self._image = image

    def __repr__(self) -> str:
        return f"ImageLogs({self._image!r})"

    async def _get(self, params: dict[str, str]) -> AsyncIterator[LogEntry]:
        image_id = await self._image._resolve(self._client)
        answer = await self._client.request("GET", routes.path("images", image_id, "logs"), params=params)
        for item in answer["entries"]:
            yield LogEntry(
                message=item["message"],
                source=item["source"],
                timestamp=times.to_datetime(item["timestamp_us"]),
                object_id=image_id,
            )

    @live_method_generator
    async def fetch(self, layers: int | None = 1) -> AsyncIterator[LogEntry]:
        """The lines of the image's last ``layers`` build steps (None: every step), oldest first."""
        params: dict[str, str] = {}
        if layers is not None:
            if not isinstance(layers, int) or isinstance(layers, bool):
                raise InvalidError(f"layers must be a whole number or None, got {layers!r}")
            if layers < 1:
                raise InvalidError("layers must be at least 1")
            params["layers"] = str(layers)
        async for entry in self._get(params):
            yield entry

    @live_method_generator
    async def tail(self, entries: int = 100) -> AsyncIterator[LogEntry]:
        """The last ``entries`` lines of the image's build, oldest first."""
        if not isinstance(entries, int) or isinstance(entries, bool) or entries < 1:
            raise InvalidError(f"entries must be a whole number of at least 1, got {entries!r}")
        async for entry in self._get({"tail": str(entries)}):
            yield entry
