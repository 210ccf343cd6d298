"""Connect tokens: an authenticating HTTP proxy in front of one sandbox port (``sb.create_connect_token``).

A client shows a token as ``Authorization: Bearer TOKEN``, as the ``_modal_connect_token`` query parameter (the
answer then sets a cookie of that name, so a browser keeps access) or as that cookie.  The request goes on to
the sandbox's port with the token removed, ``X-Verified-User-Data`` set to the metadata the token was made
with, ``X-Forwarded-For`` set to the connecting client's address as the proxy sees it, ``X-Forwarded-Proto:
https`` and ``X-Forwarded-Host`` set to the Host the client asked for.  WebSockets are carried as well, with
the same headers.  No valid token: 401, and nothing reaches the sandbox.

Trust: every client is untrusted.  Tokens are kept as SHA-256 digests and looked up by digest.  A header the
client sends never reaches the sandbox if its name could pass for one the proxy sets or that names the
client (``X-Verified-User-Data``, ``Forwarded``, every ``X-Forwarded-*``, ``X-Real-IP`` and the like):
names are compared case-insensitively with ``_`` and ``-`` alike, because CGI/WSGI servers turn both into
``_`` (``X_Verified_User_Data`` would otherwise become ``HTTP_X_VERIFIED_USER_DATA``).  Header names that
are not RFC 9110 tokens are refused by aiohttp's parser (400) and, should one get through, dropped here.  The
values the sandbox sees under those names are the proxy's own.  The sandbox's answers are passed back as they
are (hop-by-hop headers aside): the proxy serves the sandbox, it does not vouch for it.

Bounds: at most ``MAX_CONNS`` client connections are open (or in their TLS handshake) at once per proxy (one
sandbox port); more are reset at accept, as they are while the daemon is short of descriptors
(``shoal.util.limits``).  What the proxy logs about its clients and the sandbox goes through the per-sandbox
rate limit (``shoal.util.ratelog``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from shoal.network.tunnels import HANDSHAKE_TIMEOUT, peer_allowed
from shoal.util import limits, ratelog

log = logging.getLogger(__name__)
log.addFilter(ratelog.PER_SANDBOX)

MAX_CONNS = 256
"""Client connections open at once to one proxy; more are reset at accept."""

TOKEN_NAME = "_modal_connect_token"
VERIFIED_HEADER = "X-Verified-User-Data"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
}
CHUNK = 1 << 16
PROXY_SET = {
    "x-verified-user-data",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
}
"""Headers (normalised, see ``_norm``) that only the proxy may set or that claim who the client is; together
with every ``x-forwarded-*``, a client's copy never reaches the sandbox."""
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A valid header name (RFC 9110 ``token``)."""


def _norm(name: str) -> str:
    """A header name as CGI/WSGI servers see it, modulo their ``_`` for ``-``: lower case, ``_`` → ``-``."""
    return name.lower().replace("_", "-")


def _spoofable(name: str) -> bool:
    """Whether a client's header called ``name`` could pass for one the proxy sets (or for client identity)."""
    norm = _norm(name)
    return norm in PROXY_SET or norm.startswith("x-forwarded-")


