"""Paths inside volumes and sandboxes as both sides check them: components, limits, no ``..``."""

from __future__ import annotations

MAX_PATH = 4096
MAX_NAME = 255


class PathError(ValueError):
    """A volume path that is not allowed (``..``, NUL, too long)."""


def split(path: str) -> list[str]:
    """The components of a volume path; ``""``, ``"/"`` and ``"."`` are the root (``[]``).

    Leading slashes are ignored (volume paths are relative to the volume's
    root either way); ``..`` anywhere is refused rather than resolved.
    """
    if "\x00" in path:
        raise PathError("volume paths must not contain NUL bytes")
    if len(path.encode(errors="surrogateescape")) > MAX_PATH:
        raise PathError(f"volume paths are limited to {MAX_PATH} bytes")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for p in parts:
        if p == "..":
            raise PathError(f"volume paths must not contain '..': {path!r}")
        if len(p.encode(errors="surrogateescape")) > MAX_NAME:
            raise PathError(f"a volume path component is longer than {MAX_NAME} bytes: {p[:40]!r}…")
    return parts


def join(parts: list[str]) -> str:
    """The relative path for ``parts`` (``"."`` for the root)."""
    return "/".join(parts) or "."
