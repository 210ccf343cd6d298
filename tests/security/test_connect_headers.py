"""Forged identity through a connect URL: the connect-token proxy must not let a client's headers pass for its own.

One sandbox serves two echo servers behind connect tokens: on 8080 an ``http.server`` handler that answers
with the request headers it received (every spelling, duplicates kept) and on 8081 a WSGI app (``wsgiref``)
that answers with its environ's ``HTTP_*`` keys, where CGI rules make ``X_Verified_User_Data`` and
``X-Verified-User-Data`` the same key.  Each test is one attack: the client sends forged headers, and the
sandbox must see only what the proxy sets (the token's metadata, the client's address as the proxy saw it,
``https``, the Host the client asked for), never a forged value in any spelling.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

import shoal
from tests.conftest import Daemon

SERVER = r"""
import base64, hashlib, http.server, json, socketserver, struct, threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

SEEN = []  # paths of the requests that reached this server

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        SEEN.append(self.path)
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        body = json.dumps(SEEN if self.path == "/seen" else self.headers.items()).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def websocket(self):
        # Handshake, one text message with the headers of the upgrade request, then echo a close.
        accept = base64.b64encode(hashlib.sha1(self.headers["Sec-WebSocket-Key"].encode()
                 + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
        self.send_response(101); self.send_header("Upgrade", "websocket"); self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept); self.end_headers()
        self.close_connection = True
        data = json.dumps(self.headers.items()).encode()
        self.wfile.write(b"\x81" + (bytes([len(data)]) if len(data) < 126 else b"\x7e" + struct.pack("!H", len(data)))
                         + data)
        self.wfile.flush()
        rf = self.rfile
        while True:
            head = rf.read(2)
            if len(head) < 2:
                return
            n = head[1] & 0x7F
            if n == 126: n = struct.unpack("!H", rf.read(2))[0]
            elif n == 127: n = struct.unpack("!Q", rf.read(8))[0]
            rf.read(4 + n)
            if head[0] & 0x0F == 8:
                self.wfile.write(b"\x88\x00"); self.wfile.flush(); return

class Quiet(WSGIRequestHandler):
    def log_message(self, *a): pass

def app(environ, start_response):
    body = json.dumps({k: v for k, v in environ.items() if k.startswith("HTTP_")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    allow_reuse_address = True
    daemon_threads = True

wsgi = make_server("0.0.0.0", 8081, app, handler_class=Quiet)
threading.Thread(target=wsgi.serve_forever, daemon=True).start()
s = S(("0.0.0.0", 8080), H)
print("ready", flush=True)
s.serve_forever()
"""

METADATA = {"user": "ada", "role": "reader"}
FORGED = ("forged", "1.2.3.4", "evil.example")
"""Every forged value contains one of these; none may reach the sandbox."""
PROXY_OWN = {"x-verified-user-data", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
NEVER = {
    "forwarded",
    "x-real-ip",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
}
"""Names (normalised) that the proxy does not set: a client's copy must not arrive at all."""

Headers = list[tuple[str, str]]


@dataclass
class Target:
    sb: Any
    url: str
    """The proxy in front of the http.server echo (8080)."""
    token: str
    wsgi_url: str
    """The proxy in front of the WSGI echo (8081)."""
    wsgi_token: str
    blank_token: str
    """A token for 8081 made without metadata."""
    ctx: ssl.SSLContext
    metadata: str
    """What ``X-Verified-User-Data`` must carry."""

    @property
    def host(self) -> str:
        """The Host header a client sends for ``url`` (what X-Forwarded-Host must carry)."""
        u = urlsplit(self.url)
        return f"{u.hostname}:{u.port}"


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def request(url: str, ctx: ssl.SSLContext, path: str = "/h", headers: Headers = ()) -> tuple[int, Any, str]:
    """One GET through the proxy with exactly ``headers`` (duplicates and odd spellings kept): (status, JSON
    body or None, the client's own address on that connection)."""
    u = urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=30)
    try:
        conn.connect()
        local = conn.sock.getsockname()[0]
        conn.putrequest("GET", path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if resp.status == 200 else None, local
    finally:
        conn.close()


def seen(t: Target, headers: Headers, path: str = "/h") -> tuple[Headers, str]:
    """The headers the http.server echo received for a request with a bearer token and ``headers``; and the
    client's address."""
    status, body, local = request(t.url, t.ctx, path, [("Authorization", f"Bearer {t.token}"), *headers])
    assert status == 200
    return [(k, v) for k, v in body], local


def assert_proxy_view(t: Target, got: Headers, client: str) -> None:
    """The sandbox saw the proxy's headers, once each, and nothing forged under any spelling."""
    values: dict[str, list[str]] = {}
    for name, value in got:
        values.setdefault(norm(name), []).append(value)
    assert values.get("x-verified-user-data") == [t.metadata]
    assert values.get("x-forwarded-for") == [client]
    assert values.get("x-forwarded-proto") == ["https"]
    assert values.get("x-forwarded-host") == [t.host]
    assert not NEVER & values.keys()
    assert not [(k, v) for k, v in got if any(f in v for f in FORGED)]


@pytest.fixture(scope="module")
def target(daemon: Daemon, app: Any) -> Iterator[Target]:
    sb = shoal.Sandbox.create(app=app, timeout=600)
    try:
        p = sb.exec("python3", "-u", "-c", SERVER)
        out = ""
        with contextlib.closing(iter(p.stdout)) as chunks:
            for chunk in chunks:
                out += chunk
                if "ready\n" in out:
                    break
        assert "ready\n" in out, p.stderr.read()
        creds = sb.create_connect_token(port=8080, user_metadata=METADATA)
        wsgi = sb.create_connect_token(port=8081, user_metadata=METADATA)
        blank = sb.create_connect_token(port=8081)
        ctx = ssl.create_default_context(cafile=str(daemon.data_dir / "tls" / "ca.pem"))
        yield Target(sb, creds.url, creds.token, wsgi.url, wsgi.token, blank.token, ctx, json.dumps(METADATA))
    finally:
        sb.terminate()


# ---------------------------------------------------------------- X-Verified-User-Data in every spelling


def test_forged_verified_header_exact_spelling(target):
    """Attack: `X-Verified-User-Data: forged`. Defence: dropped; the sandbox sees the token's metadata."""
    got, client = seen(target, [("X-Verified-User-Data", "forged")])
    assert_proxy_view(target, got, client)


def test_forged_verified_header_underscores(target):
    """Attack: `X_Verified_User_Data: forged` (CGI maps it onto the real one). Defence: `_` counts as `-`: dropped."""
    got, client = seen(target, [("X_Verified_User_Data", "forged")])
    assert_proxy_view(target, got, client)


def test_forged_verified_header_lower_case(target):
    """Attack: `x-verified-user-data: forged`. Defence: names compared case-insensitively: dropped."""
    got, client = seen(target, [("x-verified-user-data", "forged")])
    assert_proxy_view(target, got, client)


def test_forged_verified_header_mixed_separators(target):
    """Attack: `X-VERIFIED_USER-DATA: forged`. Defence: normalised (lower case, `_`→`-`) before comparing: dropped."""
    got, client = seen(target, [("X-VERIFIED_USER-DATA", "forged")])
    assert_proxy_view(target, got, client)


def test_forged_verified_header_many_copies(target):
    """Attack: several copies in several spellings at once. Defence: every copy dropped; the proxy's is the only one."""
    forged = [(n, f"forged-{i}") for i, n in enumerate(["X-Verified-User-Data", "x_verified_user_data"] * 3)]
    got, client = seen(target, forged)
    assert_proxy_view(target, got, client)


def test_forged_verified_header_with_query_token(target):
    """Attack: forged `X_Verified_User_Data` with the token in the query string. Defence: same stripping, any token."""
    path = f"/h?_modal_connect_token={target.token}"
    status, body, client = request(target.url, target.ctx, path, [("X_Verified_User_Data", "forged")])
    assert status == 200
    assert_proxy_view(target, [(k, v) for k, v in body], client)


def test_forged_verified_header_with_cookie_token(target):
    """Attack: forged `x-verified-user-data` with the token in a cookie. Defence: same stripping, any token."""
    headers = [("Cookie", f"_modal_connect_token={target.token}"), ("x-verified-user-data", "forged")]
    status, body, client = request(target.url, target.ctx, "/h", headers)
    assert status == 200
    assert_proxy_view(target, [(k, v) for k, v in body], client)


# ---------------------------------------------------------------- who the client is, and how it came


def test_forged_x_forwarded_for(target):
    """Attack: `X-Forwarded-For: 1.2.3.4`. Defence: replaced by the client's address as the proxy saw it."""
    got, client = seen(target, [("X-Forwarded-For", "1.2.3.4")])
    assert_proxy_view(target, got, client)
    assert client.startswith("127.")  # the test reaches the proxy on loopback


def test_forged_x_forwarded_for_underscores(target):
    """Attack: `X_Forwarded_For: 1.2.3.4`. Defence: `_` counts as `-`: dropped, the proxy's value set."""
    got, client = seen(target, [("X_Forwarded_For", "1.2.3.4")])
    assert_proxy_view(target, got, client)


def test_forged_x_forwarded_for_chain(target):
    """Attack: `X-Forwarded-For: 1.2.3.4, <own address>` (a plausible chain). Defence: replaced whole, not appended."""
    got, client = seen(target, [("X-Forwarded-For", "1.2.3.4, 127.0.0.1"), ("x-forwarded-for", "1.2.3.4")])
    assert_proxy_view(target, got, client)


def test_forged_forwarded(target):
    """Attack: `Forwarded: for=1.2.3.4` (RFC 7239), any case. Defence: dropped; the proxy does not set it."""
    got, client = seen(target, [("Forwarded", "for=1.2.3.4;proto=http"), ("FORWARDED", "for=1.2.3.4")])
    assert_proxy_view(target, got, client)


def test_forged_x_real_ip(target):
    """Attack: `X-Real-IP: 1.2.3.4` and `X_Real_IP`. Defence: dropped in every spelling."""
    got, client = seen(target, [("X-Real-IP", "1.2.3.4"), ("X_Real_IP", "1.2.3.4")])
    assert_proxy_view(target, got, client)


def test_forged_client_ip_headers(target):
    """Attack: True-Client-IP, X-Client-IP, X-Cluster-Client-IP, X-Original-Forwarded-For. Defence: all dropped."""
    names = ["True-Client-IP", "X-Client-IP", "x_cluster_client_ip", "X-Original-Forwarded-For"]
    got, client = seen(target, [(n, "1.2.3.4") for n in names])
    assert_proxy_view(target, got, client)


def test_forged_x_forwarded_proto(target):
    """Attack: `X-Forwarded-Proto: http` / `X_Forwarded_Proto`. Defence: dropped; the proxy sets `https`."""
    got, client = seen(target, [("X-Forwarded-Proto", "http"), ("X_Forwarded_Proto", "forged")])
    assert_proxy_view(target, got, client)


def test_forged_x_forwarded_host(target):
    """Attack: `X-Forwarded-Host: evil.example`. Defence: dropped; the proxy sets the Host the client asked for."""
    got, client = seen(target, [("X-Forwarded-Host", "evil.example"), ("x_forwarded_host", "evil.example")])
    assert_proxy_view(target, got, client)


def test_forged_other_x_forwarded_headers(target):
    """Attack: X-Forwarded-Port/-Server/-Prefix in both spellings. Defence: a client's `X-Forwarded-*` all dropped."""
    names = ["X-Forwarded-Port", "X_Forwarded_Port", "X-Forwarded-Server", "X_FORWARDED_PREFIX"]
    got, client = seen(target, [(n, "forged") for n in names])
    assert_proxy_view(target, got, client)


def test_connection_header_cannot_remove_proxy_headers(target):
    """Attack: `Connection: X-Verified-User-Data, X-Forwarded-For` to make the proxy drop its own. Defence: the
    proxy's headers are set after hop-by-hop removal."""
    headers = [("Connection", "keep-alive, X-Verified-User-Data, X_Forwarded_For"), ("X-Verified-User-Data", "forged")]
    got, client = seen(target, headers)
    assert_proxy_view(target, got, client)


def test_unrelated_headers_pass_unchanged(target):
    """Not an attack: headers the proxy does not own (underscores included) still reach the sandbox as sent."""
    got, client = seen(target, [("X-Mine", "kept"), ("X_Custom_Thing", "also kept"), ("X-Verified-Other", "mine")])
    assert_proxy_view(target, got, client)
    assert ("X-Mine", "kept") in got and ("X_Custom_Thing", "also kept") in got and ("X-Verified-Other", "mine") in got


# ---------------------------------------------------------------- header names that are not tokens


@pytest.mark.parametrize(
    "line",
    [
        b"X-Verified User-Data: forged",  # space inside the name
        b"X-Verified-User-Data : forged",  # space before the colon
        b"X-Verified-User-Data\t: forged",  # tab before the colon
        b"X-Verified-User-Dat\xe1: forged",  # a non-ASCII byte
        b"X-Verified-User-Data\x00: forged",  # NUL
        b"X-Verified\x0b-User-Data: forged",  # a control character
        b"X-Verified(User)Data: forged",  # separators
        b"X-Mine: a\r\n X-Verified-User-Data: forged",  # obsolete line folding
    ],
    ids=["space", "space-colon", "tab-colon", "non-ascii", "nul", "control", "separators", "obs-fold"],
)
def test_header_names_that_are_not_tokens_never_reach_the_sandbox(target, line):
    """Attack: a header name that is not an RFC 9110 token (a lax server might map it onto a trusted one). Defence:
    the request is refused (400) before anything reaches the sandbox."""
    u = urlsplit(target.url)
    probe = f"/probe-{uuid.uuid4().hex}"
    raw = (
        f"GET {probe} HTTP/1.1\r\nHost: {target.host}\r\nAuthorization: Bearer {target.token}\r\n".encode()
        + line
        + b"\r\nConnection: close\r\n\r\n"
    )
    with (
        socket.create_connection((u.hostname, u.port), timeout=30) as plain,
        target.ctx.wrap_socket(plain, server_hostname=u.hostname) as s,
    ):
        s.sendall(raw)
        answer = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while data := s.recv(65536):
                answer += data
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", answer[:200]
    status, log, _ = request(target.url, target.ctx, "/seen", [("Authorization", f"Bearer {target.token}")])
    assert status == 200 and probe not in log


# ---------------------------------------------------------------- WebSocket upgrades


def test_websocket_upgrade_with_forged_headers(target):
    """Attack: forged identity headers (all spellings) on a WebSocket upgrade. Defence: the same stripping and
    the same proxy-set headers as plain HTTP."""
    import aiohttp
    from multidict import CIMultiDict

    forged = [
        ("X-Verified-User-Data", "forged"),
        ("X_Verified_User_Data", "forged"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X_Forwarded_For", "1.2.3.4"),
        ("Forwarded", "for=1.2.3.4"),
        ("X-Real-IP", "1.2.3.4"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "evil.example"),
    ]
    headers = CIMultiDict([("Authorization", f"Bearer {target.token}"), *forged])

    async def handshake() -> list[list[str]]:
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(target.url + "/ws", ssl=target.ctx, headers=headers) as ws,
        ):
            msg = await ws.receive(timeout=30)
            await ws.close()
        await asyncio.sleep(0.25)  # TLS transports finish closing on the loop (aiohttp's graceful shutdown)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)

    _, client = seen(target, [])  # the client's address as the proxy sees it (the same for every connection)
    got = [(k, v) for k, v in asyncio.run(handshake())]
    assert_proxy_view(target, got, client)
    assert not any(norm(k).startswith("sec-websocket-") and "forged" in v for k, v in got)


# ---------------------------------------------------------------- a WSGI app, where `_` and `-` are one


def wsgi_environ(t: Target, token: str, headers: Headers) -> tuple[dict[str, str], str]:
    status, body, client = request(t.wsgi_url, t.ctx, "/", [("Authorization", f"Bearer {token}"), *headers])
    assert status == 200
    return body, client


def test_wsgi_verified_user_data_is_exactly_the_metadata(target):
    """Attack: `X_Verified_User_Data` next to `X-Verified-User-Data` so that a WSGI server merges or picks the forged
    one. Defence: both dropped; HTTP_X_VERIFIED_USER_DATA is exactly the token's metadata."""
    env, _ = wsgi_environ(
        target,
        target.wsgi_token,
        [("X_Verified_User_Data", "forged"), ("X-Verified-User-Data", "forged"), ("X-VERIFIED_USER-DATA", "forged")],
    )
    assert env["HTTP_X_VERIFIED_USER_DATA"] == target.metadata


def test_wsgi_forwarded_for_is_the_proxy_view(target):
    """Attack: `X_Forwarded_For` / `X-Real-IP` / `Forwarded` to a WSGI app. Defence: HTTP_X_FORWARDED_FOR is the
    client's address as the proxy saw it, HTTP_X_FORWARDED_PROTO is https, the rest are absent."""
    env, client = wsgi_environ(
        target,
        target.wsgi_token,
        [("X_Forwarded_For", "1.2.3.4"), ("X-Real-IP", "1.2.3.4"), ("Forwarded", "for=1.2.3.4"), ("X_Real_IP", "1")],
    )
    assert env["HTTP_X_FORWARDED_FOR"] == client
    assert env["HTTP_X_FORWARDED_PROTO"] == "https"
    assert "HTTP_X_REAL_IP" not in env and "HTTP_FORWARDED" not in env
    assert not [k for k, v in env.items() if any(f in v for f in FORGED)]


def test_wsgi_blank_metadata_cannot_be_filled_in(target):
    """Attack: a token made without metadata plus a forged `X_Verified_User_Data` to fill the blank. Defence: dropped;
    HTTP_X_VERIFIED_USER_DATA stays empty."""
    env, _ = wsgi_environ(target, target.blank_token, [("X_Verified_User_Data", "forged")])
    assert env.get("HTTP_X_VERIFIED_USER_DATA", "") == ""
    assert not [k for k, v in env.items() if any(f in v for f in FORGED)]
