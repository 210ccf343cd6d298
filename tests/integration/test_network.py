"""Networking: outbound access, block_network, the always-denied destinations, allowlists, tunnels, cleanup.

All traffic stays on this machine: sandboxes talk to servers in network
namespaces these tests make (``PeerHost``, addresses in 198.18.0.0/15, the
benchmarking range), to listeners on loopback, and to a DNS server on
loopback that the daemon under test forwards to.  The module's daemon also
listens on TCP (``--tcp 0.0.0.0:<port>``) so that its API port is among the
things a sandbox must not reach.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import shoal
import shoal as modal
from shoal.exception import InvalidError
from tests.conftest import RUNTIMES, Daemon, running_daemon
from tests.netkit import CONNECT, DnsServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# ---------------------------------------------------------------- helpers: hosts, DNS, probes


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


SERVER = r"""
import http.server, socketserver, sys
name, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {name}\n".encode()
        print("conn", self.client_address[0], flush=True)
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    allow_reuse_address = True
    daemon_threads = True
s = S(("0.0.0.0", port), H)
print("ready", flush=True)
s.serve_forever()
"""

UDP_RECORDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    print("udp", addr[0], data.decode(errors="replace"), flush=True)
"""


class PeerHost:
    """A network namespace linked to the host by a veth: a stand-in for a server out on the internet."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.netns = f"shoalt-{tag}"
        self.host_if = f"tv{tag}"
        used = run("ip", "-4", "-o", "addr", "show")
        k = random.choice([k for k in range(2, 250) if f"198.18.{k}." not in used])
        self.host_ip, self.ip = f"198.18.{k}.1", f"198.18.{k}.2"
        self.procs: list[subprocess.Popen[str]] = []
        self.pumps: list[threading.Thread] = []
        self.lines: list[str] = []
        self.started: set[tuple[str, tuple[str, ...]]] = set()
        run("ip", "netns", "add", self.netns)
        try:
            run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
            run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            run("ip", "link", "set", self.host_if, "up")
            run("ip", "-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
            run("ip", "-n", self.netns, "link", "set", "eth0", "up")
            run("ip", "-n", self.netns, "link", "set", "lo", "up")
            run("ip", "-n", self.netns, "route", "add", "default", "via", self.host_ip)
        except BaseException:
            self.close()
            raise

    def add_address(self, address: str) -> None:
        """Give the host a further address (routed to it from this machine), e.g. 169.254.169.254."""
        run("ip", "-n", self.netns, "addr", "add", f"{address}/32", "dev", "eth0")
        run("ip", "route", "add", f"{address}/32", "via", self.ip, "dev", self.host_if)

    def start(self, script: str, *args: str) -> None:
        """Run a server script in the namespace until the module ends (once: a test run again finds it running)."""
        key = (script, args)
        if key in self.started:
            return
        self.started.add(key)
        cmd = ["ip", "netns", "exec", self.netns, sys.executable, "-u", "-c", script, *args]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
        out = p.stdout

        def pump() -> None:
            for line in out:
                self.lines.append(line.strip())

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        self.pumps.append(t)

    def serve_http(self, port: int = 8000) -> None:
        self.start(SERVER, self.netns, str(port))

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        for t in self.pumps:
            t.join(5)
        for p in self.procs:
            if p.stdout is not None:
                p.stdout.close()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def py(sb, code: str, *args: str, timeout: int = 60) -> tuple[int, str, str]:
    p = sb.exec("python3", "-c", code, *args, timeout=timeout)
    rc = p.wait()
    return rc, p.stdout.read(), p.stderr.read()


FETCH = """
import json, socket, sys, urllib.request
try:
    body = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
    print(json.dumps({"body": body}))
except OSError as e:
    reason = getattr(e, "reason", e)
    print(json.dumps({"errno": getattr(reason, "errno", None), "error": str(reason)}))
"""


RESOLVE = """
import json, socket, sys
try:
    print(json.dumps({"addr": socket.gethostbyname(sys.argv[1])}))
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""


def fetch(sb, url: str) -> dict:
    rc, out, err = py(sb, FETCH, url)
    assert rc == 0, err
    return json.loads(out)


def connect(sb, host: str, port: int) -> dict:
    rc, out, err = py(sb, CONNECT, host, str(port))
    assert rc == 0, err
    return json.loads(out)


def resolve(sb, name: str) -> dict:
    rc, out, err = py(sb, RESOLVE, name)
    assert rc == 0, err
    return json.loads(out)


def sandbox_ip(sb) -> str:
    rc, out, err = py(
        sb,
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.connect(('198.18.0.1', 9)); print(s.getsockname()[0])",
    )
    assert rc == 0, err
    return out.strip()


def gateway(sb) -> str:
    _rc, out, _ = py(sb, "print(open('/etc/resolv.conf').read().split()[1])")
    return out.strip()


def host_address() -> str | None:
    """The host's address on its default route (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))
        return str(s.getsockname()[0])
    except OSError:
        return None
    finally:
        s.close()


class HostListener:
    """A TCP server in the test process (all addresses) that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.sendall(b"HOST\n")
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_pid(d: Daemon, sb) -> int:
    """The host pid of a sandbox's init."""
    for f in Path("/sys/fs/cgroup").glob(f"*{d.cgroup_parent}/{sb.object_id}/cgroup.procs"):
        for pid in f.read_text().split():
            status = Path(f"/proc/{pid}/status").read_text()
            if any(ln.startswith("NSpid:") and ln.split()[-1] == "1" for ln in status.splitlines()):
                return int(pid)
    raise AssertionError("no init found")


def netns_of(d: Daemon, sb) -> str:
    """A path to a sandbox's network namespace: its init's under runc; under gVisor the Sentry's, which the
    daemon keeps bound in the sandbox's run directory (the Sentry's own init is not the sandbox's)."""
    bound = d.runtime_dir / "sandboxes" / sb.object_id / "netns"
    if bound.exists():
        return str(bound)
    return f"/proc/{init_pid(d, sb)}/ns/net"


