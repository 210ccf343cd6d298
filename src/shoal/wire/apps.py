"""Apps: ``App.lookup`` and ephemeral apps."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, field_validator

from shoal.wire.base import NAME_RE, WireModel


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


class AppInfo(BaseModel):
    """An app as the API shows it."""

    app_id: str
    name: str | None
