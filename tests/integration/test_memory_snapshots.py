"""Memory snapshots of gVisor sandboxes (``sb._experimental_snapshot()``,
``Sandbox._experimental_from_snapshot``): a running sandbox forked with its processes' memory, open files and
streams; both copies carry on independently."""

from __future__ import annotations

import shutil
import time

import pytest

import shoal
from shoal.exception import InvalidError, NotFoundError

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (gVisor) is not installed: make setup")

COUNTER = r"""
import sys, time
n = 0
log = open("/tmp/counter.log", "a")
while True:
    line = sys.stdin.readline()
    if not line:
        break
    n += int(line)
    print(f"total {n}", flush=True)
    log.write(f"{n}\n"); log.flush()
print("stdin closed", flush=True)
"""
"""A process whose state is only in its memory (``n``), an open file and its streams."""


def _app() -> shoal.App:
    return shoal.App.lookup("memory-snapshot-tests", create_if_missing=True)


def _read_lines(stream, count: int, timeout: float = 30) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in stream:
        lines.append(line.rstrip("\n"))
        if len(lines) == count or time.monotonic() > deadline:
            break
    return lines


def test_a_restored_sandbox_carries_on_with_memory_files_and_streams(daemon):
    sb = shoal.Sandbox.create(
        "python3", "-u", "-c", COUNTER, app=_app(), _experimental_enable_snapshot=True, timeout=300
    )
    try:
        assert sb._experimental_snapshot is not None
        sb.stdin.write("5\n")
        sb.stdin.drain()
        assert _read_lines(sb.stdout, 1) == ["total 5"]
        snap = sb._experimental_snapshot()
        assert snap.object_id.startswith("sn-")

        # Two restores of one snapshot: each continues from n == 5, on its own.
        forks = [shoal.Sandbox._experimental_from_snapshot(snap) for _ in range(2)]
        try:
            assert len({sb.object_id, *(f.object_id for f in forks)}) == 3
            for i, fork in enumerate(forks):
                fork.stdin.write(f"{10 * (i + 1)}\n")
                fork.stdin.drain()
            sb.stdin.write("1\n")
            sb.stdin.drain()
            assert _read_lines(forks[0].stdout, 1) == ["total 15"]
            assert _read_lines(forks[1].stdout, 1) == ["total 25"]
            assert _read_lines(sb.stdout, 1) == ["total 6"]

            # The open file carried on too, in each sandbox's own filesystem.
            for fork, last in ((forks[0], "15"), (forks[1], "25")):
                p = fork.exec("cat", "/tmp/counter.log")
                assert p.stdout.read().split() == ["5", last]
                assert p.wait() == 0
            p = sb.exec("cat", "/tmp/counter.log")
            assert p.stdout.read().split() == ["5", "6"]

            # Its entrypoint is the restored sandbox's: closing stdin ends it, and with it the sandbox.
            forks[0].stdin.write_eof()
            forks[0].stdin.drain()
            forks[0].wait()
            assert forks[0].returncode == 0
            assert "stdin closed" in forks[0].stdout.read()
            assert sb.poll() is None and forks[1].poll() is None

            # The SDK finds it again by id.
            again = shoal.SandboxSnapshot.from_id(snap.object_id)
            third = shoal.Sandbox._experimental_from_snapshot(again, name=None)
            third.stdin.write("100\n")
            third.stdin.drain()
            assert _read_lines(third.stdout, 1) == ["total 105"]
            third.terminate()
        finally:
            for fork in forks:
                fork.terminate()
    finally:
        sb.terminate()


def test_a_restored_sandbox_gets_its_own_network_address_and_runs_execs(daemon):
    sb = shoal.Sandbox.create(app=_app(), runtime="gvisor", timeout=300)
    try:
        p = sb.exec("sh", "-c", "echo before > /root/mark")
        assert p.wait() == 0
        snap = sb._experimental_snapshot()
        fork = shoal.Sandbox._experimental_from_snapshot(snap)
        try:

            def address(s: shoal.Sandbox) -> str:
                code = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                code += " s.connect(('192.0.2.1', 9)); print(s.getsockname()[0])"
                q = s.exec("python3", "-c", code)
                out = q.stdout.read().strip()
                assert q.wait() == 0, q.stderr.read()
                return out

            assert address(fork) != address(sb)
            q = fork.exec("cat", "/root/mark")
            assert q.stdout.read() == "before\n"
            # What each writes afterwards stays its own.
            assert fork.exec("sh", "-c", "echo fork > /root/mark").wait() == 0
            assert sb.exec("cat", "/root/mark").stdout.read() == "before\n"
        finally:
            fork.terminate()
    finally:
        sb.terminate()


def test_memory_snapshots_need_gvisor(daemon):
    sb = shoal.Sandbox.create(app=_app(), runtime="runc", timeout=60)
    try:
        with pytest.raises(InvalidError, match="runtime='gvisor'"):
            sb._experimental_snapshot()
    finally:
        sb.terminate()


def test_unknown_snapshots_and_bad_arguments_are_refused(daemon):
    with pytest.raises(InvalidError, match="sn-"):
        shoal.SandboxSnapshot.from_id("im-123")
    missing = shoal.SandboxSnapshot.from_id("sn-" + "A" * 22)
    with pytest.raises(NotFoundError, match="not found"):
        shoal.Sandbox._experimental_from_snapshot(missing)
    with pytest.raises(TypeError, match="SandboxSnapshot"):
        shoal.Sandbox._experimental_from_snapshot("sn-" + "A" * 22)
    with pytest.raises(InvalidError, match="invalid sandbox name"):
        shoal.Sandbox._experimental_from_snapshot(missing, name="no spaces allowed")
