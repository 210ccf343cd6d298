"""The filters every ``X.objects.list`` shares (Modal's ``max_objects`` and ``created_before``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shoal.exception import InvalidError
from shoal.wire import times


def filter_listing(
    items: list[dict[str, Any]], max_objects: int | None, created_before: datetime | str | None
) -> list[dict[str, Any]]:
    """The items (newest first, each with ``created_at``) created before ``created_before``, at most ``max_objects``."""
    if max_objects is not None and max_objects < 0:
        raise InvalidError("max_objects cannot be negative")
    if created_before is not None:
        moment = datetime.fromisoformat(created_before) if isinstance(created_before, str) else created_before
        cutoff = times.of_datetime(moment)
        items = [i for i in items if i["created_at_us"] < cutoff]
    return items if max_objects is None else items[:max_objects]
