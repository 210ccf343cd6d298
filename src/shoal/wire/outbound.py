"""``Sandbox.create(_experimental_outbound_policy=)`` on the wire: headers the daemon sets on a sandbox's
outbound HTTPS requests (``shoal.network.egress``), with Modal's rules for domains, names and templates."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator

from shoal.wire.base import WireModel

MAX_HEADERS = 25
"""Header replacements one policy may hold, all domains together (Modal's limit)."""
DOMAIN_RE = re.compile(
    r"\A(\*\.)?([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\Z"
)
"""A policy domain: a name of two labels or more, with an optional ``*.`` prefix (or ``*`` alone)."""
HEADER_NAME_RE = re.compile(r"\A[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")
FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"})
"""Headers that route or frame a request: a policy may not set them (the server would read another request)."""
_KEY_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def template_keys(template: str) -> list[str]:
    """The secret keys a header value template names (``$KEY``; ``$$`` is a literal ``$``)."""
    return [m.group(1) for m in _KEY_RE.finditer(template.replace("$$", ""))]


def render(template: str, values: dict[str, str]) -> str:
    """A header value with each ``$KEY`` replaced by the secret's value and ``$$`` by ``$`` (KeyError: no key)."""
    out: list[str] = []
    for i, part in enumerate(template.split("$$")):
        out.append("$" if i else "")
        out.append(_KEY_RE.sub(lambda m: values[m.group(1)], part))
    return "".join(out)


class HeaderReplacement(WireModel):
    """Headers set on requests to the names ``domain`` covers; values may name keys of the secret ``secret_id``."""

    domain: Annotated[str, Field(max_length=255)]
    headers: Annotated[dict[str, str], Field(min_length=1, max_length=MAX_HEADERS)]
    secret_id: Annotated[str, Field(max_length=64)] | None = None

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        if v != "*" and not DOMAIN_RE.match(v):
            raise ValueError(f"Invalid domain: {v!r} (use 'example.com', '*.example.com' or '*')")
        return v.lower()

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not HEADER_NAME_RE.match(name):
                raise ValueError(f"Invalid header name: {name!r}")
            if name.lower() in FRAMING:
                raise ValueError(f"header {name!r} routes or frames the request; an outbound policy cannot set it")
            if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
                raise ValueError(f"Header value for {name!r} must not contain control characters (except tab)")
            if len(value) > 8192:
                raise ValueError(f"Header value for {name!r} is over 8192 characters")
        return v


OutboundHeaders = Annotated[list[HeaderReplacement], Field(max_length=MAX_HEADERS)]
