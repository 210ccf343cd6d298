"""Hostile request bodies at the daemon's HTTP API: each test is one attack, sent raw over the Unix socket.

The defence (``shoal.server.app``): a JSON body is read under ``MAX_BODY`` and parsed strictly (UTF-8, the JSON
parser's nesting limit, the route's model); anything malformed gets 400 and anything too large 413, each with a
JSON error body naming a shoal exception, and a body announced too large is refused before it is read.  No
client input gets a 5xx.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPResponse
from typing import Any

import pytest

import shoal
from shoal.server.app import MAX_BODY
from tests.conftest import Daemon

LOOKUP = "/v1/apps/lookup"
"""A JSON route that creates nothing for a body it refuses."""
GHOST_STDIN = "/v1/sandboxes/sb-00000000000000000000000000/execs/ex-0000000000/stdin"


@contextmanager
def connection(daemon: Daemon, timeout: float = 30) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(daemon.socket))
    try:
        yield s
    finally:
        s.close()


def response(s: socket.socket) -> tuple[int, Any]:
    """The status and JSON body (None if not JSON) of the response on ``s``."""
    resp = HTTPResponse(s, method="POST")
    resp.begin()
    data = resp.read()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, None


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send(
    daemon: Daemon, body: bytes, *, path: str = LOOKUP, method: str = "POST", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request with a Content-Length body; its status and JSON body."""
    with connection(daemon) as s:
        h = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close"}
        s.sendall(head(method, path, h | (headers or {})) + body)
        return response(s)


def error_of(status: int, body: Any, expected: int) -> str:
    """The error message of a shoal error body, after checking its status and type."""
    assert status == expected, body
    assert isinstance(body, dict) and body["error"]["type"] == "InvalidError", body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    return message


# ---------------------------------------------------------------------------------------------------- malformed


def test_deeply_nested_json_array_is_400(daemon):
    """100,000 nested arrays: the JSON parser's RecursionError becomes 400 InvalidError, not 500."""
    depth = 100_000
    message = error_of(*send(daemon, b"[" * depth + b"]" * depth), 400)
    assert "nested too deeply" in message


def test_deeply_nested_json_object_is_400(daemon):
    """100,000 nested objects inside a valid field: 400 InvalidError, not 500."""
    depth = 100_000
    body = b'{"name": "x", "create_if_missing": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"
    assert "nested too deeply" in error_of(*send(daemon, body), 400)


def test_invalid_json_is_400(daemon):
    """A body that is not JSON: 400 InvalidError saying so."""
    assert "JSON" in error_of(*send(daemon, b'{"name": "x",'), 400)


def test_empty_body_is_400(daemon):
    """No body at all on a JSON route: 400 InvalidError."""
    assert "JSON" in error_of(*send(daemon, b""), 400)


def test_non_utf8_body_is_400(daemon):
    """Latin-1 bytes inside a JSON string: 400 InvalidError naming UTF-8, not a decode crash."""
    assert "UTF-8" in error_of(*send(daemon, b'{"name": "caf\xe9"}'), 400)


def test_utf16_body_is_400(daemon):
    """A UTF-16 body (which json.loads would sniff and accept from bytes): refused, the API speaks UTF-8."""
    assert "UTF-8" in error_of(*send(daemon, json.dumps({"name": "x"}).encode("utf-16")), 400)


def test_lone_surrogate_escape_is_400(daemon):
    """A JSON escape of a lone surrogate (valid JSON, not text): 400 at parsing, not an encode crash deeper in."""
    for body in (b'{"name": "\\ud800"}', b'{"name": "x", "\\udfff": 1}'):
        assert "surrogate" in error_of(*send(daemon, body), 400)


def test_bogus_charset_is_ignored(daemon):
    """A Content-Type with an unknown charset (a LookupError in aiohttp's text()): the body is read as UTF-8."""
    status, body = send(
        daemon,
        json.dumps({"name": "sec-charset", "create_if_missing": True}).encode(),
        headers={"Content-Type": "application/json; charset=x-no-such-charset"},
    )
    assert status == 200 and body["name"] == "sec-charset", body


