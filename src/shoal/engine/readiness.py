"""Readiness probes: ``sb.wait_until_ready()`` runs a sandbox's probe inside it until it first succeeds.

A probe runs only while somebody waits (one at a time per sandbox, however many wait), every ``interval_ms``;
once it has succeeded the sandbox stays ready.  A TCP probe is ``shoal-agent probe tcp PORT`` (a connect to the
sandbox's loopback, so it works in images without any tools); an exec probe is the user's command.  Both run as
unrecorded processes with their output discarded, like file operations.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from shoal.engine.process import SIGKILL, Process
from shoal.engine.sandbox import RUNNING, Sandbox
from shoal.exception import ConflictError, InvalidError
from shoal.runtime.spec import AGENT_PATH
from shoal.wire.sandboxes import ExecRequest, ReadinessProbe

if TYPE_CHECKING:
    from shoal.engine.manager import Manager

PROBE_TIMEOUT = 10
"""Seconds one run of an exec probe may take before it counts as a failure."""

_cleanups: set[asyncio.Task[None]] = set()


async def wait_ready(mgr: Manager, sb: Sandbox, timeout: float) -> bool:
    """Whether the sandbox is ready, waiting up to ``timeout`` seconds for its probe to succeed."""
    probe = sb.spec.request.readiness_probe
    if probe is None:
        raise InvalidError(
            f"Sandbox {sb.id} has no readiness probe: create it with"
            " readiness_probe=shoal.Probe.with_tcp(port) or shoal.Probe.with_exec(*argv)"
        )
    if sb.ready:
        return True
    _check_running(sb)
    try:
        async with asyncio.timeout(timeout):
            async with sb.probe_lock:
                while not sb.ready:
                    _check_running(sb)
                    if await _probe_once(mgr, sb, probe):
                        sb.ready = True
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(sb.finished.wait(), probe.interval_ms / 1000)
    except TimeoutError:
        pass
    return sb.ready


def _check_running(sb: Sandbox) -> None:
    if sb.state != RUNNING:
        raise ConflictError(f"Sandbox {sb.id} has already finished: it cannot become ready")


async def _probe_once(mgr: Manager, sb: Sandbox, probe: ReadinessProbe) -> bool:
    if probe.tcp_port is not None:
        args = [AGENT_PATH, "probe", "tcp", str(probe.tcp_port)]
    else:
        args = list(probe.exec_argv or [])
    req = ExecRequest(args=args, timeout=PROBE_TIMEOUT, stdout="devnull", stderr="devnull")
    proc = await mgr.exec(sb.id, req, persist=False)
    try:
        await proc.wait(None)
    finally:
        _clean_up(sb, proc)
    return proc.returncode == 0


def _clean_up(sb: Sandbox, proc: Process) -> None:
    """Kill the probe if it still runs (its waiter gave up) and forget it once it has ended."""

    async def forget() -> None:
        if not proc.exited:
            sb.signal(proc.id, SIGKILL)
            await proc.wait(PROBE_TIMEOUT)
        for stream in proc.streams:
            while not stream.eof and sb.state == RUNNING:
                await stream.wait(stream.size, 1.0)
        sb.forget(proc.id)

    task = asyncio.create_task(forget())
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)
