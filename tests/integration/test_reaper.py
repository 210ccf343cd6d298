"""The daemon collects its sandboxes' inits when they end: no zombie is left waiting on it.

runc leaves each container's init to the daemon (a child subreaper); the daemon reaps those on ``SIGCHLD``
while its helper programs (runc itself, mounts) are collected by their own waiters.
"""

from __future__ import annotations

import time
from pathlib import Path

import shoal
from tests.conftest import Daemon


def _zombie_children(pid: int) -> list[str]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                status = Path(f"/proc/{child}/status").read_text().splitlines()
            except OSError:
                continue
            state = next(ln for ln in status if ln.startswith("State:"))
            if "zombie" in state:
                name = next(ln for ln in status if ln.startswith("Name:")).split()[1]
                found.append(f"{child} ({name})")
    return found


def test_ended_sandboxes_leave_no_zombie_on_the_daemon(daemon: Daemon, app: shoal.App) -> None:
    assert daemon.proc is not None
    ended = [shoal.Sandbox.create("sh", "-c", "exit 3", app=app, timeout=120) for _ in range(3)]  # on their own
    killed = [shoal.Sandbox.create(app=app, timeout=120) for _ in range(3)]
    for sb in killed:
        sb.terminate()
    for sb in ended:
        sb.wait()
        assert sb.returncode == 3
    deadline = time.monotonic() + 10
    while (zombies := _zombie_children(daemon.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert zombies == [], f"the daemon left dead children unreaped: {zombies}"
