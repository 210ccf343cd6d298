"""The gateway's listener: one grpclib server on a loopback TCP port with the control plane and the router."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any
from urllib.parse import urlsplit

from grpclib.const import Handler
from grpclib.protocol import H2Protocol
from grpclib.server import Server

from shoal.engine.manager import Manager
from shoal.gateway.auth import GatewayAuth
from shoal.gateway.cluster import ClusterAPI, GatewayCluster
from shoal.gateway.control import ControlPlane, not_served
from shoal.gateway.mounts import GatewayMounts
from shoal.gateway.peers import PeerAuthenticated
from shoal.gateway.router import CommandRouter
from shoal.gateway.volumes import BlockStore, GatewayVolumes
from shoal.util import loopback

log = logging.getLogger(__name__)


def complete(cls: type) -> type:
    """``cls`` with every abstract RPC it leaves out answering UNIMPLEMENTED (the generated bases declare every
    RPC Modal has; the gateway serves those of the sandbox workflows)."""
    missing = {name: not_served(name) for name in getattr(cls, "__abstractmethods__", ())}
    return type(cls.__name__, (cls,), missing) if missing else cls


class _Authenticated:
    """The control plane's handlers, each checking the client's token pair first."""

    def __init__(self, inner: Any, auth: GatewayAuth) -> None:
        self.inner = inner
        self.auth = auth

    def __mapping__(self) -> dict[str, Handler]:
        def guarded(func: Any) -> Any:
            async def call(stream: Any) -> None:
                self.auth.check_client(stream.metadata)
                await func(stream)

            return call

        return {path: h._replace(func=guarded(h.func)) for path, h in self.inner.__mapping__().items()}


class _CoalescingTransport:
    """A connection's transport whose writes made in one turn of the event loop leave as one send.

    grpclib writes a response's headers, message and trailers one by one, each a send of its own and, with
    TCP_NODELAY, a packet of its own, which the client's event loop then wakes for one by one."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))  # one chunk: no copy

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _CoalescingProtocol(H2Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        super().connection_made(_CoalescingTransport(transport))  # type: ignore[arg-type]


class _Server(Server):
    """grpclib's server, its connections' writes coalesced (``_CoalescingTransport``; decision 0075)."""

    def _protocol_factory(self) -> H2Protocol:
        made = super()._protocol_factory()  # what registers the connection's handler with the server
        return _CoalescingProtocol(made.handler, made.config, made.h2_config)


@dataclasses.dataclass
class Gateway:
    """A running gateway: its URL and the credentials clients need."""

    server: Server
    url: str
    auth: GatewayAuth
    blocks: BlockStore
    peers: Server | None = None
    """The listener for calls other nodes' gateways pass on (in a cluster)."""
    cluster: GatewayCluster | None = None

    def env(self) -> dict[str, str]:
        """The environment that points an official ``modal`` client at this gateway."""
        return {
            "MODAL_SERVER_URL": self.url,
            "MODAL_TOKEN_ID": self.auth.token_id,
            "MODAL_TOKEN_SECRET": self.auth.token_secret,
        }

    async def close(self) -> None:
        for server in (self.server, self.peers):
            if server is not None:
                server.close()
                await server.wait_closed()
        if self.cluster is not None:
            self.cluster.close()
        await self.blocks.close()


async def start(mgr: Manager, address: str, cluster: tuple[ClusterAPI, str] | None = None) -> Gateway:
    """Listen on ``address`` (a loopback HOST:PORT; a port in use falls back to any free one, said in the log).

    ``cluster``: the API's cluster router and the cluster's token, where the daemon is in a cluster; the gateway
    then serves the whole cluster, and also listens on this node's cluster address for its peers' calls."""
    # Loopback only: the client may use a plain-HTTP router only when it reaches the control plane as localhost
    # (reference/modal-wire.md §1); TLS for other addresses is not built yet.
    host, port = loopback.split(address, "gateway")
    if mgr.cluster is None:
        cluster = None
    auth = GatewayAuth(mgr.cfg.data_dir, cluster[1] if cluster is not None else None)
    sock, url = loopback.listen(host, port, "gateway", log)
    blocks = BlockStore(mgr, auth)
    mounts = GatewayMounts(mgr, blocks)
    peer_host = urlsplit(mgr.cfg.advertise_url or "").hostname or "127.0.0.1"
    # Peers reach this node's gateway on its port, and its blocks on the next one (any free one where taken).
    await blocks.start(host, (peer_host, port + 1 if 0 < port < 65535 else 0) if cluster is not None else None)
    control = complete(ControlPlane)(mgr, auth, url, GatewayVolumes(mgr, blocks), mounts)
    router = complete(CommandRouter)(mgr, auth)
    if cluster is None or mgr.cluster is None:
        server = _Server([_Authenticated(control, auth), router])
        await server.start(sock=sock)
        log.info("gateway for the official modal client on %s (`shoal gateway env`)", url)
        return Gateway(server, url, auth, blocks)
    spread = GatewayCluster(mgr, cluster[0], cluster[1], auth, url)
    control.cluster = spread
    server = _Server([_Authenticated(spread.routed(control), auth), spread.routed(router, bearer=True)])
    await server.start(sock=sock)
    peers = _Server([PeerAuthenticated(control, cluster[1]), PeerAuthenticated(router, cluster[1])])
    peer_sock, peer_url = loopback.listen(peer_host, port, "gateway (its cluster's peers)", log)
    await peers.start(sock=peer_sock)
    mgr.cluster.register(gateway=peer_url, gateway_blocks=blocks.peer_base)
    log.info("gateway for the official modal client on %s, serving the cluster; its peers' on %s", url, peer_url)
    return Gateway(server, url, auth, blocks, peers, spread)