def test_huge_integer_literal_is_400(daemon):
    """A 100,000-digit integer (over Python's int-from-string limit, a ValueError deep in the parser): 400."""
    error_of(*send(daemon, b'{"name": "x", "create_if_missing": ' + b"9" * 100_000 + b"}"), 400)


def test_nan_where_a_number_belongs_is_400(daemon):
    """NaN and Infinity (which Python's JSON accepts) for a sandbox timeout: 400 from validation."""
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        body = b'{"app_id": "ap-00000000000000000000000000", "timeout": ' + literal + b"}"
        assert "timeout" in error_of(*send(daemon, body, path="/v1/sandboxes"), 400)


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"null",
        b'"a string"',
        b"42",
        b'{"name": 42}',
        b'{"name": ["x"]}',
        b'{"name": {"$gt": ""}}',
        b'{"name": "x", "create_if_missing": "yes please"}',
        b'{"name": "x", "unexpected": 1}',
    ],
    ids=["array", "null", "string", "number", "int-name", "list-name", "operator-name", "str-bool", "extra-field"],
)
def test_wrong_types_are_400(daemon, body):
    """A body of the wrong shape or field types: 400 InvalidError from the route's model."""
    error_of(*send(daemon, body), 400)


def test_wrong_types_in_a_sandbox_create_are_400(daemon):
    """Every field of a sandbox create given the wrong type at once: 400 naming them, and no sandbox made."""
    body = {
        "app_id": 7,
        "args": "not a list",
        "timeout": "soon",
        "env": ["A=1"],
        "cpu": {"cores": 1},
        "volumes": "all",
    }
    message = error_of(*send(daemon, json.dumps(body).encode(), path="/v1/sandboxes"), 400)
    assert "app_id" in message and "timeout" in message


def test_escaped_byte_in_tags_is_400_and_the_sandbox_still_reads(daemon, sandbox):
    """Tags holding a "surrogateescape" byte (\\udcff): 400, instead of stored tags that break GET of the sandbox."""
    path = f"/v1/sandboxes/{sandbox.object_id}"
    body = b'{"tags": {"k": "\\udcff"}}'
    assert "surrogate" in error_of(*send(daemon, body, path=f"{path}/tags", method="PUT"), 400)
    status, info = send(daemon, b"", path=path, method="GET")
    assert status == 200 and info["tags"] == {}, info


def test_escaped_byte_in_exec_env_is_400_and_starts_nothing(daemon, sandbox):
    """An exec whose env value or workdir is not text: 400 before any process is registered (none left half-made)."""
    path = f"/v1/sandboxes/{sandbox.object_id}/execs"

    def exec_ids() -> set[str]:
        return {e["exec_id"] for e in send(daemon, b"", path=path, method="GET")[1]["execs"]}

    before = exec_ids()
    for body in (b'{"args": ["true"], "env": {"A": "\\udcff"}}', b'{"args": ["true"], "workdir": "/\\udcff"}'):
        assert "surrogate" in error_of(*send(daemon, body, path=path), 400)
    assert exec_ids() == before


def _frame(header: bytes) -> bytes:
    return len(header).to_bytes(4, "big") + header


