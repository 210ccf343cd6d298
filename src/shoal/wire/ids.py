"""Object ids: a type prefix and 22 random base62 characters, as Modal's (``sb-…``)."""

from __future__ import annotations

import re
import secrets

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PREFIXES = {
    "app": "ap",
    "sandbox": "sb",
    "image": "im",
    "secret": "st",
    "volume": "vo",
    "exec": "ex",
    "memory_snapshot": "sn",
    "persistent": "ps",
}
_ID_RE = re.compile(r"\A(ap|sb|im|st|vo|ex|sn|ps)-[0-9A-Za-z]{22}\Z")
EXEC_ID_RE = re.compile(r"\A[A-Za-z0-9_.\-]{1,64}\Z")
"""Exec ids a caller may choose (Modal's client sends UUIDs)."""


def new(kind: str) -> str:
    """A fresh random id for an object of ``kind`` (a key of PREFIXES)."""
    return PREFIXES[kind] + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


def from_digest(kind: str, digest: bytes) -> str:
    """A deterministic id derived from a content digest (images)."""
    n = int.from_bytes(digest[:17], "big")
    chars = []
    for _ in range(22):
        n, r = divmod(n, 62)
        chars.append(_ALPHABET[r])
    return PREFIXES[kind] + "-" + "".join(chars)


def is_valid(value: str, kind: str | None = None) -> bool:
    """Whether ``value`` is a well-formed id (of ``kind`` when given)."""
    if not _ID_RE.match(value):
        return False
    return kind is None or value.startswith(PREFIXES[kind] + "-")
