"""Modal's control plane (``modal.client.ModalClient``): apps, images, and sandboxes' lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from modal_proto import api_pb2
from modal_proto.api_grpc import ModalClientBase

from shoal import exception as exc
from shoal.engine.manager import Manager
from shoal.engine.process import ENTRYPOINT_ID
from shoal.engine.sandbox import Sandbox
from shoal.gateway.auth import GatewayAuth
from shoal.gateway.cluster import GatewayCluster
from shoal.gateway.convert import create_request, create_sidecar, generic_result, grpc_errors, task_id
from shoal.gateway.images import BUILDER_VERSION, GatewayImages
from shoal.gateway.mounts import GatewayMounts
from shoal.gateway.volumes import GatewayVolumes
from shoal.util import safefs
from shoal.wire import ids
from shoal.wire.images import ImageRef
from shoal.wire.sandboxes import CreateSandbox, SandboxName, SandboxState

log = logging.getLogger(__name__)

ENVIRONMENT_ID = "en-shoal"
LOGS_SLICE = 55.0
"""Most seconds one ``SandboxGetLogs`` streams (the client calls again from the last entry)."""
LOG_CHUNK = 64 << 10
ANONYMOUS_SECRETS = 10_000
STDIN_WRITERS = 10_000
"""Sandboxes whose last V1 stdin write is remembered (the oldest are forgotten)."""
WAIT_SLICE = 10.0
"""Most seconds one ``SandboxWait`` answers after (the client allows 15 per attempt and calls again)."""
LIST_PAGE = 100


class ControlPlane(ModalClientBase):
    """The control-plane RPCs the official client's sandbox workflows send; every other one is UNIMPLEMENTED
    (``shoal.gateway.server.complete``)."""

    def __init__(
        self, mgr: Manager, auth: GatewayAuth, router_url: str, volumes: GatewayVolumes, mounts: GatewayMounts
    ) -> None:
        self.mgr = mgr
        self.auth = auth
        self.router_url = router_url
        self.images = GatewayImages(mgr, mounts)
        self.volumes = volumes
        self.mounts = mounts
        self._anonymous: OrderedDict[str, dict[str, str]] = OrderedDict()
        """Secrets a V1 create's ``env`` became, by id, until the create uses them (the oldest are forgotten)."""
        self._stdin_writes: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        """Per sandbox, its last V1 stdin write: index, start and end offsets (a retry and the next write line up)."""
        self._starts: set[asyncio.Task[Sandbox]] = set()
        """Starts still going on after SandboxCreateV2 answered (``_create_early``)."""
        self.cluster: GatewayCluster | None = None
        """Where creates, lists and names look beyond this node, where the daemon is in a cluster."""

    # ------------------------------------------------------------------ apps, environment, auth

    @grpc_errors
    async def AppGetOrCreate(self, stream: Any) -> None:
        req = await stream.recv_message()
        create = req.object_creation_type in (
            api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
            api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL,
        )
        if (cluster := self.cluster) is not None and req.app_name:
            await cluster.router.take_in_app(req.app_name)
        app_id, _ = self.mgr.lookup_app(req.app_name, create)
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=app_id))

    @grpc_errors
    async def EnvironmentGetOrCreate(self, stream: Any) -> None:
        await stream.recv_message()
        settings = api_pb2.EnvironmentSettings(image_builder_version=BUILDER_VERSION)
        meta = api_pb2.EnvironmentMetadata(name="main", settings=settings)
        await stream.send_message(api_pb2.EnvironmentGetOrCreateResponse(environment_id=ENVIRONMENT_ID, metadata=meta))

    @grpc_errors
    async def AuthTokenGet(self, stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.AuthTokenGetResponse(token=self.auth.sign("client")))

    @grpc_errors
    async def AppCreate(self, stream: Any) -> None:
        req = await stream.recv_message()  # ``with app.run():`` — an ephemeral app, stopped at the block's end
        app_id = self.mgr.create_ephemeral_app(req.description or None)
        if req.tags:
            self.mgr.set_app_tags(app_id, dict(req.tags))
        await stream.send_message(api_pb2.AppCreateResponse(app_id=app_id))

    @grpc_errors
    async def AppPublish(self, stream: Any) -> None:
        req = await stream.recv_message()
        self.mgr.app(req.app_id)  # an app with nothing to deploy: a sandbox app has no functions
        await stream.send_message(api_pb2.AppPublishResponse())

    @grpc_errors
    async def AppHeartbeat(self, stream: Any) -> None:
        req = await stream.recv_message()
        self.mgr.app(req.app_id)
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def AppClientDisconnect(self, stream: Any) -> None:
        req = await stream.recv_message()
        await self.mgr.stop_app(req.app_id)  # the end of ``app.run()``: its sandboxes end with it
        if (cluster := self.cluster) is not None:
            await cluster.router.stop_app_elsewhere(req.app_id)
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def SecretGetOrCreate(self, stream: Any) -> None:
        req = await stream.recv_message()
        secrets = self.mgr.secrets
        kind = req.object_creation_type
        if kind == api_pb2.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP:
            # A V1 create's ``env``: no named secret, only the values, for the create that follows.
            secret_id = ids.new("secret")
            self._anonymous[secret_id] = dict(req.env_dict)
            while len(self._anonymous) > ANONYMOUS_SECRETS:
                self._anonymous.popitem(last=False)
            await stream.send_message(api_pb2.SecretGetOrCreateResponse(secret_id=secret_id))
            return
        creating = kind in (
            api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
            api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS,
        )
        if (cluster := self.cluster) is not None and req.deployment_name:
            await cluster.secret_name(req.deployment_name, creating)
        if creating:
            allow = kind == api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING
            row = secrets.create(req.deployment_name, dict(req.env_dict), allow)
        elif kind == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
            row = secrets.lookup(req.deployment_name, list(req.required_keys))
        else:
            raise exc.UnimplementedError("shoal's gateway does not overwrite secrets: use `shoal secret`")
        await stream.send_message(api_pb2.SecretGetOrCreateResponse(secret_id=row.id))

    # ------------------------------------------------------------------ local files (mounts)

    @grpc_errors
    async def MountBatchedCheckExistence(self, stream: Any) -> None:
        req = await stream.recv_message()
        missing = self.mounts.missing(list(req.sha256_hex_hashes))
        await stream.send_message(api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing))

    @grpc_errors
    async def MountPutFile(self, stream: Any) -> None:
        req = await stream.recv_message()
        await stream.send_message(await asyncio.to_thread(self.mounts.put_file, req))

    @grpc_errors
    async def MountGetOrCreate(self, stream: Any) -> None:
        req = await stream.recv_message()
        if req.deployment_name:
            raise exc.UnimplementedError("shoal's gateway does not keep named mounts: use an image or a volume")
        await stream.send_message(await self.mounts.create(req))

    @grpc_errors
    async def BlobCreate(self, stream: Any) -> None:
        req = await stream.recv_message()
        await stream.send_message(self.mounts.blob_create(req))

    # ------------------------------------------------------------------ volumes

    @grpc_errors
    async def VolumeGetOrCreate(self, stream: Any) -> None:
        req = await stream.recv_message()  # (in a cluster, another node's name went to that node's gateway)
        await stream.send_message(self.volumes.get_or_create(req))

    @grpc_errors
    async def VolumeHeartbeat(self, stream: Any) -> None:
        req = await stream.recv_message()
        self.mgr.volumes.heartbeat(req.volume_id)
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def VolumePutFiles2(self, stream: Any) -> None:
        req = await stream.recv_message()
        await stream.send_message(await self.volumes.put_files(req))

    @grpc_errors
    async def VolumeGetFile2(self, stream: Any) -> None:
        req = await stream.recv_message()
        await stream.send_message(self.volumes.get_file(req))

    @grpc_errors
    async def VolumeListFiles2(self, stream: Any) -> None:
        req = await stream.recv_message()
        await self.volumes.list_files(req, stream.send_message)

    @grpc_errors
    async def VolumeRemoveFile2(self, stream: Any) -> None:
        req = await stream.recv_message()
        await asyncio.to_thread(self.volumes.remove, req)
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def VolumeCopyFiles2(self, stream: Any) -> None:
        req = await stream.recv_message()
        await asyncio.to_thread(self.volumes.copy, req)
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def VolumeDelete(self, stream: Any) -> None:
        req = await stream.recv_message()
        name = self.mgr.volumes.get(req.volume_id).name
        self.mgr.volumes.delete(req.volume_id)
        if (cluster := self.cluster) is not None:
            await cluster.volume_gone(name)
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def VolumeRename(self, stream: Any) -> None:
        req = await stream.recv_message()
        row = self.mgr.volumes.get(req.volume_id)
        if row.name is None:
            raise exc.InvalidError("an ephemeral volume has no name to change")
        if (cluster := self.cluster) is not None and req.name != row.name:
            if (holder := await cluster.volume_holder(req.name, creating=True)) is not None:
                raise exc.AlreadyExistsError(f"Volume '{req.name}' already exists (on node {holder.name})")
            try:
                self.mgr.volumes.rename(row.name, req.name)
            except BaseException:
                await cluster.volume_gone(req.name)
                raise
            await cluster.volume_gone(row.name)
        else:
            self.mgr.volumes.rename(row.name, req.name)
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def VolumeList(self, stream: Any) -> None:
        await stream.recv_message()
        listing = self.volumes.listing()
        if (cluster := self.cluster) is not None:
            listing.items.extend(await cluster.others_volumes())
        await stream.send_message(listing)

    @grpc_errors
    async def VolumeGetById(self, stream: Any) -> None:
        req = await stream.recv_message()
        row = self.mgr.volumes.get(req.volume_id)
        meta = api_pb2.VolumeMetadata(version=api_pb2.VOLUME_FS_VERSION_V2, name=row.name or "")
        await stream.send_message(api_pb2.VolumeGetByIdResponse(volume_id=row.id, metadata=meta))

    @grpc_errors
    async def VolumeCommit(self, stream: Any) -> None:
        req = await stream.recv_message()
        with self.mgr.volumes.open(req.volume_id) as vol:
            await asyncio.to_thread(safefs.syncfs, vol.root)
        await stream.send_message(api_pb2.VolumeCommitResponse(skip_reload=True))

    @grpc_errors
    async def VolumeReload(self, stream: Any) -> None:
        req = await stream.recv_message()
        self.mgr.volumes.get(req.volume_id)  # one directory, bind-mounted: every reader sees every commit
        await stream.send_message(empty_pb2.Empty())

    # ------------------------------------------------------------------ images

    @grpc_errors
    async def ImageGetOrCreate(self, stream: Any) -> None:
        req = await stream.recv_message()
        await stream.send_message(await self.images.get_or_create(req))

    @grpc_errors
    async def ImageJoinStreaming(self, stream: Any) -> None:
        req = await stream.recv_message()
        await self.images.join(req, stream.send_message)

    # ------------------------------------------------------------------ sandboxes

    def _router_access(self, sandbox_id: str) -> tuple[str, str]:
        return self.auth.sign(sandbox_id), self.router_url

    async def _sandbox(self, sandbox_id: str) -> Sandbox:
        await self._here(sandbox_id)
        return await self.mgr.started(sandbox_id)  # SandboxCreateV2 answers before the start ends

    async def _here(self, sandbox_id: str) -> None:
        """NotFoundError unless this daemon has ``sandbox_id`` (in a cluster, calls for another node's sandboxes
        were passed to that node before they reach a handler: ``shoal.gateway.cluster``)."""
        self.mgr.get(sandbox_id)

    def _create_request(self, req: Any) -> CreateSandbox:
        definition = req.definition
        sources = req.secret_sources if hasattr(req, "secret_sources") else []  # V1 creates have none
        tags = req.tags if hasattr(req, "tags") else []  # persistent creates have none
        create = create_request(req.app_id, definition, sources, tags, self._anonymous)
        steps = self.mounts.copy_steps(list(definition.mount_ids))  # Image.add_local_* (copy=False)
        image = ImageRef.model_validate(
            {"kind": "id", "image_id": self.images.image_id(definition.image_id), "steps": steps}
        )
        return create.model_copy(update={"image": image})

    async def _create(self, req: Any) -> Sandbox:
        return await self.mgr.create(self._create_request(req), lambda line: None)

    async def _placed(self, req: Any, early: bool) -> tuple[str, str]:
        """Create where the cluster has room (this node outside a cluster): the sandbox's id and its app's."""
        cluster = self.cluster
        if cluster is None:
            sb = await (self._create_early(req) if early else self._create(req))
            return sb.id, sb.row.app_id
        placed = await cluster.create(
            self._create_request(req), lambda: self._create_early(req) if early else self._create(req)
        )
        if isinstance(placed, Sandbox):
            return placed.id, placed.row.app_id
        return placed.sandbox_id, placed.app_id

    async def _create_early(self, req: Any) -> Sandbox:
        """The sandbox as soon as every check has passed and it is listed, its container still starting: the
        client's own work before its first command (a channel to the router) overlaps the start, as with Modal,
        whose create returns a sandbox that is still being scheduled.  Calls that name it wait for the start
        (``sb.settled``); a start that fails then ends it with an ``init_failure`` result, which they report."""
        create = self._create_request(req)
        loop = asyncio.get_running_loop()
        admitted: asyncio.Future[Sandbox] = loop.create_future()
        task = loop.create_task(self.mgr.create(create, lambda line: None, on_admitted=admitted.set_result))
        self._starts.add(task)
        task.add_done_callback(self._started)
        await asyncio.wait([task, admitted], return_when=asyncio.FIRST_COMPLETED)
        if not admitted.done():
            admitted.cancel()
            return task.result()  # the create's error, found before the sandbox was listed
        return admitted.result()

    def _started(self, task: asyncio.Task[Sandbox]) -> None:
        self._starts.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.info("gateway: a sandbox failed to start after its create answered: %s", error)

    # ------------------------------------------------------------------ persistent sandboxes (sessions)

    @grpc_errors
    async def PersistentSandboxCreate(self, stream: Any) -> None:
        req = await stream.recv_message()
        create = self._create_request(req).model_copy(update={"persistent": True})
        sb = await self.mgr.persistents.create(create, lambda line: None)
        rec = self.mgr.persistents.record(sb.id)
        assert rec is not None
        await stream.send_message(
            api_pb2.PersistentSandboxCreateResponse(persistent_sandbox_id=rec.persistent_id, sandbox_id=sb.id)
        )

    @grpc_errors
    async def PersistentSandboxGet(self, stream: Any) -> None:
        req = await stream.recv_message()
        if not req.persistent_sandbox_id:
            raise exc.InvalidError("look a persistent sandbox up by its id (named ones are not supported yet)")
        object_id = self.mgr.persistents.object_id(req.persistent_sandbox_id)
        await stream.send_message(
            api_pb2.PersistentSandboxGetResponse(
                persistent_sandbox_id=req.persistent_sandbox_id,
                sandbox_id=self.mgr.persistents.running_session_id(object_id) or "",
            )
        )

    @grpc_errors
    async def PersistentSandboxResume(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self.mgr.persistents.resume(self.mgr.persistents.object_id(req.persistent_sandbox_id))
        await stream.send_message(api_pb2.PersistentSandboxResumeResponse(sandbox_id=sb.id))

    @grpc_errors
    async def PersistentSandboxTerminate(self, stream: Any) -> None:
        req = await stream.recv_message()
        await self.mgr.persistents.terminate(self.mgr.persistents.object_id(req.persistent_sandbox_id))
        await stream.send_message(api_pb2.PersistentSandboxTerminateResponse())

    @grpc_errors
    async def PersistentSandboxTunnelsList(self, stream: Any) -> None:
        req = await stream.recv_message()
        object_id = self.mgr.persistents.object_id(req.persistent_sandbox_id)
        session = self.mgr.persistents.running_session_id(object_id)
        tunnels = await self.mgr.network.tunnels_of(session, self.mgr.get(session).finished, 5.0) if session else []
        data = [api_pb2.TunnelData(**t) for t in tunnels]
        await stream.send_message(api_pb2.PersistentSandboxTunnelsListResponse(tunnels=data))

    @grpc_errors
    async def SandboxCreateV2(self, stream: Any) -> None:
        req = await stream.recv_message()
        sandbox_id, app_id = await self._placed(req, early=True)
        jwt, url = self._router_access(sandbox_id)
        await stream.send_message(
            api_pb2.SandboxCreateV2Response(
                sandbox_id=sandbox_id,
                task_id=task_id(sandbox_id),
                command_router_access=api_pb2.CommandRouterAccess(jwt=jwt, url=url),
                metadata=api_pb2.SandboxHandleMetadata(app_id=app_id),
            )
        )

    @grpc_errors
    async def SandboxCreate(self, stream: Any) -> None:
        req = await stream.recv_message()
        sandbox_id, _ = await self._placed(req, early=False)
        await stream.send_message(api_pb2.SandboxCreateResponse(sandbox_id=sandbox_id))

    async def _task_id(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(req.sandbox_id)
        if sb.state == SandboxState.FINISHED:
            resp = api_pb2.SandboxGetTaskIdResponse(task_result=generic_result(sb.result))
        else:
            resp = api_pb2.SandboxGetTaskIdResponse(task_id=task_id(sb.id))
        await stream.send_message(resp)

    @grpc_errors
    async def SandboxGetTaskIdV2(self, stream: Any) -> None:
        await self._task_id(stream)

    @grpc_errors
    async def SandboxGetTaskId(self, stream: Any) -> None:
        await self._task_id(stream)

    @grpc_errors
    async def SandboxGetCommandRouterAccess(self, stream: Any) -> None:
        req = await stream.recv_message()
        sandbox_id = req.sandbox_id or "sb-" + req.task_id.removeprefix("ta-")
        await self._here(sandbox_id)
        jwt, url = self._router_access(sandbox_id)
        await stream.send_message(api_pb2.SandboxGetCommandRouterAccessResponse(jwt=jwt, url=url))

    @grpc_errors
    async def TaskGetCommandRouterAccess(self, stream: Any) -> None:
        req = await stream.recv_message()
        sandbox_id = "sb-" + req.task_id.removeprefix("ta-")
        await self._here(sandbox_id)
        jwt, url = self._router_access(sandbox_id)
        await stream.send_message(api_pb2.TaskGetCommandRouterAccessResponse(jwt=jwt, url=url))

    async def _wait(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(req.sandbox_id)
        timeout = min(max(req.timeout, 0.0), WAIT_SLICE)
        if not sb.finished.is_set() and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sb.finished.wait(), timeout)
        meta = api_pb2.SandboxHandleMetadata(app_id=sb.row.app_id, result=generic_result(sb.result))
        await stream.send_message(api_pb2.SandboxWaitResponse(result=generic_result(sb.result), metadata=meta))

    @grpc_errors
    async def SandboxWaitV2(self, stream: Any) -> None:
        await self._wait(stream)

    @grpc_errors
    async def SandboxWait(self, stream: Any) -> None:
        await self._wait(stream)

    async def _terminate(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(req.sandbox_id)
        await sb.terminate()
        await stream.send_message(api_pb2.SandboxTerminateResponse(existing_result=generic_result(sb.result)))

    @grpc_errors
    async def SandboxTerminateV2(self, stream: Any) -> None:
        await self._terminate(stream)

    @grpc_errors
    async def SandboxTerminate(self, stream: Any) -> None:
        await self._terminate(stream)

    async def _tunnels(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(req.sandbox_id)
        try:
            tunnels = await self.mgr.network.tunnels_of(sb.id, sb.finished, min(max(req.timeout, 0.0), 55.0))
        except exc.SandboxTimeoutError:
            timeout = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT)
            await stream.send_message(api_pb2.SandboxGetTunnelsResponse(result=timeout))
            return
        data = [api_pb2.TunnelData(**t) for t in tunnels]
        ok = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        await stream.send_message(api_pb2.SandboxGetTunnelsResponse(result=ok, tunnels=data))

    @grpc_errors
    async def SandboxGetTunnelsV2(self, stream: Any) -> None:
        await self._tunnels(stream)

    @grpc_errors
    async def SandboxGetTunnels(self, stream: Any) -> None:
        await self._tunnels(stream)

    @grpc_errors
    async def SandboxGetLogs(self, stream: Any) -> None:
        """The entrypoint's output for handles of the V1 kind (``from_id``): batches from ``last_entry_id`` (a
        byte offset), ``eof`` at its end; a call ends after ``timeout`` and the client calls again from there."""
        req = await stream.recv_message()
        sb = await self._sandbox(req.sandbox_id)
        fd = 2 if req.file_descriptor == api_pb2.FILE_DESCRIPTOR_STDERR else 1
        out = sb.process(ENTRYPOINT_ID).streams[fd - 1]
        offset = int(req.last_entry_id) if req.last_entry_id.isdigit() else 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(req.timeout, 1.0), LOGS_SLICE)
        while True:
            data = out.read(offset, LOG_CHUNK)
            if data:
                offset += len(data)
                item = api_pb2.TaskLogs(data=data.decode(errors="replace"), file_descriptor=req.file_descriptor)
                await stream.send_message(api_pb2.TaskLogsBatch(items=[item], entry_id=str(offset)))
                continue
            if out.eof:
                await stream.send_message(api_pb2.TaskLogsBatch(entry_id=str(offset), eof=True))
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await out.wait(offset, remaining)

    @grpc_errors
    async def SandboxStdinWrite(self, stream: Any) -> None:
        """The entrypoint's stdin for handles of the V1 kind: ``index`` numbers the writes from 1, so a retried
        one is taken once (shoal's stdin offsets, here the bytes taken before this write)."""
        req = await stream.recv_message()
        sb = await self._sandbox(req.sandbox_id)
        last = self._stdin_writes.pop(sb.id, None)
        if last is not None and last[0] == req.index:
            start = last[1]  # a retry of the last write: the same bytes at the same place
        elif last is not None and last[0] == req.index - 1:
            start = last[2]
        else:
            start = await sb.stdin_offset(ENTRYPOINT_ID)
        end = await sb.write_stdin(ENTRYPOINT_ID, start, req.input, req.eof)
        self._stdin_writes[sb.id] = (req.index, start, end)
        while len(self._stdin_writes) > STDIN_WRITERS:
            self._stdin_writes.popitem(last=False)
        await stream.send_message(api_pb2.SandboxStdinWriteResponse())

    @grpc_errors
    async def SandboxCreateConnectTokenV2(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(req.sandbox_id)
        if sb.state != SandboxState.RUNNING:
            raise exc.ConflictError(f"Sandbox {sb.id} is not running: nothing can connect to it")
        url, token = await self.mgr.network.create_connect_token(sb.id, req.port or 8080, req.user_metadata, sb.touch)
        await stream.send_message(api_pb2.SandboxCreateConnectTokenResponse(url=url, token=token))

    @grpc_errors
    async def SandboxContainerCreateV2(self, stream: Any) -> None:
        req = await stream.recv_message()
        d = req.definition
        side = await create_sidecar(
            self.mgr,
            req.sandbox_id,
            req.container_name,
            self.images.image_id(d.image_id),
            list(d.entrypoint_args),
            {},
            req.secret_sources,
            list(d.secret_ids),
            d.workdir,
            d.volume_mounts,
            d.network_access,
            d.HasField("pty_info") and d.pty_info.enabled,
        )
        await stream.send_message(
            api_pb2.SandboxContainerCreateV2Response(container_id=side.id, container_name=req.container_name)
        )

    # ------------------------------------------------------------------ memory snapshots

    async def _snapshot(self, sandbox_id: str) -> str:
        return (await self.mgr.memory_snapshots.take(sandbox_id)).snapshot_id

    @grpc_errors
    async def SandboxSnapshot(self, stream: Any) -> None:
        req = await stream.recv_message()
        await stream.send_message(api_pb2.SandboxSnapshotResponse(snapshot_id=await self._snapshot(req.sandbox_id)))

    @grpc_errors
    async def SandboxSnapshotWait(self, stream: Any) -> None:
        req = await stream.recv_message()
        self.mgr.memory_snapshots.get(req.snapshot_id)  # taken by the time SandboxSnapshot answered
        ok = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        await stream.send_message(api_pb2.SandboxSnapshotWaitResponse(result=ok))

    @grpc_errors
    async def SandboxSnapshotGet(self, stream: Any) -> None:
        req = await stream.recv_message()
        self.mgr.memory_snapshots.get(req.snapshot_id)
        meta = api_pb2.SandboxSnapshotHandleMetadata(is_v2=True)
        await stream.send_message(api_pb2.SandboxSnapshotGetResponse(snapshot_id=req.snapshot_id, handle_metadata=meta))

    async def _restore(self, req: Any) -> Sandbox:
        kind = req.sandbox_name_override_type
        override = api_pb2.SandboxRestoreRequest
        keep = kind == override.SANDBOX_NAME_OVERRIDE_TYPE_UNSPECIFIED
        name = req.sandbox_name_override if kind == override.SANDBOX_NAME_OVERRIDE_TYPE_STRING else None
        if getattr(req, "volume_mounts", None) or getattr(req, "replace_volume_mounts", False):
            raise exc.UnimplementedError("shoal restores a memory snapshot with the volumes it had")
        return await self.mgr.memory_snapshots.restore(req.snapshot_id, name, keep)

    @grpc_errors
    async def SandboxRestoreV2(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._restore(req)
        jwt, url = self._router_access(sb.id)
        await stream.send_message(
            api_pb2.SandboxRestoreV2Response(
                sandbox_id=sb.id,
                task_id=task_id(sb.id),
                command_router_access=api_pb2.CommandRouterAccess(jwt=jwt, url=url),
                metadata=api_pb2.SandboxHandleMetadata(app_id=sb.row.app_id),
            )
        )

    @grpc_errors
    async def SandboxRestore(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._restore(req)
        await stream.send_message(api_pb2.SandboxRestoreResponse(sandbox_id=sb.id))

    async def _from_name(self, stream: Any) -> None:
        req = await stream.recv_message()
        try:
            sb = self.mgr.from_name(req.app_name, req.sandbox_name, req.include_terminated)
            sandbox_id, app_id, result = sb.id, sb.row.app_id, sb.result
        except exc.NotFoundError:
            cluster = self.cluster
            found = await cluster.from_name(req.app_name, req.sandbox_name, req.include_terminated) if cluster else None
            if found is None:
                raise
            sandbox_id, app_id, result = found.sandbox_id, found.app_id, found.result
        meta = api_pb2.SandboxHandleMetadata(app_id=app_id, result=generic_result(result))
        await stream.send_message(api_pb2.SandboxGetFromNameResponse(sandbox_id=sandbox_id, metadata=meta))

    @grpc_errors
    async def SandboxGetFromNameV2(self, stream: Any) -> None:
        await self._from_name(stream)

    @grpc_errors
    async def SandboxGetFromName(self, stream: Any) -> None:
        await self._from_name(stream)

    async def _list(self, stream: Any) -> None:
        req = await stream.recv_message()
        tags = {t.tag_name: t.tag_value for t in req.tags}
        items = self.mgr.list(req.app_id or None, tags, req.include_finished)
        if (cluster := self.cluster) is not None:
            items += await cluster.others_list(req.app_id or None, tags, req.include_finished)
            items.sort(key=lambda i: i.created_at_us, reverse=True)
        before = req.before_timestamp
        page = [i for i in items if not before or i.created_at_us / 1e6 < before][:LIST_PAGE]
        out = []
        for info in page:
            result = generic_result(info.result)
            out.append(
                api_pb2.SandboxInfo(
                    id=info.sandbox_id,
                    created_at=info.created_at_us / 1e6,
                    app_id=info.app_id,
                    name=info.name or "",
                    image_id=info.image_id,
                    timeout_secs=info.timeout,
                    tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in info.tags.items()],
                    task_info=api_pb2.TaskInfo(id=task_id(info.sandbox_id), result=result),
                    metadata=api_pb2.SandboxHandleMetadata(app_id=info.app_id, result=result),
                )
            )
        await stream.send_message(api_pb2.SandboxListResponse(sandboxes=out))

    @grpc_errors
    async def SandboxListV2(self, stream: Any) -> None:
        await self._list(stream)

    @grpc_errors
    async def SandboxList(self, stream: Any) -> None:
        await self._list(stream)

    async def _tags_get(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(req.sandbox_id)
        tags = [api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sb.row.tags.items()]
        await stream.send_message(api_pb2.SandboxTagsGetResponse(tags=tags))

    @grpc_errors
    async def SandboxSetName(self, stream: Any) -> None:
        req = await stream.recv_message()
        try:
            name = SandboxName(name=req.name).name
        except ValueError as e:
            raise exc.InvalidError(str(e)) from None
        self.mgr.set_name(req.sandbox_id, name)
        await stream.send_message(api_pb2.SandboxSetNameResponse())

    @grpc_errors
    async def SandboxGetStats(self, stream: Any) -> None:
        req = await stream.recv_message()
        sb = await self._sandbox(req.sandbox_id)
        since = req.since.ToMicroseconds() / 1e6 if req.HasField("since") else None
        until = req.until.ToMicroseconds() / 1e6 if req.HasField("until") else None
        stats = self.mgr.usage.stats(sb, since, until)
        resp = api_pb2.SandboxGetStatsResponse(
            duration_hours=stats.duration_seconds / 3600,
            billed_cpu_core_seconds=stats.billed_cpu_core_seconds,
            billed_memory_gib_seconds=stats.billed_memory_gib_seconds,
            num_datapoints=stats.samples,
        )
        resp.since.FromMicroseconds(round(stats.since * 1e6))
        resp.until.FromMicroseconds(round(stats.until * 1e6))
        for key, (unit, values) in stats.percentiles.items():
            dist = resp.percentile_stats[key]
            dist.unit = unit
            for p, value in values:
                dist.percentiles.add(percentile_basis_points=round(p * 100), value=value)
        await stream.send_message(resp)

    @grpc_errors
    async def SandboxTagsGetV2(self, stream: Any) -> None:
        await self._tags_get(stream)

    @grpc_errors
    async def SandboxTagsGet(self, stream: Any) -> None:
        await self._tags_get(stream)

    async def _tags_set(self, stream: Any) -> None:
        req = await stream.recv_message()
        self.mgr.set_tags(req.sandbox_id, {t.tag_name: t.tag_value for t in req.tags})
        await stream.send_message(empty_pb2.Empty())

    @grpc_errors
    async def SandboxTagsSetV2(self, stream: Any) -> None:
        await self._tags_set(stream)

    @grpc_errors
    async def SandboxTagsSet(self, stream: Any) -> None:
        await self._tags_set(stream)


def not_served(name: str) -> Any:
    """A handler for an RPC the gateway does not serve: UNIMPLEMENTED, which the client does not retry."""

    async def handler(self: Any, stream: Any) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, f"shoal's gateway does not serve {name} yet (decision 0075)")

    handler.__name__ = name
    return handler
