"""Value types the SDK returns, as Modal's ``modal.types`` has them: files in a sandbox (``FileInfo``,
``FileWatchEvent``), entries of a volume (``FileEntry``), logs, volume and secret information, connect
credentials."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from decimal import Decimal

__all__ = [
    "AppInfo",
    "AppLifecycle",
    "AppState",
    "FileEntry",
    "FileEntryType",
    "FileInfo",
    "FileType",
    "FileWatchEvent",
    "FileWatchEventType",
    "LogEntry",
    "SandboxConnectCredentials",
    "SandboxStats",
    "SecretInfo",
    "StatsPercentile",
    "StatsPercentileDistribution",
    "VolumeInfo",
]


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


class FileEntryType(enum.IntEnum):
    """Type of a file entry listed from a volume."""

    UNSPECIFIED = 0
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    FIFO = 4
    SOCKET = 5


@dataclass(frozen=True)
class FileEntry:
    """A file or directory entry listed from a volume (``path`` is relative to the volume's root)."""

    path: str
    type: FileEntryType
    mtime: int
    size: int


@dataclass
class VolumeInfo:
    """Information about a volume."""

    name: str | None
    created_at: datetime.datetime
    created_by: str | None


@dataclass
class SecretInfo:
    """Information about a named secret (never its values)."""

    name: str | None
    created_at: datetime.datetime
    created_by: str | None
    environment_name: str | None = None
    """Modal's environments; shoal has one, and says None."""
    last_used: datetime.datetime | None = None
    """Not recorded by shoal."""


@dataclass(frozen=True)
class LogEntry:
    """One line of a sandbox's log."""

    message: str
    """The line, without its newline."""
    source: str
    """``stdout`` or ``stderr`` (the entrypoint's), or ``system`` (the sandbox started, ended, and how)."""
    timestamp: datetime.datetime
    """When its first byte reached the daemon (UTC)."""
    object_id: str
    """The sandbox's id (``sb.logs``), or the app's (``app.logs``)."""
    context_ids: list[str] = field(default_factory=list)
    """Narrower ids of where it came from: ``[sandbox id]`` in an app's logs."""

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SandboxConnectCredentials:
    """What ``sb.create_connect_token()`` returns: the proxy's URL and the token to show it."""

    url: str
    token: str


@dataclass(frozen=True)
class StatsPercentile:
    """One percentile of a measure (``percentile`` 50.0 is the median) and its value."""

    percentile: float
    value: float


@dataclass(frozen=True)
class StatsPercentileDistribution:
    """A measure's percentiles over a sandbox's usage samples, in ``unit``."""

    unit: str
    percentiles: list[StatsPercentile]


@dataclass(frozen=True)
class SandboxStats:
    """What ``sb._experimental_stats()`` returns: a sandbox's use over a time range.

    ``percentile_stats`` has ``"CPU Usage (cores)"`` and ``"Memory Usage (GiB)"`` (p50, p90, p99 over the
    samples the daemon takes every few seconds; a key is missing when none was taken in the range).  shoal
    does not price what it runs: ``cost`` is None and ``cost_by_resource`` empty; the billed core- and
    GiB-seconds count each sample as the greater of use and request, as Modal's do.
    """

    since: datetime.datetime
    until: datetime.datetime
    duration: datetime.timedelta
    percentile_stats: dict[str, StatsPercentileDistribution]
    cost: Decimal | None
    cost_by_resource: dict[str, Decimal]
    billed_cpu_core_seconds: float
    billed_memory_gib_seconds: float


class AppState(enum.StrEnum):
    """Where an app is in its life (``AppLifecycle.state``)."""

    EPHEMERAL = "ephemeral"
    DETACHED = "detached"
    DEPLOYED = "deployed"
    STOPPING = "stopping"
    STOPPED = "stopped"
    INITIALIZING = "initializing"
    DISABLED = "disabled"


@dataclass
class AppLifecycle:
    """When an app was created and stopped, and by whom.  shoal's apps are either ephemeral (``app.run()``)
    or named (``App.lookup``, which Modal shows as deployed); they have no versions, and the daemon has no
    users, so ``created_by`` is ``"local"``."""

    state: AppState
    version: int | None
    created_at: datetime.datetime
    created_by: str
    deployed_at: datetime.datetime | None
    deployed_by: str | None
    stopped_at: datetime.datetime | None
    stopped_by: str | None


@dataclass(frozen=True)
class AppInfo:
    """What ``app.info()`` returns.  shoal runs no Functions or Servers, so those maps are empty."""

    app_id: str
    description: str
    lifecycle: AppLifecycle
    functions: dict[str, str]
    servers: dict[str, str]
