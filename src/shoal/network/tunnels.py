"""Tunnels: listeners on the host that forward to a sandbox's ports (TLS terminated here, or raw TCP).

Trusts: the sandbox's address and ports, chosen by the daemon and the
validated create request; the local CA (``tls``).
Defends: a tunnel only ever connects to its own sandbox's address and the
one container port it was made for; a peer outside the sandbox's
``inbound_cidr_allowlist`` is dropped at accept, before any byte is read or
any connection made into the sandbox.  Bytes are passed through untouched
and unparsed in both directions (HTTP/1.1, HTTP/2, WebSocket or anything
else), with flow control so a slow reader on either side stops the other
instead of growing buffers in the daemon.  At most ``MAX_CONNS`` connections
are open (or in their TLS handshake) at once per sandbox port, whichever
listener they came through; more are reset at accept, as they are while the
daemon is short of descriptors (``shoal.util.limits``).

Kinds (as Modal's): ``encrypted`` — TLS offering HTTP/1.1 by ALPN; ``h2`` —
TLS offering HTTP/2 first (``h2``, then ``http/1.1``): the sandbox's server
then receives HTTP/2 with prior knowledge (h2c); ``unencrypted`` — a TLS
listener and a raw TCP one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.util import limits, ratelog

log = logging.getLogger(__name__)
log.addFilter(ratelog.PER_SANDBOX)

MAX_CONNS = 256
"""Connections open at once to one sandbox port (each costs the daemon two descriptors); more are reset."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a client has to finish its TLS handshake."""
CONNECT_RETRY = 2.0
"""How long a new tunnel connection waits for the sandbox's server to accept (it may still be starting)."""
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20
ENCRYPTED, H2, UNENCRYPTED = "encrypted", "h2", "unencrypted"
BYTES = {"in": 0, "out": 0}
"""Bytes forwarded since the daemon started: ``in`` from clients into sandboxes, ``out`` back (``/metrics``)."""


class _Side(asyncio.Protocol):
    """One end of a forwarded connection; ``peer`` is the other end."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        if self is self.conn.client:
            # For TLS, after the handshake: a failed handshake never gets here and costs the sandbox nothing.
            self.conn.ready()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)  # the other side is still connecting
            if self is self.conn.client:
                self.conn.held()
            return
        BYTES["in" if self is self.conn.client else "out"] += len(data)
        peer.transport.write(data)
        self.conn.active()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if peer.eof:
                peer.transport.close()  # both directions are done
                return False
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
                return True  # half-close: keep reading the other way
            peer.transport.close()
        return False

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        self.conn.lost(self)

    def link(self, peer: _Side) -> None:
        self.peer = peer
        for data in self.pending:
            assert peer.transport is not None
            BYTES["in" if self is self.conn.client else "out"] += len(data)
            peer.transport.write(data)
        self.pending.clear()


class _Conn:
    """A tunnel connection: the client's side, and the sandbox's once connected."""

    def __init__(self, tunnel: _Tunnel) -> None:
        self.tunnel = tunnel
        self.client = _Side(self)
        self.sandbox: _Side | None = None
        self._last = 0.0

    def ready(self) -> None:
        """The client is connected (for TLS: its handshake is done): connect into the sandbox."""
        self.tunnel.started(self)

    def held(self) -> None:
        """The client sent bytes before the sandbox's side was connected (they wait in ``client.pending``)."""

    def active(self) -> None:
        now = time.monotonic()
        if now - self._last > 1.0:
            self._last = now
            self.tunnel.owner.touch()

    def lost(self, side: _Side) -> None:
        if side is self.client and self.sandbox is not None and self.sandbox.transport is not None:
            self.sandbox.transport.close()
        if self in self.tunnel.conns:
            self.tunnel.conns.discard(self)
            self.tunnel.owner.touch()

    def close(self) -> None:
        for side in (self.client, self.sandbox):
            if side is not None and side.transport is not None:
                side.transport.abort()


