"""Where and how the SDK reaches a daemon, with environment overrides.

Environment variables (all optional):
    SHOAL_RUNTIME_DIR   the daemon's runtime directory (default /run/shoal)
    SHOAL_SOCKET        the API's Unix socket          (default $SHOAL_RUNTIME_DIR/shoald.sock)
    SHOAL_URL           http://host:port of a TCP daemon (the client then sends SHOAL_TOKEN)
    SHOAL_TOKEN         bearer token for SHOAL_URL
    SHOAL_NO_AUTOSTART  set to 1 to stop the SDK starting a local daemon
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from shoal.wire.defaults import DEFAULT_RUNTIME_DIR, SOCKET_NAME


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass
class ClientConfig:
    """Where and how the SDK reaches a daemon."""

    socket_path: Path = field(
        default_factory=lambda: Path(
            os.environ.get("SHOAL_SOCKET") or str(Path(_env("SHOAL_RUNTIME_DIR", DEFAULT_RUNTIME_DIR)) / SOCKET_NAME)
        )
    )
    url: str | None = field(default_factory=lambda: os.environ.get("SHOAL_URL") or None)
    token: str | None = field(default_factory=lambda: os.environ.get("SHOAL_TOKEN") or None)
    autostart: bool = field(default_factory=lambda: os.environ.get("SHOAL_NO_AUTOSTART", "") not in ("1", "true"))
