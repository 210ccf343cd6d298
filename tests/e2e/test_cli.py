"""The ``shoal`` command line, run as a subprocess against the test daemon."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import shoal

BUSYBOX = Path("/bin/busybox")


def shoal_cli(
    daemon, *args: str, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """Run ``shoal ARGS`` against the test daemon; its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args],
        env=daemon.env,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def running_in(app_name: str) -> list[str]:
    """Ids of the running sandboxes of the app called ``app_name``."""
    app = shoal.App.lookup(app_name, create_if_missing=True)
    return [sb.object_id for sb in shoal.Sandbox.list(app_id=app.app_id)]


@contextlib.contextmanager
def started_cli(daemon, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``shoal ARGS`` running in the background, killed (and its pipes closed) on the way out."""
    with subprocess.Popen(
        [sys.executable, "-m", "shoal", *args],
        env=daemon.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def cli_app(daemon) -> Iterator[str]:
    """A fresh app name for ``shoal run --app``; fails the test if a sandbox of it is still running after."""
    name = f"cli-{uuid.uuid4().hex[:8]}"
    yield name
    left = running_in(name)
    for sandbox_id in left:
        shoal.Sandbox.from_id(sandbox_id).terminate()
    assert not left, f"shoal run left sandboxes running: {left}"


@pytest.fixture
def entry_sandboxes(app) -> Iterator[list[shoal.Sandbox]]:
    """Sandboxes a test creates with an entrypoint; all terminated after it."""
    made: list[shoal.Sandbox] = []
    yield made
    for sb in made:
        sb.terminate()


# ------------------------------------------------------------------ run


def test_run_passes_the_exit_code_through(daemon, cli_app):
    r = shoal_cli(daemon, "run", "--app", cli_app, "--", "sh", "-c", "echo hi; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"hi\n"
    r = shoal_cli(daemon, "run", "--app", cli_app, "--", "true")
    assert r.returncode == 0, r.stderr
    # Without "--", the command's own options are still its own.
    r = shoal_cli(daemon, "run", "--app", cli_app, "sh", "-c", "exit 4")
    assert r.returncode == 4, r.stderr


def test_run_shows_build_steps_only_when_something_is_built(daemon, cli_app):
    def steps(r: subprocess.CompletedProcess[bytes]) -> list[str]:
        assert r.returncode == 0, r.stderr
        return [line for line in r.stderr.decode().splitlines() if line.startswith(("✓", "→"))]

    first = steps(shoal_cli(daemon, "run", "-v", "--app", cli_app, "--", "true"))  # builds what is missing
    # The image is built now: a plain run says nothing of it (as Modal says nothing of an image it has).
    assert steps(shoal_cli(daemon, "run", "--app", cli_app, "--", "true")) == []
    # -v lists the steps found in the cache (the default image has one per host CA bundle shoal trusts, if any).
    again = steps(shoal_cli(daemon, "run", "-v", "--app", cli_app, "--", "true"))
    assert len(again) == len(first) and all(line.endswith("(cached)") for line in again), again


def test_run_streams_output_as_it_arrives(daemon, cli_app):
    with started_cli(daemon, "run", "--app", cli_app, "--", "sh", "-c", "echo first; sleep 4; echo second") as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        got_first = time.monotonic()
        assert first == b"first\n"
        assert proc.poll() is None, "the first line only came when the command had ended"
        second = proc.stdout.readline()
        assert second == b"second\n"
        assert time.monotonic() - got_first > 2, "the lines came together, not as printed"
        assert proc.wait(60) == 0


def test_run_keeps_stderr_apart(daemon, cli_app):
    r = shoal_cli(daemon, "run", "--app", cli_app, "--", "sh", "-c", "echo out; echo err >&2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"out\n"
    assert r.stderr.endswith(b"err\n")
    assert b"out" not in r.stderr


def test_run_output_is_binary_safe(daemon, cli_app):
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 300); sys.stdout.flush()"
    r = shoal_cli(daemon, "run", "--app", cli_app, "--", "python3", "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout == bytes(range(256)) * 300


def test_run_timeout_exits_124(daemon, cli_app):
    started = time.monotonic()
    r = shoal_cli(daemon, "run", "--app", cli_app, "--timeout", "2", "--", "sleep", "60")
    assert r.returncode == 124, r.stderr
    assert time.monotonic() - started < 30


def test_run_options_reach_the_command(daemon, cli_app):
    r = shoal_cli(
        daemon,
        "run",
        "--app",
        cli_app,
        "--env",
        "GREETING=a=b",
        "--workdir",
        "/tmp",
        "--",
        "sh",
        "-c",
        'echo "$GREETING"; pwd',
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"a=b\n/tmp\n"


def test_run_stdin(daemon, cli_app):
    data = b"hello\x00\xffworld\n" * 1000
    r = shoal_cli(daemon, "run", "--app", cli_app, "--stdin", "--", "cat", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_run_that_cannot_create_a_sandbox_fails_clearly(daemon, cli_app):
    r = shoal_cli(daemon, "run", "--app", cli_app, "--image-python", "2.7", "--", "true")
    assert r.returncode == 1
    assert b"Python 2.7 is not available" in r.stderr
    assert b"Traceback" not in r.stderr
    r = shoal_cli(daemon, "run", "--app", cli_app, "--image", "im-doesnotexist0000", "--", "true")
    assert r.returncode == 1
    assert b"im-doesnotexist0000" in r.stderr
    assert b"Traceback" not in r.stderr


def test_run_terminates_its_sandbox_on_ctrl_c(daemon, cli_app):
    with started_cli(daemon, "run", "--app", cli_app, "--", "sh", "-c", "echo ready; sleep 100") as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        (sandbox_id,) = running_in(cli_app)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    assert shoal.Sandbox.from_id(sandbox_id).poll() == 137


# ------------------------------------------------------------------ sandbox


def test_sandbox_ls_shows_an_sdk_sandbox(daemon, sandbox):
    sandbox.set_tags({"owner": "cli-test"})
    r = shoal_cli(daemon, "sandbox", "ls")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.decode().splitlines() if sandbox.object_id in ln)
    assert "running" in line
    assert "owner=cli-test" in line

    r = shoal_cli(daemon, "sandbox", "ls", "--json")
    assert r.returncode == 0, r.stderr
    items = {item["sandbox_id"]: item for item in json.loads(r.stdout)}
    assert items[sandbox.object_id]["state"] == "running"
    assert items[sandbox.object_id]["tags"] == {"owner": "cli-test"}

    r = shoal_cli(daemon, "sandbox", "ls", "--json", "--app-id", "ap-nosuchapp")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_sandbox_ls_all_includes_finished(daemon, app):
    sb = shoal.Sandbox.create(app=app, timeout=60)
    sb.terminate(wait=True)
    running = json.loads(shoal_cli(daemon, "sandbox", "ls", "--json").stdout)
    assert sb.object_id not in {i["sandbox_id"] for i in running}
    everything = json.loads(shoal_cli(daemon, "sandbox", "ls", "--all", "--json").stdout)
    (mine,) = [i for i in everything if i["sandbox_id"] == sb.object_id]
    assert mine["state"] == "finished"
    assert mine["returncode"] == 137


def test_sandbox_exec(daemon, sandbox):
    sandbox.exec("sh", "-c", "echo kept > /tmp/state").wait()
    r = shoal_cli(daemon, "sandbox", "exec", sandbox.object_id, "--", "sh", "-c", "cat /tmp/state; echo e >&2; exit 5")
    assert r.returncode == 5, r.stderr
    assert r.stdout == b"kept\n"
    assert r.stderr == b"e\n"
    r = shoal_cli(
        daemon, "sandbox", "exec", "--workdir", "/tmp", "--env", "X=y", sandbox.object_id, "sh", "-c", "pwd; echo $X"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"/tmp\ny\n"


def test_sandbox_exec_into_a_finished_sandbox_fails_clearly(daemon, app):
    sb = shoal.Sandbox.create(app=app, timeout=60)
    sb.terminate(wait=True)
    r = shoal_cli(daemon, "sandbox", "exec", sb.object_id, "--", "true")
    assert r.returncode == 1
    assert b"Traceback" not in r.stderr
    assert b"Error" in r.stderr


def test_sandbox_logs_of_a_running_entrypoint(daemon, app, entry_sandboxes):
    sb = shoal.Sandbox.create("sh", "-c", "echo out1; echo err1 >&2; sleep 100", app=app, timeout=120)
    entry_sandboxes.append(sb)
    assert next(iter(sb.stdout)) == "out1\n"
    started = time.monotonic()
    r = shoal_cli(daemon, "sandbox", "logs", sb.object_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"out1\n"
    assert r.stderr == b"err1\n"
    assert time.monotonic() - started < 20, "logs without --follow waited for the entrypoint to end"
    assert sb.poll() is None


def test_sandbox_logs_of_a_finished_entrypoint_and_follow(daemon, app, entry_sandboxes):
    sb = shoal.Sandbox.create("sh", "-c", "echo a; sleep 3; echo b", app=app, timeout=120)
    entry_sandboxes.append(sb)
    r = shoal_cli(daemon, "sandbox", "logs", "--follow", sb.object_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"a\nb\n"
    sb.wait()
    r = shoal_cli(daemon, "sandbox", "logs", sb.object_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"a\nb\n"


def test_sandbox_logs_of_a_quiet_sandbox_and_errors(daemon, sandbox):
    started = time.monotonic()
    r = shoal_cli(daemon, "sandbox", "logs", sandbox.object_id)
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == (b"", b"")
    assert time.monotonic() - started < 20
    r = shoal_cli(daemon, "sandbox", "logs", "sb-nosuchsandbox000")
    assert r.returncode == 1
    assert b"not found" in r.stderr
    assert b"Traceback" not in r.stderr


def test_sandbox_terminate(daemon, app):
    sb = shoal.Sandbox.create(app=app, timeout=120)
    try:
        r = shoal_cli(daemon, "sandbox", "terminate", sb.object_id)
        assert r.returncode == 0, r.stderr
        assert shoal.Sandbox.from_id(sb.object_id).poll() == 137
        assert b"137" in r.stdout
    finally:
        sb.terminate()
    r = shoal_cli(daemon, "sandbox", "terminate", "sb-nosuchsandbox000")
    assert r.returncode == 1
    assert b"not found" in r.stderr


# ------------------------------------------------------------------ status


def test_status(daemon, sandbox):
    r = shoal_cli(daemon, "status", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["version"] == shoal.__version__
    assert info["pid"] == daemon.proc.pid
    assert info["socket"] == str(daemon.socket)
    assert info["data_dir"] == str(daemon.data_dir)
    assert info["runtime"] in ("runc", "crun")
    assert info["sandboxes_running"] >= 1
    assert isinstance(info["images"], list)

    r = shoal_cli(daemon, "status")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert f"pid {daemon.proc.pid}" in text
    assert str(daemon.socket) in text
    # Read by a script (a pipe here): plain lines, no colour codes, no padding after the last column.
    assert "\x1b" not in text
    assert [line for line in text.splitlines() if line != line.rstrip()] == []


def test_listings_are_plain_text_in_a_pipe(daemon, sandbox):
    for args in (["sandbox", "ls"], ["image", "ls"]):
        r = shoal_cli(daemon, *args)
        assert r.returncode == 0, r.stderr
        text = r.stdout.decode()
        assert text.strip(), args
        assert "\x1b" not in text
        assert [line for line in text.splitlines() if line != line.rstrip()] == [], args


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["sandbox", "ls"],
        ["image", "ls"],
        ["run", "--", "true"],
        ["sandbox", "exec", "sb-nosuchsandbox000", "--", "true"],
        ["sandbox", "logs", "sb-nosuchsandbox000"],
        ["sandbox", "terminate", "sb-nosuchsandbox000"],
    ],
)
def test_without_a_daemon_commands_fail_at_once(daemon, tmp_path, args):
    env = dict(daemon.env, SHOAL_RUNTIME_DIR=str(tmp_path))
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "shoal", *args], env=env, capture_output=True, timeout=60)
    assert r.returncode == 1
    assert b"not running" in r.stderr
    assert b"Traceback" not in r.stderr
    assert time.monotonic() - started < 10
    assert not (tmp_path / "shoald.sock").exists(), "a daemon was started"


# ------------------------------------------------------------------ image


def _busybox_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    for d in ("tmp", "proc", "dev", "sys", "etc"):
        (root / d).mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for tool in ("sh", "echo", "cat", "ls", "test", "sleep"):
        os.symlink("busybox", root / "bin" / tool)
    return root


@pytest.mark.skipif(not BUSYBOX.exists(), reason="needs busybox-static (/bin/busybox)")
def test_image_import_and_ls(daemon, app, tmp_path):
    rootfs = _busybox_rootfs(tmp_path / "rootfs")
    r = shoal_cli(daemon, "image", "import", str(rootfs), "--cmd", "sh -c 'echo from-cmd'")
    assert r.returncode == 0, r.stderr
    image_id = r.stdout.decode().strip()
    assert image_id.startswith("im-")

    listed = json.loads(shoal_cli(daemon, "image", "ls", "--json").stdout)
    assert image_id in {i["image_id"] for i in listed}
    r = shoal_cli(daemon, "image", "ls")
    assert r.returncode == 0, r.stderr
    assert image_id in r.stdout.decode()

    sb = shoal.Sandbox.create("sleep", "60", app=app, image=shoal.Image.from_id(image_id), timeout=60)
    try:
        p = sb.exec("sh", "-c", "echo hi")
        assert p.stdout.read() == "hi\n"
        assert p.wait() == 0
        p = sb.exec("sh", "-c", "test -e /usr/bin/python3 || test -e /usr/local/bin/python3 || echo no-python")
        assert p.stdout.read() == "no-python\n"
    finally:
        sb.terminate()

    entry = shoal.Sandbox.create(app=app, image=shoal.Image.from_id(image_id), timeout=60)
    try:
        entry.wait()
        assert entry.stdout.read() == "from-cmd\n"
    finally:
        entry.terminate()
    r = shoal_cli(daemon, "sandbox", "logs", entry.object_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"from-cmd\n"

    # Without a command the image gives its sandboxes no entrypoint: their logs are empty, not an error.
    r = shoal_cli(daemon, "image", "import", str(rootfs))
    assert r.returncode == 0, r.stderr
    bare = shoal.Sandbox.create(app=app, image=shoal.Image.from_id(r.stdout.decode().strip()), timeout=60)
    try:
        r = shoal_cli(daemon, "sandbox", "logs", bare.object_id)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"" and r.stderr == b""
    finally:
        bare.terminate()


def test_image_import_of_a_missing_dir_fails(daemon, tmp_path):
    r = shoal_cli(daemon, "image", "import", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert b"does not exist" in r.stderr
