"""Build-context manifests: how the SDK and the daemon name a tree of local files.

A context is named by the digest of its manifest: every entry's relative path, kind, permission bits,
and for files the size and sha256 of the content, for symlinks the target.  The client computes it (the
cache key of a copy step); the daemon recomputes it over what was uploaded and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from shoal.exception import InvalidError

MAX_ENTRIES = 1_000_000
MAX_NAME = 255
MAX_PATH = 4096
CHUNK = 1 << 20
Entry = list[Any]
"""``[path, "d", mode]``, ``[path, "f", mode, size, sha256]`` or ``[path, "l", target]``."""


def digest(entries: list[Entry]) -> str:
    """The digest that names a context with these manifest entries (sorted by path)."""
    ordered = sorted(entries, key=lambda e: e[0])
    return hashlib.sha256(json.dumps(ordered, separators=(",", ":")).encode()).hexdigest()


def check_name(name: str) -> list[str]:
    """The parts of a relative archive path, or InvalidError (absolute, ``..``, empty, too long)."""
    if not name or "\x00" in name or len(name.encode()) > MAX_PATH:
        raise InvalidError(f"invalid path in build context: {name[:200]!r}")
    if name.startswith("/"):
        raise InvalidError(f"absolute path in build context: {name[:200]!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or len(p.encode()) > MAX_NAME for p in parts):
        raise InvalidError(f"path escapes the build context or is too long: {name[:200]!r}")
    return parts


def hash_file(fd: int) -> tuple[int, str]:
    """(size, sha256) of an open file, read from its start."""
    h = hashlib.sha256()
    size = 0
    while chunk := os.pread(fd, CHUNK, size):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()
