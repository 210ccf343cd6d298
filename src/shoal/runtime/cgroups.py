"""Read-only views of sandbox cgroups (the OCI runtime creates and removes them)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from shoal.runtime.host_room import read_int, stat_int

ROOT = Path("/sys/fs/cgroup")


def _procs_files(cgroup_path: str) -> list[Path]:
    rel = cgroup_path.lstrip("/")
    return [p for p in (ROOT / "pids" / rel / "cgroup.procs", ROOT / rel / "cgroup.procs") if p.exists()]


def processes(cgroup_path: str) -> list[int]:
    """Pids in a cgroup (v1 pids hierarchy or v2); empty if it does not exist."""
    for f in _procs_files(cgroup_path):
        try:
            return [int(x) for x in f.read_text().split()]
        except OSError:
            continue
    return []


async def wait_empty(cgroup_path: str, timeout: float) -> bool:
    """Wait until no process is left in a cgroup; False if some remain after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while processes(cgroup_path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def memory_events(cgroup_path: str) -> dict[str, int]:
    """OOM counters of a sandbox's memory cgroup (v1 ``memory.oom_control`` or v2 ``memory.events``)."""
    rel = cgroup_path.lstrip("/")
    out: dict[str, int] = {}
    for f in (ROOT / "memory" / rel / "memory.oom_control", ROOT / rel / "memory.events"):
        try:
            for line in f.read_text().splitlines():
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    out[key] = int(value)
        except OSError:
            continue
    return out


def host_limits() -> tuple[int, int]:
    """Defaults for the cap on all sandboxes together: (pids, memory bytes), leaving the host a reserve."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    threads_max = int(Path("/proc/sys/kernel/threads-max").read_text())
    pids = min(pid_max, threads_max)
    mem_total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) * 1024
    reserve_mem = max(1 << 30, mem_total // 10)
    return pids - max(4096, pids // 8), max(mem_total - reserve_mem, 256 << 20)


def limit_parent(parent: str, pids: int, memory_bytes: int) -> None:
    """Create the cgroup that holds every sandbox and cap the sum of their processes and memory.

    Each sandbox's own limits come from its OCI spec; this parent is no
    container's, so the runtime leaves it to us.  Without it, enough sandboxes
    at their own limits exhaust the host's pid table or memory.
    """
    rel = parent.strip("/")
    if (ROOT / "pids").is_dir():  # cgroup v1 (also hybrid hosts)
        for ctrl, files in (
            ("pids", {"pids.max": str(pids)}),
            ("memory", {"memory.limit_in_bytes": str(memory_bytes)}),
        ):
            d = ROOT / ctrl / rel
            d.mkdir(parents=True, exist_ok=True)
            for name, value in files.items():
                (d / name).write_text(value)
        return
    if (ROOT / "cgroup.controllers").exists():  # cgroup v2
        parts = rel.split("/")
        for i in range(len(parts)):
            here = ROOT.joinpath(*parts[:i])
            (here / "cgroup.subtree_control").write_text("+pids +memory")
            ROOT.joinpath(*parts[: i + 1]).mkdir(exist_ok=True)
        d = ROOT / rel
        (d / "pids.max").write_text(str(pids))
        (d / "memory.max").write_text(str(memory_bytes))


def usage(cgroup_path: str) -> tuple[int, int] | None:
    """A cgroup's CPU time so far (nanoseconds) and the memory it uses now (bytes, less reclaimable page
    cache, as ``docker stats`` counts it); None once the cgroup is gone."""
    rel = cgroup_path.lstrip("/")
    v1_cpu = ROOT / "cpuacct" / rel / "cpuacct.usage"
    if v1_cpu.exists():
        cpu = read_int(v1_cpu)
        mem_dir = ROOT / "memory" / rel
        memory = read_int(mem_dir / "memory.usage_in_bytes")
        inactive = stat_int(mem_dir / "memory.stat", "total_inactive_file")
    else:
        d = ROOT / rel
        cpu = stat_int(d / "cpu.stat", "usage_usec") * 1000
        memory = read_int(d / "memory.current")
        inactive = stat_int(d / "memory.stat", "inactive_file")
    if cpu is None or memory is None:
        return None
    return cpu, max(0, memory - inactive)
