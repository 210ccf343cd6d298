"""Every setting of the daemon, with environment overrides.

Environment variables (all optional):
    SHOAL_DATA_DIR      state, images, outputs        (default /var/lib/shoal)
    SHOAL_RUNTIME_DIR   sockets, bundles, mounts      (default /run/shoal)
    SHOAL_SOCKET        the API's Unix socket          (default $SHOAL_RUNTIME_DIR/shoald.sock)
    SHOAL_RUNTIME       runc | crun                    (default: crun where it works, else runc)
    SHOAL_CGROUP_PARENT cgroup under which sandboxes' cgroups are made (default /shoal)
    SHOAL_IMAGE_CACHE   extra image stores (colon-separated) whose layers may be used read-only
    SHOAL_NO_HOST_CAS   set to 1 so images do not trust the host's extra CA certificates
    SHOAL_WARM_POOL     sandboxes of the default shape kept precreated (default 2)
    SHOAL_MAX_SANDBOXES sandboxes the daemon holds at once (default 1000)
    SHOAL_UID_RANGES    per-sandbox | shared | auto: a host id range per sandbox (decision 0063), one shared
                        by all (0002), or per-sandbox where the data filesystem can id-map (default auto)
    SHOAL_UID_SLOTS     per-sandbox ranges available (default 16384)
    SHOAL_TOTAL_PIDS    processes of all sandboxes together (default: the host's pid table less a reserve)
    SHOAL_TOTAL_MEMORY_MIB  memory of all sandboxes together (default: the host's memory less a reserve)
    SHOAL_MIN_FREE_DISK_MIB free space kept on the data directory's filesystem (default 512)
    SHOAL_SANDBOX_OUTPUT_MIB  recorded output kept per sandbox (default 2048)
    SHOAL_GPU_INVENTORY test/debug hook: a JSON file describing GPUs to use instead of the host's
                        (format in shoal.gpu.inventory)
The client's settings are in :mod:`shoal.sdk.config`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from shoal.network.config import NetworkConfig
from shoal.runtime.spec import IdMap
from shoal.wire.cluster import parse_labels
from shoal.wire.defaults import DEFAULT_DATA_DIR, DEFAULT_RUNTIME_DIR, SOCKET_NAME

DEFAULT_WARM_POOL = "2"
DEFAULT_MIN_FREE_DISK_MIB = "512"
DEFAULT_MAX_SANDBOXES = "1000"
"""The daemon's own ceiling (``shoal serve --max-sandboxes``); the host may run out of something first."""
"""Precreated default-shape sandboxes (decision 0008): ~1 MiB and one idle process each."""


DEFAULT_UID_SLOTS = "16384"
UID_RANGE_MODES = ("per-sandbox", "shared", "auto")


DEFAULT_GATEWAY = "127.0.0.1:8719"
DEFAULT_DASHBOARD = "127.0.0.1:8720"


def gateway_address(value: str | None) -> str | None:
    """The gateway's HOST:PORT from an option or ``$SHOAL_GATEWAY`` (``off``: None, no gateway)."""
    if value in ("off", "0", "none"):
        return None
    return value or DEFAULT_GATEWAY


