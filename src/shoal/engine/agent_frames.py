"""The daemon's side of a sandbox's agent: the frames it sends (process starts, output, exits), the
reconciliation after a (re)connection, and re-adoption of a running sandbox after a daemon restart.

A part of :class:`shoal.engine.sandbox.Sandbox`, kept apart because it is one job: the attributes it uses
are the sandbox's own, declared below for the type checker.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.agent import protocol as P
from shoal.engine.bundle import ctl_dir
from shoal.engine.link import AgentLink
from shoal.engine.logs import LogWriter
from shoal.engine.process import SIGKILL, Process
from shoal.engine.results import result_for_exit
from shoal.exception import ConflictError, ExecutionError
from shoal.runtime import cgroups
from shoal.store.state import ExecRow, SandboxRow
from shoal.wire.sandboxes import Result, SandboxState

if TYPE_CHECKING:
    from shoal.engine.sandbox import Context
    from shoal.runtime.base import ContainerRuntime

log = logging.getLogger("shoal.engine.sandbox")

FROZEN_PROBE = 3.0
"""Seconds an adopted sandbox that may be paused has for its agent to reconnect before it is taken for paused."""
MAX_LISTED = 100_000
"""Most processes an agent may list when it (re)connects."""
RUNNING = SandboxState.RUNNING


class AgentFrames:
    """Agent frames and re-adoption, for :class:`~shoal.engine.sandbox.Sandbox`."""

    id: str
    ctx: Context
    row: SandboxRow
    state: SandboxState
    run_dir: Path
    processes: dict[str, Process]
    link: AgentLink | None
    connected: asyncio.Event
    logs: LogWriter
    _hello_remaining: int
    _hello_seen: set[str]
    _listener: asyncio.Server | None
    agent_on_stdin = False
    """Whether the agent's connection is the socket it was started (or restored) with, its standard input — not one
    it made after a daemon restart: gVisor can checkpoint only the former."""
    _suspended: asyncio.Event | None = None
    agent_version = 0
    """The agent's protocol version (from its HELLO)."""
    parked = False
    """Between a parking SUSPEND and the agent's reconnection: its connection's end is expected, and frames sent
    meanwhile are kept by that (closed) link for the next one."""
    _parked_execs: set[str]
    """Processes started while parked: the agent lists them in no HELLO (their EXEC is still kept)."""
    _unparking = False
    """Between the reconnection after parking and the end of its HELLO's list."""
    _relinked: asyncio.Event | None = None

    @property
    def container_id(self) -> str:
        """The OCI container id."""
        return self.id

    @property
    def runtime(self) -> ContainerRuntime:
        """The runtime that runs its container (runc's, or runsc under gVisor)."""
        return self.ctx.runtimes.get(self.row.spec.runtime) or self.ctx.runtime

    @property
    def cgroup_path(self) -> str:
        raise NotImplementedError

    def touch(self) -> None:
        raise NotImplementedError

    def finish_soon(self, result: Result) -> None:
        raise NotImplementedError

    def _release(self, proc: Process) -> None:
        raise NotImplementedError

    def _process_from_row(self, row: ExecRow) -> Process:
        raise NotImplementedError

    def _arm_timers(self) -> None:
        raise NotImplementedError

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        raise NotImplementedError

    def _on_frames(self, link: AgentLink, frames: list[P.Frame]) -> None:
        if not link.verified:
            self._verify(link, frames[0])
            frames = frames[1:]
            if not link.verified:
                return
        acks: dict[tuple[str, int], Process] = {}
        for f in frames:
            proc = self.processes.get(f.exec_id) if f.exec_id else None
            if f.msg == P.Msg.HELLO:
                # The agent lists the processes it tracks in the next `value` STARTED frames.
                self._hello_remaining = max(0, min(f.value, MAX_LISTED))
                self.agent_version = f.version
                self._hello_seen.clear()
                if self._hello_remaining == 0:
                    self._reconcile()
            elif f.msg == P.Msg.STARTED and self._hello_remaining > 0:
                self._hello_remaining -= 1
                if proc is not None:
                    proc.pid = f.pid
                    proc.unacknowledged_exec = None
                    # Back from parking, STDIN frames kept meanwhile follow: what the daemon counted stands.
                    proc.stdin_acked = f.offset
                    proc.stdin_offset = max(proc.stdin_offset, f.offset) if self._unparking else f.offset
                    self._hello_seen.add(proc.id)
                else:
                    # Unrecorded (an attached file operation whose request ended with the old daemon): nobody
                    # will ever read it or close its stdin.
                    link.send(P.signal_frame(f.exec_id, SIGKILL))
                if self._hello_remaining == 0:
                    self._reconcile()
            elif f.msg == P.Msg.SUSPENDED:
                if self._suspended is not None:
                    self._suspended.set()
            elif proc is None:
                # Not (or no longer) tracked: an unrecorded process from before a restart, or one already
                # forgotten.  Acknowledge so the agent can let go of it; keep nothing.
                if f.msg == P.Msg.EXIT:
                    link.send(P.exit_ack_frame(f.exec_id))
                elif f.msg in (P.Msg.OUTPUT, P.Msg.EOF):
                    end = f.offset + len(f.data)
                    link.send(P.ack_frame(f.exec_id, f.fd, end, f.msg == P.Msg.EOF))
            elif f.msg == P.Msg.STARTED:
                proc.pid = f.pid
                proc.unacknowledged_exec = None
            elif f.msg == P.Msg.OUTPUT:
                stream = proc.streams[f.fd - 1]
                before = stream.received
                if not stream.append(f.offset, f.data):
                    log.warning("sandbox %s: output gap from agent; dropping connection", self.id)
                    link.close()
                    return
                if proc.is_entrypoint and proc.persist:
                    self.logs.output(f.fd, before, stream.received - before)
                acks[(proc.id, f.fd)] = proc
            elif f.msg == P.Msg.EOF:
                stream = proc.streams[f.fd - 1]
                if f.offset == stream.received:
                    stream.mark_eof()
                    if proc.persist:
                        self.ctx.state.set_eof(self.id, proc.id, proc.eof_mask)
                acks[(proc.id, f.fd)] = proc
                self._release(proc)
            elif f.msg == P.Msg.EXIT:
                self._on_exit(proc, f.kind, f.value)
                link.send(P.exit_ack_frame(proc.id))
                self._release(proc)
            elif f.msg == P.Msg.STDIN_ACK:
                proc.stdin_acknowledged(f.offset)
        for (exec_id, fd), proc in acks.items():
            stream = proc.streams[fd - 1]
            link.send(P.ack_frame(exec_id, fd, stream.received, stream.eof))

    def _verify(self, link: AgentLink, first: P.Frame) -> None:
        if first.msg != P.Msg.HELLO or not hmac.compare_digest(first.token, self.row.token):
            log.warning("sandbox %s: refusing a control connection without the agent's token", self.id)
            link.close()
            return
        link.verified = True
        self.agent_on_stdin = False
        old, self.link = self.link, link
        kept: list[bytes] = []
        if old is not None and old is not link:
            if self.parked:
                kept = old.take_held()
            old.close()
        self._close_listener()
        unparked, self.parked = self.parked, False
        self._unparking = unparked
        log.info("sandbox %s: agent reconnected%s", self.id, " after a memory snapshot" if unparked else "")
        self._on_frames(link, [first])
        for data in kept:
            link.send(data)
        if self._relinked is not None:
            self._relinked.set()

    def _reconcile(self) -> None:
        """After a (re)connection: processes the agent does not know ended unseen."""
        started_parked = self._parked_execs if self._unparking else set()
        self._unparking = False
        self._parked_execs = set()
        for proc in list(self.processes.values()):
            if proc.id in started_parked:
                continue
            if not proc.exited and proc.id not in self._hello_seen and not proc.placeholder:
                frame = proc.unacknowledged_exec
                if frame is not None and self.link is not None:
                    # The agent lists every process it knows until its end is acknowledged: it never got this one
                    # (the connection that carried its EXEC broke first).  Start it now.
                    log.info("sandbox %s: sending process %s to the agent again (it never got it)", self.id, proc.id)
                    self.link.send(frame)
                    proc.stdin_offset = proc.stdin_acked = 0  # nor any of its stdin
                    continue
                log.warning("sandbox %s: process %s was lost while the daemon was away", self.id, proc.id)
                self._on_exit(proc, P.ExitKind.SIGNAL, SIGKILL)
                proc.end_streams()
                self.ctx.state.set_eof(self.id, proc.id, proc.eof_mask)
        self.connected.set()

    def _on_exit(self, proc: Process, kind: int, value: int) -> None:
        if kind not in {k.value for k in P.ExitKind} or not -(1 << 31) <= value < (1 << 31):
            kind, value = P.ExitKind.CODE, 255
        if not proc.set_exit(kind, value):
            return
        if proc.persist:
            self.ctx.state.finish_exec(self.id, proc.id, kind, value)
        self.touch()
        if proc.is_entrypoint and self.state == RUNNING:
            self.finish_soon(result_for_exit(kind, value))

    def _on_link_closed(self, link: AgentLink) -> None:
        if link is not self.link:
            return
        if self.parked:
            return  # the agent closed it for a memory snapshot and reconnects after (``resume_agent``)
        self.link = None
        self.connected.clear()
        if self.state == RUNNING:
            # The agent is PID 1: its connection only ends when the sandbox dies.
            self.finish_soon(Result(status="terminated", message=self._death_message()))

    def _death_message(self) -> str:
        """Why the sandbox died under the daemon, as far as the host can tell (its cgroup is still there)."""
        if cgroups.memory_events(self.cgroup_path).get("oom_kill", 0) > 0:
            spec = self.row.spec
            whole = " (under gVisor the whole sandbox ends when it does)" if spec.runtime == "gvisor" else ""
            return (
                f"the sandbox ran out of memory{whole} and its init process died: "
                "give it more with Sandbox.create(memory=...)"
            )
        return "the sandbox stopped unexpectedly (its init process died)"

    @property
    def can_park(self) -> bool:
        """Whether the agent can close its connection for a checkpoint and come back (``suspend_agent(park=True)``)."""
        return self.agent_version >= P.PARK_VERSION

    async def suspend_agent(self, timeout: float, *, park: bool = False) -> None:
        """Have the agent finish the frame it is sending and then send nothing until ``resume_agent``: a
        checkpoint taken meanwhile holds no frame half sent (a memory snapshot).

        ``park``: its connection is one gVisor cannot checkpoint (made after a daemon restart), so the agent also
        closes it; ``resume_agent`` ends this, and what is sent meanwhile goes to its next connection."""
        link = self.link
        if link is None or self.parked:
            raise ConflictError(f"sandbox {self.id}'s agent is not connected")
        self._suspended = asyncio.Event()
        if park:
            self.parked = True
            self._parked_execs = set()
        link.send(P.suspend_frame(park=park))
        link.hold()
        try:
            await asyncio.wait_for(self._suspended.wait(), timeout)
            if park:
                await asyncio.wait_for(link.closed.wait(), timeout)
        except TimeoutError:
            await self.resume_agent()
            raise ExecutionError(f"sandbox {self.id}'s agent did not pause its output within {timeout:g} s") from None

    async def resume_agent(self) -> None:
        """End ``suspend_agent``: a parked agent is let reconnect, and waited for (the sandbox must be running)."""
        self._suspended = None
        if self.parked:
            await self._unpark()
        elif self.link is not None:
            self.link.release(P.resume_frame(restored=False))

    async def _unpark(self) -> None:
        """Listen for the parked agent and wait until it is back (a next snapshot must find it connected)."""
        link = self.link
        if link is not None and not link.closed.is_set():
            link.close_quietly()  # it did not park (it timed out): drop it, and its agent reconnects
        relinked = self._relinked = asyncio.Event()
        await self._listen()
        try:
            await asyncio.wait_for(relinked.wait(), self.ctx.cfg.agent_connect_timeout)
        except TimeoutError:
            if self.state == RUNNING and self.parked:
                self.parked = False
                self.link = None
                self.connected.clear()
                self.finish_soon(
                    Result(status="terminated", message="the sandbox's agent did not come back after a snapshot")
                )
        finally:
            self._relinked = None

    def load_processes(self) -> None:
        """Rebuild the records of processes still running or with output to come (after a daemon restart)."""
        for row in self.ctx.state.execs(self.id, unfinished=True):
            self.processes[row.id] = self._process_from_row(row)

    async def adopt(self) -> None:
        """Take a running sandbox back after a daemon restart: wait for its agent to reconnect."""
        self.load_processes()
        state = await self.runtime.state(self.container_id)
        frozen = self.runtime.frozen(self.container_id)
        if state == "paused" or frozen == "paused":  # the daemon died during a memory snapshot, which froze it
            await self.runtime.resume(self.container_id)
            state = await self.runtime.state(self.container_id)
        if state != "running":
            message = "the sandbox stopped while the daemon was away"
            if self.ctx.cfg.ray_address is not None:
                # A node of a cluster: the other nodes have been saying since it died that shoal lost this sandbox
                # (``internal_failure``); its own record must say the same.
                self.finish_soon(Result(status="internal_failure", exitcode=137, message=message))
            else:
                self.finish_soon(Result(status="terminated", message=message))
            return
        await self._listen()
        await self.ctx.network.reopen(self.id, self.touch)
        self._arm_timers()
        if frozen in ("pausing", "resuming"):
            self._background(self._thaw_if_frozen())
        self._background(self._expect_agent())

    async def _thaw_if_frozen(self) -> None:
        """The daemon died while pausing or resuming it: whether the Sentry got that far is unknown, and a resume
        too many would panic it.  An agent that reconnects runs; one that does not within a few seconds (it
        retries at least twice a second) is frozen, and is thawed."""
        try:
            await asyncio.wait_for(self.connected.wait(), FROZEN_PROBE)
        except TimeoutError:
            if self.state == RUNNING:
                log.warning("sandbox %s: thawing it (a daemon died while it was paused for a snapshot)", self.id)
                await self.runtime.resume(self.container_id)
            return
        self.runtime.clear_frozen(self.container_id)

    async def _listen(self) -> None:
        """Listen on the sandbox's reconnection socket, for its agent's next connection (verified by its token)."""
        self._close_listener()
        path = ctl_dir(self.run_dir) / "agent.sock"
        path.unlink(missing_ok=True)

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            AgentLink(self._on_frames, self._on_link_closed, self.id).attach(reader, writer)

        self._listener = await asyncio.start_unix_server(accepted, path=str(path), limit=1 << 18)
        os.chmod(path, 0o666)

    async def _expect_agent(self) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), self.ctx.cfg.agent_connect_timeout)
        except TimeoutError:
            if self.state == RUNNING:
                self.finish_soon(Result(status="terminated", message="the sandbox's agent did not reconnect"))

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()  # unregisters from the loop before closing the socket
            self._listener = None
            (ctl_dir(self.run_dir) / "agent.sock").unlink(missing_ok=True)


def new_token() -> bytes:
    """A fresh agent reconnection token."""
    return secrets.token_bytes(32)
