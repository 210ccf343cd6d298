"""Persistent sandboxes (``Sandbox.create(_experimental_persistent=True)``), as modal 1.6 has them: a sandbox
that runs as a sequence of sessions; pausing ends one and keeps its files, and the next session (explicitly
resumed, or started by the next call that needs it) carries on from them with its processes started afresh."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

import shoal
from shoal.exception import InvalidError, NotFoundError
from tests.conftest import DEFAULT_RUNTIME


def _app() -> shoal.App:
    return shoal.App.lookup("persistent-tests", create_if_missing=True)


def _run(sb: shoal.Sandbox, *argv: str) -> tuple[int, str]:
    p = sb.exec(*argv)
    rc = p.wait()
    return rc, p.stdout.read()


SLEEPERS = (
    "import os; print(sum(open(f'/proc/{p}/cmdline', 'rb').read() == b'sleep\\x001000\\x00'"
    " for p in os.listdir('/proc') if p.isdigit()))"
)
"""How many ``sleep 1000`` processes run in the sandbox."""


def _persistent(**kwargs) -> shoal.Sandbox:
    return shoal.Sandbox.create(app=_app(), timeout=None, _experimental_persistent=True, **kwargs)


def test_files_outlive_a_pause_and_the_next_call_resumes_it(daemon):
    secret = shoal.Secret.from_dict({"TOKEN": "s3cret"})
    sb = _persistent(secrets=[secret], env={"GREETING": "hi"})
    try:
        first = sb._info["persistent"]["session_id"]
        assert first == sb.object_id and sb._info["persistent"]["persistent_id"].startswith("ps-")
        assert _run(sb, "sh", "-c", "echo kept > /root/notes; sleep 1000 >/dev/null 2>&1 &") == (0, "")
        assert _run(sb, "python3", "-c", SLEEPERS) == (0, "1\n")
        p = sb.exec("echo", "from the first session")
        assert p.wait() == 0

        sb._experimental_pause()
        info = shoal.Sandbox.from_id(sb.object_id)._info
        assert info["persistent"]["session_id"] is None and info["persistent"]["exit_image"].startswith("im-")
        # Listed once, under its object id, paused or not (its sessions are not listed on their own).
        listed = [s.object_id for s in shoal.Sandbox.list(app_id=_app().app_id)]
        assert listed.count(sb.object_id) == 1 and first in listed
        assert sb.poll() is None  # paused is not finished: only terminate ends a persistent sandbox
        assert p.stdout.read() == "from the first session\n"  # a process of the first session is still readable

        # The next exec starts a session from the files the first one left: same object, new processes.
        assert _run(sb, "cat", "/root/notes") == (0, "kept\n")
        info = shoal.Sandbox.from_id(sb.object_id)._info
        second = info["persistent"]["session_id"]
        assert second not in (None, first) and info["persistent"]["sessions"] == 2
        assert second not in [s.object_id for s in shoal.Sandbox.list(app_id=_app().app_id)]
        assert _run(sb, "python3", "-c", SLEEPERS) == (0, "0\n")
        # The definition carries over: environment and secrets.
        assert _run(sb, "sh", "-c", "echo $GREETING $TOKEN") == (0, "hi s3cret\n")

        # An explicit pause and resume; resume of a running one changes nothing.
        sb._experimental_pause()
        sb._experimental_resume()
        third = shoal.Sandbox.from_id(sb.object_id)._info["persistent"]["session_id"]
        sb._experimental_resume()
        assert shoal.Sandbox.from_id(sb.object_id)._info["persistent"]["session_id"] == third not in (first, second)
        assert _run(sb, "cat", "/root/notes") == (0, "kept\n")
        sb.filesystem.write_text("written by the file API", "/root/api.txt")
        sb._experimental_pause()
        assert sb.filesystem.read_text("/root/api.txt") == "written by the file API"
    finally:
        sb.terminate()
    assert sb.poll() == 137
    sb.wait(raise_on_termination=False)
    with pytest.raises(InvalidError, match="has been terminated"):
        sb.exec("true")


def test_calls_at_once_on_a_paused_sandbox_resume_it_once(daemon):
    sb = _persistent()
    try:
        assert _run(sb, "sh", "-c", "echo 1 > /root/n")[0] == 0
        sb._experimental_pause()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: _run(sb, "cat", "/root/n"), range(4)))
        assert results == [(0, "1\n")] * 4
        assert shoal.Sandbox.from_id(sb.object_id)._info["persistent"]["sessions"] == 2
    finally:
        sb.terminate()


def test_persistent_sandboxes_take_modal_arguments_and_refuse_what_modal_refuses(daemon):
    with pytest.raises(InvalidError, match="require `timeout=None`"):
        shoal.Sandbox.create(app=_app(), _experimental_persistent=True)
    with pytest.raises(InvalidError, match="require `timeout=None`"):
        shoal.Sandbox.create(app=_app(), timeout=None, idle_timeout=60, _experimental_persistent=True)
    with pytest.raises(InvalidError, match="only supported for experimental persistent"):
        shoal.Sandbox.create(app=_app(), timeout=None)
    with pytest.raises(InvalidError, match="Named persistent"):
        _persistent(name="p1")
    with pytest.raises(InvalidError, match="tags"):
        _persistent(tags={"a": "b"})
    sb = _persistent()
    try:
        assert sb._info["timeout"] == 3600 and sb._info["idle_timeout"] == 300  # each session's, as modal 1.6
        with pytest.raises(NotImplementedError, match="Tags"):
            sb.set_tags({"a": "b"})
        with pytest.raises(NotImplementedError, match="Memory snapshots"):
            sb._experimental_snapshot()
        with pytest.raises(NotImplementedError, match="network access"):
            sb._experimental_set_outbound_network_policy(outbound_cidr_allowlist=[])
    finally:
        sb.terminate()


def _images(d) -> set[str]:
    res = subprocess.run(
        [sys.executable, "-m", "shoal", "image", "ls", "--json"],
        env=d.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return {i["image_id"] for i in json.loads(res.stdout)}


def test_a_paused_persistent_sandbox_survives_a_daemon_restart(own_daemon):
    sb = _persistent()
    try:
        assert _run(sb, "sh", "-c", "echo one > /root/a")[0] == 0
        sb._experimental_pause()
        image = shoal.Sandbox.from_id(sb.object_id)._info["persistent"]["exit_image"]
        res = subprocess.run(
            [sys.executable, "-m", "shoal", "image", "rm", image],
            env=own_daemon.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        assert res.returncode != 0 and b"persistent sandbox" in res.stderr

        # Its record (definition, environment) is root's alone.
        assert (own_daemon.data_dir / "persistent").stat().st_mode & 0o777 == 0o700
        own_daemon.restart(signal.SIGKILL)
        assert sb.poll() is None
        assert _run(sb, "sh", "-c", "cat /root/a; echo two >> /root/a") == (0, "one\n")

        # Killed while a session runs: the session is taken back, and pausing it keeps its files.
        own_daemon.restart(signal.SIGKILL)
        sb._experimental_pause()
        assert _run(sb, "cat", "/root/a") == (0, "one\ntwo\n")
        sb._experimental_pause()
        image = shoal.Sandbox.from_id(sb.object_id)._info["persistent"]["exit_image"]
        assert image in _images(own_daemon)
    finally:
        sb.terminate()
    assert image not in _images(own_daemon)  # terminated for good: its files go
    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_id("sb-" + "0" * 22)


def test_a_session_whose_entrypoint_ends_is_paused_and_the_next_runs_it_again(daemon):
    sb = shoal.Sandbox.create(
        "sh", "-c", "echo run >> /root/runs; sleep 2", app=_app(), timeout=None, _experimental_persistent=True
    )

    def paused() -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = shoal.Sandbox.from_id(sb.object_id)._info
            if info["persistent"]["session_id"] is None:
                return info
            time.sleep(0.1)
        raise AssertionError("the session did not end with its entrypoint")

    try:
        first = paused()
        assert first["state"] == "running" and sb.poll() is None  # the persistent sandbox goes on
        sb._experimental_resume()
        second = paused()
        assert second["persistent"]["sessions"] == 2
        assert second["persistent"]["exit_image"] != first["persistent"]["exit_image"]
        rc, out = _run(sb, "sh", "-c", "sleep 0.3; cat /root/runs")  # a third session (its entrypoint ran too)
        assert (rc, out) == (0, "run\nrun\nrun\n")
    finally:
        sb.terminate()


def test_the_end_of_app_run_terminates_its_persistent_sandboxes(daemon):
    app = shoal.App("persistent-ephemeral")
    with app.run():
        sb = shoal.Sandbox.create(app=app, timeout=None, _experimental_persistent=True)
        assert _run(sb, "true")[0] == 0
        sb._experimental_pause()
    assert sb.poll() == 137  # paused or not, it does not outlive its app


def test_a_session_that_died_while_the_daemon_was_away_keeps_its_files(own_daemon):
    sb = _persistent()
    try:
        assert _run(sb, "sh", "-c", "echo kept > /root/f")[0] == 0
        own_daemon.stop(signal.SIGKILL)
        runtime = "runsc" if DEFAULT_RUNTIME == "gvisor" else "runc"
        root = own_daemon.runtime_dir / "oci" / runtime
        subprocess.run([runtime, "--root", str(root), "kill", sb.object_id, "KILL"], check=True, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # (gVisor's sandbox outlives its init for a moment)
            res = subprocess.run([runtime, "--root", str(root), "state", sb.object_id], capture_output=True, timeout=30)
            if res.returncode != 0 or json.loads(res.stdout)["status"] != "running":
                break
            time.sleep(0.1)
        own_daemon.start()
        assert sb.poll() is None
        assert _run(sb, "cat", "/root/f") == (0, "kept\n")
        assert shoal.Sandbox.from_id(sb.object_id)._info["persistent"]["sessions"] == 2
    finally:
        sb.terminate()


def test_a_daemon_killed_while_a_session_ends_keeps_its_files(own_daemon):
    sb = _persistent()
    try:
        # Enough files that copying them outlasts the moment the daemon is killed.
        script = "import os\nos.makedirs('/root/many')\nfor i in range(20000): open(f'/root/many/{i}', 'w').close()"
        assert _run(sb, "python3", "-c", script)[0] == 0
        start = own_daemon.log.stat().st_size

        def pause() -> None:
            with contextlib.suppress(Exception):  # its daemon is killed under it
                sb._experimental_pause()

        pauser = threading.Thread(target=pause, daemon=True)
        pauser.start()
        deadline = time.monotonic() + 60
        while b"keeping its files" not in own_daemon.log.read_bytes()[start:]:
            assert time.monotonic() < deadline, "the session did not start to end"
            time.sleep(0.005)
        own_daemon.stop(signal.SIGKILL)
        own_daemon.start()
        assert b"taken after a restart" in own_daemon.log.read_bytes()[start:]
        pauser.join(60)  # (its client retries the pause on the new daemon: let that be done first)
        assert not pauser.is_alive()
        assert _run(sb, "sh", "-c", "ls /root/many | wc -l") == (0, "20000\n")
    finally:
        sb.terminate()


def test_stdin_goes_to_the_current_session(daemon):
    sb = shoal.Sandbox.create(
        "sh",
        "-c",
        "while read l; do echo $l >> /root/in; done",
        app=_app(),
        timeout=None,
        _experimental_persistent=True,
    )

    def lines(n: int) -> str:
        deadline = time.monotonic() + 30
        while True:
            out = _run(sb, "sh", "-c", "cat /root/in 2>/dev/null")[1]
            if out.count("\n") >= n or time.monotonic() > deadline:
                return out
            time.sleep(0.1)

    try:
        sb.stdin.write("a\n")
        sb.stdin.drain()
        assert lines(1) == "a\n"
        sb._experimental_pause()
        # Each session's stdin starts anew; the writer goes on in the one that runs (the write starts it).
        sb.stdin.write("b\n")
        sb.stdin.drain()
        assert lines(2) == "a\nb\n"
    finally:
        sb.terminate()
