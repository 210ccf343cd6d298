"""OCI runtime spec (``config.json``) for a sandbox.

Defends the host against the sandbox: every namespace (user included, so root
inside is an unprivileged uid outside), a reduced capability set, no new
privileges, seccomp, masked and read-only kernel interfaces in /proc and /sys,
cgroup limits on memory, CPU and process count, and rlimits no higher than
the host's.  The agent binary and the control directory are the only host
paths mounted, both read-only, in one mount (``/.shoal``).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Any

from shoal.runtime import seccomp

SHOAL_DIR = "/.shoal"
"""shoal's own directory inside every sandbox: one read-only mount holding ``bin`` and ``ctl`` (decision 0079)."""
AGENT_DIR = "/.shoal/bin"
"""Where the agent binary appears inside every sandbox."""
CTL_DIR = "/.shoal/ctl"
"""Where the reconnection socket appears inside every sandbox."""
AGENT_PATH = f"{AGENT_DIR}/shoal-agent"
RECONNECT_SOCKET = f"{CTL_DIR}/agent.sock"
CTL_FD = 3
"""The agent's inherited control descriptor (runc ``--preserve-fds 1``)."""
GVISOR_CTL_FD = 0
"""Under gVisor the control socket is the agent's standard input (runsc passes only its stdio in)."""

CAPABILITIES = [
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
]

MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
]

READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]

OOM_SCORE_ADJ = 500
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class IdMap:
    """Sandbox ids 0..size-1 are host ids host_id..host_id+size-1."""

    host_id: int = 100000
    size: int = 65536


@dataclass(frozen=True)
class Resources:
    """Limits for one sandbox's cgroup."""

    cpu_request: float | None = None
    cpu_limit: float | None = None
    memory_limit_mib: int | None = None
    pids_limit: int = 1024


@dataclass(frozen=True)
class Bind:
    """A host path bind-mounted into the sandbox."""

    source: str
    destination: str
    read_only: bool = True


@dataclass(frozen=True)
class DeviceNode:
    """A host character device passed through: a bind mount of the node plus a device-cgroup allow rule.

    Not ``linux.devices``: under a user namespace runc cannot mknod and bind-mounts the *same* path
    from the host instead, so the node's host path would have to equal its sandbox path.
    """

    source: str
    destination: str
    major: int
    minor: int


@dataclass
class ContainerConfig:
    """Everything that differs between sandboxes' specs."""

    container_id: str
    rootfs: str
    shoal_dir: str
    """The host directory mounted at ``/.shoal`` (its ``bin`` and ``ctl``)."""
    hostname: str = "sandbox"
    idmap: IdMap = field(default_factory=IdMap)
    resources: Resources = field(default_factory=Resources)
    cgroup_parent: str = "/shoal"
    binds: list[Bind] = field(default_factory=list)
    netns_path: str | None = None
    userns_path: str | None = None
    """A user namespace to join, already mapped as ``idmap`` says (None: the runtime makes one)."""
    devices: list[DeviceNode] = field(default_factory=list)
    split_shoal_dirs: tuple[str, str] | None = None
    """Sandboxes made by shoal before decision 0079 had the agent's directory and the control directory as two
    mounts: their memory snapshots restore only into the same mounts (host paths of ``bin`` and ``ctl``)."""
    gvisor: bool = False
    """For runsc (decision 0069): no user namespace in the spec (runsc gives its Sentry one of its own; the root
    is id-mapped to the stored range instead), the control socket on standard input."""


GVISOR_HOST_TASKS_PER_PROCESS = 4
"""Host tasks (threads and stub processes) runsc's systrap platform holds for each process in a gVisor sandbox:
~2 measured (60 sleeping processes: 27 → 151 host tasks; a shell fork bomb after 20 s: ~1900)."""
GVISOR_HOST_TASKS_BASE = 256
"""Host tasks of a gVisor sandbox before its first process: the Sentry's and the gofer's threads (~30 measured)."""


def _rlimits(r: Resources, gvisor: bool) -> list[dict[str, Any]]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = hard if hard != resource.RLIM_INFINITY else 1 << 20
    nofile = min(nofile, 1 << 20)
    out = [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}]
    if gvisor:
        # The Sentry's own kernel counts the sandbox's tasks against this (root in the sandbox cannot raise it:
        # no CAP_SYS_RESOURCE), so a fork bomb gets EAGAIN there before the host's pids limit, which would end
        # the whole sandbox, is reached.
        out.append({"type": "RLIMIT_NPROC", "hard": r.pids_limit, "soft": r.pids_limit})
    return out


