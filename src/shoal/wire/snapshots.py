"""Snapshots and image mounts of running sandboxes on the wire."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, field_validator

from shoal.wire.base import WireModel, check_sandbox_name

MAX_SNAPSHOT_TIMEOUT = 24 * 3600


class SnapshotRequest(WireModel):
    """``sb.snapshot_filesystem()``."""

    timeout: Annotated[int, Field(ge=1, le=MAX_SNAPSHOT_TIMEOUT)] = 55
    ttl: Annotated[int, Field(ge=1)] | None = None
    """Recorded with the image (``expires_at``); shoal keeps snapshots until they are removed."""


class DirectorySnapshotRequest(SnapshotRequest):
    """``sb.snapshot_directory(path)``."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]


class MountRequest(WireModel):
    """``sb.mount_image(path, image)``."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]
    image_id: Annotated[str, Field(min_length=1, max_length=64)]


class UnmountRequest(WireModel):
    """``sb.unmount_image(path)``."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]


class MountList(BaseModel):
    """The images mounted in a sandbox: path → image id."""

    mounts: dict[str, str]


class Mounted(BaseModel):
    """``sb.mount_image``."""

    path: str
    image_id: str


class Unmounted(BaseModel):
    """``sb.unmount_image``."""

    path: str


class MemorySnapshotInfo(WireModel):
    """A memory snapshot of a gVisor sandbox (``sb._experimental_snapshot()``): its processes' memory and kernel
    state, and its filesystem as an image."""

    snapshot_id: str
    sandbox_id: str
    """The sandbox it was taken of."""
    app_id: str
    image_id: str
    """Its filesystem at the moment of the snapshot."""
    created_at: float
    expires_at: float | None = None
    size: int = 0
    """Bytes of its checkpoint on disk (the image's layer not counted)."""


class MemorySnapshotList(WireModel):
    """Memory snapshots, newest first."""

    snapshots: list[MemorySnapshotInfo]


class RestoreRequest(WireModel):
    """``Sandbox._experimental_from_snapshot(snapshot, name=...)``."""

    keep_name: bool = True
    """Give the new sandbox the snapshotted sandbox's name (Modal's default); False: ``name``."""
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return check_sandbox_name(v)
