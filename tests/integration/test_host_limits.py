"""A host-wide kernel limit that runs out is a clear ``ResourceExhaustedError``, never a raw runtime message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shoal
from shoal.exception import ResourceExhaustedError
from tests.conftest import DEFAULT_RUNTIME, Daemon

MAXBYTES = Path("/proc/sys/kernel/keys/maxbytes")


@pytest.mark.skipif(
    DEFAULT_RUNTIME == "gvisor",
    reason="gVisor's kernel keeps a sandbox's keys itself: the host's key quota is never used (decision 0069)",
)
def test_the_kernel_key_quota_running_out_is_resource_exhausted(own_daemon: Daemon) -> None:
    app = shoal.App.lookup("shoal-tests-limits", create_if_missing=True)
    made = [shoal.Sandbox.create(app=app, timeout=60)]
    time.sleep(0.5)  # the warm pool's refill holds keys too: let it settle before the quota is set
    before = MAXBYTES.read_text()
    # Each sandbox's root is a host uid of its own (decision 0063) whose first key is the runtime's session
    # keyring: with one byte of key payload allowed per user (the kernel's least), a new sandbox's start runs
    # into the quota.
    MAXBYTES.write_text("1")
    try:
        with pytest.raises(ResourceExhaustedError) as refused:
            for _ in range(4):  # past the warm pool's precreated sandboxes
                made.append(shoal.Sandbox.create(app=app, timeout=60))
    finally:
        MAXBYTES.write_text(before)
        for sb in made:
            sb.terminate()
    message = str(refused.value)
    assert "kernel key quota" in message and "sysctl -w kernel.keys.maxkeys" in message
    assert not message.startswith("runc")
    again = shoal.Sandbox.create(app=app, timeout=60)  # with the quota back, creates work again
    try:
        assert again.exec("echo", "ok").stdout.read() == "ok\n"
    finally:
        again.terminate()


def test_the_daemons_own_ceiling_is_resource_exhausted_and_shown_by_status(own_daemon: Daemon) -> None:
    own_daemon.restart_with("--max-sandboxes", "2")
    app = shoal.App.lookup("shoal-tests-limits", create_if_missing=True)
    made = [shoal.Sandbox.create(app=app, timeout=60) for _ in range(2)]
    try:
        with pytest.raises(ResourceExhaustedError, match=r"at most 2 sandboxes.*--max-sandboxes"):
            made.append(shoal.Sandbox.create(app=app, timeout=60))
        status = json.loads(
            subprocess.run(
                [sys.executable, "-m", "shoal", "status", "--json"], capture_output=True, text=True, check=True
            ).stdout
        )
        assert status["capacity"]["max_sandboxes"] == 2
        assert status["capacity"]["live"] == 2 and status["capacity"]["left"] == 0
        made.pop().terminate()
        made.append(shoal.Sandbox.create(app=app, timeout=60))  # room again
        assert made[-1].exec("echo", "ok").stdout.read() == "ok\n"
    finally:
        for sb in made:
            sb.terminate()


def _refused_then_room_again(app: shoal.App, option: str) -> None:
    with pytest.raises(ResourceExhaustedError) as refused:
        shoal.Sandbox.create(app=app, timeout=60).terminate()
    assert option in str(refused.value), refused.value


@pytest.mark.skipif(
    DEFAULT_RUNTIME == "gvisor",
    reason="a gVisor sandbox's host tasks are its Sentry's, not its processes: at --total-pids the Sentry, and so "
    "the whole sandbox, ends (decision 0069)",
)
def test_processes_of_all_sandboxes_running_out_is_resource_exhausted(own_daemon: Daemon) -> None:
    """One sandbox's processes use up what all sandboxes together may run: the next create is refused, naming
    ``--total-pids``; once they end, creates work again."""
    own_daemon.restart_with("--total-pids", "48", "--warm-pool", "0")
    app = shoal.App.lookup("shoal-tests-limits", create_if_missing=True)
    hog = shoal.Sandbox.create(app=app, timeout=120)
    try:
        p = hog.exec("sh", "-c", "for i in $(seq 42); do sleep 600 & done; echo started; wait")
        assert next(iter(p.stdout)) == "started\n"
        _refused_then_room_again(app, "--total-pids")
        hog.exec("pkill", "sleep").wait()
        p.wait()
        sb = shoal.Sandbox.create(app=app, timeout=60)
        assert sb.exec("echo", "ok").stdout.read() == "ok\n"
        sb.terminate()
    finally:
        hog.terminate()


def test_memory_of_all_sandboxes_running_out_is_resource_exhausted(own_daemon: Daemon) -> None:
    """One sandbox holds most of the memory all sandboxes together may use: the next create is refused, naming
    ``--total-memory-mib``; once it lets go, creates work again."""
    own_daemon.restart_with("--total-memory-mib", "64", "--warm-pool", "0")
    app = shoal.App.lookup("shoal-tests-limits", create_if_missing=True)
    hog = shoal.Sandbox.create(app=app, timeout=120)
    try:
        p = hog.exec(
            "python3", "-c", "import sys; b = bytearray(b'x') * (40 << 20); print('held', flush=True); sys.stdin.read()"
        )
        assert next(iter(p.stdout)) == "held\n"
        _refused_then_room_again(app, "--total-memory-mib")
        p.stdin.write_eof()
        p.stdin.drain()
        assert p.wait() == 0
        sb = shoal.Sandbox.create(app=app, timeout=60)
        assert sb.exec("echo", "ok").stdout.read() == "ok\n"
        sb.terminate()
    finally:
        hog.terminate()


def test_a_full_data_disk_is_resource_exhausted(own_daemon: Daemon) -> None:
    """Less free space than the daemon keeps free on the data directory's filesystem: creates are refused,
    naming the directory and ``--min-free-disk-mib``."""
    st = os.statvfs(own_daemon.data_dir)
    free_mib = st.f_bavail * st.f_frsize >> 20
    own_daemon.restart_with("--min-free-disk-mib", str(free_mib + 1024), "--warm-pool", "0")
    app = shoal.App.lookup("shoal-tests-limits", create_if_missing=True)
    _refused_then_room_again(app, "--min-free-disk-mib")
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "shoal", "status", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert abs(status["capacity"]["disk_free_mib"] - free_mib) < 512
    own_daemon.restart_with("--warm-pool", "0")
    sb = shoal.Sandbox.create(app=app, timeout=60)
    try:
        assert sb.exec("echo", "ok").stdout.read() == "ok\n"
    finally:
        sb.terminate()