@dataclass(eq=False)
class _Tunnel:
    """One listener: a container port, reached by TLS or raw TCP."""

    owner: SandboxTunnels
    port: int
    tls: ssl.SSLContext | None = None
    acceptor: limits.Acceptor | None = None
    conns: set[_Conn] = field(default_factory=set)

    def accept(self) -> _Side:
        return _Conn(self).client

    def accepted(self, sock: socket.socket, addr: Any) -> None:
        """A new connection: dropped unless its peer may connect and the port has room, else served."""
        if not self.owner.allowed(str(addr[0])):
            limits.refuse(sock)
            return
        if not self.owner.open.admit(self.port, sock):
            limits.refuse(sock)
            log.warning(
                "tunnel to %s:%d: %d connections open already, refusing more",
                self.owner.ip,
                self.port,
                MAX_CONNS,
                extra=ratelog.about(self.owner.ip),
            )
            return
        limits.spent()  # the connection into the sandbox it will open
        self.owner.spawn(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        timeout = HANDSHAKE_TIMEOUT if self.tls is not None else None
        # A failed or timed-out handshake (OSError): the transport is closed, and the sandbox never saw a thing.
        with contextlib.suppress(OSError):
            await loop.connect_accepted_socket(self.accept, sock, ssl=self.tls, ssl_handshake_timeout=timeout)

    def started(self, conn: _Conn) -> None:
        client = conn.client
        assert client.transport is not None
        self.conns.add(conn)
        self.owner.touch()
        client.transport.pause_reading()
        self.owner.spawn(self._connect(conn))

    async def _connect(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + CONNECT_RETRY
        while True:
            try:
                _, proto = await loop.create_connection(lambda: _Side(conn), self.owner.ip, self.port)
                break
            except OSError:
                if time.monotonic() >= deadline or conn.client.transport is None or conn.client.transport.is_closing():
                    if conn.client.transport is not None:
                        conn.client.transport.close()
                    return
                await asyncio.sleep(0.1)
        conn.sandbox = proto
        if conn.client.transport is None or conn.client.transport.is_closing():
            assert proto.transport is not None
            proto.transport.close()
            return
        proto.link(conn.client)
        conn.client.link(proto)
        if conn.client.eof:
            conn.client.eof_received()
        conn.client.transport.resume_reading()


def peer_allowed(inbound: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None, peer: str) -> bool:
    """Whether a client at ``peer`` may connect under ``inbound`` (None: anybody; IPv4-mapped IPv6 counts as IPv4)."""
    if inbound is None:
        return True
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in inbound)


class SandboxTunnels:
    """One sandbox's tunnels."""

    def __init__(self, ip: str, inbound: list[str] | None, touch: Callable[[], None]) -> None:
        self.ip = ip
        self.inbound = [ipaddress.ip_network(c) for c in inbound] if inbound is not None else None
        self.touch = touch
        self.listeners: list[_Tunnel] = []
        self.ready = asyncio.Event()
        self.open = limits.Gate(MAX_CONNS)
        """Connections open per container port."""
        self._tasks: set[asyncio.Task[None]] = set()

    def allowed(self, peer: str) -> bool:
        """Whether ``peer`` may connect (``inbound_cidr_allowlist``)."""
        return peer_allowed(self.inbound, peer)

    def busy(self) -> bool:
        """Whether any tunnel connection is open."""
        return any(t.conns for t in self.listeners)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("tunnel to %s: a connection failed: %r", self.ip, exc, extra=ratelog.about(self.ip))

    def route(self, port: int) -> _Tunnel:
        """A tunnel to container ``port`` with no listener of its own: the shared one (``routing``) hands it
        the connections whose name is this tunnel's."""
        tunnel = _Tunnel(self, port)
        self.listeners.append(tunnel)
        return tunnel

    async def listen(self, port: int, bind: str, want: int, tls: ssl.SSLContext | None) -> int:
        """A listener forwarding to container ``port``; binds ``want`` if free, else any port.  Returns its port."""
        tunnel = _Tunnel(self, port, tls)
        sock = limits.listen_socket(bind, want)
        tunnel.acceptor = limits.Acceptor(sock, tunnel.accepted, f"the tunnel to {self.ip}:{port}")
        tunnel.acceptor.start()
        self.listeners.append(tunnel)
        return tunnel.acceptor.port

    async def close(self) -> None:
        """Stop listening and cut every open connection."""
        for t in self.listeners:
            if t.acceptor is not None:
                t.acceptor.close()
            for c in list(t.conns):
                c.close()
        for task in list(self._tasks):
            task.cancel()
        self.ready.clear()
        self.listeners.clear()
