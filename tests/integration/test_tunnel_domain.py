"""Tunnels that look like Modal's: ``shoal serve --tunnel-domain D`` gives each TLS tunnel a name ``<unique>.D`` on
port 443 of one shared listener, routed by the TLS server name (or an HTTP/1.1 Host), and ``shoal trust`` puts
the local CA into the system store so unmodified clients connect to ``https://{tunnel.host}/``.

The daemon listens on 127.0.0.44 (a loopback address of its own, so port 443 is free for it); the names are
resolved by the test (a client's address, an aiohttp resolver, or a wildcard DNS record that programs in a private
mount namespace see: ``tests.user_machine``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import shoal
from tests.conftest import Daemon, _require_root_and_runtime, network_leaks
from tests.integration import test_network as tn
from tests.user_machine import BIND, DOMAIN, UserMachine, user_machine


@pytest.fixture(scope="module")
def machine() -> Iterator[UserMachine]:
    _require_root_and_runtime()
    with user_machine() as m:
        yield m


@pytest.fixture(scope="module")
def routed(machine: UserMachine) -> Daemon:
    return machine.daemon


@pytest.fixture
def made(routed: Daemon) -> Iterator[list]:
    sandboxes: list = []
    yield sandboxes
    for sb in sandboxes:
        sb.terminate()


def ca_context(d: Daemon) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(d.data_dir / "tls" / "ca.pem"))


def get(name: str, path: str, ctx: ssl.SSLContext, host_header: str | None = None, sni: bool = True):
    """GET ``https://name/path`` on the shared listener: (status, body)."""
    conn = http.client.HTTPSConnection(BIND, 443, context=ctx, timeout=30)
    # http.client would send the address as the server name: connect as a client that resolved ``name`` would.
    raw = socket.create_connection((BIND, 443), timeout=30)
    conn.sock = ctx.wrap_socket(raw, server_hostname=name if sni else None)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host_header or name)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def test_tunnels_are_names_on_port_443_routed_by_sni(routed, made):
    app = shoal.App.lookup("tunnel-domain", create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, timeout=300, encrypted_ports=[8001], h2_ports=[8002], unencrypted_ports=[8004])
    made.append(sb)
    other = shoal.Sandbox.create(app=app, timeout=300, encrypted_ports=[8001])
    made.append(other)
    tunnels = sb.tunnels()
    t1, t2 = tunnels[8001], tunnels[8002]
    for t in (t1, t2):
        label, _, domain = t.host.partition(".")
        assert domain == DOMAIN and len(label) == 12
        assert t.port == 443 and t.url == f"https://{t.host}"
    assert len({t1.host, t2.host, other.tunnels()[8001].host}) == 3
    assert tunnels[8004].tcp_socket[0] == BIND  # raw TCP cannot be routed by name: a port of its own
    tn.copy_h2_into(sb)
    tn.start_servers(sb, p8001="http", p8002="h2c", p8004="echo")
    tn.start_servers(other, p8001="http")
    ctx = ca_context(routed)

    assert get(t1.host, "/x", ctx) == (200, b"hello from port 8001 /x\n")
    status, body = get(t1.host, "/big", ctx)
    assert (status, len(body), hashlib.sha256(body).hexdigest()) == (200, tn.BIG_BLOCKS << 20, tn.expected_big_digest())
    # The other sandbox's name reaches the other sandbox (its server says the same, so ask for its address).
    status, body = get(other.tunnels()[8001].host, "/headers", ctx)
    assert status == 200 and json.loads(body)["headers"]["Host"] == other.tunnels()[8001].host
    # WebSocket and HTTP/2 (ALPN h2 chosen for the h2 tunnel's name only) through the same port.
    assert tn.websocket_roundtrip(f"wss://{t1.host}/ws", ctx, address=BIND) == ["echo: hi", "echo: " + "x" * 1000]
    assert tn.h2_get(t2.host, 443, "/two", ca_context(routed), address=BIND) == ("h2", 200, b"h2 hello /two\n")
    with socket.create_connection(tunnels[8004].tcp_socket, timeout=30) as s:
        s.sendall(b"raw")
        assert s.recv(10) == b"RAW"


def test_names_without_sni_route_by_host_and_unknown_names_get_421(routed, made):
    sb = shoal.Sandbox.create(app=shoal.App.lookup("tunnel-domain", create_if_missing=True), encrypted_ports=[8001])
    made.append(sb)
    tn.start_servers(sb, p8001="http")
    name = sb.tunnels()[8001].host
    ctx = ca_context(routed)
    ctx.check_hostname = False  # no SNI: the wildcard certificate is still verified against the CA
    assert get(name, "/by-host", ctx, sni=False) == (200, b"hello from port 8001 /by-host\n")
    status, body = get(name, "/", ctx, sni=False, host_header=f"nothing.{DOMAIN}")
    assert status == 421 and b"no tunnel is named" in body
    status, body = get(f"unknown.{DOMAIN}", "/", ca_context(routed))
    assert status == 421
    # The server name wins over the Host header when it names a tunnel.
    assert get(name, "/sni", ca_context(routed), host_header=f"nothing.{DOMAIN}")[0] == 200
    # A terminated sandbox's name routes nowhere any more.
    sb.terminate()
    assert get(name, "/", ca_context(routed))[0] == 421