# ---------------------------------------------------------------- fixtures


@dataclass
class Net:
    daemon: Daemon
    dns: DnsServer
    app: shoal.App
    web: PeerHost
    other: PeerHost
    api_port: int


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    """A daemon whose sandboxes' DNS goes to a test DNS server, and two test hosts with web servers."""
    dns_server = DnsServer()
    saved = os.environ.get("SHOAL_DNS_UPSTREAM")
    os.environ["SHOAL_DNS_UPSTREAM"] = f"127.0.0.1:{dns_server.port}"
    web = other = None
    try:
        web, other = PeerHost(), PeerHost()
        web.serve_http(8000)
        other.serve_http(8000)
        dns_server.records.update(
            {"web.shoal.test": web.ip, "a.allowed.shoal.test": web.ip, "other.shoal.test": other.ip}
        )
        with running_daemon() as d:
            api_port = free_port()
            d.stop()
            d.start("--tcp", f"0.0.0.0:{api_port}")
            app = shoal.App.lookup("network-tests", create_if_missing=True)
            yield Net(d, dns_server, app, web, other, api_port)
    finally:
        for h in (web, other):
            if h is not None:
                h.close()
        dns_server.close()
        if saved is None:
            os.environ.pop("SHOAL_DNS_UPSTREAM", None)
        else:
            os.environ["SHOAL_DNS_UPSTREAM"] = saved


class Made(list):  # type: ignore[type-arg]
    """The sandboxes a test made, and the runtime they run under."""

    def __init__(self, runtime: str) -> None:
        super().__init__()
        self.runtime = runtime


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request) -> str:  # type: ignore[no-untyped-def]
    """The tests that make sandboxes with ``create`` run once with runc sandboxes and once with gVisor ones."""
    return str(request.param)


@pytest.fixture
def sandboxes(net: Net, runtime: str) -> Iterator[Made]:
    """Sandboxes a test creates (append to the list), of the runtime under test; all terminated afterwards."""
    made = Made(runtime)
    yield made
    for sb in made:
        sb.terminate()


def create(net: Net, made: list, **kwargs) -> shoal.Sandbox:
    kwargs.setdefault("runtime", getattr(made, "runtime", None))
    sb = shoal.Sandbox.create(app=net.app, timeout=300, **kwargs)
    made.append(sb)
    return sb


# ---------------------------------------------------------------- (a) outbound, block_network, always denied


def test_outbound_by_default_through_nat_with_dns(net, sandboxes):
    sb = create(net, sandboxes)
    assert fetch(sb, f"http://{net.web.ip}:8000/") == {"body": f"hello from {net.web.netns}\n"}
    # By name, through the daemon's DNS forwarder (which asks the test's DNS server on loopback).
    assert fetch(sb, "http://web.shoal.test:8000/") == {"body": f"hello from {net.web.netns}\n"}
    assert "web.shoal.test" in net.dns.queries
    # NAT: the server sees the host's address on its link, not the sandbox's.
    assert f"conn {net.web.host_ip}" in net.web.lines
    assert not any(line.startswith("conn 10.") for line in net.web.lines)
    rc, out, _ = py(sb, "import socket; print(sorted(n for _, n in socket.if_nameindex()))")
    assert out.strip() == "['eth0', 'lo']"
    rc, out, _ = py(sb, "import socket; print(socket.gethostname(), open('/etc/hosts').read().split()[-1])")
    assert out.split() == ["sandbox", "sandbox"]
    # The sandbox's resolver and host files are its own to change.
    rc, _, err = py(sb, "open('/etc/hosts', 'a').write('198.18.0.9 extra\\n')")
    assert rc == 0, err


def test_block_network_is_loopback_only(net, sandboxes):
    sb = create(net, sandboxes, block_network=True)
    _rc, out, _ = py(sb, "import socket; print(sorted(n for _, n in socket.if_nameindex()))")
    assert out.strip() == "['lo']"
    # No route under runc; gVisor's own stack says the host is unreachable instead.
    unreachable = errno.EHOSTUNREACH if sandboxes.runtime == "gvisor" else errno.ENETUNREACH
    assert connect(sb, net.web.ip, 8000) == {"errno": unreachable}
    assert "error" in resolve(sb, "web.shoal.test")
    # Control: the same request from a default sandbox works.
    assert "body" in fetch(create(net, sandboxes), f"http://{net.web.ip}:8000/")


def test_host_is_unreachable(net, sandboxes):
    """Attack: reach services on the host: any host address (its link to the sandbox, its uplink, its link to
    another network), its loopback, the daemon's TCP API port, the DNS forwarder's address on other ports."""
    sb = create(net, sandboxes, restrict_modal_access=True)
    listener = HostListener()
    try:
        gw = gateway(sb)
        targets = [gw, net.web.host_ip]
        if (addr := host_address()) is not None:
            targets.append(addr)
        for target in targets:
            assert connect(sb, target, listener.port) == {"errno": errno.EHOSTUNREACH}, target
            assert connect(sb, target, net.api_port) == {"errno": errno.EHOSTUNREACH}, target
        # 127.0.0.1 in the sandbox is its own loopback.
        assert connect(sb, "127.0.0.1", listener.port) == {"errno": errno.ECONNREFUSED}
    finally:
        listener.close()
    assert listener.accepted == 0
    # Control: from the host, both listeners answer on those addresses.
    with socket.create_connection((net.web.host_ip, net.api_port), timeout=5):
        pass


def test_cloud_metadata_is_unreachable(net, sandboxes):
    """Attack: fetch cloud credentials from 169.254.169.254 (here served by a test host, reachable from the host)."""
    meta = PeerHost()
    try:
        meta.add_address("169.254.169.254")
        meta.serve_http(80)
        with socket.create_connection(("169.254.169.254", 80), timeout=5):
            pass  # control: the address answers from the host
        sb = create(net, sandboxes)
        assert fetch(sb, "http://169.254.169.254/latest/meta-data/")["errno"] == errno.EHOSTUNREACH
        assert fetch(sb, f"http://{meta.ip}/")["body"] == f"hello from {meta.netns}\n"
    finally:
        meta.close()


