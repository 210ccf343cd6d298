"""Which image a sandbox runs, and importing a root filesystem as an image."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shoal.wire import recipe
from shoal.wire.base import WireModel
from shoal.wire.reference import RegistrySource


class ImageRef(WireModel):
    """Which image a sandbox runs: the base image for a Python version, an image id, a registry image, or an
    empty one (``scratch``)."""

    kind: Literal["debian_slim", "id", "registry", "scratch"] = "debian_slim"
    python_version: str | None = None
    image_id: str | None = None
    registry: RegistrySource | None = None
    """``Image.from_registry``: the reference and its credentials (``shoal.images.registry``)."""
    steps: Annotated[list[recipe.Step], Field(max_length=recipe.MAX_STEPS)] = []
    """Build steps applied on the base (``shoal.wire.recipe``); each is a cached layer or a config change."""
    force_build: bool = False
    """Rebuild every step (the base itself is bootstrapped once per machine)."""


class ImportRootfs(WireModel):
    """Import a root filesystem directory on the daemon's host as an image."""

    path: str
    env: dict[str, str] = {}
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    workdir: str | None = None
