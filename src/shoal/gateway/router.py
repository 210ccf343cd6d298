"""Modal's task command router (``modal.task_command_router.TaskCommandRouter``): processes in a sandbox, their
output and input, and the entrypoint's.  Every call carries a bearer token the control plane signed for one
sandbox, and may only touch that sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from modal_proto import api_pb2
from modal_proto import task_command_router_pb2 as tcr
from modal_proto.task_command_router_grpc import TaskCommandRouterBase

from shoal.agent.build import BINARY_NAME
from shoal.agent.protocol import ExitKind
from shoal.engine import readiness
from shoal.engine.manager import Manager
from shoal.engine.process import ENTRYPOINT_ID, Process
from shoal.engine.sandbox import Sandbox
from shoal.gateway.auth import GatewayAuth
from shoal.gateway.convert import (
    allowlists,
    create_sidecar,
    generic_result,
    grpc_errors,
    outbound_headers,
    sandbox_of_task,
)
from shoal.runtime.spec import AGENT_DIR
from shoal.wire.sandboxes import ExecRequest, OutboundPolicyUpdate, SandboxState

FS_TOOLS = "/__modal/.bin/modal-sandbox-fs-tools"
"""The helper the client execs for ``sb.filesystem``, with one JSON command: shoal's own tool runs instead."""
AGENT_PATH = f"{AGENT_DIR}/{BINARY_NAME}"
"""Where every sandbox has shoal's agent binary, whose ``fs`` mode is the filesystem tool."""
SNAPSHOT_TIMEOUT = 55
"""Seconds a filesystem snapshot may take (the client's own default)."""
CHUNK = 1 << 20
"""Most bytes in one output message."""
EXEC_WAIT_SLICE = 50.0
"""Seconds a ``TaskExecWait`` waits before DEADLINE_EXCEEDED, which the client retries (it allows 60)."""


def fs_tool_args(args: list[str]) -> list[str]:
    """shoal's filesystem tool (``shoal-agent fs``) for one JSON command of Modal's: the same operation, the same
    error payload on stderr, and entries with the same fields (``agent/fstool.c``)."""
    try:
        command = json.loads(args[0]) if len(args) == 1 else None
    except ValueError:
        command = None
    params: dict[str, Any] = {}
    op = None
    if isinstance(command, dict) and len(command) == 1:
        op, value = next(iter(command.items()))
        params = value if isinstance(value, dict) else {}
    path = params.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise GRPCError(Status.INVALID_ARGUMENT, f"not a filesystem command on an absolute path: {args[:1]!r}")
    simple = {"ReadFile": ["read"], "WriteFile": ["write"], "ListFiles": ["ls"], "Stat": ["stat"]}
    if op in simple:
        return [AGENT_PATH, "fs", *simple[op], path]
    if op == "MakeDirectory":
        return [AGENT_PATH, "fs", "mkdir", *(["-p"] if params.get("parents") else []), path]
    if op == "Remove":
        return [AGENT_PATH, "fs", "rm", *(["-r"] if params.get("recursive") else []), path]
    if op == "Watch":
        argv = [AGENT_PATH, "fs", "watch", *(["-r"] if params.get("recursive") else [])]
        timeout = params.get("timeout_secs")
        if isinstance(timeout, int) and timeout > 0:
            argv += ["-t", str(timeout)]
        kinds = params.get("filter")
        if isinstance(kinds, list):
            names = [k for k in kinds if isinstance(k, str) and k.isalpha()]
            argv += ["-f", ",".join(names) or "None"]  # an empty filter reports nothing
        return [*argv, path]
    raise GRPCError(Status.UNIMPLEMENTED, f"shoal's gateway does not serve the filesystem's {op} yet (decision 0075)")