def test_sandboxes_cannot_reach_each_other(net, sandboxes):
    a, b = create(net, sandboxes), create(net, sandboxes)
    server = a.exec(
        "python3",
        "-c",
        "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
        "s.bind(('0.0.0.0', 9000)); s.listen(8); print('ready', flush=True)\n"
        "while True:\n c, _ = s.accept(); c.sendall(b'A\\n'); c.close()",
    )
    wait_ready(server)
    a_ip, b_ip = sandbox_ip(a), sandbox_ip(b)
    assert a_ip != b_ip
    assert connect(b, a_ip, 9000) == {"errno": errno.EHOSTUNREACH}
    # Controls: a reaches itself on its address, and the host reaches a (the path tunnels take).
    assert connect(a, a_ip, 9000) == {"connected": "A\n"}
    with socket.create_connection((a_ip, 9000), timeout=5) as s:
        assert s.recv(4) == b"A\n"


SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if sys.argv[3]:
    s.bind((sys.argv[3], 0))
s.sendto(sys.argv[4].encode(), (sys.argv[1], int(sys.argv[2])))
"""


def test_spoofed_source_is_dropped(net, sandboxes):
    """Attack: send with another source address.  A sandbox cannot add addresses (no CAP_NET_ADMIN over its
    namespace); the test does it for it, from the host, and the filter still drops what it sends."""
    sb, victim = create(net, sandboxes), create(net, sandboxes)
    net.other.start(UDP_RECORDER, "9999")
    net.other.lines.clear()  # (what the other runtime's run recorded)
    rc, _, _err = py(
        sb, "import subprocess, sys; sys.exit(subprocess.call(['ip', 'addr', 'add', '198.18.250.9/32', 'dev', 'eth0']))"
    )
    assert rc != 0  # no privilege for it inside
    spoofs = ["198.18.250.9", sandbox_ip(victim)]
    nsenter = ["nsenter", f"--net={netns_of(net.daemon, sb)}"]
    for addr in spoofs:
        subprocess.run([*nsenter, "ip", "addr", "add", f"{addr}/32", "dev", "eth0"], check=True)
    real = ""
    if sandboxes.runtime == "gvisor":
        # runsc moves eth0's addresses and routes into its own network stack; the host's stack in that
        # namespace gets the sandbox's real address back and a route out, so the control packet takes the
        # same path as the attack packets.
        real = sandbox_ip(sb)
        subprocess.run([*nsenter, "ip", "addr", "add", f"{real}/32", "dev", "eth0"], check=True)
        subprocess.run(
            [*nsenter, "ip", "route", "add", "default", "via", gateway(sb), "dev", "eth0", "onlink"], check=True
        )
    for addr in [*spoofs, real]:
        label = addr if addr != real else "real"
        subprocess.run([*nsenter, sys.executable, "-c", SEND_UDP, net.other.ip, "9999", addr, label], check=True)
    deadline = time.monotonic() + 5
    while not any(line.endswith(" real") for line in net.other.lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = [line for line in net.other.lines if line.startswith("udp ")]
    assert [line.split()[-1] for line in got] == ["real"], got


def test_many_sandboxes_created_and_removed_leave_nothing(net):
    d = net.daemon
    made = []
    ours: set[str] = set()
    try:
        for _ in range(100):
            made.append(shoal.Sandbox.create(app=net.app, timeout=300))
        ips = {sandbox_ip(sb) for sb in (made[0], made[49], made[99])}
        assert len(ips) == 3
        assert "body" in fetch(made[99], f"http://{net.web.ip}:8000/")
        links = run("ip", "-o", "link", "show")
        # Each has its own link (the daemon's warm pool may hold a few more of its own).
        ours = {json.loads((d.runtime_dir / "net" / f"{sb.object_id}.json").read_text())["link"] for sb in made}
        assert len(ours) == 100 and all(f" {link}@" in links for link in ours)
    finally:
        threads = [threading.Thread(target=sb.terminate) for sb in made]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def remaining() -> list[str]:
        links = run("ip", "-o", "link", "show")
        return [link for link in ours if f" {link}@" in links]

    deadline = time.monotonic() + 5  # the kernel removes a dead namespace's veth in the background
    while remaining() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert remaining() == []
    assert [sb.object_id for sb in made if (d.runtime_dir / "net" / f"{sb.object_id}.json").exists()] == []


# ---------------------------------------------------------------- (b) allowlists


def test_cidr_allowlist_allows_exactly_what_it_lists(net, sandboxes):
    sb = create(net, sandboxes, outbound_cidr_allowlist=[f"{net.web.ip}/32"])
    assert fetch(sb, f"http://{net.web.ip}:8000/") == {"body": f"hello from {net.web.netns}\n"}
    assert fetch(sb, f"http://{net.other.ip}:8000/")["errno"] == errno.EHOSTUNREACH
    # DNS still answers (only addresses are restricted), and the always-denied list still holds.
    assert resolve(sb, "other.shoal.test") == {"addr": net.other.ip}
    assert connect(sb, gateway(sb), net.api_port) == {"errno": errno.EHOSTUNREACH}
    # An empty allowlist allows nothing; a wider one allows both hosts.
    none = create(net, sandboxes, outbound_cidr_allowlist=[])
    assert fetch(none, f"http://{net.web.ip}:8000/")["errno"] == errno.EHOSTUNREACH
    wide = create(net, sandboxes, outbound_cidr_allowlist=["198.18.0.0/15"])
    assert "body" in fetch(wide, f"http://{net.web.ip}:8000/")
    assert "body" in fetch(wide, f"http://{net.other.ip}:8000/")
    # The sandbox without a list next to them is unaffected.
    assert "body" in fetch(create(net, sandboxes), f"http://{net.other.ip}:8000/")


def test_deprecated_cidr_allowlist_alias(net, sandboxes):
    with pytest.warns(shoal.exception.DeprecationError, match="outbound_cidr_allowlist"):
        sb = create(net, sandboxes, cidr_allowlist=[net.other.ip])
    assert "body" in fetch(sb, f"http://{net.other.ip}:8000/")
    assert fetch(sb, f"http://{net.web.ip}:8000/")["errno"] == errno.EHOSTUNREACH


def test_domain_allowlist_pins_what_allowed_names_resolve_to(net, sandboxes):
    sb = create(net, sandboxes, outbound_domain_allowlist=["*.allowed.shoal.test", "WEB.shoal.test"])
    # Before any lookup, even the allowed host's address is closed.
    assert fetch(sb, f"http://{net.web.ip}:8000/")["errno"] == errno.EHOSTUNREACH
    assert fetch(sb, "http://a.allowed.shoal.test:8000/") == {"body": f"hello from {net.web.netns}\n"}
    assert fetch(sb, "http://web.shoal.test:8000/")["body"] == f"hello from {net.web.netns}\n"
    # A name outside the list does not resolve (and is not even asked upstream); its address stays closed.
    asked = len(net.dns.queries)
    assert "error" in resolve(sb, "other.shoal.test")
    assert "error" in resolve(sb, "allowed.shoal.test")  # '*.x' covers subdomains, not x itself
    assert "other.shoal.test" not in net.dns.queries[asked:]
    assert fetch(sb, f"http://{net.other.ip}:8000/")["errno"] == errno.EHOSTUNREACH
    # Another sandbox's lookups pin nothing for this one, and this one's pins do not open the other.
    plain = create(net, sandboxes, outbound_domain_allowlist=["other.shoal.test"])
    assert fetch(plain, f"http://{net.web.ip}:8000/")["errno"] == errno.EHOSTUNREACH
    assert "body" in fetch(plain, "http://other.shoal.test:8000/")
    assert fetch(sb, f"http://{net.other.ip}:8000/")["errno"] == errno.EHOSTUNREACH


def test_domain_and_cidr_allowlists_combine(net, sandboxes):
    sb = create(
        net, sandboxes, outbound_domain_allowlist=["web.shoal.test"], outbound_cidr_allowlist=[f"{net.other.ip}/32"]
    )
    assert "body" in fetch(sb, "http://web.shoal.test:8000/")
    assert "body" in fetch(sb, f"http://{net.other.ip}:8000/")
    star = create(net, sandboxes, outbound_domain_allowlist=["*"], outbound_cidr_allowlist=[])
    assert "body" in fetch(star, "http://other.shoal.test:8000/")
    assert fetch(star, f"http://{net.web.ip}:8000/")["errno"] == errno.EHOSTUNREACH


def test_allowlist_validation_errors(net):
    app = net.app
    with pytest.raises(InvalidError, match="not a valid CIDR"):
        shoal.Sandbox.create(app=app, outbound_cidr_allowlist=["10.0.0.300/8"])
    with pytest.raises(InvalidError, match="IPv6"):
        shoal.Sandbox.create(app=app, outbound_cidr_allowlist=["2001:db8::/32"])
    with pytest.raises(InvalidError, match="not a domain name"):
        shoal.Sandbox.create(app=app, outbound_domain_allowlist=["exa mple.com"])
    with pytest.raises(InvalidError, match="not a domain name"):
        shoal.Sandbox.create(app=app, outbound_domain_allowlist=["a.*.example.com"])
    with pytest.raises(InvalidError, match="list of strings"):
        shoal.Sandbox.create(app=app, outbound_domain_allowlist="example.com")  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match="allowlists"):
        shoal.Sandbox.create(app=app, block_network=True, outbound_cidr_allowlist=["10.0.0.0/8"])
    with pytest.raises(InvalidError, match="allowlists"):
        shoal.Sandbox.create(app=app, block_network=True, inbound_cidr_allowlist=["10.0.0.0/8"])
    with pytest.raises(InvalidError, match="only one of"), pytest.warns(shoal.exception.DeprecationError):
        shoal.Sandbox.create(app=app, cidr_allowlist=["10.0.0.0/8"], outbound_cidr_allowlist=["10.0.0.0/8"])


ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(16)
print("ready", flush=True)
def serve(c):
    with c:
        while data := c.recv(4096):
            c.sendall(data)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

KEEP_TALKING = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
while True:
    try:
        s.sendall(b"ping")
        if not s.recv(16):
            raise ConnectionResetError(0, "closed by the peer")
        print("ok", flush=True)
    except OSError as e:
        print("cut", e.errno, flush=True)
        break
    time.sleep(0.1)
"""


