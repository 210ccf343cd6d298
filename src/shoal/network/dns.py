"""The sandboxes' DNS server: a forwarder on the gateway address, which pins what allowlisted names resolve to.

Trusts: the upstream resolvers the host uses (they answer for the host too),
and the source address of a query, which names the sandbox that sent it
(the ruleset drops spoofed sources before they get here).

Defends against: hostile queries (parsed by dnspython only for sandboxes
with a domain allowlist; otherwise only size-checked and passed on as
bytes), floods (a bounded number of queries in flight per sandbox, the rest
dropped; at most ``MAX_TCP`` TCP connections per sandbox, more are reset at
accept, and one idle for ``TCP_IDLE`` seconds is closed; nothing at all while
the daemon is short of descriptors, ``shoal.util.limits``), and names
outside a sandbox's allowlist (answered NXDOMAIN, never forwarded).  For a
sandbox with a domain allowlist, every IPv4 address in an allowed answer
is allowed for that sandbox (``on_pins``) *before* the answer is sent, so
the connection that follows is never refused by a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset

from shoal.network.ruleset import PIN_SECONDS
from shoal.util import limits, ratelog
from shoal.wire.policy import domain_allowed

log = logging.getLogger(__name__)
log.addFilter(ratelog.PER_SANDBOX)

MAX_INFLIGHT = 64
"""Queries one sandbox may have waiting on the upstream (each holds one socket); more are dropped."""
MAX_TCP = 16
"""TCP connections one sandbox (by source address) may hold to the forwarder; more are reset at accept."""
UPSTREAM_TIMEOUT = 2.0
TCP_IDLE = 5.0
"""Seconds a TCP client may take to send a query (or to read an answer) before its connection is closed."""
MAX_PIN_SECONDS = 24 * 3600
LOCAL_TTL = 5
"""Seconds a sidecar's name may be cached (it changes only when the sidecar is made again)."""


@dataclass
class Client:
    """What the forwarder knows of one sandbox."""

    domains: list[str] | None
    """Names it may resolve (None: any, and nothing to pin)."""
    on_pins: Callable[[dict[ipaddress.IPv4Address, int]], Awaitable[None]] | None = None
    inflight: int = 0
    names: dict[str, str] = field(default_factory=dict)
    """Names answered here with an address (its sidecars, or a sidecar's sandbox as ``main``), before any
    allowlist or upstream."""


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: DnsForwarder) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        client = self.owner.clients(str(addr[0]))
        if client is not None and client.inflight < MAX_INFLIGHT:  # (else dropped before any work)
            self.owner._spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = await self.owner.resolve(str(addr[0]), data, tcp=False)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


class DnsForwarder:
    """UDP and TCP port 53 on one address, forwarding to the host's resolvers."""

    def __init__(
        self,
        bind: ipaddress.IPv4Address,
        upstreams: list[tuple[str, int]],
        clients: Callable[[str], Client | None],
    ) -> None:
        self.bind = bind
        self.upstreams = upstreams
        self.clients = clients
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: limits.Acceptor | None = None
        self._tcp_open = limits.Gate(MAX_TCP)
        """TCP connections open per source address."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on ``bind``:53 (UDP and TCP)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(str(self.bind), 53))
        self._udp = transport
        sock = limits.listen_socket(str(self.bind), 53, backlog=128)
        self._tcp = limits.Acceptor(sock, self._tcp_accept, f"the DNS forwarder ({self.bind}:53/tcp)")
        self._tcp.start()

    async def close(self) -> None:
        """Stop listening and cancel queries in flight."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("DNS forwarder: a query failed: %r", exc, extra=ratelog.about("dns"))

    # ------------------------------------------------------------------ one query

    async def resolve(self, source: str, query: bytes, *, tcp: bool) -> bytes | None:
        """The answer to send back for ``query`` from ``source``, or None to stay silent."""
        client = self.clients(source)
        if client is None or len(query) < 12 or client.inflight >= MAX_INFLIGHT or not limits.reserve_ok():
            return None
        client.inflight += 1
        try:
            if client.names:
                local = self._local(client, query)
                if local is not None:
                    return local
            if client.domains is None:
                return await self._forward(query, tcp)
            return await self._filtered(client, query, tcp)
        finally:
            client.inflight -= 1

    @staticmethod
    def _local(client: Client, query: bytes) -> bytes | None:
        """The answer for a name of ``client.names`` (A: its address; any other type: no records), else None."""
        try:
            msg = dns.message.from_wire(query)
        except Exception:
            return None
        if msg.flags & dns.flags.QR or msg.opcode() != dns.opcode.QUERY or len(msg.question) != 1:
            return None
        question = msg.question[0]
        address = client.names.get(question.name.to_text(omit_final_dot=True).lower())
        if address is None:
            return None
        reply = dns.message.make_response(msg)
        reply.flags |= dns.flags.AA
        if question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(question.name, LOCAL_TTL, "IN", "A", address))
        return reply.to_wire()

    async def _filtered(self, client: Client, query: bytes, tcp: bool) -> bytes | None:
        assert client.domains is not None
        try:
            msg = dns.message.from_wire(query)
        except Exception:
            return None
        if msg.flags & dns.flags.QR or msg.opcode() != dns.opcode.QUERY or len(msg.question) != 1:
            reply = dns.message.make_response(msg)
            reply.set_rcode(dns.rcode.REFUSED)
            return reply.to_wire()
        name = msg.question[0].name.to_text(omit_final_dot=True)
        if not domain_allowed(name, client.domains):
            reply = dns.message.make_response(msg)
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply.to_wire()
        raw = await self._forward(query, tcp)
        if raw is None:
            return None
        try:
            answer = dns.message.from_wire(raw)
        except Exception:
            return None
        pins: dict[ipaddress.IPv4Address, int] = {}
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.A:
                for rd in rrset:
                    secs = min(max(int(rrset.ttl), PIN_SECONDS), MAX_PIN_SECONDS)
                    pins[ipaddress.IPv4Address(rd.address)] = secs
        if pins and client.on_pins is not None:
            await client.on_pins(pins)
        return raw

    async def _forward(self, query: bytes, tcp: bool) -> bytes | None:
        for host, port in self.upstreams:
            try:
                if tcp:
                    return await asyncio.wait_for(self._ask_tcp(host, port, query), UPSTREAM_TIMEOUT)
                return await asyncio.wait_for(self._ask_udp(host, port, query), UPSTREAM_TIMEOUT)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                continue
        return None

    async def _ask_udp(self, host: str, port: int, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, query)
            while True:
                data = await loop.sock_recv(sock, 65535)
                if len(data) >= 12 and data[:2] == query[:2]:
                    return data

    async def _ask_tcp(self, host: str, port: int, query: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(size)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # ------------------------------------------------------------------ TCP clients

    def _tcp_accept(self, sock: socket.socket, addr: tuple[str | int, ...]) -> None:
        source = str(addr[0])
        if self.clients(source) is None:
            limits.refuse(sock)  # not a sandbox of this daemon
            return
        if not self._tcp_open.admit(source, sock):
            limits.refuse(sock)
            log.warning(
                "DNS over TCP from %s: %d connections open already, refusing more",
                source,
                MAX_TCP,
                extra=ratelog.about(source),
            )
            return
        self._spawn(self._tcp_client(sock, source))

    async def _tcp_client(self, sock: socket.socket, source: str) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError:
            return  # (the transport closed the socket)
        try:
            while True:
                (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE))
                query = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                reply = await self.resolve(source, query, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), TCP_IDLE)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, struct.error):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
