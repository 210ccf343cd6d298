"""One TLS listener for every tunnel, routed by name (``shoal serve --tunnel-domain D``; Modal-like tunnel hosts).

Each TLS tunnel is named ``<label>.D``; clients connect to the shared listener (port 443 by default) and the
name they ask for picks the sandbox port: the TLS server name (SNI), or, from a client that sent none or an
unknown one, the ``Host`` header of its first HTTP/1.1 request.  After that the connection is forwarded exactly
as a tunnel's own listener forwards it (``shoal.network.tunnels``): bytes untouched, HTTP/1.1, h2 and WebSocket.

Trusts: the route table, whose names the daemon made (random labels).
Defends: a name from a client is only a key into that table; a connection naming no tunnel gets a 421 and is
closed.  Because the name travels inside the handshake, the sandbox's ``inbound_cidr_allowlist`` and its
per-port connection cap are checked after the handshake (not at accept as on a tunnel's own listener), still
before any byte or connection reaches the sandbox.  A client that neither names a tunnel nor finishes its
request head within ``HANDSHAKE_TIMEOUT`` (or sends more than ``HEAD_MAX`` bytes of it) is cut off, and at
most ``MAX_OPEN`` connections are open through this listener at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
from typing import Any

from shoal.util import limits, ratelog

from .tunnels import HANDSHAKE_TIMEOUT, MAX_CONNS, _Conn, _Side, _Tunnel

log = logging.getLogger(__name__)
log.addFilter(ratelog.PER_SANDBOX)

HEAD_MAX = 16 * 1024
"""Bytes of a request head read while looking for its ``Host`` (a client that sent no usable server name)."""
MAX_OPEN = 16384
"""Connections open at once through the shared listener, all tunnels together."""
_SNI_ATTR = "shoal_server_name"


def new_label() -> str:
    """A fresh tunnel name's first label: 12 random base-32 characters (DNS-safe, not guessable)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "".join(secrets.choice(alphabet) for _ in range(12))


def host_of(head: bytes) -> str:
    """The host name in an HTTP/1.x request head's ``Host`` header (port and trailing dot removed), or ''."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip().decode("ascii", "replace").lower()
            if host.startswith("["):
                return host[1:].partition("]")[0]
            return host.rpartition(":")[0].rstrip(".") if ":" in host else host.rstrip(".")
    return ""


class _RoutedConn(_Conn):
    """A connection to the shared listener: which tunnel it is for is learnt from its name."""

    def __init__(self, router: TunnelRouter) -> None:
        self.router = router
        self.client = _Side(self)
        self.sandbox: _Side | None = None
        self._last = 0.0
        self.routed = False
        self._timer: asyncio.TimerHandle | None = None

    def ready(self) -> None:
        transport = self.client.transport
        assert transport is not None
        name = getattr(transport.get_extra_info("ssl_object"), _SNI_ATTR, "")
        tunnel = self.router.routes.get(name)
        if tunnel is not None:
            self._route(tunnel, transport)
            return
        self.router.waiting.add(self)
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._give_up)

    def held(self) -> None:
        if self.routed:
            return
        transport = self.client.transport
        assert transport is not None
        head = b"".join(self.client.pending)
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > HEAD_MAX:
                self._refuse(transport, "the request head is too long")
            return
        host = host_of(head[:end])
        tunnel = self.router.routes.get(host)
        if tunnel is None:
            self._refuse(transport, f"no tunnel is named {host!r}" if host else "the request names no host")
            return
        self._route(tunnel, transport)

    def _route(self, tunnel: _Tunnel, transport: asyncio.Transport) -> None:
        self.routed = True
        self._stop_waiting()
        self.tunnel = tunnel
        peer = transport.get_extra_info("peername")
        if not tunnel.owner.allowed(str(peer[0]) if peer else ""):
            transport.abort()
            return
        if not tunnel.owner.open.admit(tunnel.port, transport.get_extra_info("socket")):
            log.warning(
                "tunnel to %s:%d: %d connections open already, refusing more",
                tunnel.owner.ip,
                tunnel.port,
                MAX_CONNS,
                extra=ratelog.about(tunnel.owner.ip),
            )
            transport.abort()
            return
        limits.spent()  # the connection into the sandbox
        tunnel.started(self)

    def _refuse(self, transport: asyncio.Transport, why: str) -> None:
        self.routed = True  # nothing more is read
        self._stop_waiting()
        body = f"shoal: {why}\n".encode()
        transport.write(
            b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        transport.close()

    def _give_up(self) -> None:
        self._timer = None
        if not self.routed and self.client.transport is not None:
            self.routed = True
            self.client.transport.abort()
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.router.waiting.discard(self)

    def lost(self, side: _Side) -> None:
        self._stop_waiting()
        if hasattr(self, "tunnel"):
            super().lost(side)


class TunnelRouter:
    """The shared listener and its table: tunnel name → the tunnel (``SandboxTunnels.route``)."""

    def __init__(self, domain: str, encrypted: ssl.SSLContext, h2: ssl.SSLContext) -> None:
        self.domain = domain
        self.routes: dict[str, _Tunnel] = {}
        self.h2_names: set[str] = set()
        self.waiting: set[_RoutedConn] = set()
        self._tls = encrypted
        self._h2 = h2
        self._tls.sni_callback = self._server_name
        self._open = limits.Gate(MAX_OPEN)
        self._acceptor: limits.Acceptor | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def name(self, label: str) -> str:
        """The full host name of the tunnel labelled ``label``."""
        return f"{label}.{self.domain}"

    async def start(self, bind: str, port: int) -> int:
        """Listen on ``bind``:``port`` (that port or fail: clients are told it).  Returns the port."""
        sock = limits.listen_socket(bind, port, backlog=1024)
        if port and sock.getsockname()[1] != port:
            sock.close()
            raise OSError(f"the tunnel port {bind}:{port} is in use: choose another with --tunnel-port")
        self._acceptor = limits.Acceptor(sock, self._accepted, f"the tunnel listener on {bind}:{port}")
        self._acceptor.start()
        return self._acceptor.port

    def add(self, label: str, tunnel: _Tunnel, h2: bool) -> None:
        """Route ``<label>.<domain>`` to ``tunnel`` (offering HTTP/2 by ALPN when ``h2``)."""
        name = self.name(label)
        self.routes[name] = tunnel
        if h2:
            self.h2_names.add(name)

    def remove(self, label: str) -> None:
        name = self.name(label)
        self.routes.pop(name, None)
        self.h2_names.discard(name)

    def _server_name(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        name = (server_name or "").lower().rstrip(".")
        setattr(sslobj, _SNI_ATTR, name)
        if name in self.h2_names:
            sslobj.context = self._h2

    def _accepted(self, sock: socket.socket, addr: Any) -> None:
        if not self._open.admit(None, sock):
            limits.refuse(sock)
            log.warning(
                "the tunnel listener has %d connections open already, refusing more",
                MAX_OPEN,
                extra=ratelog.about("tunnel-listener"),
            )
            return
        task = asyncio.ensure_future(self._serve(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            await loop.connect_accepted_socket(
                lambda: _RoutedConn(self).client, sock, ssl=self._tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )

    async def close(self) -> None:
        """Stop listening and cut the connections not yet routed (routed ones close with their sandbox)."""
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        for conn in list(self.waiting):
            conn.close()
        self.waiting.clear()
        for task in list(self._tasks):
            task.cancel()
        self.routes.clear()
        self.h2_names.clear()
