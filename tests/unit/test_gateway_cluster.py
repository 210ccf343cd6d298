"""The gateway's cluster logic that needs no cluster: which calls name a sandbox (and so go to its node), which a
peer may pass on, the credentials every node derives from the cluster's token, and the replayed first request."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("modal_proto", reason="the gateway extra is not installed: make setup")

from grpclib import GRPCError, Status
from modal_proto import api_pb2
from modal_proto import task_command_router_pb2 as tcr

from shoal.gateway.auth import TOKEN_FILE, GatewayAuth
from shoal.gateway.control import ControlPlane
from shoal.gateway.peers import (
    PEER_TOKEN,
    PeerAuthenticated,
    Replayed,
    names_a_sandbox,
    names_a_snapshot,
    names_a_volume,
    sandbox_named,
)
from shoal.gateway.router import CommandRouter
from shoal.gateway.server import complete

CONTROL = "/modal.client.ModalClient/"
ROUTER = "/modal.task_command_router.TaskCommandRouter/"


def mapping(cls: type) -> dict[str, Any]:
    servicer = complete(cls)
    return dict(servicer.__mapping__(object.__new__(servicer)))  # the handlers' shapes only: nothing is called


def test_the_sandbox_a_request_names() -> None:
    assert sandbox_named(api_pb2.SandboxWaitRequest(sandbox_id="sb-abc")) == "sb-abc"
    assert sandbox_named(tcr.TaskExecStartRequest(task_id="ta-abc", exec_id="e")) == "sb-abc"
    start = tcr.TaskExecStdinWriteStreamRequest(start=tcr.TaskExecStdinWriteStreamStart(task_id="ta-xyz"))
    assert sandbox_named(start) == "sb-xyz"
    assert sandbox_named(tcr.TaskExecStdinWriteStreamRequest(data=b"more")) is None
    assert sandbox_named(tcr.TaskExecStartRequest(task_id="not-a-task")) is None  # answered here: no such task
    access = api_pb2.SandboxGetCommandRouterAccessRequest(task_id="ta-q")
    assert sandbox_named(access) == "sb-q"
    assert sandbox_named(api_pb2.SandboxWaitRequest()) is None


def test_which_paths_go_to_a_sandboxs_node() -> None:
    control, router = mapping(ControlPlane), mapping(CommandRouter)
    for name in ("SandboxWait", "SandboxTerminateV2", "SandboxGetLogs", "SandboxTagsSet", "TaskGetCommandRouterAccess"):
        assert names_a_sandbox(control[CONTROL + name]), name
    for name in ("TaskExecStart", "TaskExecStdioRead", "TaskExecStdinWriteStream", "TaskSnapshotFilesystem"):
        assert names_a_sandbox(router[ROUTER + name]), name
    for name in ("SandboxCreateV2", "SandboxListV2", "AppGetOrCreate", "VolumeGetOrCreate", "SecretGetOrCreate"):
        assert not names_a_sandbox(control[CONTROL + name]), name
        assert not names_a_snapshot(control[CONTROL + name]), name
    for name in ("SandboxSnapshotWait", "SandboxSnapshotGet", "SandboxRestoreV2"):
        assert names_a_snapshot(control[CONTROL + name]), name
    for name in ("VolumePutFiles2", "VolumeGetFile2", "VolumeListFiles2", "VolumeDelete", "VolumeRename"):
        assert names_a_volume(control[CONTROL + name]) and not names_a_sandbox(control[CONTROL + name]), name
    assert not names_a_volume(control[CONTROL + "VolumeGetOrCreate"])  # by name: asked of every node first


def test_a_peer_listener_takes_only_calls_about_a_sandbox_or_snapshot_with_the_clusters_token() -> None:
    peer = PeerAuthenticated(complete(ControlPlane)(*[None] * 5), "cluster-token").__mapping__()

    class Stream:
        def __init__(self, metadata: dict[str, str]) -> None:
            self.metadata = metadata

    assert CONTROL + "VolumeGetOrCreate" in peer  # from the node that found this one holds the name
    for name in ("SandboxCreateV2", "AppGetOrCreate", "SandboxListV2", "AuthTokenGet", "SecretGetOrCreate"):
        with pytest.raises(GRPCError) as refused:
            asyncio.run(peer[CONTROL + name].func(Stream({PEER_TOKEN: "cluster-token"})))
        assert refused.value.status == Status.UNIMPLEMENTED, name

    for metadata in ({}, {PEER_TOKEN: "wrong"}, {PEER_TOKEN: "clüster-token"}, {"x-modal-token-id": "cluster-token"}):
        with pytest.raises(GRPCError) as refused:
            asyncio.run(peer[CONTROL + "SandboxWaitV2"].func(Stream(metadata)))
        assert refused.value.status == Status.UNAUTHENTICATED


def test_every_node_derives_the_same_gateway_credentials_from_the_clusters_token(tmp_path: Path) -> None:
    one, two = GatewayAuth(tmp_path / "a", "shared"), GatewayAuth(tmp_path / "b", "shared")
    assert (one.token_id, one.token_secret) == (two.token_id, two.token_secret)
    assert one.token_id.startswith("ak-") and one.token_secret.startswith("as-")
    assert two.verify(one.sign("sb-1")) == "sb-1"  # a router token any node signed
    other = GatewayAuth(tmp_path / "c", "another cluster")
    assert other.token_secret != one.token_secret
    with pytest.raises(GRPCError) as refused:
        other.verify(one.sign("sb-1"))
    assert refused.value.status == Status.UNAUTHENTICATED
    two.check_client({"x-modal-token-id": one.token_id, "x-modal-token-secret": one.token_secret})
    for bad in ({"x-modal-token-id": one.token_id, "x-modal-token-secret": "ünknown"}, {}):
        with pytest.raises(GRPCError) as refused:
            two.check_client(bad)
        assert refused.value.status == Status.UNAUTHENTICATED
    assert not (tmp_path / "a" / TOKEN_FILE).exists()  # nothing of its own on disk
    tmp_path.joinpath("d").mkdir()
    alone = GatewayAuth(tmp_path / "d")
    assert alone.token_secret != one.token_secret and (tmp_path / "d" / TOKEN_FILE).exists()


def test_a_replayed_stream_gives_the_request_read_to_route_it_then_the_rest() -> None:
    class Stream:
        def __init__(self) -> None:
            self.left = ["second", "third"]
            self.metadata = {"authorization": "Bearer t"}

        async def recv_message(self) -> str | None:
            return self.left.pop(0) if self.left else None

    async def read() -> tuple[str | None, list[str], Any]:
        replayed = Replayed(Stream(), "first")
        head = await replayed.recv_message()
        rest = [m async for m in replayed]
        return head, rest, replayed.metadata

    assert asyncio.run(read()) == ("first", ["second", "third"], {"authorization": "Bearer t"})
