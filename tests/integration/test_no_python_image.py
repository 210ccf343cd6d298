"""The agent brings everything it needs: sandboxes work in an image with no Python and no libc (busybox-static)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import shoal
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client

BUSYBOX = Path("/bin/busybox")


@pytest.fixture(scope="module")
def busybox_image(daemon, tmp_path_factory) -> shoal.Image:
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("busybox-root")
    (root / "bin").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "echo", "cat", "ls", "ps", "sleep", "id", "wc", "kill", "nc"):
        os.symlink("busybox", root / "bin" / applet)
    for d in ("tmp", "proc", "sys", "dev", "etc"):
        (root / d).mkdir()
    resp = run_blocking(default_client().request("POST", "/v1/images/import", json_body={"path": str(root)}))
    return shoal.Image.from_id(resp["image_id"])


def test_exec_stdin_and_exit_codes_without_python(app, busybox_image):
    sb = shoal.Sandbox.create(app=app, image=busybox_image, timeout=60)
    try:
        assert sb.exec("sh", "-c", "test -e /usr/bin/python3 || echo no-python").stdout.read() == "no-python\n"
        assert sb.exec("sh", "-c", "exit 9").wait() == 9
        assert sb.exec("sh", "-c", "kill -TERM $$").wait() == 128 + 15
        p = sb.exec("cat")
        p.stdin.write(b"\x00\xff binary")
        p.stdin.write_eof()
        p.stdin.drain()
        assert p.stdout.read() == "\x00\ufffd binary"
        # PID 1 is shoal's static agent; ps sees only this sandbox.
        ps = sb.exec("ps", "-o", "pid,comm").stdout.read()
        assert "1 shoal-agent" in ps.replace("  ", " ")
        assert sb.exec("id", "-u").stdout.read() == "0\n"
    finally:
        sb.terminate()


def test_entrypoint_in_an_image_without_a_default_command(app, busybox_image):
    sb = shoal.Sandbox.create("sh", "-c", "echo from-busybox; exit 4", app=app, image=busybox_image, timeout=60)
    assert sb.stdout.read() == "from-busybox\n"
    sb.wait()
    assert sb.returncode == 4


def test_no_command_and_no_image_command_keeps_the_sandbox_up(app, busybox_image):
    sb = shoal.Sandbox.create(app=app, image=busybox_image, timeout=60)
    try:
        assert sb.poll() is None
        assert sb.exec("echo", "alive").stdout.read() == "alive\n"
    finally:
        sb.terminate()
    assert sb.poll() == 137


def test_entrypoint_streams_of_a_sandbox_without_one_end_with_it(app, busybox_image):
    sb = shoal.Sandbox.create(app=app, image=busybox_image, timeout=60)
    sb.terminate()
    assert sb.stdout.read() == ""
    assert sb.stderr.read() == ""


def test_tcp_readiness_probe_without_any_tools(app, busybox_image):
    # The TCP probe is the agent's own connect: it needs nothing from the image.
    sb = shoal.Sandbox.create(
        "sh", "-c", "sleep 1; nc -l -p 8000", app=app, image=busybox_image, readiness_probe=shoal.Probe.with_tcp(8000)
    )
    try:
        sb.wait_until_ready(timeout=30)
        sb.wait(raise_on_termination=False)  # nc exits after the probe's connection: it was really reached
        assert sb.returncode == 0
    finally:
        sb.terminate()