def operator_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA of the operator's own and a wildcard certificate for ``*.DOMAIN`` from it: (ca, cert, key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{DOMAIN}")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_names_survive_a_daemon_restart_and_an_operator_certificate_is_served(routed, made, tmp_path):
    app = shoal.App.lookup("tunnel-domain", create_if_missing=True)
    sb = shoal.Sandbox.create(
        "python3", "-u", "-c", tn.HTTP_SERVER, str(tn.BIG_BLOCK_SEED), "1", "8001=http",
        app=app, encrypted_ports=[8001], timeout=300,
    )  # fmt: skip
    made.append(sb)
    name = sb.tunnels()[8001].host
    ca, cert, key = operator_certificate(tmp_path)
    routed.restart_with("--tunnel-domain", DOMAIN, "--tunnel-cert", str(cert), "--tunnel-key", str(key))
    try:
        after = shoal.Sandbox.from_id(sb.object_id).tunnels()[8001]
        assert (after.host, after.port) == (name, 443)
        assert get(name, "/again", ssl.create_default_context(cafile=str(ca))) == (
            200,
            b"hello from port 8001 /again\n",
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            get(name, "/", ca_context(routed))  # the local CA's certificate is not served any more
    finally:
        routed.restart_with("--tunnel-domain", DOMAIN)


def test_status_names_the_domain(routed):
    env = {**os.environ, "SHOAL_RUNTIME_DIR": str(routed.runtime_dir), "SHOAL_NO_AUTOSTART": "1"}
    out = subprocess.run([sys.executable, "-m", "shoal", "status", "--json"], env=env, capture_output=True, text=True)
    assert json.loads(out.stdout)["tunnels"] == {"domain": DOMAIN, "port": 443, "bind": BIND}
    text = subprocess.run([sys.executable, "-m", "shoal", "status"], env=env, capture_output=True, text=True).stdout
    assert f"<name>.{DOMAIN}:443" in text


UNMODIFIED_CLIENTS = r"""
import json, sys, urllib.request
import requests
url = sys.argv[1]
out = {"urllib": urllib.request.urlopen(url + "/urllib", timeout=30).read().decode()}
out["requests"] = requests.get(url + "/requests", timeout=30).text
print(json.dumps(out))
"""


@pytest.mark.skipif(not shutil.which("update-ca-certificates"), reason="needs Debian's ca-certificates")
def test_shoal_trust_lets_unmodified_clients_use_tunnel_host(machine, made):
    """Code that builds ``https://{tunnel.host}/`` (as code written for Modal does) works once the name resolves
    (the operator's wildcard DNS record) and ``shoal trust`` ran — here in a private mount namespace over copies
    of the trust store, so the host's own store is never changed."""
    sb = shoal.Sandbox.create(app=shoal.App.lookup("tunnel-domain", create_if_missing=True), encrypted_ports=[8001])
    made.append(sb)
    tn.start_servers(sb, p8001="http")
    tunnel = sb.tunnels()[8001]
    py = sys.executable
    before = machine.run(["sh", "-c", f"{py} -m shoal trust --remove && {py} -c '{UNTRUSTED}' {tunnel.url}"])
    assert before.returncode == 0 and before.stdout.splitlines()[-1] == "CERTIFICATE_VERIFY_FAILED", before.stderr
    done = machine.run([py, "-c", UNMODIFIED_CLIENTS, tunnel.url])
    assert done.returncode == 0, done.stdout + done.stderr
    trust_out = (machine.root / "trust.out").read_text()
    assert "REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt" in trust_out
    assert "WEBSOCKET_CLIENT_CA_BUNDLE" in trust_out
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "urllib": "hello from port 8001 /urllib\n",
        "requests": "hello from port 8001 /requests\n",
    }
    assert (machine.root / "local" / "shoal-local-ca.crt").exists()
    assert not Path("/usr/local/share/ca-certificates/shoal-local-ca.crt").exists()  # the host's store: untouched


UNTRUSTED = """
import ssl, sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=30)
except urllib.error.URLError as exc:
    print(exc.reason.reason if isinstance(exc.reason, ssl.SSLError) else exc)
"""


def test_serve_refuses_bad_domains_and_certificates(tmp_path):
    for args, words in [
        (["--tunnel-domain", "not a domain"], "not a DNS name"),
        (["--tunnel-domain", "-x.test"], "not a DNS name"),
        (["--tunnel-cert", "/etc/hostname", "--tunnel-key", "/etc/hostname"], "give the domain too"),
        (["--tunnel-domain", "a.test", "--tunnel-cert", "/etc/hostname", "--tunnel-key", "/etc/hostname"],
         "cannot read the tunnel certificate"),
    ]:  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "shoal", "serve", "--data-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)


def test_hostile_clients_of_the_shared_listener(routed, made):
    """The inbound allowlist holds for a named tunnel; an endless request head without a name is cut off."""
    app = shoal.App.lookup("tunnel-domain", create_if_missing=True)
    fenced = shoal.Sandbox.create(app=app, encrypted_ports=[8001], inbound_cidr_allowlist=["192.0.2.0/24"])
    made.append(fenced)
    tn.start_servers(fenced, p8001="http")
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected, ssl.SSLError)):
        get(fenced.tunnels()[8001].host, "/", ca_context(routed))  # 127.0.0.1 is not in 192.0.2.0/24
    ctx = ca_context(routed)
    ctx.check_hostname = False
    with socket.create_connection((BIND, 443), timeout=30) as raw, ctx.wrap_socket(raw) as s:
        s.sendall(b"GET / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 20000)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 421 ") and b"too long" in reply


def test_a_network_that_fails_to_start_leaves_no_bridge_or_table(own_daemon):
    """The shared tunnel port is taken: the daemon refuses to start, and takes down the network it had set up."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(RuntimeError, match="daemon exited at start"):
            own_daemon.restart_with("--tunnel-domain", "fail.test", "--tunnel-port", str(holder.getsockname()[1]))
    finally:
        holder.close()
    assert network_leaks(own_daemon) == []
    own_daemon.start()  # and it starts again once the port is free
