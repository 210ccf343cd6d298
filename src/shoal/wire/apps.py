"""Apps: ``App.lookup`` and ephemeral apps."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, field_validator

from shoal.wire.base import NAME_RE, WireModel

TAG_RE = re.compile(r"\A[A-Za-z0-9._-]{1,63}\Z")
MAX_TAGS = 64


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    """An app's tags by Modal's rules (letters, digits, ``-``, ``.``, ``_``; 63 characters at most), or
    ValueError naming the first bad one."""
    rules = "tags may contain only letters, digits, dashes, periods or underscores, 63 characters at most"
    for key, value in tags.items():
        if not isinstance(key, str) or not TAG_RE.match(key):
            raise ValueError(f"Invalid tag key: {key!r}: {rules}")
        if not isinstance(value, str) or not TAG_RE.match(value):
            raise ValueError(f"Invalid tag value: {value!r}: {rules}")
    return tags


AppTagDict = Annotated[dict[str, str], Field(max_length=MAX_TAGS), AfterValidator(check_tags)]


class AppTags(WireModel):
    """``app.set_tags``: the app's whole tag set."""

    tags: AppTagDict


class AppLookup(WireModel):
    """``App.lookup``."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    create_if_missing: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("app names may use letters, digits, '-', '_' and '.', at most 64 characters")
        return v


class AppCreate(WireModel):
    """An ephemeral app (``with app.run():``)."""

    name: str | None = None
    tags: AppTagDict = {}
    """``App(name, tags=)``: set as the app starts."""


class AppInfo(BaseModel):
    """An app as the API shows it."""

    app_id: str
    name: str | None


class AppDetails(BaseModel):
    """``app.info()`` and ``app.get_tags()``: what the daemon records of an app."""

    app_id: str
    name: str | None
    ephemeral: bool
    created_at_us: int
    stopped_at_us: int | None
    tags: dict[str, str]
    sandboxes_running: int


class AppList(BaseModel):
    """``GET /v1/apps``: every app the daemon knows, newest first."""

    apps: list[AppDetails]