def dashboard_address(value: str | None) -> str | None:
    """The dashboard's HOST:PORT from an option or ``$SHOAL_DASHBOARD`` (``off``: None, no dashboard)."""
    if value in ("off", "0", "none"):
        return None
    return value or DEFAULT_DASHBOARD


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass
class Config:
    """Daemon settings."""

    data_dir: Path = field(default_factory=lambda: Path(_env("SHOAL_DATA_DIR", DEFAULT_DATA_DIR)))
    runtime_dir: Path = field(default_factory=lambda: Path(_env("SHOAL_RUNTIME_DIR", DEFAULT_RUNTIME_DIR)))
    socket_path: Path | None = None
    tcp_host: str | None = None
    tcp_port: int | None = None
    gateway: str | None = field(default_factory=lambda: gateway_address(os.environ.get("SHOAL_GATEWAY")))
    """Loopback HOST:PORT of the gateway for the official modal client (``shoal.gateway``); None: off."""
    dashboard: str | None = field(default_factory=lambda: dashboard_address(os.environ.get("SHOAL_DASHBOARD")))
    """Loopback HOST:PORT of the web dashboard (``shoal.server.dashboard``); None: off."""
    runtime: str | None = field(default_factory=lambda: os.environ.get("SHOAL_RUNTIME") or None)
    """The OCI runtime of ``runc`` sandboxes (runc or crun; None: crun where it works, else runc)."""
    default_runtime: str = field(default_factory=lambda: os.environ.get("SHOAL_DEFAULT_RUNTIME") or "runc")
    """What sandboxes that do not say run under: ``runc`` (containers) or ``gvisor`` (runsc; decision 0069)."""
    idmap: IdMap = field(default_factory=IdMap)
    cgroup_parent: str = field(default_factory=lambda: _env("SHOAL_CGROUP_PARENT", "/shoal"))
    pids_limit: int = 1024
    """Processes per sandbox."""
    total_pids_limit: int | None = field(default_factory=lambda: _optional_int("SHOAL_TOTAL_PIDS"))
    """Processes of all sandboxes together (None: the host's pid table less a reserve)."""
    total_memory_mib: int | None = field(default_factory=lambda: _optional_int("SHOAL_TOTAL_MEMORY_MIB"))
    """Memory of all sandboxes together (None: the host's memory less a reserve)."""
    min_free_disk_mib: int = field(
        default_factory=lambda: int(os.environ.get("SHOAL_MIN_FREE_DISK_MIB") or DEFAULT_MIN_FREE_DISK_MIB)
    )
    """Free space kept on the data directory's filesystem: creates are refused below it."""
    default_memory_mib: int | None = 4096
    """Memory limit of a sandbox created without ``memory=``; None for no limit."""
    max_output_bytes: int = 1 << 30
    """Per process stream; output beyond it is dropped (``sandbox_output_bytes`` says how)."""
    sandbox_output_bytes: int = field(
        default_factory=lambda: int(os.environ.get("SHOAL_SANDBOX_OUTPUT_MIB") or 2048) << 20
    )
    """Disk quota for the recorded output of one sandbox, all processes and streams together
    (``SHOAL_SANDBOX_OUTPUT_MIB``, default 2048).  Output past it is discarded: the streams end where the
    quota ran out, and ``sb.logs`` gets a system line saying so.  Kept ``retention_seconds`` after the end."""
    agent_connect_timeout: float = 10.0
    image_caches: list[Path] = field(
        default_factory=lambda: [Path(p) for p in os.environ.get("SHOAL_IMAGE_CACHE", "").split(":") if p]
    )
    """Other image stores whose layers this daemon may use read-only (tests share the base image)."""
    agent_cache: Path | None = field(default_factory=lambda: _optional_path("SHOAL_AGENT_CACHE"))
    """A directory of agent binaries shared by daemons that start on fresh data directories (tests, a local cluster):
    the agent is copied from it instead of compiled (``shoal.agent.build.ensure_agent``)."""
    retention_seconds: float = 24 * 3600
    """How long finished sandboxes' records and output are kept."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    trust_host_cas: bool = field(default_factory=lambda: os.environ.get("SHOAL_NO_HOST_CAS", "") not in ("1", "true"))
    """Give images from outside (debian_slim, registries) the host's extra CA certificates (``shoal.images.trust``)."""
    host_ca_dir: Path = field(
        default_factory=lambda: Path(_env("SHOAL_HOST_CA_DIR", "/usr/local/share/ca-certificates"))
    )
    """Where the host keeps its extra CA certificates (``*.crt``, as ``update-ca-certificates`` reads them)."""
    image_build_timeout: int = 3600
    """Seconds one ``run`` build step may take."""
    warm_pool: int = field(default_factory=lambda: int(os.environ.get("SHOAL_WARM_POOL") or DEFAULT_WARM_POOL))
    """Sandboxes of the default shape kept precreated (``shoal.engine.pool``); 0: none."""
    max_sandboxes: int = field(
        default_factory=lambda: int(os.environ.get("SHOAL_MAX_SANDBOXES") or DEFAULT_MAX_SANDBOXES)
    )
    """Sandboxes (running or starting, image builds' included) this daemon holds at once; more are refused."""
    metrics_public: bool = field(default_factory=lambda: os.environ.get("SHOAL_METRICS_PUBLIC", "") in ("1", "true"))
    """Serve ``GET /metrics`` on the TCP listener without the bearer token (``shoal serve --metrics-public``)."""
    usage_interval: float = field(default_factory=lambda: max(0.05, float(os.environ.get("SHOAL_USAGE_INTERVAL") or 5)))
    """Seconds between two readings of each sandbox's CPU and memory use (``shoal.engine.usage``)."""
    uid_ranges: str = field(default_factory=lambda: _env("SHOAL_UID_RANGES", "auto"))
    """``per-sandbox``, ``shared`` or ``auto`` (``shoal.runtime.idmap``, decisions 0002 and 0063)."""
    uid_slots: int = field(default_factory=lambda: int(os.environ.get("SHOAL_UID_SLOTS") or DEFAULT_UID_SLOTS))
    """Host id ranges of 65,536 ids for sandboxes (per-sandbox mode): at most this many sandboxes at once."""
    uid_first_slot: int = field(default_factory=lambda: int(os.environ.get("SHOAL_UID_FIRST_SLOT") or 0))
    """The first of this daemon's ranges: daemons that share a host take disjoint ones (``scripts/local-cluster``)."""
    ray_address: str | None = field(default_factory=lambda: os.environ.get("SHOAL_RAY_ADDRESS") or None)
    """The Ray cluster this daemon joins as one node of a shoal cluster (``shoal serve --ray``; decision 0077)."""
    node_name: str = field(default_factory=lambda: os.environ.get("SHOAL_NODE_NAME") or socket.gethostname())
    """This daemon's name in the cluster."""
    node_labels: dict[str, str] = field(default_factory=lambda: parse_labels(os.environ.get("SHOAL_NODE_LABELS", "")))
    """Labels a create may ask for to land on this node (``--node-labels k=v,k2=v2``)."""
    advertise_url: str | None = field(default_factory=lambda: os.environ.get("SHOAL_ADVERTISE_URL") or None)
    """Where the other nodes reach this daemon's API (default: the ``--tcp`` address)."""
    """Sandbox networking (``SHOAL_NETWORK*``, ``SHOAL_ALLOW_PRIVATE_RANGES``, ``SHOAL_DNS_UPSTREAM``,
    ``SHOAL_TUNNEL_*``: see its module)."""

    def __post_init__(self) -> None:
        if self.socket_path is None:
            self.socket_path = Path(_env("SHOAL_SOCKET", str(self.runtime_dir / SOCKET_NAME)))
        for name in ("total_pids_limit", "total_memory_mib"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if self.min_free_disk_mib < 0:
            raise ValueError(f"min_free_disk_mib must not be negative, not {self.min_free_disk_mib}")
        if self.uid_ranges not in UID_RANGE_MODES:
            raise ValueError(f"uid ranges must be one of {', '.join(UID_RANGE_MODES)}, not {self.uid_ranges!r}")

    @property
    def socket(self) -> Path:
        """The API socket path."""
        assert self.socket_path is not None
        return self.socket_path

    @property
    def db_path(self) -> Path:
        """SQLite state database."""
        return self.data_dir / "state.db"

    @property
    def token_path(self) -> Path:
        """Bearer token for the TCP listener (0600)."""
        return self.data_dir / "api-token"

    @property
    def images_dir(self) -> Path:
        """Image layer store."""
        return self.data_dir / "images"

    @property
    def sandboxes_dir(self) -> Path:
        """Per-sandbox persistent data (upper dirs, outputs)."""
        return self.data_dir / "sandboxes"

    @property
    def agent_dir(self) -> Path:
        """The directory holding the agent binary, bind-mounted into sandboxes."""
        return self.data_dir / "agent"

    @property
    def staged_agent(self) -> Path:
        """The daemon's copy of the agent binary on the runtime directory's filesystem: each sandbox's
        ``/.shoal/bin/shoal-agent`` is a hard link to it (``shoal.engine.bundle``)."""
        return self.runtime_dir / "agent" / "shoal-agent"

    @property
    def run_sandboxes_dir(self) -> Path:
        """Per-sandbox runtime files (bundles, mount points, control sockets)."""
        return self.runtime_dir / "sandboxes"

    @property
    def oci_state_dir(self) -> Path:
        """Where the OCI runtime keeps container state."""
        return self.runtime_dir / "oci"

    @property
    def log_path(self) -> Path:
        """The daemon's log when it runs in the background."""
        return self.data_dir / "shoald.log"

    @property
    def pid_path(self) -> Path:
        """The background daemon's pid file."""
        return self.runtime_dir / "shoald.pid"


def _optional_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _optional_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None
