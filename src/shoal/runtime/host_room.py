"""What the host has left for one more sandbox: processes and memory under the sandboxes' parent cgroup,
and free space where sandboxes write.  Read at each create (a few small files) so that running out is a
``ResourceExhaustedError`` that names the limit, before the runtime fails with its own words."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shoal.exception import ResourceExhaustedError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PIDS_TO_START = 8
"""Processes a start needs in the parent cgroup (the runtime's init, the agent, the first process)."""
MEMORY_TO_START = 32 << 20
"""Memory a new sandbox needs before its first process runs (agent, page tables, kernel objects)."""


@dataclass
class Room:
    """What is left (None: the host does not say)."""

    pids_left: int | None
    pids_max: int | None
    memory_left: int | None
    memory_max: int | None
    disk_left: int
    disk_path: str

    def as_dict(self) -> dict[str, int]:
        out = {"disk_free_mib": self.disk_left >> 20}
        if self.pids_left is not None:
            out["pids_left"] = self.pids_left
        if self.memory_left is not None:
            out["memory_left_mib"] = self.memory_left >> 20
        return out


def read_int(path: Path) -> int | None:
    """The integer a cgroup file holds; None when it cannot be read, or says ``max``."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text) if text.isdigit() else None


def stat_int(path: Path, key: str) -> int:
    """The value of ``key`` in a cgroup's ``*.stat`` file; 0 when it cannot be read."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def measure(parent: str, data_dir: Path) -> Room:
    """What is left under the cgroup ``parent`` (v1 or v2) and on the filesystem of ``data_dir``."""
    rel = parent.strip("/")
    if (CGROUP_ROOT / "pids").is_dir():  # cgroup v1 (also hybrid hosts)
        pids_dir, mem_dir = CGROUP_ROOT / "pids" / rel, CGROUP_ROOT / "memory" / rel
        pids_max, pids_now = read_int(pids_dir / "pids.max"), read_int(pids_dir / "pids.current")
        mem_max, mem_now = read_int(mem_dir / "memory.limit_in_bytes"), read_int(mem_dir / "memory.usage_in_bytes")
        inactive = stat_int(mem_dir / "memory.stat", "total_inactive_file")
    else:
        d = CGROUP_ROOT / rel
        pids_max, pids_now = read_int(d / "pids.max"), read_int(d / "pids.current")
        mem_max, mem_now = read_int(d / "memory.max"), read_int(d / "memory.current")
        inactive = stat_int(d / "memory.stat", "inactive_file")
    pids_left = pids_max - pids_now if pids_max is not None and pids_now is not None else None
    memory_left = None
    if mem_max is not None and mem_now is not None and mem_max < 1 << 60:
        memory_left = mem_max - max(0, mem_now - inactive)  # reclaimable page cache is room
    st = os.statvfs(data_dir)
    return Room(pids_left, pids_max, memory_left, mem_max, st.f_bavail * st.f_frsize, str(data_dir))


def check(room: Room, min_free_disk: int) -> None:
    """Refuse a create the host has no room for, saying which limit and how to raise it."""
    if room.pids_left is not None and room.pids_left < PIDS_TO_START:
        raise ResourceExhaustedError(
            f"the sandboxes together may run at most {room.pids_max} processes and {room.pids_left} are left: end"
            " some sandboxes (or their processes), or raise the limit with `shoal serve --total-pids N`"
            " (or $SHOAL_TOTAL_PIDS)"
        )
    if room.memory_left is not None and room.memory_left < MEMORY_TO_START:
        raise ResourceExhaustedError(
            f"the sandboxes together may use at most {(room.memory_max or 0) >> 20} MiB of memory and"
            f" {max(0, room.memory_left) >> 20} MiB are left: end some sandboxes, or raise the limit with"
            " `shoal serve --total-memory-mib N` (or $SHOAL_TOTAL_MEMORY_MIB)"
        )
    if room.disk_left < min_free_disk:
        raise ResourceExhaustedError(
            f"the data directory's filesystem ({room.disk_path}) has {room.disk_left >> 20} MiB free, under the"
            f" {min_free_disk >> 20} MiB kept free: free some space (`shoal image prune`, `shoal volume rm`, old"
            " snapshots), or lower the reserve with `shoal serve --min-free-disk-mib N` (or $SHOAL_MIN_FREE_DISK_MIB)"
        )
