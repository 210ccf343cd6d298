"""Reap dead sandbox inits.

A container's init (the agent) is orphaned as soon as ``runc run --detach``
returns.  The daemon makes itself a child subreaper so that those inits become
its children, and reaps them when they die; otherwise their zombies wait on
the host's PID 1, which on some hosts reaps late or never.  Only children that
run as a sandbox uid are reaped here, so the exit status of the daemon's own
helpers (runc, mmdebstrap) is never taken from their waiters.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants children of this process; False where unsupported."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _children() -> set[int]:
    pids: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{os.getpid()}/task").iterdir())
    except OSError:  # out of descriptors: the next SIGCHLD tries again
        return pids
    for task in tasks:
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def _uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reap_sandbox_inits(is_sandbox_uid: Callable[[int], bool]) -> int:
    """Reap dead children that ran as a sandbox's uid; returns how many."""
    reaped = 0
    for pid in _children():
        uid = _uid(pid)
        if uid is None or not is_sandbox_uid(uid):
            continue
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            reaped += done == pid
    return reaped
