"""Named secrets on the wire: create, look up, update, and what the API shows of one (never a value)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, field_validator

from shoal.wire.base import WireModel, check_env
from shoal.wire.volumes import check_name

MAX_KEYS = 1000
MAX_BYTES = 1 << 20


def check_secret_env(env: dict[str, str]) -> dict[str, str]:
    """Refuse a secret that is not NAME=value strings or exceeds the key or byte limit."""
    check_env(env)
    if len(env) > MAX_KEYS:
        raise ValueError(f"a secret holds at most {MAX_KEYS} keys")
    if sum(len(k) + len(v.encode()) for k, v in env.items()) > MAX_BYTES:
        raise ValueError(f"a secret holds at most {MAX_BYTES} bytes")
    return env


class SecretCreate(WireModel):
    """``Secret.objects.create``."""

    name: str
    env: dict[str, str]
    allow_existing: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "secret")

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return check_secret_env(v)


class SecretLookup(WireModel):
    """``Secret.from_name`` (hydration)."""

    name: str
    required_keys: Annotated[list[str], Field(max_length=MAX_KEYS)] = []

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "secret")


class SecretUpdate(WireModel):
    """``secret.update``: keys to add or replace."""

    env: dict[str, str]

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return check_secret_env(v)


class SecretInfo(BaseModel):
    """A secret as the API shows it: never its values."""

    secret_id: str
    name: str
    created_at_us: int
    updated_at_us: int


class SecretList(BaseModel):
    """``shoal secret ls``: names and dates, never values."""

    secrets: list[SecretInfo]
