"""Which calls pass between the gateways of a cluster's nodes, and the listener that takes them (decision 0081).

A call is passed to the node that holds what its request names: a sandbox (by its sandbox or task id), a memory
snapshot, or a volume (by id, or ``VolumeGetOrCreate``'s name).  Each gateway takes such calls from its peers on
its node's cluster address, with the cluster's API token, and answers for its own node only.
"""

from __future__ import annotations

import hmac
from typing import Any

from grpclib import GRPCError, Status
from grpclib.const import Handler

from shoal.gateway.convert import sandbox_of_task

PEER_TOKEN = "x-shoal-cluster-token"
"""The metadata key of the cluster's API token on a call one gateway passes to another."""


def sandbox_named(message: Any) -> str | None:
    """The sandbox a request names by its ``sandbox_id``, or its ``task_id`` (also a stream's ``start``'s)."""
    fields = message.DESCRIPTOR.fields_by_name
    if "sandbox_id" in fields and message.sandbox_id:
        return str(message.sandbox_id)
    if "task_id" in fields and message.task_id:
        return _of_task(str(message.task_id))
    if "start" in fields and fields["start"].message_type is not None and message.HasField("start"):
        return sandbox_named(message.start)
    return None


def _of_task(task: str) -> str | None:
    try:
        return sandbox_of_task(task)
    except GRPCError:
        return None  # answered here as a task no node has


def names_a_sandbox(handler: Handler) -> bool:
    """Whether a path's requests name a sandbox (``sandbox_named``), which decides the node that answers them."""
    fields = handler.request_type.DESCRIPTOR.fields_by_name
    start = fields.get("start")
    return (
        "sandbox_id" in fields
        or "task_id" in fields
        or (start is not None and start.message_type is not None and "task_id" in start.message_type.fields_by_name)
    )


def names_a_snapshot(handler: Handler) -> bool:
    """Whether a path's requests name a memory snapshot only (it lives on the node of the sandbox it was taken of)."""
    return "snapshot_id" in handler.request_type.DESCRIPTOR.fields_by_name and not names_a_sandbox(handler)


def names_a_volume(handler: Handler) -> bool:
    """Whether a path's requests name a volume by id (they go to the node that holds it)."""
    return "volume_id" in handler.request_type.DESCRIPTOR.fields_by_name and not names_a_sandbox(handler)


VOLUME_BY_NAME = "/modal.client.ModalClient/VolumeGetOrCreate"
"""The one path that names a volume by its name: it goes to the node that holds the name."""


def passed_on(path: str, handler: Handler) -> bool:
    """Whether one node's gateway may pass a path's calls to another's."""
    return names_a_sandbox(handler) or names_a_snapshot(handler) or names_a_volume(handler) or path == VOLUME_BY_NAME


class Replayed:
    """A server stream whose first request was read already (to route it): the handler reads it again."""

    def __init__(self, stream: Any, first: Any) -> None:
        self._stream = stream
        self._first: Any = first

    async def recv_message(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._stream.recv_message()

    def __aiter__(self) -> Replayed:
        return self

    async def __anext__(self) -> Any:
        message = await self.recv_message()
        if message is None:
            raise StopAsyncIteration
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class PeerAuthenticated:
    """The handlers of calls other nodes' gateways pass on: only those ``passed_on`` allows (a sandbox, a memory
    snapshot or a volume), each checking the cluster's token first; every other path answers UNIMPLEMENTED."""

    def __init__(self, inner: Any, cluster_token: str) -> None:
        self.inner = inner
        self.token = cluster_token

    def __mapping__(self) -> dict[str, Handler]:
        def guarded(func: Any) -> Any:
            async def call(stream: Any) -> None:
                given = str(stream.metadata.get(PEER_TOKEN, "")).encode(errors="replace")
                if not hmac.compare_digest(given, self.token.encode()):
                    raise GRPCError(Status.UNAUTHENTICATED, "not a call from a node of this cluster")
                await func(stream)

            return call

        async def refused(stream: Any) -> None:
            raise GRPCError(
                Status.UNIMPLEMENTED, "a gateway takes only calls about a sandbox, snapshot or volume from its peers"
            )

        return {
            path: h._replace(func=guarded(h.func) if passed_on(path, h) else refused)
            for path, h in self.inner.__mapping__().items()
        }
