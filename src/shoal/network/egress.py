"""Headers added to a sandbox's outbound HTTPS requests outside the sandbox (Modal's ``OutboundPolicy``).

A sandbox created with ``_experimental_outbound_policy`` has every TCP connection it opens to port 443 turned,
by the packet filter, to this interceptor on its gateway (``ruleset``: only destinations the filter would let
it reach anyway).  The interceptor reads the TLS server name from the client's first message without taking
it off the socket.  A name that no replacement of the sandbox's policy matches is forwarded untouched to the
address the sandbox dialled.  For a matching name the interceptor ends the sandbox's TLS with a certificate
for that name from the egress CA (``egress_ca``; the sandbox trusts it), opens its own TLS connection to the
same address checking that the server really is that name (the host's trust store, or ``--egress-ca-file``),
and forwards each HTTP/1.1 request with the policy's headers set, replacing any the sandbox sent under those
names.  Secret values are put in here: they never enter the sandbox.

Trusts: the policy (validated by ``shoal.wire.outbound``) and the secret values the daemon resolved for it.
Defends against the sandbox, whose every byte is hostile:
- sending a secret elsewhere: headers are added only on a connection whose server proved, with a certificate
  the host trusts, that it is the matching name, and only to requests whose ``Host`` is that same name (a
  request for another name on the same connection, as a shared front end would route it, gets a 421);
- request smuggling: a head that is not plain HTTP/1.x, or that frames its body ambiguously (both
  ``Content-Length`` and ``Transfer-Encoding``, differing lengths, an unknown transfer coding, folded lines) is
  refused with a 400 and the connection closed, so the server reads exactly the requests the interceptor read;
- reaching what the filter denies: the interceptor dials only the address the sandbox dialled, after the filter
  let that address through, and checks it again against the denied ranges;
- exhausting the daemon: at most ``MAX_CONNS`` connections per sandbox (more are reset), the descriptor
  reserve (``shoal.util.limits``), ``HELLO_TIMEOUT`` for the first message, ``HEAD_MAX`` per request head.
WebSocket upgrades and ``CONNECT`` get their head rewritten, then their bytes pass as they are; h2 is not
offered to the sandbox (clients fall back to HTTP/1.1, as they do with any server that lacks it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass

from shoal.network.egress_ca import EgressCA
from shoal.network.ruleset import EGRESS_PORT
from shoal.util import limits, ratelog

log = logging.getLogger(__name__)
log.addFilter(ratelog.PER_SANDBOX)

PORT = EGRESS_PORT
MAX_CONNS = 256
"""Intercepted connections one sandbox may hold open at once; more are reset."""
HELLO_MAX = 16 * 1024 + 5
"""Bytes of a client's first TLS record looked at for its server name (one record at most)."""
HELLO_TIMEOUT = 10.0
"""Seconds a sandbox may take to send its TLS ClientHello."""
HEAD_MAX = 64 * 1024
"""Bytes of one request head; a longer one gets a 431."""
UPSTREAM_TIMEOUT = 15.0
"""Seconds to connect to the server and finish its TLS handshake."""
CHUNK = 64 * 1024
_SO_ORIGINAL_DST = 80
_TOKEN = re.compile(rb"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_FRAMING = {b"content-length", b"transfer-encoding"}


@dataclass(frozen=True)
class Replacement:
    """Headers set on requests to the names ``domain`` matches (values resolved from the policy's secret)."""

    domain: str
    headers: dict[str, str]


def domain_matches(pattern: str, name: str) -> bool:
    """Whether a policy domain covers a server name: ``*`` any, ``*.x`` x and its subdomains, else exactly."""
    name = name.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        apex = pattern[2:]
        return name == apex or name.endswith("." + apex)
    return name == pattern


def headers_for(policy: list[Replacement], name: str) -> dict[bytes, bytes]:
    """The headers to set on requests to ``name`` (lower-cased name → value; later replacements win)."""
    out: dict[bytes, bytes] = {}
    for rep in policy:
        if domain_matches(rep.domain, name):
            for key, value in rep.headers.items():
                out[key.lower().encode()] = value.encode()
    return out


class _NeedMore(Exception):
    pass


def server_name(data: bytes) -> str:
    """The SNI host name in a TLS ClientHello at the start of ``data`` ('' when there is none or ``data`` is not
    one); ``_NeedMore`` when the first record is incomplete.  Only the first record is read: a ClientHello that
    spans records (none that clients send today) passes untouched."""
    if len(data) < 5:
        if data and data[0] != 0x16:
            return ""
        raise _NeedMore
    if data[0] != 0x16 or data[1] != 0x03:
        return ""
    length = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + length:
        raise _NeedMore
    body = data[5 : 5 + length]
    try:
        return _sni(body)
    except (IndexError, ValueError):
        return ""


def _sni(msg: bytes) -> str:
    if msg[0] != 0x01:
        return ""
    end = min(len(msg), 4 + int.from_bytes(msg[1:4], "big"))
    i = 4 + 2 + 32  # type and length, legacy version, random
    i += 1 + msg[i]  # session id
    i += 2 + int.from_bytes(msg[i : i + 2], "big")  # cipher suites
    i += 1 + msg[i]  # compression methods
    ext_end = min(end, i + 2 + int.from_bytes(msg[i : i + 2], "big"))
    i += 2
    while i + 4 <= ext_end:
        kind, size = int.from_bytes(msg[i : i + 2], "big"), int.from_bytes(msg[i + 2 : i + 4], "big")
        i += 4
        if kind == 0:  # server_name: a list of (type, name); type 0 is a host name
            j, list_end = i + 2, min(i + size, i + 2 + int.from_bytes(msg[i : i + 2], "big"))
            while j + 3 <= list_end:
                name_type, name_len = msg[j], int.from_bytes(msg[j + 1 : j + 3], "big")
                name = msg[j + 3 : j + 3 + name_len]
                if name_type == 0 and len(name) == name_len:
                    text = name.decode("ascii")  # UnicodeDecodeError is a ValueError: no usable name
                    return text.lower().rstrip(".") if _host_ok(text) else ""
                j += 3 + name_len
            return ""
        i += size
    return ""


def _host_ok(name: str) -> bool:
    return 0 < len(name) <= 253 and all(c.isalnum() or c in "-._" for c in name)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The address and port a redirected connection was dialled to (from the kernel's NAT record)."""
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


class _Reject(Exception):
    """A request the interceptor refuses: answered with ``status`` and the connection closed."""

    def __init__(self, status: str, why: str) -> None:
        super().__init__(why)
        self.status = status


def rewrite_head(head: bytes, name: str, add: dict[bytes, bytes]) -> tuple[bytes, int | None, bool]:
    """One request head with ``add`` set (its lines ending CRLF CRLF) → the head to send, the body framing
    (a length, or None for chunked) and whether the connection turns into a byte stream after it (an upgrade
    or ``CONNECT``).  Raises ``_Reject`` for what the server could read differently from this parser."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not _TOKEN.match(parts[0]):
        raise _Reject("400 Bad Request", "not an HTTP/1.1 request line")
    method = parts[0]
    kept: list[bytes] = [lines[0]]
    hosts: list[bytes] = []
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    upgrade = False
    for line in lines[1:]:
        key, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(key):
            raise _Reject("400 Bad Request", "a malformed header line (folded, or without a name)")
        lower, value = key.lower(), value.strip(b" \t")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise _Reject("400 Bad Request", "a control character in a header value")
        if lower == b"host":
            hosts.append(value)
        elif lower == b"content-length":
            lengths.add(value)
        elif lower == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",") if c.strip()]
        elif lower == b"upgrade":
            upgrade = True
        if lower not in add:
            kept.append(line)
    if len(hosts) != 1:
        raise _Reject("400 Bad Request", "a request needs exactly one Host header")
    host = hosts[0].decode("ascii", "replace").lower()
    host = host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host
    if host.rstrip(".") != name:
        raise _Reject(
            "421 Misdirected Request", f"this connection is for {name}; open another one for {host or 'that host'}"
        )
    length: int | None
    if codings:
        if lengths or codings != [b"chunked"]:
            raise _Reject("400 Bad Request", "only 'Transfer-Encoding: chunked' alone frames a body here")
        length = None
    elif lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit() or len(next(iter(lengths))) > 18:
            raise _Reject("400 Bad Request", "an invalid or repeated Content-Length")
        length = int(next(iter(lengths)))
    else:
        length = 0
    for key, value in add.items():
        kept.append(key + b": " + value)
    return b"\r\n".join(kept) + b"\r\n\r\n", length, upgrade or method == b"CONNECT"


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        data = await reader.read(min(n, CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        writer.write(data)
        await writer.drain()
        n -= len(data)


async def _copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].partition(b";")[0].strip()
        if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise _Reject("400 Bad Request", "a malformed chunk size")
        size = int(size_text, 16)
        writer.write(line)
        if size == 0:
            while True:  # trailer fields, then the empty line
                trailer = await reader.readuntil(b"\r\n")
                writer.write(trailer)
                if trailer == b"\r\n":
                    await writer.drain()
                    return
        await _copy(reader, writer, size)
        if await reader.readexactly(2) != b"\r\n":
            raise _Reject("400 Bad Request", "a chunk not followed by CRLF")
        writer.write(b"\r\n")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, ssl.SSLError, RuntimeError):
        pass


def _answer(writer: asyncio.StreamWriter, status: str, text: str) -> None:
    body = f"shoal outbound policy: {text}\n".encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    writer.write(head.encode() + b"\r\n" + body)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 2)


class EgressInterceptor:
    """The listener on the gateway that outbound-policy sandboxes' HTTPS connections are turned to."""

    def __init__(
        self,
        gateway: ipaddress.IPv4Address,
        policy_of: Callable[[str], list[Replacement] | None],
        deny: list[ipaddress.IPv4Network],
        ca: EgressCA,
        upstream: ssl.SSLContext,
    ) -> None:
        self.gateway = gateway
        self.policy_of = policy_of
        self.deny = deny
        self.ca = ca
        self.upstream = upstream
        self.gate = limits.Gate(MAX_CONNS)
        self.acceptor: limits.Acceptor | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Listen on ``gateway``:``PORT`` (the address is this daemon's alone, so the port is always free)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((str(self.gateway), PORT))
            sock.listen(256)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.acceptor = limits.Acceptor(sock, self._accepted, "the outbound policy interceptor")
        self.acceptor.start()

    async def close(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def _accepted(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        source = addr[0]
        if self.policy_of(source) is None or not self.gate.admit(source, sock):
            log.warning("sandbox %s: outbound policy connection refused (no policy, or %d open)", source, MAX_CONNS)
            limits.refuse(sock)
            return
        task = asyncio.get_running_loop().create_task(self._serve(sock, source))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _denied(self, address: str) -> bool:
        ip = ipaddress.IPv4Address(address)
        return ip == self.gateway or any(ip in net for net in self.deny)

    async def _serve(self, sock: socket.socket, source: str) -> None:
        try:
            dst, port = original_destination(sock)
            if self._denied(dst):
                limits.refuse(sock)
                return
            name = await asyncio.wait_for(self._peek_name(sock), HELLO_TIMEOUT)
            if name and headers_for(self.policy_of(source) or [], name):
                # Read again for each request: an updated policy applies to connections already open.
                await self._intercept(sock, dst, port, name, lambda: headers_for(self.policy_of(source) or [], name))
            else:
                await self._pass(sock, dst, port)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("sandbox %s: outbound policy connection ended: %s", source, exc)
        finally:
            if sock.fileno() != -1:
                sock.close()

    async def _peek_name(self, sock: socket.socket) -> str:
        """The server name of the ClientHello waiting on ``sock``, read without consuming it."""
        loop = asyncio.get_running_loop()
        seen = -1
        while True:
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            data = sock.recv(HELLO_MAX, socket.MSG_PEEK)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            try:
                return server_name(data)
            except _NeedMore:
                pass
            if len(data) == seen:  # nothing new yet: the socket stays readable while peeked data waits
                await asyncio.sleep(0.005)
            seen = len(data)

    async def _streams(
        self, sock: socket.socket, ctx: ssl.SSLContext | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=HEAD_MAX)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=ctx, ssl_handshake_timeout=HELLO_TIMEOUT if ctx else None
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _pass(self, sock: socket.socket, dst: str, port: int) -> None:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(dst, port), UPSTREAM_TIMEOUT)
        limits.spent()
        reader, writer = await self._streams(sock, None)
        try:
            await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
        finally:
            await _close(up_w)
            await _close(writer)

    async def _intercept(
        self, sock: socket.socket, dst: str, port: int, name: str, add: Callable[[], dict[bytes, bytes]]
    ) -> None:
        reader, writer = await self._streams(sock, await self.ca.context_for(name))
        try:
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(dst, port, ssl=self.upstream, server_hostname=name), UPSTREAM_TIMEOUT
                )
                limits.spent()
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                _answer(writer, "502 Bad Gateway", f"cannot reach {name} at {dst}:{port} as a trusted server: {exc}")
                with contextlib.suppress(OSError, RuntimeError):
                    await writer.drain()
                return
            try:
                back = asyncio.ensure_future(_pipe(up_r, writer))
                try:
                    await self._requests(reader, writer, up_w, name, add)
                    await back
                finally:
                    back.cancel()
            finally:
                await _close(up_w)
        finally:
            await _close(writer)

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up: asyncio.StreamWriter,
        name: str,
        add: Callable[[], dict[bytes, bytes]],
    ) -> None:
        """Forward requests with the headers ``add()`` gives (asked per request) set, until the sandbox stops
        sending (then half-close the server side)."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise _Reject("400 Bad Request", "the connection ended inside a request head") from None
                    break
                except asyncio.LimitOverrunError:
                    too_long = f"a request head over {HEAD_MAX} bytes"
                    raise _Reject("431 Request Header Fields Too Large", too_long) from None
                out, length, stream = rewrite_head(head, name, add())
                up.write(out)
                if stream:
                    await _pipe(reader, up)
                    return
                if length is None:
                    await _copy_chunked(reader, up)
                else:
                    await _copy(reader, up, length)
                await up.drain()
            if up.can_write_eof():
                up.write_eof()
        except _Reject as rej:
            _answer(writer, rej.status, str(rej))
            with contextlib.suppress(OSError, RuntimeError):
                await writer.drain()
            up.close()
        except (asyncio.LimitOverrunError, ValueError):
            up.close()