def test_outbound_policy_replaced_at_run_time(net, sandboxes):
    for host in (net.web, net.other):
        host.start(ECHO_SERVER, "9100")
    sb = create(net, sandboxes)
    keepers = {}
    for name, host in (("web", net.web), ("other", net.other)):
        # Line mode: with -u, print writes "ok" and "\n" separately, and a chunk may hold either.
        p = sb.exec("python3", "-u", "-c", KEEP_TALKING, host.ip, "9100", timeout=120, bufsize=1)
        lines = iter(p.stdout)
        assert next(lines) == "ok\n"
        keepers[name] = (p, lines)

    sb._experimental_set_outbound_network_policy(outbound_cidr_allowlist=[f"{net.web.ip}/32"])
    # The connection the policy no longer allows is cut; the allowed one goes on.
    p, lines = keepers["other"]
    assert next(line for line in lines if not line.startswith("ok")).startswith("cut")
    assert p.wait() == 0
    p, lines = keepers["web"]
    assert [next(lines) for _ in range(5)] == ["ok\n"] * 5
    assert fetch(sb, f"http://{net.web.ip}:8000/") == {"body": f"hello from {net.web.netns}\n"}
    assert fetch(sb, f"http://{net.other.ip}:8000/")["errno"] == errno.EHOSTUNREACH

    # By name instead: only what allowed names resolve to, and the web connection is cut now.
    sb._experimental_set_outbound_network_policy(outbound_domain_allowlist=["other.shoal.test"])
    assert next(line for line in lines if not line.startswith("ok")).startswith("cut")
    assert "error" in resolve(sb, "web.shoal.test")
    assert fetch(sb, f"http://{net.web.ip}:8000/")["errno"] == errno.EHOSTUNREACH
    assert fetch(sb, "http://other.shoal.test:8000/") == {"body": f"hello from {net.other.netns}\n"}

    # Open again; the always-denied destinations stay denied.
    sb._experimental_set_outbound_network_policy()
    assert "body" in fetch(sb, f"http://{net.web.ip}:8000/")
    assert "body" in fetch(sb, f"http://{net.other.ip}:8000/")
    assert connect(sb, gateway(sb), net.api_port) == {"errno": errno.EHOSTUNREACH}
    # A sandbox beside it never changed.
    assert "body" in fetch(create(net, sandboxes), f"http://{net.other.ip}:8000/")


