"""Snapshots and image mounts of running sandboxes on the wire."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from shoal.wire.base import WireModel

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
