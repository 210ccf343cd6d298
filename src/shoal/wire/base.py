"""What every request and response body shares: the base model and the checks on strings that reach
the agent's C code (NUL bytes, argv size, variable names, absolute paths).

Validation here is the first defence against bad input: a refused value gets a message that says what to
change.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from shoal.exception import InvalidError

ARG_MAX_BYTES = 1 << 16
ENV_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
NAME_RE = re.compile(r"\A[A-Za-z0-9\-_.]{1,64}\Z")
MAX_TIMEOUT = 24 * 3600


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL bytes")
    return value


def check_argv(args: list[str], what: str = "command") -> list[str]:
    """Refuse argv that the kernel or the agent cannot carry."""
    total = 0
    for a in args:
        _no_nul(a, f"{what} arguments")
        total += len(a.encode()) + 1
    if total > ARG_MAX_BYTES:
        raise ValueError(f"{what} arguments total {total} bytes; the limit is {ARG_MAX_BYTES}")
    return args


def check_env(env: dict[str, str]) -> dict[str, str]:
    """Refuse environment variables that are not NAME=value strings."""
    for k, v in env.items():
        if not ENV_NAME_RE.match(k):
            raise ValueError(f"invalid environment variable name {k!r}: use letters, digits and _")
        _no_nul(v, f"environment variable {k}")
    return env


def check_abs_path(path: str | None, what: str) -> str | None:
    """Refuse relative paths and NUL bytes."""
    if path is None:
        return None
    _no_nul(path, what)
    if not path.startswith("/"):
        raise ValueError(f"{what} must be an absolute path (starting with '/'), got {path!r}")
    if len(path) > 4096:
        raise ValueError(f"{what} is longer than 4096 bytes")
    return path


EnvDict = Annotated[dict[str, str], AfterValidator(check_env)]
"""Environment variables: NAME=value strings the agent can carry."""


Workdir = Annotated[str | None, AfterValidator(lambda v: check_abs_path(v, "workdir"))]
"""An absolute working directory."""


def check_sandbox_name(v: str | None) -> str | None:
    """A sandbox name as a validator checks it: None, or ``NAME_RE`` (ValueError naming the rule)."""
    if v is not None and not NAME_RE.match(v):
        raise ValueError(f"invalid sandbox name {v!r}: use letters, digits, '-', '_' and '.', at most 64 characters")
    return v


class WireModel(BaseModel):
    """A request or response body: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


M = TypeVar("M", bound=BaseModel)


def validation_message(exc: ValidationError) -> str:
    """One line per refused field: where it is and what is wrong with it."""
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "request"
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)[:4000]


def build(model: type[M], **fields: Any) -> M:
    """A request body, checked here the way the daemon checks it: ``InvalidError`` naming what to change."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise InvalidError(validation_message(exc)) from None


def dump(model: type[M], **fields: Any) -> dict[str, Any]:
    """A request body as JSON: the fields given, checked here the way the daemon checks them."""
    return build(model, **fields).model_dump(mode="json", exclude_unset=True)


class Done(BaseModel):
    """The answer of an operation that has nothing to report: ``{}``."""
