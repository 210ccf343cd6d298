"""``_experimental_outbound_policy`` (Modal's ``OutboundPolicy``): headers set on a sandbox's outbound HTTPS
requests outside the sandbox, their secret values never inside it.

The "internet" is two network namespaces (``PeerHost``) serving HTTPS that echoes what it received: ``web``
with a certificate from a CA the daemon is told to trust (``SHOAL_EGRESS_CA_FILE``), ``rogue`` with one from
a CA nobody trusts.  Names resolve through a test DNS server on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import shoal
from shoal.exception import InvalidError
from shoal.network.tls import make_ca, sign_server_cert
from tests.conftest import Daemon, restore_environ, running_daemon
from tests.integration.test_network import PeerHost, py
from tests.netkit import DnsServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

TOKEN = "tok-" + uuid.uuid4().hex

ECHO_HTTPS = r"""
import hashlib, http.server, json, socketserver, ssl, sys
cert = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))
    def _answer(self):
        body = self._body()
        out = json.dumps({
            "method": self.command, "path": self.path, "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body), "body_sha": hashlib.sha256(body).hexdigest(),
        }).encode()
        print("req", out.decode(), flush=True)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = _answer
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    allow_reuse_address = True
    daemon_threads = True
s = S(("0.0.0.0", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("ready", flush=True)
s.serve_forever()
"""

# Runs in the sandbox: requests over one kept-alive connection with the sandbox's default trust (SSL_CERT_FILE).
CLIENT = r"""
import hashlib, http.client, json, os, ssl, sys
host, mode = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context() if mode == "verify" else ssl._create_unverified_context()
conn = http.client.HTTPSConnection(host, 443, context=ctx, timeout=10)
out = []
try:
    conn.request("GET", "/one", headers={"Authorization": "Bearer from-the-sandbox", "X-Mine": "kept"})
    r = conn.getresponse(); out.append([r.status, r.read().decode()])
    body = os.urandom(200_000)
    conn.request("POST", "/two", body=body, headers={"Content-Type": "application/octet-stream"})
    r = conn.getresponse(); out.append([r.status, r.read().decode(), hashlib.sha256(body).hexdigest()])
    conn.request("POST", "/three", body=iter([b"abc", b"defg"]), encode_chunked=True)
    r = conn.getresponse(); out.append([r.status, r.read().decode()])
    out.append(hashlib.sha256(conn.sock.getpeercert(binary_form=True)).hexdigest())
except Exception as e:
    out.append(["error", type(e).__name__, str(e)])
print(json.dumps(out))
"""

RAW = r"""
import json, socket, ssl, sys
host, request = sys.argv[1], sys.argv[2].encode().decode("unicode_escape").encode("latin-1")
ctx = ssl.create_default_context()
s = ctx.wrap_socket(socket.create_connection((host, 443), timeout=10), server_hostname=host)
s.sendall(request)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(json.dumps(data.decode(errors="replace")))
"""


@dataclass
class World:
    daemon: Daemon
    app: shoal.App
    web: PeerHost
    rogue: PeerHost
    web_cert_sha: str
    secret: str


def _certs(tmp: Path, name: str, hosts: list[str]) -> tuple[Path, Path]:
    """A CA and a server certificate for ``hosts`` signed by it: (CA cert, cert+key file)."""
    ca, ca_key = tmp / f"{name}-ca.pem", tmp / f"{name}-ca-key.pem"
    make_ca(ca, ca_key, f"test {name} CA")
    cert, key = sign_server_cert(ca, ca_key, hosts, 2)
    both = tmp / f"{name}-server.pem"
    both.write_bytes(key + cert)
    return ca, both


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    tmp = Path(tempfile.mkdtemp(prefix="shoal-egress-"))
    names = ["api.shoal.test", "static.shoal.test", "*.static.shoal.test", "plain.shoal.test"]
    web_ca, web_pem = _certs(tmp, "web", names)
    _rogue_ca, rogue_pem = _certs(tmp, "rogue", names)
    for path in tmp.iterdir():
        path.chmod(0o644)
    tmp.chmod(0o755)
    dns_server = DnsServer()
    saved = {k: os.environ.get(k) for k in ("SHOAL_DNS_UPSTREAM", "SHOAL_EGRESS_CA_FILE")}
    os.environ["SHOAL_DNS_UPSTREAM"] = f"127.0.0.1:{dns_server.port}"
    os.environ["SHOAL_EGRESS_CA_FILE"] = str(web_ca)
    web = rogue = None
    secret = f"egress-{uuid.uuid4().hex[:8]}"
    try:
        web, rogue = PeerHost(), PeerHost()
        web.start(ECHO_HTTPS, str(web_pem))
        rogue.start(ECHO_HTTPS, str(rogue_pem))
        dns_server.records.update(
            {
                "api.shoal.test": web.ip,
                "a.static.shoal.test": web.ip,
                "static.shoal.test": web.ip,
                "plain.shoal.test": web.ip,
                "b.static.shoal.test": rogue.ip,
            }
        )
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        der = x509.load_pem_x509_certificates(web_pem.read_bytes())[0].public_bytes(serialization.Encoding.DER)
        with running_daemon() as d:
            shoal.Secret.objects.create(secret, {"API_TOKEN": TOKEN})
            app = shoal.App.lookup("egress-tests", create_if_missing=True)
            yield World(d, app, web, rogue, hashlib.sha256(der).hexdigest(), secret)
    finally:
        for h in (web, rogue):
            if h is not None:
                h.close()
        dns_server.close()
        restore_environ(saved)
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()


@pytest.fixture
def sandboxes() -> Iterator[list[shoal.Sandbox]]:
    made: list[shoal.Sandbox] = []
    yield made
    for sb in made:
        sb.terminate()


def policy(world: World) -> shoal.experimental.OutboundPolicy:
    return (
        shoal.experimental.OutboundPolicy()
        .with_header_replacement(
            domain="api.shoal.test",
            secret=shoal.Secret.from_name(world.secret),
            headers={"Authorization": "Bearer $API_TOKEN", "X-Price": "$$5"},
        )
        .with_header_replacement(domain="*.static.shoal.test", headers={"X-Trace": "trace-1"})
    )


def client(sb: shoal.Sandbox, host: str, mode: str = "verify") -> list:
    rc, out, err = py(sb, CLIENT, host, mode)
    assert rc == 0, err
    return json.loads(out)


def headers(answer: str) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(answer)["headers"]}


def test_policy_headers_are_set_outside_the_sandbox(world, sandboxes):
    sb = shoal.Sandbox.create(app=world.app, _experimental_outbound_policy=policy(world), timeout=300)
    sandboxes.append(sb)
    one, two, three, cert_sha = client(sb, "api.shoal.test")
    # The sandbox trusted the daemon's stand-in certificate by default; the server got the secret's value in
    # place of the sandbox's own Authorization, and the sandbox's other headers as they were.
    assert one[0] == 200
    got = headers(one[1])
    assert got["authorization"] == f"Bearer {TOKEN}"
    assert got["x-price"] == "$5"
    assert got["x-mine"] == "kept"
    assert got["host"] == "api.shoal.test"
    assert "x-trace" not in got
    assert cert_sha != world.web_cert_sha  # the sandbox spoke to the interceptor, not to the server
    # Bodies pass intact on the same kept-alive connection: a 200 kB upload, then a chunked one.
    assert two[0] == 200 and json.loads(two[1])["body_sha"] == two[2]
    assert headers(two[1])["authorization"] == f"Bearer {TOKEN}"
    assert three[0] == 200 and json.loads(three[1])["body_len"] == 7
    # A wildcard replacement covers subdomains and the apex, with its own headers only.
    for host in ("a.static.shoal.test", "static.shoal.test"):
        first = client(sb, host)[0]
        assert first[0] == 200, first
        got = headers(first[1])
        assert got["x-trace"] == "trace-1"
        assert got["authorization"] == "Bearer from-the-sandbox"
    # The secret's value is nowhere in the sandbox: not in its environment, not in its files.
    rc, out, _ = py(sb, "import os; print(os.environ.get('SSL_CERT_FILE')); print(dict(os.environ))")
    assert rc == 0 and out.splitlines()[0] == "/etc/shoal/ca-certificates.crt" and TOKEN not in out
    p = sb.exec("grep", "-rl", TOKEN, "/etc", "/root", "/tmp", "/proc/self/environ")
    assert p.wait() == 1 and p.stdout.read() == ""


def test_names_the_policy_does_not_cover_pass_untouched(world, sandboxes):
    sb = shoal.Sandbox.create(app=world.app, _experimental_outbound_policy=policy(world), timeout=300)
    sandboxes.append(sb)
    # Not covered: the sandbox talks TLS with the server itself (its own certificate) and nothing is added.
    one, *_rest, cert_sha = client(sb, "plain.shoal.test", "noverify")
    assert one[0] == 200
    got = headers(one[1])
    assert got["authorization"] == "Bearer from-the-sandbox" and "x-price" not in got
    assert cert_sha == world.web_cert_sha
    # A sandbox without a policy is not intercepted at all, and has no bundle of shoal's.
    plain = shoal.Sandbox.create(app=world.app, timeout=300)
    sandboxes.append(plain)
    one, *_rest, cert_sha = client(plain, "api.shoal.test", "noverify")
    assert headers(one[1])["authorization"] == "Bearer from-the-sandbox" and cert_sha == world.web_cert_sha
    _rc, out, _ = py(plain, "import os; print(os.environ.get('SSL_CERT_FILE'), os.path.exists('/etc/shoal'))")
    assert out.split()[0] != "/etc/shoal/ca-certificates.crt" and out.split()[1] == "False"


def test_secrets_go_only_to_the_named_server_and_host(world, sandboxes):
    sb = shoal.Sandbox.create(app=world.app, _experimental_outbound_policy=policy(world), timeout=300)
    sandboxes.append(sb)
    # A server that cannot prove it is the covered name (a certificate from a CA the host does not trust)
    # gets nothing: the sandbox is told why with a 502.
    result = client(sb, "b.static.shoal.test")
    assert result[0][0] == 502 and "b.static.shoal.test" in result[0][1], result
    assert not any(line.startswith("req") for line in world.rogue.lines)
    # A request on api.shoal.test's connection naming another host (domain fronting) is refused with a 421.
    rc, out, err = py(sb, RAW, "api.shoal.test", "GET / HTTP/1.1\\r\\nHost: plain.shoal.test\\r\\n\\r\\n")
    assert rc == 0, err
    answer = json.loads(out)
    assert answer.startswith("HTTP/1.1 421") and "api.shoal.test" in answer and TOKEN not in answer
    # Ambiguous framing (both lengths), which could smuggle a second request past the rewrite: 400.
    smuggle = "POST / HTTP/1.1\\r\\nHost: api.shoal.test\\r\\nContent-Length: 4\\r\\nTransfer-Encoding: chunked"
    rc, out, err = py(sb, RAW, "api.shoal.test", smuggle + "\\r\\n\\r\\n0\\r\\n\\r\\n")
    assert json.loads(out).startswith("HTTP/1.1 400"), out


def intercepted(world: World) -> str:
    """The addresses in the daemon's outbound-policy set (nft's listing)."""
    netid = json.loads((world.daemon.data_dir / "network.json").read_text())["netid"]
    out = subprocess.run(
        ["nft", "list", "set", "inet", f"shoal_{netid}", "intercept"], capture_output=True, text=True, check=True
    )
    return out.stdout.partition("elements")[2]


def test_policy_survives_a_daemon_crash_and_leaves_nothing(world, sandboxes):
    sb = shoal.Sandbox.create(app=world.app, _experimental_outbound_policy=policy(world), timeout=300)
    sandboxes.append(sb)
    ip = json.loads(py(sb, "import json, socket; print(json.dumps(socket.gethostbyname('sandbox')))")[1])
    assert ip in intercepted(world)
    record = world.daemon.runtime_dir / "net" / f"{sb.object_id}.json"
    assert "Bearer $API_TOKEN" in record.read_text() and TOKEN not in record.read_text()  # templates, not values
    world.daemon.restart(signal.SIGKILL)
    first = client(sb, "api.shoal.test")[0]
    assert first[0] == 200 and headers(first[1])["authorization"] == f"Bearer {TOKEN}"
    sb.terminate(wait=True)
    assert ip not in intercepted(world)
    assert not record.exists()


def test_policy_errors(world):
    app = world.app
    ok_domain = shoal.experimental.OutboundPolicy().with_header_replacement
    cases = [
        (ok_domain(domain="exa mple.com", headers={"X": "1"}), "Invalid domain"),
        (ok_domain(domain="example.com", headers={}), "at least one header"),
        (ok_domain(domain="example.com", headers={"Bad Name": "1"}), "Invalid header name"),
        (ok_domain(domain="example.com", headers={"X": "a\nb"}), "control characters"),
        (ok_domain(domain="example.com", headers={"Host": "other"}), "routes or frames"),
        (ok_domain(domain="example.com", headers={"X": "$KEY"}), "no `secret` was passed"),
        (
            ok_domain(domain="example.com", headers={"X": "$KEY"}, secret=shoal.Secret.from_dict({"KEY": "v"})),
            "only support named secrets",
        ),
        (
            ok_domain(domain="example.com", headers={"X": "$MISSING"}, secret=shoal.Secret.from_name(world.secret)),
            r"\$MISSING",
        ),
        (ok_domain(domain="example.com", headers={f"X-{i}": "1" for i in range(26)}), "more than 25"),
    ]
    for pol, message in cases:
        with pytest.raises(InvalidError, match=message):
            shoal.Sandbox.create(app=app, _experimental_outbound_policy=pol)
    pol = policy(world)
    with pytest.raises(InvalidError, match="block_network"):
        shoal.Sandbox.create(app=app, _experimental_outbound_policy=pol, block_network=True)
    with pytest.raises(InvalidError, match="outbound_domain_allowlist"):
        shoal.Sandbox.create(app=app, _experimental_outbound_policy=pol, outbound_domain_allowlist=["x.com"])
    with pytest.raises(InvalidError, match="OutboundPolicy"):
        shoal.Sandbox.create(app=app, _experimental_outbound_policy={"domain": "x.com"})
    with pytest.raises(shoal.exception.NotFoundError):
        shoal.Sandbox.create(
            app=app,
            _experimental_outbound_policy=ok_domain(
                domain="x.com", headers={"X": "$K"}, secret=shoal.Secret.from_name("no-such-secret-here")
            ),
        )


# Runs in the sandbox: a request, then (after a line on stdin) another on the same kept-alive connection.
TWO_STEPS = r"""
import http.client, json, ssl, sys
conn = http.client.HTTPSConnection(sys.argv[1], 443, context=ssl.create_default_context(), timeout=10)
out = []
for step in range(2):
    if step:
        sys.stdin.readline()
    conn.request("GET", f"/{step}", headers={"Authorization": "Bearer from-the-sandbox"})
    r = conn.getresponse()
    out.append(r.read().decode())
    print("sent", flush=True)
print(json.dumps(out), flush=True)
"""


def test_a_running_sandbox_gets_its_policy_replaced(world, sandboxes):
    sb = shoal.Sandbox.create(app=world.app, _experimental_outbound_policy=policy(world), timeout=300)
    sandboxes.append(sb)
    p = sb.exec("python3", "-c", TWO_STEPS, "api.shoal.test", timeout=60)
    lines = iter(p.stdout)
    assert next(lines) == "sent\n"
    newer = (
        shoal.experimental.OutboundPolicy()
        .with_header_replacement(domain="api.shoal.test", headers={"X-Trace": "trace-2"})
        .with_header_replacement(domain="plain.shoal.test", headers={"X-Trace": "trace-plain"})
    )
    sb._experimental_update_outbound_policy(newer)
    p.stdin.write(b"go\n")
    p.stdin.drain()
    sent, answers = "".join(lines).split("\n", 1)
    assert sent == "sent"
    before, after = (headers(a) for a in json.loads(answers))
    assert p.wait() == 0
    assert before["authorization"] == f"Bearer {TOKEN}" and "x-trace" not in before
    # The next request on the same connection has the new policy's headers only: the old ones are gone.
    assert after["x-trace"] == "trace-2" and after["authorization"] == "Bearer from-the-sandbox"
    # A name the policy now covers is intercepted on new connections; the record keeps the new templates.
    first = client(sb, "plain.shoal.test")[0]
    assert first[0] == 200 and headers(first[1])["x-trace"] == "trace-plain"
    record = world.daemon.runtime_dir / "net" / f"{sb.object_id}.json"
    assert "trace-plain" in record.read_text() and "API_TOKEN" not in record.read_text()
    # Errors: a missing secret key, a sandbox created without a policy, the wrong type.
    bad = shoal.experimental.OutboundPolicy().with_header_replacement(
        domain="api.shoal.test", headers={"X": "$MISSING"}, secret=shoal.Secret.from_name(world.secret)
    )
    with pytest.raises(InvalidError, match=r"\$MISSING"):
        sb._experimental_update_outbound_policy(bad)
    assert headers(client(sb, "api.shoal.test")[0][1])["x-trace"] == "trace-2"  # the refused update changed nothing
    plain = shoal.Sandbox.create(app=world.app, timeout=300)
    sandboxes.append(plain)
    with pytest.raises(InvalidError, match="created with an `_experimental_outbound_policy`"):
        plain._experimental_update_outbound_policy(newer)
    with pytest.raises(InvalidError, match="OutboundPolicy"):
        sb._experimental_update_outbound_policy({"domain": "x.com"})  # type: ignore[arg-type]


def test_the_official_client_sets_and_replaces_a_policy(world, sandboxes):
    pytest.importorskip("modal_proto", reason="the official modal client is a test dependency: make setup")
    from tests.integration.test_gateway import run_client

    sandbox_id = run_client(
        f"""
        import json, modal, modal.experimental
        app = modal.App.lookup("egress-gateway", create_if_missing=True)
        policy = modal.experimental.OutboundPolicy().with_header_replacement(
            domain="api.shoal.test",
            secret=modal.Secret.from_name({world.secret!r}),
            headers={{"Authorization": "Bearer $API_TOKEN"}},
        )
        sb = modal.Sandbox.create(app=app, _experimental_outbound_policy=policy, timeout=300)
        print(json.dumps(sb.object_id))
        """
    )
    sb = shoal.Sandbox.from_id(sandbox_id)
    sandboxes.append(sb)
    first = client(sb, "api.shoal.test")[0]
    assert first[0] == 200 and headers(first[1])["authorization"] == f"Bearer {TOKEN}"
    run_client(
        f"""
        import json, modal, modal.experimental
        sb = modal.Sandbox.from_id({sandbox_id!r})
        policy = modal.experimental.OutboundPolicy()
        sb._experimental_update_outbound_policy(
            policy.with_header_replacement(domain="api.shoal.test", headers={{"X-New": "1"}})
        )
        print(json.dumps("updated"))
        """
    )
    got = headers(client(sb, "api.shoal.test")[0][1])
    assert got["x-new"] == "1" and got["authorization"] == "Bearer from-the-sandbox"
