"""Value types of the filesystem API, as Modal's ``modal.types``: ``FileInfo``, ``FileType``, ``FileWatchEvent``."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["FileInfo", "FileType", "FileWatchEvent", "FileWatchEventType"]


class FileType(enum.Enum):
    """What a path in a sandbox is (``FileInfo.type``).  Anything that is neither a directory nor a symlink
    (a regular file, a device, a FIFO, a socket) is a ``FILE``."""

    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"


@dataclass(frozen=True)
class FileInfo:
    """One file, directory or symlink in a sandbox (``sb.filesystem.stat`` / ``list_files``).

    Names that are not valid UTF-8 carry their raw bytes as surrogate escapes, as ``os.listdir`` does:
    ``os.fsencode(info.name)`` gives the bytes back.
    """

    name: str
    path: str
    type: FileType
    size: int
    mode: int
    """``st_mode``: file type bits and permission bits."""
    permissions: str
    """The permission bits in octal, e.g. ``"0644"``."""
    owner: str
    """The owner's name in the sandbox's ``/etc/passwd``, else the uid as a string."""
    group: str
    modified_time: float
    """Seconds since the epoch."""
    symlink_target: str | None
    """Where a symlink points (as written in the link); None for anything else."""

    def is_file(self) -> bool:
        """Whether this is a file (anything but a directory or a symlink)."""
        return self.type == FileType.FILE

    def is_dir(self) -> bool:
        """Whether this is a directory."""
        return self.type == FileType.DIRECTORY

    def is_symlink(self) -> bool:
        """Whether this is a symlink (``stat`` describes the link itself, not its target)."""
        return self.type == FileType.SYMLINK


class FileWatchEventType(enum.Enum):
    """Kinds of change ``watch`` reports.  A rename inside the watched tree is one ``Modify`` event with the
    old and the new path; a rename out of it is a ``Remove``, into it a ``Create``."""

    Unknown = "Unknown"
    Access = "Access"
    Create = "Create"
    Modify = "Modify"
    Remove = "Remove"


@dataclass
class FileWatchEvent:
    """One change seen by ``watch``."""

    paths: list[str]
    type: FileWatchEventType
