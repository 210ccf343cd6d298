"""Which image a sandbox runs, and importing a root filesystem as an image."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

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


class ImageId(BaseModel):
    """An image made or found by an operation (an import, a snapshot)."""

    image_id: str


class ImageSummary(BaseModel):
    """An image in a listing."""

    image_id: str
    recipe: dict[str, Any]
    """What made it (``shoal.wire.recipe``)."""
    created_at_us: int
    layers: list[str]


class ImageList(BaseModel):
    """``GET /v1/images``."""

    images: list[ImageSummary]


class StoredImage(ImageSummary):
    """An image with its disk use."""

    size: int
    own_size: int
    """Bytes of its top layer alone (what it adds over its parent)."""
    in_use: bool
    """Whether a sandbox runs it now."""


class ImageStoreUsage(BaseModel):
    """``shoal image ls``: images with their sizes, and the store's disk use."""

    images: list[StoredImage]
    layers: int
    layer_bytes: int
    unused_layers: int
    reclaimable_bytes: int
    context_bytes: int
    path: str
    disk_free_bytes: int
    disk_total_bytes: int


class ImageRemoved(BaseModel):
    """``shoal image rm``."""

    image_id: str
    removed_layers: int
    freed_bytes: int


class PruneResult(BaseModel):
    """``shoal image prune``."""

    removed_images: int
    removed_layers: int
    removed_contexts: int
    freed_bytes: int


class ContextStored(BaseModel):
    """An uploaded build context: kept (``stored``), or already there."""

    context: str
    stored: bool
