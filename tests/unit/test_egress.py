"""The outbound-policy interceptor's pure parts: server names from real ClientHellos, request heads, domains,
header templates."""

from __future__ import annotations

import os
import ssl

import pytest

from shoal.network.egress import (
    Replacement,
    _NeedMore,
    _Reject,
    domain_matches,
    headers_for,
    rewrite_head,
    server_name,
)
from shoal.network.etc_files import write_trust
from shoal.wire.outbound import HeaderReplacement, render, template_keys


def client_hello(name: str | None) -> bytes:
    """The first flight a real TLS client (Python's OpenSSL) sends for ``name``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = name is not None
    if name is None:
        ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_server_name_from_real_client_hellos():
    hello = client_hello("API.Example.com")
    assert server_name(hello) == "api.example.com"
    assert server_name(client_hello(None)) == ""
    for cut in (0, 3, 5, len(hello) // 2, len(hello) - 1):
        with pytest.raises(_NeedMore):
            server_name(hello[:cut])
    # Not TLS at all (plain HTTP on port 443), or a record that is not a handshake: no name, passed untouched.
    assert server_name(b"GET / HTTP/1.1\r\n") == ""
    assert server_name(b"\x17\x03\x03\x00\x05hello") == ""


def test_server_name_survives_hostile_lengths():
    hello = bytearray(client_hello("example.com"))
    for i in range(5, len(hello)):  # every byte of the record body set to 0xff in turn: never an exception
        corrupt = bytes(hello[:i]) + b"\xff" + bytes(hello[i + 1 :])
        assert isinstance(server_name(corrupt), str)


def test_domains_and_headers_for():
    assert domain_matches("*", "anything.org")
    assert domain_matches("*.example.com", "example.com") and domain_matches("*.example.com", "a.b.example.com")
    assert not domain_matches("*.example.com", "badexample.com")
    assert domain_matches("example.com", "EXAMPLE.com.") and not domain_matches("example.com", "a.example.com")
    policy = [
        Replacement("*.example.com", {"X-A": "1", "Authorization": "x"}),
        Replacement("api.example.com", {"x-a": "2"}),
    ]
    assert headers_for(policy, "api.example.com") == {b"x-a": b"2", b"authorization": b"x"}
    assert headers_for(policy, "other.org") == {}


def test_rewrite_head_sets_headers_and_reads_framing():
    add = {b"authorization": b"Bearer s"}
    head = b"POST /x HTTP/1.1\r\nHost: api.example.com:443\r\nAuthorization: mine\r\nContent-Length: 12\r\n\r\n"
    out, length, stream = rewrite_head(head, "api.example.com", add)
    assert (
        out == b"POST /x HTTP/1.1\r\nHost: api.example.com:443\r\nContent-Length: 12\r\nauthorization: Bearer s\r\n\r\n"
    )
    assert (length, stream) == (12, False)
    chunked = b"POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert rewrite_head(chunked, "api.example.com", add)[1:] == (None, False)
    upgrade = b"GET /ws HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    assert rewrite_head(upgrade, "api.example.com", add)[1:] == (0, True)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: other.org\r\n\r\n", "421"),
        (b"GET / HTTP/1.1\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: api.example.com\r\nHost: other.org\r\n\r\n", "400"),
        (b"GET / HTTP/2.0\r\nHost: api.example.com\r\n\r\n", "400"),
        (b"GET /a b HTTP/1.1\r\nHost: api.example.com\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: api.example.com\r\n X-Folded: y\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost : api.example.com\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: -3\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: api.example.com\r\nX: a\x00b\r\n\r\n", "400"),
    ],
)
def test_rewrite_head_refuses_what_a_server_could_read_otherwise(head, status):
    with pytest.raises(_Reject) as info:
        rewrite_head(head, "api.example.com", {b"x-k": b"v"})
    assert info.value.status.startswith(status)


def test_templates():
    assert template_keys("Bearer $API_TOKEN and $$NOT $X1") == ["API_TOKEN", "X1"]
    assert render("Bearer $API_TOKEN, $$5, $", {"API_TOKEN": "t"}) == "Bearer t, $5, $"
    with pytest.raises(KeyError):
        render("$MISSING", {})


def test_wire_refuses_bad_replacements():
    ok = HeaderReplacement(domain="*.Example.com", headers={"X-A": "1"})
    assert ok.domain == "*.example.com"
    for bad in (
        {"domain": "example", "headers": {"X": "1"}},
        {"domain": "*.*.example.com", "headers": {"X": "1"}},
        {"domain": "example.com", "headers": {}},
        {"domain": "example.com", "headers": {"Transfer-Encoding": "1"}},
        {"domain": "example.com", "headers": {"X": "a\rb"}},
    ):
        with pytest.raises(ValueError):
            HeaderReplacement.model_validate(bad)


def test_trust_bundle_follows_nothing_the_image_put_there(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc" / "ssl").mkdir(parents=True)
    outside.mkdir()
    (outside / "ca-certificates.crt").write_bytes(b"HOST FILE\n")
    (root / "etc" / "ssl" / "certs").symlink_to(outside)  # a hostile image points the system path at the host
    write_trust(root, b"EGRESS CA\n", b"HOST ROOTS\n", os.getuid(), 1 << 20)
    assert (outside / "ca-certificates.crt").read_bytes() == b"HOST FILE\n"
    bundle = (root / "etc" / "shoal" / "ca-certificates.crt").read_bytes()
    assert bundle.startswith(b"HOST ROOTS\n") and bundle.endswith(b"EGRESS CA\n")  # (the link was not read either)
    # An image with its own bundle keeps its roots, in both places.
    (root / "etc" / "ssl" / "certs").unlink()
    (root / "etc" / "ssl" / "certs").mkdir()
    (root / "etc" / "ssl" / "certs" / "ca-certificates.crt").write_bytes(b"IMAGE ROOTS\n")
    write_trust(root, b"EGRESS CA\n", b"HOST ROOTS\n", os.getuid(), 1 << 20)
    for path in ("etc/shoal/ca-certificates.crt", "etc/ssl/certs/ca-certificates.crt"):
        text = (root / path).read_bytes()
        assert text.startswith(b"IMAGE ROOTS\n") and text.endswith(b"EGRESS CA\n") and b"HOST" not in text