class CommandRouter(TaskCommandRouterBase):
    """The router RPCs of exec, stdio and stdin."""

    def __init__(self, mgr: Manager, auth: GatewayAuth) -> None:
        self.mgr = mgr
        self.auth = auth

    async def _sandbox(self, stream: Any, task: str) -> Sandbox:
        header = str(stream.metadata.get("authorization", ""))
        token = header.removeprefix("Bearer ").strip()
        sandbox_id = sandbox_of_task(task)
        if self.auth.verify(token) != sandbox_id:
            raise GRPCError(Status.PERMISSION_DENIED, f"this token is not for task {task}")
        return await self.mgr.started(sandbox_id)  # SandboxCreateV2 answers before the start ends

    async def _process(self, stream: Any, task: str, exec_id: str) -> Process:
        """A process of the task's sandbox, or of one of its sidecars (which the client addresses by task too)."""
        return self._owner(await self._sandbox(stream, task), exec_id).process(exec_id)

    def _owner(self, sb: Sandbox, exec_id: str) -> Sandbox:
        """The sandbox (``sb`` or a sidecar of it) that runs ``exec_id``."""
        if exec_id in sb.processes or exec_id == ENTRYPOINT_ID:
            return sb
        for candidate in (sb, *self.mgr.sidecars.of(sb.id, include_terminated=True)):
            if exec_id in candidate.processes or self.mgr.state.exec(candidate.id, exec_id) is not None:
                return candidate  # (an ended process is only in the store)
        return sb  # (its NotFoundError names the exec)

    def _container(self, sb: Sandbox, container_id: str) -> Sandbox:
        """A sidecar of ``sb`` by its id (the client's container id)."""
        for side in self.mgr.sidecars.of(sb.id, include_terminated=True):
            if side.id == container_id:
                return side
        raise GRPCError(Status.NOT_FOUND, f"sandbox {sb.id} has no sidecar {container_id!r}")

    @grpc_errors
    async def TaskExecStart(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(stream, req.task_id)
        if sb.state == SandboxState.FINISHED and sb.spec.request.persistent_of is not None:
            # NOT_FOUND, not the ConflictError of a finished sandbox: the client then moves to the persistent
            # sandbox's running session (resuming one) and runs the command there.
            raise GRPCError(Status.NOT_FOUND, f"session {sb.id} of a persistent sandbox has ended")
        args = list(req.command_args)
        if args and args[0] == FS_TOOLS:
            args = fs_tool_args(args[1:])
        pty = req.HasField("pty_info") and req.pty_info.enabled
        env = {e.key: e.value for e in req.env} if req.env else {}
        if pty and req.pty_info.env_term:
            env["TERM"] = req.pty_info.env_term
        secret_env: dict[str, str] = {}
        for source in req.secret_sources:
            secret_env.update(dict(source.env.contents))
        secret_ids = [s.secret_id for s in req.secret_sources if s.secret_id] + list(req.secret_ids)
        exec_req = ExecRequest(
            exec_id=req.exec_id,
            args=args,
            workdir=req.workdir or None,
            env=env,
            pty=pty,
            pty_size=(req.pty_info.winsz_rows, req.pty_info.winsz_cols)
            if pty and 0 < req.pty_info.winsz_rows <= 10000 and 0 < req.pty_info.winsz_cols <= 10000
            else None,
            secret_env=secret_env,
            secret_ids=secret_ids,
            timeout=req.timeout_secs or None,
            stdout="pipe" if req.stdout_config == tcr.TASK_EXEC_STDOUT_CONFIG_PIPE else "devnull",
            stderr="devnull" if req.stderr_config == tcr.TASK_EXEC_STDERR_CONFIG_DEVNULL else "pipe",
        )
        if req.stderr_config == tcr.TASK_EXEC_STDERR_CONFIG_STDOUT:
            raise GRPCError(Status.UNIMPLEMENTED, "shoal's gateway does not merge stderr into stdout yet")
        target = self._container(sb, req.container_id) if req.container_id else sb
        await self.mgr.exec(target.id, exec_req)
        await stream.send_message(tcr.TaskExecStartResponse())

    async def _stream_output(self, stream: Any, proc: Process, fd: int, offset: int, v2: bool) -> None:
        async for data in proc.streams[fd - 1].follow(offset, CHUNK):  # its end is the end of the output
            if v2:
                await stream.send_message(tcr.SandboxStdioReadV2Response(data=data, starting_offset=offset))
            else:
                await stream.send_message(tcr.TaskExecStdioReadResponse(data=data))
            offset += len(data)

    @grpc_errors
    async def TaskExecStdioRead(self, stream: Any) -> None:
        req = await stream.recv_message()
        proc = await self._process(stream, req.task_id, req.exec_id)
        fd = 2 if req.file_descriptor == tcr.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDERR else 1
        await self._stream_output(stream, proc, fd, req.offset, v2=False)

    @grpc_errors
    async def SandboxStdioReadV2(self, stream: Any) -> None:
        req = await stream.recv_message()
        proc = await self._process(stream, req.task_id, ENTRYPOINT_ID)
        fd = 2 if req.file_descriptor == tcr.SANDBOX_STDIO_FILE_DESCRIPTOR_STDERR else 1
        await self._stream_output(stream, proc, fd, req.offset, v2=True)

    @staticmethod
    def _exit(proc: Process, response: Any) -> Any:
        kind, value = proc.exit_kind, proc.exit_value or 0
        if kind == ExitKind.SIGNAL:
            return response(signal=value)
        return response(code=value)

    @staticmethod
    def _ended(proc: Process) -> bool:
        """Whether a process's end is to be reported.  One killed at its deadline never is: the client holds the
        same deadline and answers -1 itself when it passes (as Modal's does), which the daemon's kill at that
        moment would otherwise race."""
        return proc.exited and proc.exit_kind != ExitKind.TIMEOUT

    @grpc_errors
    async def TaskExecWait(self, stream: Any) -> None:
        req = await stream.recv_message()
        proc = await self._process(stream, req.task_id, req.exec_id)
        if not proc.exited:
            await proc.wait(EXEC_WAIT_SLICE)
        if not self._ended(proc):
            if proc.exited:
                await asyncio.sleep(EXEC_WAIT_SLICE)  # the client's own deadline ends this call first
            raise GRPCError(Status.DEADLINE_EXCEEDED, "still running")
        await stream.send_message(self._exit(proc, tcr.TaskExecWaitResponse))

    @grpc_errors
    async def TaskExecPoll(self, stream: Any) -> None:
        req = await stream.recv_message()
        proc = await self._process(stream, req.task_id, req.exec_id)
        if not self._ended(proc):
            await stream.send_message(tcr.TaskExecPollResponse())
            return
        await stream.send_message(self._exit(proc, tcr.TaskExecPollResponse))

    async def _write_stdin(self, sb: Sandbox, exec_id: str, offset: int, data: bytes, eof: bool) -> None:
        await sb.write_stdin(exec_id, offset, data, eof)

    @grpc_errors
    async def TaskExecStdinWrite(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = self._owner(await self._sandbox(stream, req.task_id), req.exec_id)
        await self._write_stdin(sb, req.exec_id, req.offset, req.data, req.eof)
        await stream.send_message(tcr.TaskExecStdinWriteResponse())

    @grpc_errors
    async def SandboxStdinWriteV2(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(stream, req.task_id)
        await self._write_stdin(sb, ENTRYPOINT_ID, req.offset, req.data, req.eof)
        await stream.send_message(tcr.SandboxStdinWriteV2Response())

    @grpc_errors
    async def TaskExecStdinStatus(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = self._owner(await self._sandbox(stream, req.task_id), req.exec_id)
        offset = await sb.stdin_offset(req.exec_id)
        proc = sb.process(req.exec_id)
        await stream.send_message(tcr.TaskExecStdinStatusResponse(num_bytes_written=offset, closed=proc.exited))

    @grpc_errors
    async def SandboxWaitUntilReady(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(stream, req.task_id)
        if not await readiness.wait_ready(self.mgr, sb, max(req.timeout, 0.0)):
            raise GRPCError(Status.DEADLINE_EXCEEDED, f"Sandbox {sb.id} was not ready within {req.timeout:g} s")
        await stream.send_message(tcr.SandboxWaitUntilReadyTcrResponse(ready_at=time.time()))

    @grpc_errors
    async def TaskSnapshotMemory(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(stream, req.task_id)
        info = await self.mgr.memory_snapshots.take(sb.id)
        await stream.send_message(tcr.TaskSnapshotMemoryResponse(snapshot_id=info.snapshot_id))

    @grpc_errors
    async def TaskSnapshotDirectory(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._target(stream, req.task_id, req.container_id)
        ttl = req.ttl_seconds if req.ttl_seconds > 0 else None
        path = req.path.decode(errors="surrogateescape")
        image_id = await self.mgr.snapshots.directory(sb.id, path, SNAPSHOT_TIMEOUT, ttl)
        await stream.send_message(tcr.TaskSnapshotDirectoryResponse(image_id=image_id))

    @grpc_errors
    async def TaskMountDirectory(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._target(stream, req.task_id, req.container_id)
        await self.mgr.snapshots.mount(sb.id, req.path.decode(errors="surrogateescape"), req.image_id)
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def TaskUnmountDirectory(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._target(stream, req.task_id, req.container_id)
        await self.mgr.snapshots.unmount(sb.id, req.path.decode(errors="surrogateescape"))
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def TaskSetNetworkAccess(self, stream: Any) -> None:
        """``sb._experimental_set_outbound_network_policy``: the new allowlists, or none (open)."""
        req = await stream.recv_message()
        sb = await self._sandbox(stream, req.task_id)
        if sb.state != SandboxState.RUNNING:
            raise GRPCError(
                Status.FAILED_PRECONDITION, f"Sandbox {sb.id} is not running: its policy can no longer change"
            )
        access = req.network_access
        if access.network_access_type == api_pb2.NetworkAccess.ALLOWLIST:
            await self.mgr.network.set_policy(sb.id, *allowlists(access))
        elif access.network_access_type == api_pb2.NetworkAccess.OPEN:
            await self.mgr.network.set_policy(sb.id, None, None)
        else:
            raise GRPCError(Status.INVALID_ARGUMENT, "a running sandbox's network can be opened or allowlisted")
        await stream.send_message(tcr.TaskSetNetworkAccessResponse())

    @grpc_errors
    async def TaskSetOutboundPolicy(self, stream: Any) -> None:
        """``sb._experimental_update_outbound_policy``: header replacements that replace all of the sandbox's."""
        req = await stream.recv_message()
        sb = await self._sandbox(stream, req.task_id)
        if sb.state != SandboxState.RUNNING:
            raise GRPCError(
                Status.FAILED_PRECONDITION, f"Sandbox {sb.id} is not running: its policy can no longer change"
            )
        update = OutboundPolicyUpdate.model_validate(
            {"outbound_headers": outbound_headers(req.experimental_outbound_policy)}
        )
        await self.mgr.network.set_outbound_headers(sb.id, [r.model_dump(mode="json") for r in update.outbound_headers])
        await stream.send_message(tcr.TaskSetExperimentalOutboundPolicyResponse())

    async def _target(self, stream: Any, task: str, container_id: str) -> Sandbox:
        sb = await self._sandbox(stream, task)
        return self._container(sb, container_id) if container_id else sb

    # ------------------------------------------------------------------ sidecars

    @grpc_errors
    async def TaskContainerCreate(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(stream, req.task_id)
        side = await create_sidecar(
            self.mgr,
            sb.id,
            req.container_name,
            req.image_id,
            list(req.args),
            {e.key: e.value for e in req.env},
            req.secret_sources,
            list(req.secret_ids),
            req.workdir,
            req.volume_mounts,
            req.network_access,
            req.HasField("pty_info") and req.pty_info.enabled,
        )
        await stream.send_message(
            tcr.TaskContainerCreateResponse(container_id=side.id, container_name=req.container_name)
        )

    @staticmethod
    def _container_info(side: Sandbox) -> Any:
        status = "running" if side.state == SandboxState.RUNNING else "terminated"
        name = side.spec.request.sidecar_name or ""
        return tcr.TaskContainerInfo(
            container_id=side.id, container_name=name, status=status, result=generic_result(side.result)
        )

    @grpc_errors
    async def TaskContainerGet(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(stream, req.task_id)
        side = self.mgr.sidecars.get(sb.id, req.container_name, req.include_terminated)
        await stream.send_message(tcr.TaskContainerGetResponse(container=self._container_info(side)))

    @grpc_errors
    async def TaskContainerList(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(stream, req.task_id)
        sides = self.mgr.sidecars.of(sb.id, req.include_terminated)
        await stream.send_message(tcr.TaskContainerListResponse(containers=[self._container_info(x) for x in sides]))

    @grpc_errors
    async def TaskContainerWait(self, stream: Any) -> None:
        req = await stream.recv_message()
        side = self._container(await self._sandbox(stream, req.task_id), req.container_id)
        timeout = min(max(req.timeout, 0.0), 55.0)
        if not side.finished.is_set() and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(side.finished.wait(), timeout)
        await stream.send_message(tcr.TaskContainerWaitResponse(result=generic_result(side.result)))

    @grpc_errors
    async def TaskContainerTerminate(self, stream: Any) -> None:
        req = await stream.recv_message()
        side = self._container(await self._sandbox(stream, req.task_id), req.container_id)
        await side.terminate()
        await stream.send_message(tcr.TaskContainerTerminateResponse())

    @grpc_errors
    async def TaskReloadVolumes(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._target(stream, req.task_id, req.container_id)
        if sb.state != SandboxState.RUNNING:
            raise GRPCError(Status.FAILED_PRECONDITION, "Sandbox already finished")
        # Volumes are bind mounts of one directory: a running sandbox already sees every committed change.
        await stream.send_message(tcr.TaskReloadVolumesResponse())

    @grpc_errors
    async def TaskSnapshotFilesystem(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._target(stream, req.task_id, req.container_id)
        ttl = req.ttl_seconds if req.ttl_seconds > 0 else None
        image_id = await self.mgr.snapshots.filesystem(sb.id, SNAPSHOT_TIMEOUT, ttl)
        await stream.send_message(tcr.TaskSnapshotFilesystemResponse(image_id=image_id))

    @grpc_errors
    async def TaskExecStdinWriteStream(self, stream: Any) -> None:
        sb: Sandbox | None = None
        exec_id = ""
        offset = 0
        async for msg in stream:
            if msg.HasField("start"):
                sb = self._owner(await self._sandbox(stream, msg.start.task_id), msg.start.exec_id)
                exec_id, offset = msg.start.exec_id, msg.start.offset
            elif sb is None:
                raise GRPCError(Status.INVALID_ARGUMENT, "the stream must start with `start`")
            elif msg.HasField("end"):
                await self._write_stdin(sb, exec_id, offset, b"", True)
            elif msg.data:
                await self._write_stdin(sb, exec_id, offset, msg.data, False)
                offset += len(msg.data)
        await stream.send_message(tcr.TaskExecStdinWriteStreamResponse())