def test_outbound_policy_change_errors(net, sandboxes):
    sb = create(net, sandboxes)
    with pytest.raises(InvalidError, match="not a valid CIDR"):
        sb._experimental_set_outbound_network_policy(outbound_cidr_allowlist=["10.0.0.300/8"])
    with pytest.raises(InvalidError, match="list of strings"):
        sb._experimental_set_outbound_network_policy(outbound_domain_allowlist="example.com")
    blocked = create(net, sandboxes, block_network=True)
    with pytest.raises(InvalidError, match="no network"):
        blocked._experimental_set_outbound_network_policy(outbound_cidr_allowlist=[])
    sb.terminate(wait=True)
    with pytest.raises(shoal.exception.ConflictError, match="not running"):
        sb._experimental_set_outbound_network_policy()


# ---------------------------------------------------------------- (c) tunnels

BIG_BLOCK_SEED, BIG_BLOCKS = 7, 100  # 100 blocks of 1 MiB: the "100 MB download"

HTTP_SERVER = r"""
import base64, hashlib, http.server, json, random, socket, socketserver, struct, sys, threading

BLOCK = random.Random(int(sys.argv[1])).randbytes(1 << 20)
BLOCKS = int(sys.argv[2])

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/big":
            self.send_response(200); self.send_header("Content-Length", str(len(BLOCK) * BLOCKS)); self.end_headers()
            for _ in range(BLOCKS):
                self.wfile.write(BLOCK)
        elif self.path == "/ws":
            accept = base64.b64encode(hashlib.sha1(self.headers["Sec-WebSocket-Key"].encode()
                     + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
            self.send_response(101); self.send_header("Upgrade", "websocket"); self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept); self.end_headers(); self.wfile.flush()
            self.close_connection = True
            rf = self.rfile
            while True:
                b1, b2 = rf.read(2)
                n = b2 & 0x7F
                if n == 126: n = struct.unpack("!H", rf.read(2))[0]
                elif n == 127: n = struct.unpack("!Q", rf.read(8))[0]
                mask = rf.read(4); data = bytes(c ^ mask[i % 4] for i, c in enumerate(rf.read(n)))
                op = b1 & 0x0F
                if op == 8:
                    self.wfile.write(b"\x88\x00"); return
                reply = b"echo: " + data
                size = bytes([len(reply)]) if len(reply) < 126 else b"\x7e" + struct.pack("!H", len(reply))
                head = bytes([0x80 | op]) + size
                self.wfile.write(head + reply); self.wfile.flush()
        elif self.path.startswith("/headers"):
            body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        else:
            body = f"hello from port {self.server.server_address[1]} {self.path}\n".encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)

class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    allow_reuse_address = True
    daemon_threads = True

def listen(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    return s

def echo(port):
    s = listen(port)
    while True:
        c, _ = s.accept()
        def serve(c=c):
            while data := c.recv(65536):
                c.sendall(data.upper())
            c.shutdown(socket.SHUT_WR); c.close()
        threading.Thread(target=serve, daemon=True).start()

def h2c(port):
    sys.path.insert(0, "/opt/h2lib")
    import h2.config, h2.connection, h2.events
    s = listen(port)
    while True:
        c, _ = s.accept()
        def serve(c=c):
            conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
            conn.initiate_connection(); c.sendall(conn.data_to_send())
            while data := c.recv(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        path = dict(ev.headers)[b":path"].decode()
                        body = f"h2 hello {path}\n".encode()
                        conn.send_headers(ev.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                        conn.send_data(ev.stream_id, body, end_stream=True)
                c.sendall(conn.data_to_send())
            c.close()
        threading.Thread(target=serve, daemon=True).start()

kinds = dict(a.split("=") for a in sys.argv[3:])
for port, kind in kinds.items():
    if kind == "http":
        srv = S(("0.0.0.0", int(port)), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    else:
        threading.Thread(target={"echo": echo, "h2c": h2c}[kind], args=(int(port),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def start_servers(sb, **kinds: str):
    """Run the test servers in the sandbox: port=kind with kind in http, echo, h2c."""
    args = [f"{port.lstrip('p')}={kind}" for port, kind in kinds.items()]
    p = sb.exec("python3", "-u", "-c", HTTP_SERVER, str(BIG_BLOCK_SEED), str(BIG_BLOCKS), *args)
    wait_ready(p)
    return p


def wait_ready(p) -> None:
    """Read a process's output until it says it is ready."""
    seen = ""
    with contextlib.closing(iter(p.stdout)) as chunks:
        for chunk in chunks:
            seen += chunk
            if "ready\n" in seen:
                return
    raise AssertionError(f"the server ended before it was ready: {p.stderr.read()}")


def copy_h2_into(sb) -> None:
    """Ship the pure-Python h2 library (from this test's environment) into the sandbox for an h2c server."""
    import io
    import tarfile

    import h2
    import hpack
    import hyperframe

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for mod in (h2, hpack, hyperframe):
            root = Path(mod.__file__).parent
            tar.add(root, arcname=root.name, filter=lambda t: None if "__pycache__" in t.name else t)
    p = sb.exec("bash", "-c", "mkdir -p /opt/h2lib && tar -x -C /opt/h2lib")
    p.stdin.write(buf.getvalue())
    p.stdin.write_eof()
    p.stdin.drain()
    assert p.wait() == 0, p.stderr.read()


