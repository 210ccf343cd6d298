"""Reap dead sandbox inits.

A container's init (the agent) is orphaned as soon as ``runc run --detach``
returns.  The daemon makes itself a child subreaper so that those inits become
its children, and reaps them when they die; otherwise their zombies wait on
the host's PID 1, which on some hosts reaps late or never.  Only children that
run as a sandbox uid (or that the caller knows as a sandbox's, such as gVisor's
sandbox and gofer processes) are reaped here, so the exit status of the daemon's
own helpers (runc, mmdebstrap) is never taken from their waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path

IsSandbox = Callable[[int, int], bool]
"""(pid, real uid) of an exited child → whether it was a sandbox's process, to be reaped here."""

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


_EXITED = os.WEXITED | os.WNOHANG | os.WNOWAIT
RESCAN_DELAY = 0.05
"""Seconds before looking past a helper's exit that its own waiter has not collected yet."""


def _exited_uid(idtype: int, pid: int) -> tuple[int, int] | None:
    """(pid, real uid) of an exited child (``P_ALL``: the first in line), left waitable; None: none."""
    try:
        info = os.waitid(idtype, pid, _EXITED)
    except ChildProcessError:
        return None
    if info is None or info.si_pid == 0:
        return None
    return info.si_pid, info.si_uid


def _reap(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    return False


def reap_first_in_line(is_sandbox: IsSandbox) -> tuple[int, bool]:
    """Reap exited sandbox inits while one is first among the exited children: (how many, whether another
    program's exit, left to its own waiter, is first in line now and may hide more).  Costs nothing per child."""
    reaped = 0
    while (found := _exited_uid(os.P_ALL, 0)) is not None:
        pid, uid = found
        if not is_sandbox(pid, uid):
            return reaped, True
        reaped += _reap(pid)
    return reaped, False


def reap_sandbox_inits(is_sandbox: IsSandbox) -> int:
    """Reap every exited child that ran as a sandbox's uid, looking at each child; returns how many."""
    reaped = 0
    for pid in _children():
        found = _exited_uid(os.P_PID, pid)
        if found is not None and is_sandbox(pid, found[1]):
            reaped += _reap(pid)
    return reaped


class InitReaper:
    """Reaps sandbox inits on ``SIGCHLD`` at a cost that does not grow with the number of sandboxes.

    Exited children are looked at first in line (``waitid(P_ALL, WNOWAIT)``); a helper program's exit first in
    line (its own waiter collects it) hides those behind it, so a moment later the line is looked at again, and
    if it is still blocked every child is (one ``waitid`` each).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, is_sandbox: IsSandbox) -> None:
        self._loop = loop
        self._is_sandbox = is_sandbox
        self._later: asyncio.TimerHandle | None = None

    def on_sigchld(self) -> None:
        """The ``SIGCHLD`` handler."""
        _, blocked = reap_first_in_line(self._is_sandbox)
        if blocked and self._later is None:
            self._later = self._loop.call_later(RESCAN_DELAY, self._again)

    def _again(self) -> None:
        self._later = None
        _, blocked = reap_first_in_line(self._is_sandbox)
        if blocked:
            reap_sandbox_inits(self._is_sandbox)

    def close(self) -> None:
        """Cancel a pending look."""
        if self._later is not None:
            self._later.cancel()
            self._later = None
