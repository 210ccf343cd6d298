"""An image's config: what a sandbox inherits from its image (env, command, workdir, layers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ImageConfig:
    """What a sandbox inherits from its image."""

    env: dict[str, str] = field(default_factory=dict)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    workdir: str | None = None
    layers: list[str] = field(default_factory=list)
    """Layer ids, bottom first."""
    python: str | None = None
    user: str | None = None
    """Dockerfile USER: later build steps run as this user (sandboxes still start as root)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageConfig:
        """Inverse of ``to_json``."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