def tls_context(net: Net):
    import ssl

    return ssl.create_default_context(cafile=ca_path(net.daemon))


def ca_path(d: Daemon) -> str:
    """The tunnel CA as `shoal status` reports it."""
    env = {**os.environ, "SHOAL_RUNTIME_DIR": str(d.runtime_dir), "SHOAL_NO_AUTOSTART": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "shoal", "status", "--json"], env=env, capture_output=True, text=True, check=True
    ).stdout
    path = json.loads(out)["tunnel_ca"]
    text = subprocess.run(
        [sys.executable, "-m", "shoal", "status"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert path in text.replace("\n", "")
    return str(path)


def expected_big_digest() -> str:
    import hashlib

    block = random.Random(BIG_BLOCK_SEED).randbytes(1 << 20)
    h = hashlib.sha256()
    for _ in range(BIG_BLOCKS):
        h.update(block)
    return h.hexdigest()


def http_get(host: str, port: int, path: str, ctx=None) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET over TCP or TLS, reading the whole body (hashing big ones)."""
    import http.client

    conn = (
        http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
        if ctx is not None
        else http.client.HTTPConnection(host, port, timeout=60)
    )
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def test_seed_port_forwarding_with_tunnels(net, sandboxes):
    """The seed's tunnel example, as written: it declares no port, so looking up 8080 opens a TLS tunnel on the
    spot (shoal's extension: Modal raises KeyError there)."""
    app = net.app
    sb = modal.Sandbox.create(
        "python", "-m", "http.server", "8080",
        app=app,
    )  # fmt: skip
    sandboxes.append(sb)

    tunnel = sb.tunnels()[8080]
    print(f"Access at: {tunnel.url}")

    assert tunnel.url == f"https://{tunnel.host}:{tunnel.port}"
    import urllib.request

    page = urllib.request.urlopen(tunnel.url + "/", context=tls_context(net), timeout=30).read().decode()
    assert "Directory listing for /" in page
    # The server's log lines arrive as they are written.
    with contextlib.closing(iter(sb.stderr)) as lines:
        line = next(lines)
    assert '"GET / HTTP/1.1" 200' in line


def test_tunnel_kinds_carry_http_websocket_tcp_and_100mb(net, sandboxes):
    sb = create(net, sandboxes, encrypted_ports=[8001], h2_ports=[8002], unencrypted_ports=[8003, 8004])
    tunnels = sb.tunnels()  # before any server listens inside
    assert sorted(tunnels) == [8001, 8002, 8003, 8004]
    copy_h2_into(sb)
    start_servers(sb, p8001="http", p8002="h2c", p8003="http", p8004="echo")
    ctx = tls_context(net)
    big = expected_big_digest()
    import hashlib

    # encrypted: HTTPS, a WebSocket, 100 MB intact.
    t = tunnels[8001]
    assert http_get(t.host, t.port, "/x", ctx) == (200, b"hello from port 8001 /x\n")
    status, body = http_get(t.host, t.port, "/big", ctx)
    assert (status, len(body), hashlib.sha256(body).hexdigest()) == (200, BIG_BLOCKS << 20, big)
    assert websocket_roundtrip(f"wss://{t.host}:{t.port}/ws", ctx) == ["echo: hi", "echo: " + "x" * 1000]
    with pytest.raises(InvalidError):
        _ = t.tcp_socket

    # unencrypted: raw TCP (HTTP and an echo protocol with half-close) and its TLS endpoint.
    t = tunnels[8003]
    host, port = t.tcp_socket
    status, body = http_get(host, port, "/big")
    assert (status, len(body), hashlib.sha256(body).hexdigest()) == (200, BIG_BLOCKS << 20, big)
    assert http_get(*t.tls_socket, "/tls", ctx) == (200, b"hello from port 8003 /tls\n")
    with pytest.warns(shoal.exception.DeprecationError):
        assert t.url.startswith("https://")
    with socket.create_connection(tunnels[8004].tcp_socket, timeout=30) as s:
        s.sendall(b"raw tcp " * 1000)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got == b"RAW TCP " * 1000

    # h2: TLS with ALPN h2, HTTP/2 all the way to an h2c server.
    t = tunnels[8002]
    assert h2_get(t.host, t.port, "/two", ctx) == ("h2", 200, b"h2 hello /two\n")


def websocket_roundtrip(url: str, ctx, address: str | None = None) -> list[str]:
    """Two messages through a WebSocket echo at ``url`` (its host name resolved to ``address`` when given)."""
    import asyncio

    import aiohttp
    import aiohttp.abc

    class Fixed(aiohttp.abc.AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
            addr = {"hostname": host, "host": address, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
            return [addr]

        async def close(self) -> None:
            pass

    async def go() -> list[str]:
        out = []
        connector = aiohttp.TCPConnector(resolver=Fixed()) if address else None
        async with aiohttp.ClientSession(connector=connector) as s, s.ws_connect(url, ssl=ctx) as ws:
            for msg in ("hi", "x" * 1000):
                await ws.send_str(msg)
                out.append((await ws.receive(timeout=30)).data)
            await ws.close()
        await asyncio.sleep(0.25)  # TLS transports finish closing on the loop (aiohttp's graceful shutdown)
        return out

    return asyncio.run(go())


def h2_get(host: str, port: int, path: str, ctx, address: str | None = None) -> tuple[str, int, bytes]:
    """An HTTP/2 GET of ``https://host:port/path`` (connecting to ``address`` instead of resolving ``host``)."""
    import h2.connection
    import h2.events

    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((address or host, port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        proto = s.selected_alpn_protocol()
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(
            1, [(":method", "GET"), (":path", path), (":authority", host), (":scheme", "https")], end_stream=True
        )
        s.sendall(conn.data_to_send())
        status, body, done = 0, b"", False
        while not done:
            data = s.recv(65536)
            assert data, "connection closed early"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    done = True
            s.sendall(conn.data_to_send())
    return proto, status, body


def test_tunnels_edge_cases(net, sandboxes):
    plain = create(net, sandboxes)
    assert plain.tunnels() == {}
    sb = create(net, sandboxes, encrypted_ports=[8080])
    assert sb.tunnels(timeout=5)[8080].port > 0
    ended = shoal.Sandbox.create(app=net.app, encrypted_ports=[8080])
    ended.terminate()
    with pytest.raises(shoal.exception.SandboxTimeoutError):
        ended.tunnels(timeout=1)
    # The listener is gone with the sandbox.
    t = sb.tunnels()[8080]
    sb.terminate()
    with pytest.raises(OSError):
        socket.create_connection((t.host, t.port), timeout=5).close()
    with pytest.raises(InvalidError, match="more than once"):
        shoal.Sandbox.create(app=net.app, encrypted_ports=[8080], unencrypted_ports=[8080])
    with pytest.raises(InvalidError, match="port number"):
        shoal.Sandbox.create(app=net.app, h2_ports=[70000])
    with pytest.raises(InvalidError, match="open ports"):
        shoal.Sandbox.create(app=net.app, block_network=True, unencrypted_ports=[22])


def test_inbound_cidr_allowlist(net, sandboxes):
    closed = create(net, sandboxes, unencrypted_ports=[8004], inbound_cidr_allowlist=["198.18.0.0/15"])
    opened = create(net, sandboxes, unencrypted_ports=[8004], inbound_cidr_allowlist=["127.0.0.0/8"])
    for sb in (closed, opened):
        start_servers(sb, p8004="echo")

    def echo(sb) -> bytes:
        try:
            with socket.create_connection(sb.tunnels()[8004].tcp_socket, timeout=10) as s:
                s.sendall(b"knock")
                s.shutdown(socket.SHUT_WR)
                return s.recv(100)
        except OSError:  # reset by the tunnel's abort, at any of the steps
            return b""

    assert echo(closed) == b""
    assert echo(opened) == b"KNOCK"


def test_open_tunnel_connection_counts_as_activity(net, sandboxes):
    # The server is the entrypoint (a running exec would itself count as activity).
    sb = shoal.Sandbox.create(
        "python3", "-u", "-c", HTTP_SERVER, "1", "1", "8004=echo",
        app=net.app, unencrypted_ports=[8004], idle_timeout=2, timeout=120,
    )  # fmt: skip
    sandboxes.append(sb)
    with socket.create_connection(sb.tunnels()[8004].tcp_socket, timeout=10) as s:
        s.sendall(b"a")
        assert s.recv(10) == b"A"  # the connection waits for the server to listen
        time.sleep(4)  # silent, but open: the sandbox stays up
        assert sb.poll() is None
    started = time.monotonic()
    while sb.poll() is None and time.monotonic() - started < 10:
        time.sleep(0.1)
    assert sb.poll() == 124  # then idle: it ends ~2 s after the connection closed
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- (a, c) daemon restarts and crashes


def test_tunnels_and_policy_survive_a_restart_and_a_crash_leaves_nothing(own_daemon):
    """SIGKILL the daemon; meanwhile one sandbox dies and a crashed teardown leaves residue (a link, a record,
    filter elements).  The next daemon re-adopts the live sandbox (tunnel, allowlist) and removes the rest."""
    d = own_daemon
    app = shoal.App.lookup("network-crash", create_if_missing=True)
    # The echo server is the entrypoint: no output stream of the SDK's stays open across the SIGKILL.
    keep = shoal.Sandbox.create(
        "python3", "-u", "-c", HTTP_SERVER, "1", "1", "8004=echo",
        app=app, unencrypted_ports=[8004], outbound_cidr_allowlist=["198.18.0.0/15"],
    )  # fmt: skip
    gone = shoal.Sandbox.create(app=app, outbound_domain_allowlist=["x.shoal.test"])
    before = keep.tunnels()[8004]
    with socket.create_connection(before.tcp_socket, timeout=10) as s:
        s.sendall(b"before")
        assert s.recv(100) == b"BEFORE"  # (the tunnel waits for the server to listen)
    state = json.loads((d.data_dir / "network.json").read_text())
    netid = state["netid"]
    import ipaddress

    stray_ip = ipaddress.IPv4Network(state["subnet"]).network_address + 4000
    stray = f"sv{netid}fa0"
    table = f"inet shoal_{netid}"

    keep._experimental_set_outbound_network_policy(outbound_cidr_allowlist=["198.18.0.0/16"])  # replaces /15
    creds = keep.create_connect_token(port=8004)

    d.stop(signal.SIGKILL)
    os.kill(init_pid(d, gone), signal.SIGKILL)
    (d.runtime_dir / "net" / "sb-strayStrayStrayStray12.json").write_text(
        json.dumps({"ip": str(stray_ip), "link": stray})
    )
    run("ip", "link", "add", stray, "type", "veth", "peer", "name", f"sv{netid}fa1")
    run("nft", f"add element {table} restricted {{ {stray_ip} }}")
    run("nft", f"add element {table} allow_pin {{ {stray_ip} . 198.18.7.7 timeout 1h }}")
    started = d.log.read_text().count("daemon ready")
    d.start()
    while d.log.read_text().count("daemon ready") == started:  # start() may have seen the first run's line
        time.sleep(0.05)

    links = run("ip", "-o", "link", "show")
    assert stray not in links and f"sv{netid}fa1" not in links
    assert str(stray_ip) not in run("nft", "list", "table", *table.split())
    assert not (d.runtime_dir / "net" / "sb-strayStrayStrayStray12.json").exists()
    with pytest.raises(shoal.exception.SandboxTerminatedError):
        gone.wait()
    # The live one kept its address, its tunnel (same port) and its allowlist.
    after = shoal.Sandbox.from_id(keep.object_id).tunnels()[8004]
    assert after.tcp_socket == before.tcp_socket
    with socket.create_connection(after.tcp_socket, timeout=10) as s:
        s.sendall(b"still here")
        assert s.recv(100) == b"STILL HERE"
    assert "restricted" in run("nft", "list", "set", *table.split(), "restricted")
    # The connect-token proxy is back on its port and still knows the token (8004 speaks no HTTP: 502, not 401).
    ctx = ssl.create_default_context(cafile=str(d.data_dir / "tls" / "ca.pem"))
    assert _request(creds.url, ctx)[0] == 401
    assert _request(creds.url, ctx, headers={"Authorization": f"Bearer {creds.token}"})[0] == 502
    cidrs = run("nft", "list", "set", *table.split(), "allow_cidr")
    assert "198.18.0.0/16" in cidrs and "198.18.0.0/15" not in cidrs  # the policy set at run time, not at create
    assert connect(keep, "192.0.2.1", 80)["errno"] == errno.EHOSTUNREACH
    keep.terminate()


def test_declared_ports_and_on_demand_tunnels(net, sandboxes):
    """Declared ports are listed before any lookup; an undeclared one appears once looked up; block_network has
    no tunnels at all."""
    sb = shoal.Sandbox.create("python", "-m", "http.server", "8080", encrypted_ports=[8080], app=net.app)
    sandboxes.append(sb)
    tunnels = sb.tunnels()
    assert sorted(tunnels) == [8080]
    assert 9000 not in tunnels
    extra = tunnels[9000]
    assert 9000 in tunnels and extra.port not in (0, tunnels[8080].port)
    assert sorted(sb.tunnels()) == [8080, 9000]
    with pytest.raises(KeyError):
        tunnels[70000]
    blocked = shoal.Sandbox.create(block_network=True, app=net.app)
    sandboxes.append(blocked)
    with pytest.raises(shoal.exception.InvalidError, match="no network"):
        blocked.tunnels()[8080]


def _request(url: str, ctx, method: str = "GET", path: str = "/", headers=None, body=None):
    """(status, headers, body) of one HTTPS request."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_connect_tokens_authenticate_and_carry_user_metadata(net, sandboxes):
    import asyncio
    import hashlib

    import aiohttp

    sb = create(net, sandboxes)
    start_servers(sb, p8080="http")
    creds = sb.create_connect_token(user_metadata={"user": "ada"})
    assert creds.url.startswith("https://") and len(creds.token) >= 32
    ctx = tls_context(net)
    bearer = {"Authorization": f"Bearer {creds.token}"}

    # No token, or a wrong one: 401, nothing reaches the sandbox.
    assert _request(creds.url, ctx, path="/headers")[0] == 401
    assert _request(creds.url, ctx, path="/headers", headers={"Authorization": "Bearer nope"})[0] == 401

    # A bearer token: the server sees the metadata (never a client's forged copy) and not the token.
    status, _, body = _request(
        creds.url, ctx, path="/headers?a=1", headers={**bearer, "X-Verified-User-Data": "forged", "X-Mine": "kept"}
    )
    seen = json.loads(body)
    assert status == 200 and seen["path"] == "/headers?a=1"
    assert seen["headers"]["X-Verified-User-Data"] == '{"user": "ada"}'
    assert seen["headers"]["X-Mine"] == "kept" and "Authorization" not in seen["headers"]

    # The query parameter: stripped before the sandbox, and a cookie is set for the next requests.
    status, headers, body = _request(creds.url, ctx, path=f"/headers?_modal_connect_token={creds.token}&b=2")
    assert status == 200 and json.loads(body)["path"] == "/headers?b=2"
    assert f"_modal_connect_token={creds.token}" in headers["Set-Cookie"]
    status, _, body = _request(
        creds.url, ctx, path="/headers", headers={"Cookie": f"theme=dark; _modal_connect_token={creds.token}"}
    )
    assert status == 200 and json.loads(body)["headers"]["Cookie"] == "theme=dark"

    # Request bodies and WebSockets travel through the proxy intact.
    payload = os.urandom(3 << 20)
    status, _, body = _request(creds.url, ctx, method="POST", path="/upload", headers=bearer, body=payload)
    assert status == 200 and json.loads(body) == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    async def websocket() -> list[str]:
        out = []
        async with aiohttp.ClientSession() as s, s.ws_connect(creds.url + "/ws", ssl=ctx, headers=bearer) as ws:
            for msg in ("hi", "x" * 1000):
                await ws.send_str(msg)
                out.append((await ws.receive(timeout=30)).data)
            await ws.close()
        await asyncio.sleep(0.25)  # TLS transports finish closing on the loop (aiohttp's graceful shutdown)
        return out

    assert asyncio.run(websocket()) == ["echo: hi", "echo: " + "x" * 1000]

    # Each token carries its own metadata; a port nobody listens on answers 502.
    other = sb.create_connect_token(user_metadata="plain text")
    assert other.url == creds.url
    status, _, body = _request(other.url, ctx, path="/headers", headers={"Authorization": f"Bearer {other.token}"})
    assert json.loads(body)["headers"]["X-Verified-User-Data"] == "plain text"
    idle = sb.create_connect_token(port=8099)
    assert _request(idle.url, ctx, headers={"Authorization": f"Bearer {idle.token}"})[0] == 502


def test_connect_token_errors(net, sandboxes):
    sb = create(net, sandboxes)
    with pytest.raises(InvalidError, match="port"):
        sb.create_connect_token(port=0)
    with pytest.raises(InvalidError, match="JSON"):
        sb.create_connect_token(user_metadata={"x": object()})
    with pytest.raises(InvalidError, match="line breaks"):
        sb.create_connect_token(user_metadata="a\r\nX-Evil: 1")
    with pytest.raises(InvalidError, match="no network"):
        create(net, sandboxes, block_network=True).create_connect_token()
    creds = sb.create_connect_token()
    sb.terminate(wait=True)
    with pytest.raises(shoal.exception.ConflictError, match="not running"):
        sb.create_connect_token()
    with pytest.raises(OSError):  # the proxy closed with the sandbox
        _request(creds.url, tls_context(net), headers={"Authorization": f"Bearer {creds.token}"})