def digest(token: str) -> str:
    """How a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


class ConnectProxy:
    """One listener: TLS in, plain HTTP to ``ip:port`` in the sandbox, for holders of a token of ``tokens``."""

    def __init__(
        self,
        ip: str,
        port: int,
        tokens: dict[str, str],
        inbound: list[str] | None,
        touch: Callable[[], None],
    ) -> None:
        self.upstream = f"http://{ip}:{port}"
        self.ip = ip
        self.port = port
        self.tokens = tokens
        """SHA-256 of each token → its user metadata (shared with the attachment record)."""
        self.inbound = [ipaddress.ip_network(c) for c in inbound] if inbound is not None else None
        self.touch = touch
        self.open = 0
        """Requests in progress (activity for ``idle_timeout``)."""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._acceptor: limits.Acceptor | None = None
        self._tls: ssl.SSLContext | None = None
        self._conns = limits.Gate(MAX_CONNS)
        self._tasks: set[asyncio.Task[None]] = set()
        self.listen_port = 0

    async def start(self, bind: str, want: int, tls: ssl.SSLContext) -> int:
        """Listen on ``want`` if it is free, else on any port; returns the port."""
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # aiohttp's own lines about this proxy's requests (a client's bad request, a sandbox's broken answer)
        # go through the per-sandbox rate limit.
        logger = logging.LoggerAdapter(log, ratelog.about(self.ip))
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, logger=logger)
        await self._runner.setup()
        sock = limits.listen_socket(bind, want)
        self.listen_port = int(sock.getsockname()[1])
        self._tls = tls
        self._acceptor = limits.Acceptor(sock, self._accepted, f"the connect proxy to {self.ip}:{self.port}")
        self._acceptor.start()
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
        )
        return self.listen_port

    def _accepted(self, sock: socket.socket, addr: Any) -> None:
        if not self._conns.admit(None, sock):
            limits.refuse(sock)
            log.warning(
                "connect proxy to %s:%d: %d connections open already, refusing more",
                self.ip,
                self.port,
                MAX_CONNS,
                extra=ratelog.about(self.ip),
            )
            return
        task = asyncio.ensure_future(self._serve(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        server = self._runner.server if self._runner is not None else None
        if server is None:  # closed meanwhile
            limits.refuse(sock)
            return
        loop = asyncio.get_running_loop()
        # A failed or timed-out handshake (OSError): the transport is closed, nothing reached the sandbox.
        with contextlib.suppress(OSError):
            await loop.connect_accepted_socket(server, sock, ssl=self._tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _token(self, request: web.Request) -> tuple[str | None, str]:
        """The token the request shows and where: "header", "query", "cookie" (None: none valid)."""
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip(), "header"
        if TOKEN_NAME in request.query:
            return request.query[TOKEN_NAME], "query"
        if TOKEN_NAME in request.cookies:
            return request.cookies[TOKEN_NAME], "cookie"
        return None, ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not peer_allowed(self.inbound, request.remote or ""):
            raise web.HTTPForbidden(text="this address may not connect (inbound_cidr_allowlist)\n")
        token, where = self._token(request)
        metadata = self.tokens.get(digest(token)) if token else None
        if token is None or metadata is None:
            raise web.HTTPUnauthorized(
                text="a valid connect token is needed: Authorization: Bearer <token>, or ?_modal_connect_token=\n",
                headers={"WWW-Authenticate": "Bearer"},
            )
        self.open += 1
        self.touch()
        try:
            headers = self._forward_headers(request, where, metadata)
            query = [(k, v) for k, v in request.query.items() if k != TOKEN_NAME]
            url = self.upstream + request.path
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._websocket(request, url, query, headers)
            return await self._http(request, url, query, headers, token if where == "query" else None)
        finally:
            self.open -= 1
            self.touch()

    def _forward_headers(self, request: web.Request, where: str, metadata: str) -> CIMultiDict[str]:
        """The headers for the sandbox: the client's, less hop-by-hop ones, the token and anything that could pass
        for a header the proxy sets (in any spelling), then the proxy's own ``X-Verified-User-Data`` and
        ``X-Forwarded-*``."""
        connection = {_norm(h.strip()) for h in request.headers.get("Connection", "").split(",")}
        hop_by_hop = HOP_BY_HOP | connection
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            norm = _norm(name)
            if not TOKEN.fullmatch(name) or norm in hop_by_hop or _spoofable(name):
                continue
            if norm == "authorization" and where == "header":
                continue
            if norm == "cookie":
                kept = [c for c in value.split(";") if c.strip().split("=", 1)[0] != TOKEN_NAME]
                if not kept:
                    continue
                value = ";".join(kept).strip()
            out.add(name, value)
        out[VERIFIED_HEADER] = metadata
        if request.remote:
            out["X-Forwarded-For"] = request.remote
        out["X-Forwarded-Proto"] = "https"
        host = request.headers.get("Host")
        if host:
            out["X-Forwarded-Host"] = host
        return out

    async def _http(
        self,
        request: web.Request,
        url: str,
        query: list[tuple[str, str]],
        headers: CIMultiDict[str],
        set_cookie: str | None,
    ) -> web.StreamResponse:
        assert self._session is not None
        data = request.content if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method, url, params=query, headers=headers, data=data, allow_redirects=False
            )
        except aiohttp.ClientConnectionError:
            raise web.HTTPBadGateway(text=f"nothing answers on port {self.port} in the sandbox\n") from None
        except aiohttp.ClientError:
            not_http = f"what answers on port {self.port} in the sandbox does not speak HTTP\n"
            raise web.HTTPBadGateway(text=not_http) from None
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            dropped = HOP_BY_HOP | {"content-length"}
            dropped |= {h.strip().lower() for h in upstream.headers.get("Connection", "").split(",")}
            for name, value in upstream.headers.items():
                if name.lower() not in dropped:
                    resp.headers.add(name, value)
            if upstream.headers.get("Content-Length") is not None:
                resp.content_length = int(upstream.headers["Content-Length"])
            if set_cookie is not None:
                resp.set_cookie(TOKEN_NAME, set_cookie, secure=True, httponly=True, samesite="Lax")
            await resp.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def _websocket(
        self, request: web.Request, url: str, query: list[tuple[str, str]], headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        assert self._session is not None
        for name in list(headers):
            if _norm(name).startswith("sec-websocket-"):
                del headers[name]
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            up = await self._session.ws_connect(url, params=query, headers=headers, protocols=protocols)
        except (aiohttp.ClientConnectionError, aiohttp.WSServerHandshakeError):
            raise web.HTTPBadGateway(text=f"no WebSocket answers on port {self.port} in the sandbox\n") from None
        down = web.WebSocketResponse(protocols=[up.protocol] if up.protocol else ())
        await down.prepare(request)

        async with up:
            tasks = [asyncio.ensure_future(pump(down, up)), asyncio.ensure_future(pump(up, down))]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
        return down


async def pump(src: Any, dst: Any) -> None:
    """Pass text and binary messages from the WebSocket ``src`` to ``dst`` until ``src`` closes; then close ``dst``."""
    async for msg in src:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        else:
            break
    await dst.close()
