"""``sb.logs``: a sandbox's entrypoint output as timestamped lines, and its lifecycle events (Modal's logs API)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, Literal

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


class SandboxLogs:
    """The logs of one sandbox (``sb.logs``); kept after it ends, as long as its output is.

    Examples:
        for entry in sb.logs.tail(20):
            print(entry.timestamp, entry.source, entry.message)
        errors = list(sb.logs.fetch(since=started, source="stderr", search_text="Traceback"))
    """

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    def __repr__(self) -> str:
        return f"SandboxLogs({self._sandbox_id})"

    async def _get(self, params: dict[str, str]) -> AsyncIterator[LogEntry]:
        answer = await self._client.request("GET", routes.path("sandboxes", self._sandbox_id, "logs"), params=params)
        for item in answer["entries"]:
            yield LogEntry(
                message=item["message"],
                source=item["source"],
                timestamp=times.to_datetime(item["timestamp_us"]),
                object_id=self._sandbox_id,
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
