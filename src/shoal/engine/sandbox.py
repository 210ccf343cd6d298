"""One sandbox's lifecycle: start, processes, stdin, timeouts, finish and teardown.

States (persisted after every change):  creating → running → finished, or
creating → finished when start-up fails.  Anything else is a bug and raises.

Trust: frames from the agent are hostile.  They can only touch this sandbox's
own processes, are bounded in size by the decoder and by the output limit,
and a malformed or inconsistent frame drops the connection.  A reconnecting
agent (after a daemon restart) must present the token given at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.agent import protocol as P
from shoal.agent.build import BINARY_NAME
from shoal.engine.agent_frames import AgentFrames
from shoal.engine.bundle import write_bundle
from shoal.engine.config import Config
from shoal.engine.environment import process_env
from shoal.engine.link import AgentLink
from shoal.engine.logs import LogWriter
from shoal.engine.output import OutputBudget
from shoal.engine.process import ENTRYPOINT_ID, SIGKILL, Process
from shoal.engine.results import describe, describe_process, returncode_of
from shoal.engine.uids import UidSlots
from shoal.exception import ConflictError, InvalidError, NotFoundError, ServiceError
from shoal.images.base import KEEP_ALIVE_CMD
from shoal.network.service import Network
from shoal.runtime import cgroups, idmap, rootfs
from shoal.runtime.base import ContainerRuntime
from shoal.runtime.idmap import IdRange, Namespaces
from shoal.store.spec import SandboxSpec
from shoal.store.state import ExecRow, SandboxRow, State
from shoal.wire.image_config import ImageConfig
from shoal.wire.sandboxes import CreateSandbox, ExecInfo, ExecRequest, Result, SandboxInfo, SandboxState
from shoal.wire.times import micros

if TYPE_CHECKING:
    from shoal.engine.replicas import VolumeReplicas
    from shoal.secrets.store import SecretStore
    from shoal.volumes.mounts import VolumeBinds

log = logging.getLogger(__name__)

CREATING, RUNNING, FINISHED = SandboxState.CREATING, SandboxState.RUNNING, SandboxState.FINISHED
_TRANSITIONS: dict[SandboxState, set[SandboxState]] = {
    CREATING: {RUNNING, FINISHED},
    RUNNING: {FINISHED},
    FINISHED: set(),
}
STDIN_WINDOW = 16 << 20
"""Stdin bytes the daemon lets wait in an agent before a writer must wait."""
PRESTART_FRESH = 24 * 3600.0
"""Seconds for which a pooled sandbox's prestarted keep-alive entrypoint (a 48 h ``sleep``) may still be a
request's entrypoint; an older one is replaced."""


@dataclass
class Context:
    """What every sandbox shares."""

    cfg: Config
    state: State
    runtime: ContainerRuntime
    """The runtime of runc sandboxes (runc or crun)."""
    network: Network
    volumes: VolumeBinds | None = None
    secrets: SecretStore | None = None
    torn_down: Callable[[Sandbox], None] | None = None
    """Told when a sandbox is gone from the machine (its memory need not be kept: the store has it)."""
    ending: Callable[[Sandbox], Awaitable[None]] | None = None
    """Awaited by the teardown of a persistent sandbox's session once its processes are gone and before its files
    go (its exit snapshot)."""
    uids: UidSlots | None = None
    """Per-sandbox host id ranges (decision 0063); None: every sandbox shares one (decision 0002)."""
    runtimes: dict[str, ContainerRuntime] = field(default_factory=dict)
    """Every runtime this daemon has, by kind (``runc``, ``gvisor``)."""
    replicas: VolumeReplicas | None = None
    """Copies of other nodes' volumes (a cluster): what a sandbox changed in them is sent back as it ends."""


