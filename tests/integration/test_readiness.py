"""Readiness probes: ``Sandbox.create(readiness_probe=Probe...)`` and ``sb.wait_until_ready()``."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import shoal
from shoal.exception import ConflictError, InvalidError
from shoal.exception import TimeoutError as ModalTimeoutError

SERVER = "import http.server as h; h.HTTPServer(('127.0.0.1', 8000), h.SimpleHTTPRequestHandler).serve_forever()"
FETCH = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').status)"


def test_tcp_probe_waits_for_the_server_to_listen(app):
    sb = shoal.Sandbox.create(
        "bash", "-c", f"sleep 1.5; exec python3 -c {SERVER!r}", app=app, readiness_probe=shoal.Probe.with_tcp(8000)
    )
    try:
        started = time.monotonic()
        sb.wait_until_ready(timeout=60)
        assert time.monotonic() - started >= 1.0  # not before the server could listen
        # Ready means a client in the sandbox is served at once.
        p = sb.exec("python3", "-c", FETCH)
        assert p.stdout.read() == "200\n" and p.wait() == 0
        started = time.monotonic()
        sb.wait_until_ready(timeout=5)  # ready stays ready
        assert time.monotonic() - started < 2
    finally:
        sb.terminate()


def test_exec_probe_becomes_ready_when_its_command_succeeds(app):
    sb = shoal.Sandbox.create(app=app, readiness_probe=shoal.Probe.with_exec("test", "-f", "/tmp/ready"))
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            shoal.Sandbox.from_id(sb.object_id).wait_until_ready(timeout=60)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    try:
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(1.5)
        assert waiter.is_alive() and not outcome  # the file is not there: not ready
        sb.exec("touch", "/tmp/ready").wait()
        waiter.join(20)
        assert outcome == [None]
    finally:
        sb.terminate()


def test_not_ready_in_time_is_a_timeout_error(app):
    sb = shoal.Sandbox.create(app=app, readiness_probe=shoal.Probe.with_tcp(8000, interval_ms=50))
    try:
        started = time.monotonic()
        with pytest.raises(ModalTimeoutError, match="did not become ready within 1"):
            sb.wait_until_ready(timeout=1)
        assert 0.9 <= time.monotonic() - started < 10
        # The failed probes leave nothing running in the sandbox.
        ps = sb.exec("bash", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout.read()
        assert "probe" not in ps
    finally:
        sb.terminate()


def test_ready_async(app):
    async def main() -> None:
        sb = await shoal.Sandbox.create.aio(
            "bash", "-c", f"exec python3 -c {SERVER!r}", app=app, readiness_probe=shoal.Probe.with_tcp(8000)
        )
        try:
            await sb.wait_until_ready.aio(timeout=60)
            p = await sb.exec.aio("python3", "-c", FETCH)
            assert await p.stdout.read.aio() == "200\n"
        finally:
            await sb.terminate.aio()

    asyncio.run(main())


def test_errors(app):
    sb = shoal.Sandbox.create(app=app)
    try:
        with pytest.raises(InvalidError, match="no readiness probe"):
            sb.wait_until_ready(timeout=5)
    finally:
        sb.terminate()
    sb = shoal.Sandbox.create(app=app, readiness_probe=shoal.Probe.with_exec("false"))
    with pytest.raises(InvalidError, match="timeout"):
        sb.wait_until_ready(timeout=0)
    sb.terminate(wait=True)
    with pytest.raises(ConflictError, match="finished"):
        sb.wait_until_ready(timeout=5)


def test_a_sandbox_that_ends_while_waiting_is_a_conflict(app):
    sb = shoal.Sandbox.create("sleep", "1", app=app, readiness_probe=shoal.Probe.with_exec("false"))
    with pytest.raises(ConflictError, match="finished"):
        sb.wait_until_ready(timeout=30)


@pytest.mark.parametrize(
    "make",
    [
        lambda: shoal.Probe.with_tcp(0),
        lambda: shoal.Probe.with_tcp(65536),
        lambda: shoal.Probe.with_tcp("80"),
        lambda: shoal.Probe.with_tcp(80, interval_ms=0),
        lambda: shoal.Probe.with_exec(),
        lambda: shoal.Probe.with_exec("true", interval_ms=1.5),
        lambda: shoal.Probe.with_exec("true", 3),
    ],
    ids=["port-0", "port-65536", "port-str", "interval-0", "no-argv", "interval-float", "argv-int"],
)
def test_bad_probes_are_invalid(make):
    with pytest.raises(InvalidError):
        make()


def test_readiness_probe_must_be_a_probe(app):
    with pytest.raises(InvalidError, match=r"shoal\.Probe"):
        shoal.Sandbox.create(app=app, readiness_probe="tcp:8000")
