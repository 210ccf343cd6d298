"""A restarted daemon re-adopts running sandboxes; processes and their output survive; ends are not lost."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest

import shoal
from shoal.exception import SandboxTimeoutError
from tests.conftest import DEFAULT_RUNTIME

pytestmark = pytest.mark.restart


def _app():
    return shoal.App.lookup("restart-tests", create_if_missing=True)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "kill-9"])
def test_running_sandbox_and_exec_survive_a_restart(own_daemon, how):
    sb = shoal.Sandbox.create(app=_app(), timeout=120)
    sb.exec("bash", "-c", "echo state > /tmp/state").wait()
    # An exec that prints before, during and after the restart.
    p = sb.exec("bash", "-c", "for i in $(seq 1 30); do echo $i; sleep 0.1; done")
    first = next(iter(p.stdout))
    own_daemon.restart(how)
    rest = p.stdout.read()
    assert first + rest == "".join(f"{i}\n" for i in range(1, 31))
    assert p.wait() == 0
    # The sandbox is still the same one, with its files.
    assert sb.poll() is None
    assert sb.exec("cat", "/tmp/state").stdout.read() == "state\n"
    again = shoal.Sandbox.from_id(sb.object_id)
    assert again.exec("echo", "after").stdout.read() == "after\n"
    sb.terminate()
    assert sb.poll() == 137


def test_exec_that_ends_while_the_daemon_is_down(own_daemon):
    sb = shoal.Sandbox.create(app=_app(), timeout=120)
    p = sb.exec("bash", "-c", "sleep 1; echo finished; exit 5")
    own_daemon.stop(signal.SIGKILL)
    time.sleep(2)  # the exec ends while nobody listens
    own_daemon.start()
    assert p.wait() == 5
    assert p.stdout.read() == "finished\n"
    sb.terminate()


def test_entrypoint_that_ends_while_the_daemon_is_down(own_daemon):
    sb = shoal.Sandbox.create("bash", "-c", "sleep 1; echo bye; exit 3", app=_app(), timeout=120)
    own_daemon.stop()
    time.sleep(2)
    own_daemon.start()
    sb.wait()
    assert sb.returncode == 3
    assert sb.stdout.read() == "bye\n"


def test_timeout_that_passes_while_the_daemon_is_down(own_daemon):
    sb = shoal.Sandbox.create(app=_app(), timeout=2)
    own_daemon.stop(signal.SIGKILL)
    time.sleep(3)
    own_daemon.start()
    with pytest.raises(SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124


def test_stdin_after_a_restart(own_daemon):
    sb = shoal.Sandbox.create(app=_app(), timeout=120)
    p = sb.exec("bash", "-c", "while read l; do echo got:$l; done")
    p.stdin.write("before\n")
    p.stdin.drain()
    own_daemon.restart()
    p.stdin.write("after\n")
    p.stdin.write_eof()
    p.stdin.drain()
    assert p.stdout.read() == "got:before\ngot:after\n"
    assert p.wait() == 0
    sb.terminate()


def test_a_sandbox_killed_while_the_daemon_is_down_is_reported(own_daemon):
    sb = shoal.Sandbox.create(app=_app(), timeout=120)
    p = sb.exec("sleep", "100")
    own_daemon.stop(signal.SIGKILL)
    runtime = "runsc" if DEFAULT_RUNTIME == "gvisor" else "runc"
    subprocess.run(
        [runtime, "--root", str(own_daemon.runtime_dir / "oci" / runtime), "kill", sb.object_id, "KILL"], check=True
    )
    time.sleep(0.5)
    own_daemon.start()
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 137
    assert p.wait() == 137


def test_output_written_while_the_daemon_is_down_is_kept(own_daemon):
    sb = shoal.Sandbox.create(app=_app(), timeout=120)
    p = sb.exec("python3", "-c", "import time,sys\ntime.sleep(0.5)\nsys.stdout.write('x' * 3_000_000)\n")
    own_daemon.stop(signal.SIGKILL)
    time.sleep(1.5)
    own_daemon.start()
    assert p.wait() == 0
    assert p.stdout.read() == "x" * 3_000_000
    sb.terminate()


def _fs_tools(sb) -> str:
    p = sb.exec("bash", "-c", "for c in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $c 2>/dev/null; echo; done")
    return "".join(
        line + "\n" for line in p.stdout.read().splitlines() if line.startswith("/.shoal/") and " fs " in line
    )


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "kill-9"])
def test_file_operations_cut_off_by_a_restart_fail_and_leave_nothing(own_daemon, how):
    sb = shoal.Sandbox.create(app=_app(), timeout=120)
    f = sb.open("/tmp/half", "wb")
    f.write(b"x" * 1000)
    outcome: list[BaseException | None] = []

    def watch() -> None:
        try:
            for _ in sb.filesystem.watch("/tmp"):
                pass
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 10
    while "fs watch" not in (tools := _fs_tools(sb)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "fs open" in tools and "fs watch" in tools
    own_daemon.restart(how)
    # The open file and the watch lived in requests to the old daemon: they fail with a clear error ...
    with pytest.raises(shoal.exception.ConnectionError, match="daemon"):
        f.write(b"y")
        f.flush()
    watcher.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], shoal.exception.ConnectionError), outcome
    # ... and their processes in the sandbox are stopped, not left waiting for input forever.
    deadline = time.monotonic() + 10
    while (left := _fs_tools(sb)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == ""
    # The sandbox goes on; new file operations work.
    sb.filesystem.write_text("after", "/tmp/after")
    assert sb.filesystem.read_text("/tmp/after") == "after"
    sb.terminate()
