"""Validated shapes of the volume API's requests and answers."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, Field, field_validator

from shoal.wire import ids
from shoal.wire.base import WireModel
from shoal.wire.paths import PathError, split

NAME_RE = re.compile(r"\A[A-Za-z0-9\-_.]{1,64}\Z")
"""Names of volumes and secrets: the rule apps and sandboxes follow (``shoal.wire.sandboxes.NAME_RE``)."""

RESERVED_MOUNT_PREFIXES = ("/proc", "/sys", "/dev", "/.shoal")
"""Where a volume may not be mounted: kernel interfaces and shoal's own mounts."""


def check_name(value: str, what: str = "volume") -> str:
    """Refuse object names Modal would refuse."""
    if not NAME_RE.match(value):
        raise ValueError(f"invalid {what} name {value!r}: use letters, digits, '-', '_' and '.', at most 64 characters")
    return value


def check_volume_path(value: str) -> str:
    """Refuse volume paths with ``..``, NUL or excessive length."""
    try:
        split(value)
    except PathError as exc:
        raise ValueError(str(exc)) from None
    return value


class VolumeMount(WireModel):
    """One volume mounted into a sandbox at ``path``."""

    path: str
    volume_id: str
    read_only: bool = False
    sub_path: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"volume mount paths must be absolute (start with '/'), got {v!r}")
        try:
            parts = split(v)
        except PathError as exc:
            raise ValueError(f"volume mount path: {exc}") from None
        norm = "/" + "/".join(parts)
        if norm == "/":
            raise ValueError("a volume cannot be mounted at '/'")
        for prefix in RESERVED_MOUNT_PREFIXES:
            if norm == prefix or norm.startswith(prefix + "/"):
                raise ValueError(f"a volume cannot be mounted at {v!r}: {prefix} is reserved")
        return norm

    @field_validator("volume_id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ids.is_valid(v, "volume"):
            raise ValueError(f"{v!r} is not a volume id (vo-…)")
        return v

    @field_validator("sub_path")
    @classmethod
    def _sub_path(cls, v: str | None) -> str | None:
        return None if v is None else check_volume_path(v)


class VolumeLookup(WireModel):
    """``Volume.from_name``."""

    name: str
    create_if_missing: bool = False
    version: Annotated[int, Field(ge=1, le=2)] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)


class VolumeCreate(WireModel):
    """``Volume.objects.create``."""

    name: str
    allow_existing: bool = False
    version: Annotated[int, Field(ge=1, le=2)] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)


class VolumeRename(WireModel):
    """``Volume.rename``."""

    old_name: str
    new_name: str

    @field_validator("old_name", "new_name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)


class VolumeInfo(BaseModel):
    """A volume as the API shows it."""

    volume_id: str
    name: str | None
    created_at_us: int
    ephemeral: bool
    version: int
    size_bytes: int | None = None


class RemoveFile(WireModel):
    """``vol.remove_file``."""

    path: str
    recursive: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_volume_path(v)


class CopyFiles(WireModel):
    """``vol.copy_files``."""

    src_paths: Annotated[list[str], Field(min_length=1, max_length=10_000)]
    dst_path: str
    recursive: bool = False

    @field_validator("src_paths")
    @classmethod
    def _srcs(cls, v: list[str]) -> list[str]:
        return [check_volume_path(p) for p in v]

    @field_validator("dst_path")
    @classmethod
    def _dst(cls, v: str) -> str:
        return check_volume_path(v)


class VolumeList(BaseModel):
    """``Volume.objects.list``."""

    volumes: list[VolumeInfo]


class FilesUploaded(BaseModel):
    """A batch upload: how many files landed."""

    files: int