class Sandbox(AgentFrames):
    """A sandbox known to the daemon (running, or finished and still retained)."""

    def __init__(self, ctx: Context, row: SandboxRow) -> None:
        self.ctx = ctx
        self.row = row
        self.id = row.id
        self.state = row.state
        self.result: Result | None = (
            Result.model_validate(
                {"status": row.result_status, "exitcode": row.result_code, "message": row.result_message or ""}
            )
            if row.result_status
            else None
        )
        cfg = ctx.cfg
        self.run_dir = cfg.run_sandboxes_dir / row.id
        self.data_dir = cfg.sandboxes_dir / row.id
        self.out_dir = self.data_dir / "out"
        self.processes: dict[str, Process] = {}
        self.link: AgentLink | None = None
        self.connected = asyncio.Event()
        self.finished = asyncio.Event()
        self.settled = asyncio.Event()
        """Set once the sandbox is past CREATING (running, or failed to start)."""
        if self.state != CREATING:
            self.settled.set()
        self.ready = False
        """Whether the readiness probe has succeeded (``shoal.engine.readiness``)."""
        self.probe_lock = asyncio.Lock()
        if self.state == FINISHED:
            self.finished.set()
        self.last_activity = time.monotonic()
        self._timers: list[asyncio.TimerHandle] = []
        self._idle_task: asyncio.Task[None] | None = None
        self._teardown_task: asyncio.Task[None] | None = None
        self._listener: asyncio.Server | None = None
        self._hello_remaining = 0
        self._hello_seen: set[str] = set()
        self._parked_execs: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.keep_upper: Path | None = None
        """Image builds: at teardown, move the upper directory here instead of deleting it (None if that failed)."""
        self._pool_socket: socket.socket | None = None
        self._pool_started = False
        """A precreated sandbox whose agent already runs, waiting for its INIT (every pooled one, decision 0064)."""
        self._prestarted: tuple[bytes, float] | None = None
        """A pooled gVisor sandbox's entrypoint, started before a request took it: its EXEC frame, and when."""
        self._budget: OutputBudget | None = None
        self.logs = LogWriter(self.data_dir)
        """Timestamps of the entrypoint's output and lifecycle events (``sb.logs``)."""

    # ---------------------------------------------------------------- state

    def _move(self, new: SandboxState, result: Result | None = None) -> None:
        """The one place a sandbox changes state: checked against ``_TRANSITIONS``, stored, logged.

        Moving to FINISHED records ``result`` (how it ended) and wakes whoever waits for the end.
        """
        if new not in _TRANSITIONS[self.state]:
            raise AssertionError(f"sandbox {self.id}: illegal transition {self.state} -> {new}")
        self.state = new
        self.settled.set()
        if new is FINISHED:
            assert result is not None, "a sandbox finishes with a result"
            self.result = result
            self.logs.system(describe(result))
            self.row.finished_at = time.time()
            self.ctx.state.finish_sandbox(self.id, result.status, result.exitcode, result.message, self.row.finished_at)
            self.finished.set()
            return
        self.ctx.state.set_sandbox_state(self.id, new)
        if new is RUNNING:
            self.logs.system("Sandbox started")

    @property
    def spec(self) -> SandboxSpec:
        """What the sandbox was created with (its secrets sealed: never return them to callers)."""
        return self.row.spec

    @property
    def gvisor(self) -> bool:
        """Whether it runs under gVisor (runsc) rather than as a runc container (decision 0069)."""
        return self.spec.runtime == "gvisor"

    @property
    def netns_path(self) -> Path:
        """Where a gVisor sandbox's network namespace is kept (a bind mount), made before runsc starts."""
        return self.run_dir / "netns"

    @property
    def host_ids(self) -> IdRange:
        """The host ids the sandbox's ids 0..65535 are (under gVisor: the ids its root's mount shows, 0..65535;
        the Sentry, not the host, runs its processes)."""
        if self.gvisor:
            return IdRange(0, self.ctx.cfg.idmap.size)
        slot = self.spec.uid_slot
        if slot is None:
            return IdRange(self.ctx.cfg.idmap.host_id, self.ctx.cfg.idmap.size)
        return UidSlots.ids(slot)

    async def _namespaces(self) -> Namespaces | None:
        """Its own user namespace and storage id-mapping, taking a uid slot if it has none yet (warm pool); under
        gVisor only the storage mapping (runsc makes the Sentry's namespace)."""
        helper = self.ctx.cfg.agent_dir / BINARY_NAME
        if self.gvisor:
            storage = await asyncio.to_thread(idmap.gvisor_storage_mapping, helper, self.ctx.cfg.idmap.host_id)
            return Namespaces(sandbox=-1, storage=storage)
        uids = self.ctx.uids
        if uids is None:
            return None
        if self.spec.uid_slot is None:
            self.spec.uid_slot = uids.take(self.id)
        return await asyncio.to_thread(idmap.make_namespaces, helper, self.host_ids, self.ctx.cfg.idmap.host_id)

    def _release_ids(self) -> None:
        """Its container is gone: its uid slot may go to another sandbox."""
        if self.ctx.uids is not None:
            self.ctx.uids.release(self.id, self.spec.uid_slot)

    @property
    def cgroup_path(self) -> str:
        """The sandbox's cgroup, relative to each hierarchy's root."""
        return f"{self.ctx.cfg.cgroup_parent}/{self.container_id}"

    def info(self) -> SandboxInfo:
        """The sandbox as the API shows it."""
        return SandboxInfo(
            sandbox_id=self.id,
            app_id=self.row.app_id,
            name=self.row.name,
            tags=self.row.tags,
            state=self.state,
            created_at_us=micros(self.row.created_at),
            image_id=self.spec.image_id,
            timeout=self.spec.request.timeout,
            idle_timeout=self.spec.request.idle_timeout,
            result=self.result,
            returncode=returncode_of(self.result),
            runtime=self.spec.runtime,
            node=self.ctx.cfg.node_name if self.ctx.cfg.ray_address else None,
        )

    # ---------------------------------------------------------------- start

    async def _launch(
        self,
        req: CreateSandbox,
        lowers: list[str],
        launch: Callable[[str, int], Awaitable[None]],
        first: bytes = b"",
    ) -> socket.socket:
        """Mount the root, write the bundle, wire a gVisor sandbox's network, and ``launch(bundle, their_fd)``
        the container with one end of a fresh socketpair as the agent's control socket; our end.  ``first``: a
        frame put on the socket before the launch, which the agent reads as soon as it runs."""
        netns = self._make_gvisor_netns(req)  # beside the root and the bundle: it needs neither
        ns: Namespaces | None = None
        try:
            ns = await self._namespaces()
            bundle = write_bundle(self, req, lowers, ns)
            if netns is not None:
                await netns
                await self.ctx.network.connect(self.id, self.cgroup_path, self.touch, netns=str(self.netns_path))
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if first:
                    ours.sendall(first)  # a small frame on an empty socket: it does not block
                await launch(str(bundle), theirs.fileno())
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
                if self.ctx.volumes:
                    self.ctx.volumes.release(self.id)  # the container holds its own copies of the volume mounts
        except BaseException:
            if netns is not None:
                await asyncio.gather(netns, return_exceptions=True)  # done before the clean-up unmounts it
            raise
        finally:
            if ns is not None:
                ns.close()
        return ours

    async def start(self, req: CreateSandbox, image: ImageConfig, lowers: list[str]) -> None:
        """Mount the root, start the container and the entrypoint.  Raises after cleaning up on failure."""
        log_path = str(self.run_dir / "agent.log")
        try:
            ours = await self._launch(
                req, lowers, lambda bundle, fd: self.runtime.start(self.container_id, bundle, fd, log_path)
            )
            await self._connect_agent(ours, req, image, wire_network=not self.gvisor)
        except BaseException as exc:
            await self._fail_start(exc)
            raise
        self._arm_timers()

    async def start_restored(
        self, req: CreateSandbox, lowers: list[str], checkpoint: Path, carried: list[ExecRow]
    ) -> None:
        """Start from a memory snapshot (``runsc restore``): its processes carry on.  ``carried``: the processes
        that ran when it was taken, recorded again as this sandbox's (their output here starts at the snapshot).

        The restored agent is still suspended, and its standard input is now our socket: RESUME tells it that it
        was restored, and it answers HELLO with the snapshotted sandbox's token (``row.token``) and its processes.
        """
        log_path = str(self.run_dir / "agent.log")
        try:
            ours = await self._launch(
                req,
                lowers,
                lambda bundle, fd: self.runtime.restore(self.container_id, bundle, str(checkpoint), fd, log_path),
                # RESUME waits on the socket: the restored agent reads it as soon as it runs, and says HELLO.
                first=P.resume_frame(restored=True),
            )
            now = time.time()
            for row in carried:
                self.ctx.state.add_exec(ExecRow(self.id, row.id, row.spec, "running", now))
                self.processes[row.id] = self._process_from_row(self.ctx.state.exec(self.id, row.id) or row)
            link = AgentLink(self._on_frames, self._on_link_closed, self.id)  # verified by its HELLO's token
            await link.start(ours)
            try:
                await asyncio.wait_for(self.connected.wait(), self.ctx.cfg.agent_connect_timeout)
            except TimeoutError:
                raise ServiceError(f"the restored sandbox's agent did not answer: {self._agent_log_tail()}") from None
            self.agent_on_stdin = True
            self._move(RUNNING)
        except BaseException as exc:
            await self._fail_start(exc)
            raise
        self._arm_timers()

    async def precreate(self, req: CreateSandbox, image: ImageConfig, lowers: list[str]) -> None:
        """For the warm pool: everything up to the agent's INIT (the container made and started, network wired).

        Not in the database yet; ``activate`` finishes the start once a request takes it, ``discard`` removes
        it if none does.  The agent runs already; under gVisor so does the image's keep-alive command as the
        entrypoint a request of the default shape would start (exec'ing it costs a fresh gVisor sandbox tens of
        milliseconds, which would otherwise compete with the request's first exec).
        """
        log_path = str(self.run_dir / "agent.log")
        self._pool_socket = await self._launch(
            req, lowers, lambda bundle, fd: self.runtime.create(self.container_id, bundle, fd, log_path)
        )
        if not self.gvisor:
            await self.ctx.network.connect(self.id, self.cgroup_path, self.touch)
            # The agent starts now and waits for its INIT, off the path of the request that takes it.
            await self.runtime.start_created(self.container_id)
            self._pool_started = True
        else:
            # `runsc start` (a runsc process, then the agent's start inside gVisor) is most of a pooled gVisor
            # sandbox's start: do it now; the agent waits for its INIT, which carries nothing of the pool's.
            await self.runtime.start_created(self.container_id)
            self._pool_started = True
            entrypoint = self._entrypoint_request(req, image)
            if entrypoint is not None and entrypoint.args == KEEP_ALIVE_CMD:
                frame = self._exec_frame(ENTRYPOINT_ID, entrypoint, entrypoint=True)
                self._pool_socket.sendall(frame)  # a small frame on an empty socket: it does not block
                self._prestarted = (frame, time.monotonic())

    def _make_gvisor_netns(self, req: CreateSandbox) -> asyncio.Future[None] | None:
        """Under gVisor with a network: start making the namespace the bundle names (wired once the bundle is
        written, before runsc copies it)."""
        if not self.gvisor or not self.ctx.network.will_wire(req):
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.ensure_future(self.ctx.network.make_netns(str(self.netns_path)))

    def claim(self, row: SandboxRow) -> None:
        """Make a precreated sandbox the one of a request whose ``row`` is now stored (CREATING until ``activate``)."""
        self.row = row
        self.state = row.state
        self.settled.clear()
        self.last_activity = time.monotonic()

    async def activate(self, req: CreateSandbox, image: ImageConfig) -> None:
        """Start a claimed precreated sandbox: like ``start``'s second half."""
        ours, self._pool_socket = self._pool_socket, None
        assert ours is not None, "activate() without precreate()"
        try:
            if not self._pool_started:
                await self.runtime.start_created(self.container_id)
            await self._connect_agent(ours, req, image, wire_network=False, prestarted=self._prestarted)
        except BaseException as exc:
            await self._fail_start(exc)
            raise
        self._arm_timers()

    async def discard(self) -> None:
        """Remove a precreated sandbox that no request took (it has no database row)."""
        if self._pool_socket is not None:
            self._pool_socket.close()
            self._pool_socket = None
        failed: BaseException | None = None
        try:
            await self.runtime.delete(self.container_id)
        except Exception as exc:
            failed = exc
        with contextlib.suppress(Exception):
            await self.ctx.network.detach(self.id)
        with contextlib.suppress(OSError):
            rootfs.unmount(str(self.run_dir / "rootfs"))
        unmount_netns(self.netns_path)
        await asyncio.to_thread(shutil.rmtree, self.run_dir, True)
        await asyncio.to_thread(shutil.rmtree, self.data_dir, True)
        if failed is not None:
            raise failed  # the container may still exist: its uid slot stays taken
        self._release_ids()
        if self.run_dir.exists() or self.data_dir.exists():
            raise OSError(f"sandbox {self.id}: its directories could not be removed")

    async def _connect_agent(
        self,
        ours: socket.socket,
        req: CreateSandbox,
        image: ImageConfig,
        *,
        wire_network: bool,
        prestarted: tuple[bytes, float] | None = None,
    ) -> None:
        """Link the agent, INIT it and start the entrypoint.  ``prestarted``: the entrypoint a pooled sandbox runs
        already (its EXEC frame, and when it was sent); it becomes this request's if that is the very EXEC the
        request would send, and is dropped (killed, never reported) otherwise."""
        cfg = self.ctx.cfg
        link = AgentLink(self._on_frames, self._on_link_closed, self.id)
        link.verified = True
        self.link = link
        self.agent_on_stdin = True
        entrypoint = self._entrypoint_request(req, image)
        adopted = False
        if prestarted is not None:
            frame, sent_at = prestarted
            fresh = time.monotonic() - sent_at < PRESTART_FRESH
            wanted = None if entrypoint is None else self._exec_frame(ENTRYPOINT_ID, entrypoint, entrypoint=True)
            if fresh and frame == wanted:
                # Recorded before the link reads a frame: its STARTED (and the HELLO's list) find it.
                assert entrypoint is not None
                self._start_process(ENTRYPOINT_ID, entrypoint, entrypoint=True, send=False)
                adopted = True
        await link.start(ours)
        if prestarted is not None and not adopted:
            # Before INIT: every frame the agent sent of it comes before the HELLO, while nothing here knows the id.
            link.send(P.signal_frame(ENTRYPOINT_ID, SIGKILL, forget=True))
        workdir = req.workdir
        link.send(P.init_frame(self.row.token, workdir))
        if wire_network:
            await self.ctx.network.connect(self.id, self.cgroup_path, self.touch)
        try:
            await asyncio.wait_for(self.connected.wait(), cfg.agent_connect_timeout)
        except TimeoutError:
            raise ServiceError(f"the sandbox's agent did not start: {self._agent_log_tail()}") from None
        if entrypoint is None:
            self._add_placeholder_entrypoint()
        elif not adopted:
            self._start_process(ENTRYPOINT_ID, entrypoint, entrypoint=True)
        self._move(RUNNING)

    @staticmethod
    def _entrypoint_request(req: CreateSandbox, image: ImageConfig) -> ExecRequest | None:
        """The entrypoint's command as an exec (the request's, else the image's), or None when there is none."""
        argv = list(req.args) or [*(image.entrypoint or []), *(image.cmd or [])]
        if not argv:
            return None
        return ExecRequest(args=argv, workdir=req.workdir or image.workdir, pty=req.pty)

    async def _fail_start(self, exc: BaseException) -> None:
        self._move(FINISHED, Result(status="init_failure", exitcode=None, message=str(exc) or type(exc).__name__))
        await self._teardown()

    def _agent_log_tail(self) -> str:
        try:
            return (self.run_dir / "agent.log").read_text(errors="replace")[-1000:].strip() or "no output"
        except OSError:
            return "no output"

    def _arm_timers(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = self.row.deadline
        if deadline is not None:
            delay = max(0.0, deadline - time.time())
            self._timers.append(
                loop.call_later(
                    delay,
                    lambda: self.finish_soon(Result(status="timeout", message="Sandbox timed out")),
                )
            )
        if self.spec.request.idle_timeout:
            self._idle_task = asyncio.create_task(self._watch_idle(float(self.spec.request.idle_timeout)))

    async def _watch_idle(self, idle: float) -> None:
        while self.state == RUNNING:
            busy = any(not p.exited and not p.is_entrypoint for p in self.processes.values())
            busy = busy or self.ctx.network.busy(self.id)  # an open tunnel connection is activity
            quiet = time.monotonic() - self.last_activity
            if not busy and quiet >= idle:
                self.finish_soon(Result(status="timeout", message="Sandbox idle timeout reached"))
                return
            await asyncio.sleep(idle if busy else max(0.05, idle - quiet))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def touch(self) -> None:
        """Record activity (for ``idle_timeout``)."""
        self.last_activity = time.monotonic()

    # ---------------------------------------------------------------- processes

    def _add_placeholder_entrypoint(self) -> None:
        """No command and none in the image: sb.stdout/stderr are empty streams that end with the sandbox."""
        stored: dict[str, Any] = {"args": [], "workdir": None, "timeout": None, "pty": False}
        self.processes[ENTRYPOINT_ID] = Process(self.id, ENTRYPOINT_ID, stored, self.out_dir, 0)
        self.ctx.state.add_exec(ExecRow(self.id, ENTRYPOINT_ID, stored, "running", time.time()))

    def _start_process(
        self, exec_id: str, req: ExecRequest, *, entrypoint: bool = False, persist: bool = True, send: bool = True
    ) -> Process:
        """Record a process and send its EXEC (``send=False``: the agent runs it already)."""
        stored = {"args": req.args, "workdir": req.workdir, "timeout": req.timeout, "pty": req.pty}
        proc = Process(
            self.id,
            exec_id,
            stored,
            self.out_dir,
            self.ctx.cfg.max_output_bytes,
            persist=persist,
            budget=self._output_budget() if persist else None,
        )
        self.processes[exec_id] = proc
        if self.parked:
            self._parked_execs.add(exec_id)
        if persist:
            self.ctx.state.add_exec(ExecRow(self.id, exec_id, stored, "running", time.time()))
        if self.spec.request.verbose and not entrypoint:
            self.logs.system(describe_process(req.args, persist))
        if send:
            assert self.link is not None
            proc.unacknowledged_exec = self._exec_frame(exec_id, req, entrypoint=entrypoint)
            self.link.send(proc.unacknowledged_exec)
        return proc

    def _exec_frame(self, exec_id: str, req: ExecRequest, *, entrypoint: bool) -> bytes:
        """The EXEC frame that starts ``req`` in this sandbox (its environment, directory and user resolved)."""
        flags = 0
        if req.pty:
            flags |= P.ExecFlag.PTY
        if req.stdout == "devnull":
            flags |= P.ExecFlag.STDOUT_NULL
        if req.stderr == "devnull":
            flags |= P.ExecFlag.STDERR_NULL
        if entrypoint:
            flags |= P.ExecFlag.ENTRYPOINT
        cwd = req.workdir or self.spec.request.workdir or self.spec.image_workdir or "/"
        timeout_ms = (req.timeout or 0) * 1000
        env = process_env(self.ctx.secrets, self.id, self.spec, req, self.spec.image_env)
        window = req.pty_size if req.pty else None
        return P.exec_frame(exec_id, req.args, env, cwd, timeout_ms, flags, self.spec.image_user, window)

    async def exec(self, req: ExecRequest, exec_id: str, *, persist: bool = True) -> Process:
        """Start a process (idempotent on ``exec_id``).

        ``persist=False`` is for a process that lives only as long as one request (file operations): it is not
        recorded in the database, and ``forget()`` drops it once its output is delivered.
        """
        existing = self.processes.get(exec_id)
        if existing is not None:
            return existing
        if persist and (row := self.ctx.state.exec(self.id, exec_id)) is not None:
            return self._process_from_row(row)  # a retried request whose process already ended
        await self._await_agent()
        self.touch()
        return self._start_process(exec_id, req, persist=persist)

    def forget(self, exec_id: str) -> None:
        """Drop an unrecorded process that has ended and whose output was delivered."""
        proc = self.processes.get(exec_id)
        if proc is not None and not proc.persist and proc.exited and proc.eof_mask == 3:
            del self.processes[exec_id]
            proc.close()

    async def _await_agent(self) -> None:
        """Return once the sandbox runs and its agent is connected (it reconnects after a daemon restart)."""
        await self.settled.wait()  # a create that returned early (the gateway's) may still be starting it
        if self.state == RUNNING and not self.connected.is_set():
            try:
                await asyncio.wait_for(self.connected.wait(), self.ctx.cfg.agent_connect_timeout)
            except TimeoutError:
                raise ServiceError("the sandbox's agent is not connected; try again") from None
        if self.state != RUNNING:
            message = self.result.message if self.result and self.result.message else ""
            raise ConflictError(message or "Sandbox already finished")

    def process(self, exec_id: str) -> Process:
        """A process of this sandbox, or NotFoundError.

        Memory holds only processes that are running or have output to come; one that has ended is rebuilt
        from the store (exit code, which streams ended) and its output files, each time it is asked for.
        """
        proc = self.processes.get(exec_id)
        if proc is not None:
            return proc
        row = self.ctx.state.exec(self.id, exec_id)
        if row is None:
            raise NotFoundError(f"no process {exec_id!r} in sandbox {self.id}")
        return self._process_from_row(row)

    def _process_from_row(self, row: ExecRow) -> Process:
        more_to_come = row.exit_kind is None or row.eof_mask != 3
        proc = Process(
            self.id,
            row.id,
            row.spec,
            self.out_dir,
            self.ctx.cfg.max_output_bytes,
            eof_mask=row.eof_mask,
            budget=self._output_budget() if more_to_come and self.state != FINISHED else None,
        )
        if row.exit_kind is not None and row.exit_value is not None:
            proc.set_exit(row.exit_kind, row.exit_value)
        if self.state == FINISHED:
            # Gone with its sandbox, whatever the store missed (a daemon killed mid-teardown).
            proc.set_exit(P.ExitKind.SIGNAL, SIGKILL)
            proc.end_streams()
        return proc

    def _output_budget(self) -> OutputBudget:
        """The sandbox's output quota (``Config.sandbox_output_bytes``), less what its streams already hold."""
        if self._budget is None:
            held = 0
            with contextlib.suppress(FileNotFoundError), os.scandir(self.out_dir) as it:
                for entry in it:
                    with contextlib.suppress(OSError):
                        held += entry.stat(follow_symlinks=False).st_size
            self._budget = OutputBudget(self.ctx.cfg.sandbox_output_bytes - held, self._output_full)
        return self._budget

    def _output_full(self) -> None:
        quota = self.ctx.cfg.sandbox_output_bytes
        log.warning("sandbox %s: output quota of %d MiB reached; further output is discarded", self.id, quota >> 20)
        self.logs.system(
            f"Output quota reached ({quota >> 20} MiB stored for this sandbox): further output of its processes"
            " is discarded; their streams end where the quota ran out"
        )

    def _release(self, proc: Process) -> None:
        """A recorded process that has ended, with both streams ended, lives on in the store only."""
        if proc.persist and proc.exited and proc.eof_mask == 3 and self.processes.get(proc.id) is proc:
            del self.processes[proc.id]
            proc.close()

    def exec_infos(self) -> list[ExecInfo]:
        """Every process of the sandbox, oldest first (recorded ones from the store, live ones from memory)."""
        out = []
        listed = set()
        for row in self.ctx.state.execs(self.id):
            live = self.processes.get(row.id)
            out.append(self.exec_info(live if live is not None else self._process_from_row(row)))
            listed.add(row.id)
        out += [self.exec_info(p) for p in self.processes.values() if p.id not in listed]
        return out

    async def stdin_offset(self, exec_id: str) -> int:
        """How many bytes of a process's stdin the daemon has taken: where a writer that did not start the
        process (a handle from ``Sandbox.from_id``) goes on."""
        proc = self.process(exec_id)
        if not proc.exited and self.state == RUNNING:
            await self._await_agent()  # after a restart the agent's HELLO says how far its stdin got
        return proc.stdin_offset

    async def write_stdin(self, exec_id: str, offset: int, data: bytes, eof: bool) -> int:
        """Forward stdin bytes starting at ``offset``; returns the next expected offset."""
        proc = self.process(exec_id)
        if proc.exited or self.state != RUNNING:
            # The process is gone; like a closed pipe, input is dropped (its stdin offset may not be known).
            return max(proc.stdin_offset, offset + len(data))
        await self._await_agent()
        if offset > proc.stdin_offset:
            raise ConflictError(
                f"stdin offset {offset} is past the {proc.stdin_offset} bytes received: bytes are missing"
            )
        if proc.exited or self.state != RUNNING:
            return proc.stdin_offset  # it ended while the agent reconnected
        if proc.stdin_eof and offset + len(data) > proc.stdin_offset:
            raise ConflictError("stdin was already closed with write_eof()")
        self.touch()
        skip = proc.stdin_offset - offset
        data = data[skip:]
        assert self.link is not None
        pos = 0
        while True:
            await proc.wait_stdin_room(STDIN_WINDOW)
            if proc.exited or self.link is None:
                break
            chunk = data[pos : pos + P.MAX_STDIN_CHUNK]
            last = pos + len(chunk) >= len(data)
            self.link.send(P.stdin_frame(exec_id, proc.stdin_offset, chunk, eof and last))
            proc.stdin_offset += len(chunk)
            pos += len(chunk)
            if last:
                break
        if eof:
            proc.stdin_eof = True
        if self.link is not None:
            await self.link.drain()
        self.touch()
        return proc.stdin_offset

    def signal(self, exec_id: str, signo: int) -> None:
        """Send signal ``signo`` to a running process's group (no-op once it has ended)."""
        proc = self.process(exec_id)
        if not proc.exited and self.link is not None:
            self.link.send(P.signal_frame(exec_id, signo))

    def resize(self, exec_id: str, rows: int, cols: int) -> None:
        """Set the size of a running process's terminal (its foreground process group gets SIGWINCH)."""
        proc = self.process(exec_id)
        if not proc.spec.get("pty"):
            raise InvalidError(f"process {exec_id} has no terminal to resize: start it with pty=True")
        if proc.exited or self.link is None:
            return
        if self.agent_version < P.RESIZE_VERSION:
            raise InvalidError(
                "this sandbox's agent predates terminal resizing (the sandbox was started by an older shoal);"
                " sandboxes created from now on have it"
            )
        self.link.send(P.resize_frame(exec_id, rows, cols))

    def exec_info(self, proc: Process) -> ExecInfo:
        """A process as the API shows it."""
        return ExecInfo(
            exec_id=proc.id,
            args=proc.spec["args"],
            state="exited" if proc.exited else "running",
            returncode=proc.returncode,
            pid=proc.pid,
        )

    # ---------------------------------------------------------------- finish

    @property
    def teardown_task(self) -> asyncio.Task[None] | None:
        """The task removing the finished sandbox, if one was started."""
        return self._teardown_task

    def finish_soon(self, result: Result) -> None:
        """Record the result now and tear down in the background."""
        if self.state == FINISHED:
            return
        self._move(FINISHED, result)
        self._teardown_task = asyncio.create_task(self._teardown())

    async def terminate(self) -> None:
        """Kill the sandbox (returncode 137) and wait until it is gone."""
        await self.settled.wait()
        if self.state == RUNNING:
            self._move(FINISHED, Result(status="terminated", message="Sandbox terminated"))
            self._teardown_task = asyncio.create_task(self._teardown())
        if self._teardown_task is not None:
            await asyncio.shield(self._teardown_task)

    async def _teardown(self) -> None:
        """Remove the container, its mounts and runtime files; end every stream."""
        for t in self._timers:
            t.cancel()
        if self._idle_task is not None and self._idle_task is not asyncio.current_task():
            self._idle_task.cancel()
        self._close_listener()
        # kill + wait + delete rather than `delete --force`, which sleeps 100 ms after its kill.
        runtime = self.runtime
        await runtime.kill(self.container_id)
        link = self.link
        if link is not None:
            try:
                await asyncio.wait_for(link.closed.wait(), 5.0)
            except TimeoutError:
                link.close()
        if not await cgroups.wait_empty(self.cgroup_path, 5.0):
            log.warning("sandbox %s: processes remain after SIGKILL; forcing removal", self.id)
        try:
            await runtime.delete(self.container_id)
        except Exception:
            log.exception("sandbox %s: deleting the container failed", self.id)
        if self.ctx.ending is not None and self.spec.request.persistent_of:
            try:
                await self.ctx.ending(self)
            except Exception:
                log.exception("sandbox %s: keeping its files for its next session failed", self.id)
        if self.ctx.volumes:
            self.ctx.volumes.release(self.id)
        if self.ctx.replicas is not None and self.spec.request.volumes:
            try:
                await self.ctx.replicas.sandbox_ended(self)
            except Exception:
                log.exception("sandbox %s: sending its volume changes to their nodes failed", self.id)
        try:
            await self.ctx.network.detach(self.id)
        except Exception:
            log.exception("sandbox %s: removing its network failed", self.id)
        for proc in self.processes.values():
            if not proc.exited:
                proc.set_exit(P.ExitKind.SIGNAL, SIGKILL)
                if proc.persist:
                    self.ctx.state.finish_exec(self.id, proc.id, P.ExitKind.SIGNAL, SIGKILL)
            if proc.eof_mask != 3:
                proc.end_streams()
                if proc.persist:
                    self.ctx.state.set_eof(self.id, proc.id, proc.eof_mask)
            proc.close()
        self.processes.clear()  # what outlives the sandbox is in the store and the output files
        self.logs.close()
        try:
            rootfs.unmount(str(self.run_dir / "rootfs"))
        except OSError:
            log.exception("sandbox %s: unmounting its root failed", self.id)
        unmount_netns(self.netns_path)
        await asyncio.to_thread(self._remove_files)
        self._release_ids()
        if self.ctx.torn_down is not None:
            self.ctx.torn_down(self)

    def _remove_files(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.keep_upper is not None:
            try:
                os.rename(self.data_dir / "upper", self.keep_upper)
            except OSError:
                log.exception("sandbox %s: keeping its upper directory failed", self.id)
                self.keep_upper = None
        for name in ("upper", "work", "mounts"):  # mounts: images mounted with sb.mount_image
            shutil.rmtree(self.data_dir / name, ignore_errors=True)

    def remove_data(self) -> None:
        """Delete everything kept for a finished sandbox (retention)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)


def unmount_netns(path: Path) -> None:
    """Let go of a gVisor sandbox's network namespace (its veth goes with it); nothing if there is none."""
    if not os.path.lexists(path):
        return
    try:
        rootfs.unmount(str(path))
    except OSError as exc:
        log.warning("unmounting the network namespace %s failed: %s", path, exc)