@pytest.mark.parametrize(
    "header",
    [b"[" * 5000 + b"]" * 5000, b'{"path": "\\ud800", "size": 0}', b'{"path": "x", "size": "big"}', b"\xff\xfe"],
    ids=["deep-json", "lone-surrogate-path", "wrong-type", "not-utf8"],
)
def test_malformed_volume_upload_header_is_400(daemon, header):
    """A volume upload frame header that is deep, not text, or of the wrong type: 400, nothing written."""
    with shoal.Volume.ephemeral() as vol:
        status, body = send(
            daemon,
            _frame(header) + _frame(b""),
            path=f"/v1/volumes/{vol.object_id}/files",
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        error_of(status, body, 400)
        assert vol.listdir("/") == []


# ---------------------------------------------------------------------------------------------------- oversized


def _refused_unread(daemon: Daemon, path: str, extra: dict[str, str] | None = None) -> str:
    """Announce a 300 MB body, send 1 KiB of it, and expect 413 at once."""
    size = 300 << 20
    with connection(daemon, timeout=10) as s:
        h = {"Content-Type": "application/json", "Content-Length": str(size)} | (extra or {})
        s.sendall(head("POST", path, h))
        if "Expect" not in h:
            s.sendall(b"[" * 1024)
        started = time.monotonic()
        status, body = response(s)
        assert time.monotonic() - started < 5
    message = error_of(status, body, 413)
    assert str(MAX_BODY) in message and str(size) in message
    return message


def test_huge_json_body_by_content_length_is_413_unread(daemon):
    """A 300 MB JSON body announced by Content-Length: 413 naming the limit before the body is read."""
    _refused_unread(daemon, LOOKUP)


def test_huge_stdin_body_by_content_length_is_413_unread(daemon):
    """A 300 MB stdin write announced by Content-Length: 413 before the body is read (stdin is read whole)."""
    _refused_unread(daemon, GHOST_STDIN)


def test_huge_body_on_a_route_without_one_is_413(daemon):
    """A 300 MB body sent to a route that takes none: 413 rather than running the route."""
    _refused_unread(daemon, "/v1/apps/ap-00000000000000000000000000/stop")


def test_expect_continue_huge_body_is_413_before_upload(daemon):
    """``Expect: 100-continue`` for a 300 MB body: the final 413 comes instead of "100 Continue"."""
    _refused_unread(daemon, LOOKUP, {"Expect": "100-continue"})


def test_huge_chunked_body_is_413(daemon):
    """A chunked body (no Content-Length) past the limit: 413 once the limit is passed, not 500."""
    chunk = b" " * (1 << 20)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with connection(daemon, timeout=30) as s:
        s.sendall(head("POST", LOOKUP, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}))
        try:
            for _ in range((MAX_BODY >> 20) + 8):
                s.sendall(framed)
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading: its answer is waiting
        status, body = response(s)
    assert str(MAX_BODY) in error_of(status, body, 413)


def test_gzip_bomb_is_413(daemon):
    """A 100 KB gzip body inflating to 100 MB of JSON whitespace: the inflated size counts, 413."""
    bomb = gzip.compress(b" " * (100 << 20), compresslevel=9)
    assert len(bomb) < MAX_BODY
    status, body = send(daemon, bomb, headers={"Content-Encoding": "gzip"})
    assert str(MAX_BODY) in error_of(status, body, 413)


def test_body_just_under_the_limit_is_parsed(daemon):
    """The limit is not off by one the other way: a body of MAX_BODY bytes is read, parsed, and refused as 400."""
    body = b'{"name": "' + b"a" * (MAX_BODY - 12) + b'"}'
    assert len(body) == MAX_BODY
    message = error_of(*send(daemon, body), 400)
    assert "name" in message


# ---------------------------------------------------------------------------------------------------- framing


def test_unknown_route_gets_a_json_404(daemon):
    """A path no route serves: 404 with a NotFoundError body, like the API's own errors."""
    status, body = send(daemon, b"{}", path="/v1/no/such/route")
    assert status == 404 and body["error"]["type"] == "NotFoundError", body


def test_wrong_method_gets_a_json_405(daemon):
    """A known path with a method it does not serve: 405 with an InvalidError body."""
    status, body = send(daemon, b"{}", path="/v1/status", method="DELETE")
    error_of(status, body, 405)


def test_malformed_chunk_framing_is_400(daemon):
    """A chunked body whose chunk size is not hex: the HTTP parser's 400, never a 5xx."""
    with connection(daemon) as s:
        s.sendall(head("POST", LOOKUP, {"Transfer-Encoding": "chunked"}) + b"zz\r\n{}\r\n0\r\n\r\n")
        status, _ = response(s)
    assert status == 400