def host_pids_limit(r: Resources, gvisor: bool) -> int:
    """The host pids cgroup limit: the sandbox's own under runc; under gVisor room for the Sentry's host tasks
    behind that many sandbox processes (the sandbox's limit is then its RLIMIT_NPROC)."""
    if not gvisor:
        return r.pids_limit
    return GVISOR_HOST_TASKS_BASE + r.pids_limit * GVISOR_HOST_TASKS_PER_PROCESS


def _resources(r: Resources, gvisor: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"pids": {"limit": host_pids_limit(r, gvisor)}}
    if r.memory_limit_mib is not None:
        out["memory"] = {"limit": r.memory_limit_mib << 20}
    cpu: dict[str, Any] = {}
    if r.cpu_limit is not None:
        period = 100_000
        cpu["period"] = period
        cpu["quota"] = max(1000, int(r.cpu_limit * period))
    if r.cpu_request is not None:
        cpu["shares"] = max(2, int(r.cpu_request * 1024))
    if cpu:
        out["cpu"] = cpu
    return out


_RO = ["ro", "nosuid", "nodev"]


def _shoal_mounts(cfg: ContainerConfig) -> list[dict[str, Any]]:
    if cfg.split_shoal_dirs is None:
        return [{"destination": SHOAL_DIR, "type": "bind", "source": cfg.shoal_dir, "options": ["bind", *_RO]}]
    agent_dir, ctl_dir = cfg.split_shoal_dirs
    return [
        {"destination": AGENT_DIR, "type": "bind", "source": agent_dir, "options": ["bind", *_RO]},
        {"destination": CTL_DIR, "type": "bind", "source": ctl_dir, "options": ["bind", *_RO, "noexec"]},
    ]


def build(cfg: ContainerConfig) -> dict[str, Any]:
    """The complete ``config.json`` for one sandbox."""
    mounts: list[dict[str, Any]] = [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        *_shoal_mounts(cfg),
    ]
    for b in cfg.binds:
        opts = ["rbind", "nosuid", "nodev", "ro" if b.read_only else "rw"]
        mounts.append({"destination": b.destination, "type": "bind", "source": b.source, "options": opts})
    for d in cfg.devices:  # no "nodev" here, or the node cannot be opened
        mounts.append({"destination": d.destination, "type": "bind", "source": d.source, "options": ["bind", "nosuid"]})
    resources = _resources(cfg.resources, cfg.gvisor)
    if cfg.devices:
        resources["devices"] = [
            {"allow": True, "type": "c", "major": d.major, "minor": d.minor, "access": "rw"} for d in cfg.devices
        ]
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    if not cfg.gvisor:
        # A user namespace made for the sandbox by its own host uid (``shoal.runtime.idmap``), or a fresh one.
        namespaces.append({"type": "user", "path": cfg.userns_path} if cfg.userns_path else {"type": "user"})
    namespaces.append({"type": "network", "path": cfg.netns_path} if cfg.netns_path else {"type": "network"})
    idmap = [{"containerID": 0, "hostID": cfg.idmap.host_id, "size": cfg.idmap.size}]
    ctl_fd = GVISOR_CTL_FD if cfg.gvisor else CTL_FD
    joined = cfg.userns_path is not None and not cfg.gvisor
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [AGENT_PATH, "--fd", str(ctl_fd), "--reconnect", RECONNECT_SOCKET],
            "env": [f"PATH={DEFAULT_PATH}"],
            "cwd": "/",
            "capabilities": {k: CAPABILITIES for k in ("bounding", "effective", "permitted")},
            # In a joined user namespace the runtime would set these with prlimit(2) on a process that already
            # runs as the sandbox's uid, which needs CAP_SYS_RESOURCE; it inherits the daemon's (the same) instead.
            **({} if joined else {"rlimits": _rlimits(cfg.resources, cfg.gvisor)}),
            "noNewPrivileges": True,
            # Under host-wide memory pressure, sandbox processes go before the host's.
            "oomScoreAdj": OOM_SCORE_ADJ,
        },
        "root": {"path": cfg.rootfs, "readonly": False},
        "hostname": cfg.hostname,
        "mounts": mounts,
        "linux": {
            **({} if cfg.gvisor else {"uidMappings": idmap, "gidMappings": idmap}),
            "namespaces": namespaces,
            "resources": resources,
            "cgroupsPath": f"{cfg.cgroup_parent}/{cfg.container_id}",
            "seccomp": seccomp.profile(),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }
