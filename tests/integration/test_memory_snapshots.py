"""Memory snapshots of gVisor sandboxes (``sb._experimental_snapshot()``,
``Sandbox._experimental_from_snapshot``): a running sandbox forked with its processes' memory, open files and
streams; both copies carry on independently."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


def _counter() -> shoal.Sandbox:
    """A sandbox whose entrypoint is ``COUNTER``, made for memory snapshots."""
    return shoal.Sandbox.create(
        "python3", "-u", "-c", COUNTER, app=_app(), _experimental_enable_snapshot=True, timeout=300
    )


def _add(sb: shoal.Sandbox, n: int, total: int) -> None:
    """Send ``n`` to the counter; it must answer ``total``."""
    sb.stdin.write(f"{n}\n")
    sb.stdin.drain()
    assert _read_lines(sb.stdout, 1) == [f"total {total}"]


def test_a_restored_sandbox_carries_on_with_memory_files_and_streams(daemon):
    sb = _counter()
    try:
        # _experimental_enable_snapshot without a runtime picks gVisor, the runtime that can take one.
        assert shoal.Sandbox.from_id(sb.object_id)._info["runtime"] == "gvisor"
        _add(sb, 5, 5)
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


def _cli(d, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "shoal", *args], env=d.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout.decode()


def test_snapshots_survive_a_daemon_restart_and_are_listed_and_removed_with_the_cli(own_daemon):
    sb = _counter()
    _add(sb, 7, 7)
    snap = sb._experimental_snapshot()
    listed = json.loads(_cli(own_daemon, "snapshot", "ls", "--json"))
    assert [(s["snapshot_id"], s["sandbox_id"]) for s in listed] == [(snap.object_id, sb.object_id)]
    assert listed[0]["size"] > 0

    own_daemon.restart(signal.SIGKILL)
    sb = shoal.Sandbox.from_id(sb.object_id)
    fork = shoal.Sandbox._experimental_from_snapshot(shoal.SandboxSnapshot.from_id(snap.object_id))
    try:
        fork.stdin.write("1\n")
        fork.stdin.drain()
        assert _read_lines(fork.stdout, 1) == ["total 8"]
        assert snap.object_id in _cli(own_daemon, "snapshot", "ls")
        # Its filesystem image cannot go while the snapshot needs it.
        res = subprocess.run(
            [sys.executable, "-m", "shoal", "image", "rm", listed[0]["image_id"]],
            env=own_daemon.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        assert res.returncode != 0 and b"shoal snapshot rm" in res.stderr
    finally:
        fork.terminate()
        sb.terminate()
    assert snap.object_id in _cli(own_daemon, "snapshot", "rm", snap.object_id)
    assert json.loads(_cli(own_daemon, "snapshot", "ls", "--json")) == []
    with pytest.raises(NotFoundError):
        shoal.Sandbox._experimental_from_snapshot(snap)


def _snapshots_while_busy(sb: shoal.Sandbox, execs: int, snapshots: int) -> list[shoal.SandboxSnapshot]:
    """Take ``snapshots`` memory snapshots while another thread runs ``execs`` execs, each followed by "1" on the
    entrypoint's stdin; every exec must come through whole."""
    results: list[tuple[int, str]] = []

    def busy() -> None:
        for i in range(execs):
            p = sb.exec("echo", str(i))
            results.append((p.wait(), p.stdout.read()))
            sb.stdin.write("1\n")
            sb.stdin.drain()

    worker = threading.Thread(target=busy)
    worker.start()
    snaps = [sb._experimental_snapshot() for _ in range(snapshots)]
    worker.join(120)
    assert results == [(0, f"{i}\n") for i in range(execs)]
    return snaps


def _check_fork_goes_on(snap: shoal.SandboxSnapshot, low: int, high: int) -> None:
    """A fork of ``snap`` counts on from whatever it had counted (between ``low`` and ``high``); input sent before
    the snapshot that it had not read yet reaches it first."""
    fork = shoal.Sandbox._experimental_from_snapshot(snap)
    try:
        fork.stdin.write("1000\n")
        fork.stdin.drain()
        totals: list[int] = []
        for line in fork.stdout:
            totals.append(int(line.split()[1]))
            if totals[-1] >= 1000:
                break
        before, last = totals[:-1], totals[-1]
        assert before == sorted(before) and all(low <= t <= high for t in before), totals
        assert 1000 + low <= last <= 1000 + high and (not before or last == 1000 + before[-1]), totals
        assert fork.exec("true").wait() == 0
    finally:
        fork.terminate()


def test_a_sandbox_taken_back_after_a_daemon_restart_can_be_snapshotted(own_daemon):
    # Its agent's connection is then a host socket, which gVisor cannot save: the agent lets go of it for the
    # checkpoint and comes back; execs and input sent meanwhile are kept, and a fork of it carries on too.
    sb = _counter()
    try:
        _add(sb, 7, 7)
        own_daemon.restart(signal.SIGKILL)
        sb = shoal.Sandbox.from_id(sb.object_id)
        snaps = _snapshots_while_busy(sb, 8, 2)
        assert _read_lines(sb.stdout, 9)[-1] == "total 15"
        for snap in snaps:
            _check_fork_goes_on(snap, 7, 15)
        # The original goes on after its snapshots: its memory, its streams, new execs.
        _add(sb, 100, 115)
        assert sb.exec("cat", "/tmp/counter.log").stdout.read().split()[-1] == "115"
    finally:
        sb.terminate()


def test_a_daemon_killed_right_after_a_snapshot_leaves_the_sandbox_running(own_daemon):
    # The answer comes before the sandbox is resumed (in the background): a daemon killed in between must not
    # leave it frozen or deaf.
    sb = _counter()
    try:
        _add(sb, 2, 2)
        sb._experimental_snapshot()
        own_daemon.restart(signal.SIGKILL)
        sb = shoal.Sandbox.from_id(sb.object_id)
        sb.stdin.write("3\n")
        sb.stdin.drain()
        assert _read_lines(sb.stdout, 2) == ["total 2", "total 5"]
        assert sb.exec("true").wait() == 0
    finally:
        sb.terminate()


def _sentry_call(d, sandbox_id: str, method: str) -> None:
    """What the daemon does to pause or resume a gVisor sandbox for a snapshot (its Sentry's control socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(d.runtime_dir / "oci" / "runsc" / f"runsc-{sandbox_id}.sock"))
        s.sendall(json.dumps({"method": method, "arg": None}).encode())
        assert b'"success":true' in s.recv(65536)


def test_a_daemon_that_died_while_pausing_or_resuming_leaves_no_frozen_sandbox(own_daemon):
    # The daemon writes where a pause stands beside runsc's state (runsc's own state file does not see a pause
    # through the Sentry's socket).  Killed between that mark and the Sentry's answer, it cannot know whether the
    # sandbox is paused: the next daemon finds out from whether its agent comes back, and thaws it if not (a
    # resume too many would panic the Sentry and end the sandbox).
    sb = _counter()
    marker = own_daemon.runtime_dir / "oci" / "runsc" / f"{sb.object_id}.shoal-frozen"
    try:
        _add(sb, 4, 4)
        # Killed after marking "pausing", before the Sentry paused it: it runs.
        own_daemon.stop(signal.SIGKILL)
        marker.write_text("pausing")
        own_daemon.start()
        sb = shoal.Sandbox.from_id(sb.object_id)
        assert sb.exec("echo", "running").stdout.read() == "running\n"
        deadline = time.monotonic() + 10
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not marker.exists()
        # Killed after marking "resuming", before the Sentry resumed it: it is paused, and thawed.
        own_daemon.stop(signal.SIGKILL)
        _sentry_call(own_daemon, sb.object_id, "containerManager.Pause")
        marker.write_text("resuming")
        own_daemon.start()
        sb = shoal.Sandbox.from_id(sb.object_id)
        sb.stdin.write("5\n")
        sb.stdin.drain()
        assert _read_lines(sb.stdout, 2) == ["total 4", "total 9"]
        assert sb.exec("echo", "thawed").stdout.read() == "thawed\n"
        assert not marker.exists()
    finally:
        sb.terminate()


def test_execs_and_stdin_during_a_snapshot_are_kept(daemon):
    sb = _counter()
    try:
        snaps = _snapshots_while_busy(sb, 15, 3)
        assert _read_lines(sb.stdout, 15)[-1] == "total 15"
        for snap in snaps:
            _check_fork_goes_on(snap, 0, 15)
    finally:
        sb.terminate()


def test_pause_and_resume_need_a_persistent_sandbox_as_in_modal(sandbox):
    # modal 1.6.4 pauses only persistent sandboxes (its session stops and a later one starts from its files;
    # tests/integration/test_persistent.py); any other sandbox answers with Modal's error.
    for call in (sandbox._experimental_pause, sandbox._experimental_resume):
        with pytest.raises(NotImplementedError, match="_experimental_persistent=True"):
            call()
    assert sandbox.poll() is None
