"""Host-wide kernel limits that sandboxes share, read from ``/proc``: what is left before one runs out."""

from __future__ import annotations

from pathlib import Path


def key_quota_left(uid: int) -> int | None:
    """Keys ``uid`` may still create under ``kernel.keys.maxkeys`` (runc takes one per container for its
    session keyring), or None if the kernel does not say."""
    try:
        maxkeys = int(Path("/proc/sys/kernel/keys/maxkeys").read_text())
        lines = Path("/proc/key-users").read_text().splitlines()
    except (OSError, ValueError):
        return None
    used = 0
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[0] == f"{uid}:":
            used = int(fields[3].split("/")[0])
    return max(0, maxkeys - used)
