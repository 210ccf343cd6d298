"""Per-sandbox bounds on the daemon's connections, descriptors and log lines (issue 11; docs/decisions/0017).

A sandbox (or a client of its tunnels) opens far more connections than it could need and holds them: the
daemon's descriptor count must grow by at most the cap, the extras must be reset at once, UDP DNS and
``Sandbox.create`` must keep working, and the daemon's log must not grow by more than a few lines.  All
traffic stays on this machine: sandboxes talk to their own DNS forwarder, the test process to tunnels on
loopback, and the forwarder's upstream is a DNS responder in this process on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import shoal
from shoal.network import connect as connect_proxy
from shoal.network import dns as dns_forwarder
from shoal.network import tunnels as tunnel_mod
from shoal.util import limits
from shoal.util.ratelog import RateLimit
from tests.conftest import Daemon, running_daemon
from tests.netkit import DnsServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NAME, ADDRESS = "flood.shoal.test", "198.18.7.7"
SLACK = 24
"""Descriptors the daemon may open besides the flood meanwhile (an exec's pipes and spool files, a request)."""
LOG_GROWTH = 4096
"""Bytes the daemon's log may grow by during one flood."""

DNS_FLOOD = r"""
import json, socket, sys, time
ns = open("/etc/resolv.conf").read().split()[1]
n = int(sys.argv[1])
t0 = time.monotonic()
socks, reset = [], 0
for _ in range(n):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((ns, 53))
    except ConnectionResetError:  # reset before connect() returned
        reset += 1
        s.close()
        continue
    socks.append(s)
time.sleep(1.0)
held = []
for s in socks:
    s.setblocking(False)
    try:
        data = s.recv(1)
    except BlockingIOError:
        held.append(s)
        continue
    except OSError:
        data = b""
    reset += 1
    s.close()
print(json.dumps({"held": len(held), "reset": reset}), flush=True)
# The daemon closes idle connections: time until every held one is closed.
for s in held:
    s.setblocking(True)
    s.settimeout(30)
    try:
        s.recv(1)
    except OSError:
        pass
print(json.dumps({"idle_closed_after": time.monotonic() - t0}), flush=True)
"""

RESOLVE = """
import json, socket, sys
try:
    print(json.dumps({"addr": socket.gethostbyname(sys.argv[1])}))
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""

ECHO_SERVER = r"""
import selectors, socket
sel = selectors.DefaultSelector()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8004))
srv.listen(1024)
srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is srv:
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            continue
        c = key.fileobj
        try:
            data = c.recv(65536)
        except OSError:
            data = b""
        if data:
            c.sendall(data.upper())
        else:
            sel.unregister(c)
            c.close()
"""


@contextlib.contextmanager
def dns_upstream() -> Iterator[DnsServer]:
    """A DNS server where ``NAME`` is ``ADDRESS``, named in SHOAL_DNS_UPSTREAM for daemons started meanwhile."""
    up = DnsServer({NAME: ADDRESS})
    saved = os.environ.get("SHOAL_DNS_UPSTREAM")
    os.environ["SHOAL_DNS_UPSTREAM"] = f"127.0.0.1:{up.port}"
    try:
        yield up
    finally:
        up.close()
        if saved is None:
            os.environ.pop("SHOAL_DNS_UPSTREAM", None)
        else:
            os.environ["SHOAL_DNS_UPSTREAM"] = saved


@dataclass
class Setup:
    daemon: Daemon
    app: shoal.App


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    with dns_upstream(), running_daemon() as d:
        yield Setup(d, shoal.App.lookup("connection-bounds-tests", create_if_missing=True))


def create(app: shoal.App, made: list, *args: str, **kwargs) -> shoal.Sandbox:
    sb = shoal.Sandbox.create(*args, app=app, timeout=300, **kwargs)
    made.append(sb)
    return sb


def fds(d: Daemon) -> int:
    assert d.proc is not None
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def log_size(d: Daemon) -> int:
    return d.log.stat().st_size


def resolve(sb: shoal.Sandbox, name: str = NAME) -> dict:
    p = sb.exec("python3", "-c", RESOLVE, name, timeout=30)
    assert p.wait() == 0, p.stderr.read()
    return json.loads(p.stdout.read())


def create_and_exec_works(app: shoal.App, made: list) -> None:
    sb = create(app, made)
    p = sb.exec("echo", "alive", timeout=60)
    assert p.wait() == 0 and p.stdout.read() == "alive\n"
    sb.terminate()


def open_many(addr: tuple[str, int], n: int) -> list[socket.socket]:
    """``n`` connections to ``addr``; one reset before connect() returned is in the list, closed."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect(addr)
        except ConnectionResetError:
            s.close()
        out.append(s)
    return out


def reset_ones(socks: list[socket.socket], within: float = 3.0) -> list[socket.socket]:
    """The connections the daemon closed (within ``within`` seconds; the rest must stay open meanwhile)."""
    deadline = time.monotonic() + within
    closed: list[socket.socket] = []
    while True:
        for s in socks:
            if s in closed:
                continue
            if s.fileno() == -1:
                closed.append(s)
                continue
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    closed.append(s)
            except BlockingIOError:
                pass
            except OSError:
                closed.append(s)
        if time.monotonic() >= deadline:
            return closed
        time.sleep(0.2)


def wait_for_peers(sb: shoal.Sandbox, n: int, timeout: float = 20) -> None:
    """Until the sandbox holds ``n`` established connections on port 8004 (the tunnel connected through)."""
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        p = sb.exec("sh", "-c", "grep -c ':1F44 [0-9A-F:]* 01 ' /proc/net/tcp || true", timeout=30)
        p.wait()
        count = int(p.stdout.read().strip() or 0)
        if count >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"the sandbox holds {count} tunnel connections, not {n}")


# ---------------------------------------------------------------- the DNS forwarder


def test_dns_tcp_flood_costs_the_daemon_at_most_the_cap(setup, sandboxes):
    """Attack: a sandbox opens 200 TCP connections to its DNS forwarder and holds them.  Defence: MAX_TCP per
    sandbox, the rest reset at accept, idle ones closed after TCP_IDLE; UDP DNS and Sandbox.create unaffected."""
    d = setup.daemon
    sb = create(setup.app, sandboxes)
    assert resolve(sb) == {"addr": ADDRESS}
    before, log_before = fds(d), log_size(d)
    flood = sb.exec("python3", "-c", DNS_FLOOD, "200", timeout=60)
    lines = iter(flood.stdout)
    first = json.loads(next(lines, "null"))
    assert first is not None, flood.stderr.read()
    during = fds(d)
    assert first == {"held": dns_forwarder.MAX_TCP, "reset": 200 - dns_forwarder.MAX_TCP}
    assert during - before <= dns_forwarder.MAX_TCP + SLACK, (before, during)
    # Meanwhile UDP DNS answers for that very sandbox, and new sandboxes are made and run.
    assert resolve(sb) == {"addr": ADDRESS}
    create_and_exec_works(setup.app, sandboxes)
    closed_after = json.loads(next(lines))["idle_closed_after"]
    assert flood.wait() == 0, flood.stderr.read()
    assert closed_after < dns_forwarder.TCP_IDLE + 4
    assert log_size(d) - log_before <= LOG_GROWTH, d.log.read_text()[log_before:]


# ---------------------------------------------------------------- tunnels and the connect proxy


def test_tunnel_flood_is_capped_per_port(setup, sandboxes):
    """Attack: a client opens more connections to one tunnel port (raw TCP and TLS listeners together) than the
    cap, and holds them.  Defence: MAX_CONNS per sandbox port, the extras reset at once, fd growth bounded."""
    d = setup.daemon
    cap = tunnel_mod.MAX_CONNS
    sb = create(setup.app, sandboxes, "python3", "-c", ECHO_SERVER, unencrypted_ports=[8004])
    tunnel = sb.tunnels()[8004]
    with contextlib.closing(socket.create_connection(tunnel.tcp_socket, timeout=10)) as s:
        s.sendall(b"ping")
        assert s.recv(10) == b"PING"
    before, log_before = fds(d), log_size(d)
    tcp = open_many(tunnel.tcp_socket, cap - 40)
    tls = open_many(tunnel.tls_socket, 80)  # no handshake: a connection in its handshake counts as well
    try:
        closed = reset_ones(tcp + tls)
        assert len(closed) == 40, len(closed)
        through = [s for s in tcp if s not in closed]
        wait_for_peers(sb, len(through))
        during = fds(d)
        assert during - before <= 2 * cap + SLACK, (before, during)
        # The connections let through work.
        through[0].setblocking(True)
        through[0].sendall(b"still")
        assert through[0].recv(10) == b"STILL"
        create_and_exec_works(setup.app, sandboxes)
    finally:
        for s in tcp + tls:
            s.close()
    # Once they are closed the port has room again, and the daemon gives the descriptors back.
    deadline = time.monotonic() + 10
    while fds(d) > before + SLACK and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fds(d) <= before + SLACK
    with contextlib.closing(socket.create_connection(tunnel.tcp_socket, timeout=10)) as s:
        s.sendall(b"again")
        assert s.recv(10) == b"AGAIN"
    assert log_size(d) - log_before <= LOG_GROWTH, d.log.read_text()[log_before:]


def test_connect_proxy_flood_is_capped(setup, sandboxes):
    """Attack: a client holds more connections to a sandbox's connect-token proxy than the cap.  Defence:
    MAX_CONNS per proxy, the extras reset at once, the daemon's descriptors and log bounded."""
    d = setup.daemon
    cap = connect_proxy.MAX_CONNS
    sb = create(setup.app, sandboxes)
    u = urlsplit(sb.create_connect_token(port=8080).url)
    addr = (u.hostname or "", u.port or 443)
    before, log_before = fds(d), log_size(d)
    socks = open_many(addr, cap + 30)
    try:
        assert len(reset_ones(socks)) == 30
        assert fds(d) - before <= cap + SLACK
    finally:
        for s in socks:
            s.close()
    assert log_size(d) - log_before <= LOG_GROWTH, d.log.read_text()[log_before:]


# ---------------------------------------------------------------- the daemon's descriptor limit and reserve


def soft_hard(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files limit")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_daemon_raises_its_limit_and_keeps_a_reserve(own_daemon, sandboxes):
    """Attack: flood a daemon that started under a low soft limit, then one near its hard limit.  Defence: the
    soft limit is raised to the hard one at start; below RESERVE free descriptors sandbox-driven connections are
    reset while Sandbox.create works, with rate-limited log lines and no tracebacks."""
    d = own_daemon
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        with dns_upstream():
            d.restart()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert d.proc is not None
    pid = d.proc.pid
    assert soft_hard(pid) == (hard, hard)

    app = shoal.App.lookup("connection-bounds-tests", create_if_missing=True)
    sb = create(app, sandboxes, "python3", "-c", ECHO_SERVER, unencrypted_ports=[8004])
    tunnel = sb.tunnels()[8004]
    with contextlib.closing(socket.create_connection(tunnel.tcp_socket, timeout=10)) as s:
        s.sendall(b"ping")
        assert s.recv(10) == b"PING"
    # Leave the daemon 100 descriptors above its reserve: the tunnel fills that, then is refused.
    low = fds(d) + limits.RESERVE + 100
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (low, hard))  # the soft one only: root may lack CAP_SYS_RESOURCE
    log_before = log_size(d)
    socks = open_many(tunnel.tcp_socket, 150)
    try:
        closed = reset_ones(socks)
        assert 80 <= len(closed) <= 120, len(closed)  # ~50 let through (2 descriptors each), the rest reset
        assert fds(d) <= low - limits.RESERVE + SLACK
        create_and_exec_works(app, sandboxes)
    finally:
        for s in socks:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    text = d.log.read_text()[log_before:]
    assert "file descriptors free" in text
    assert text.count("Traceback") == 0, text
    assert len(text) <= LOG_GROWTH, text
    # Out of descriptors altogether: connections wait in the backlog and the listener pauses rather than spins;
    # other work that needs a descriptor fails now and then (a line each), but nothing floods the log.
    log_before = log_size(d)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (16, hard))
    try:
        waiting = open_many(tunnel.tcp_socket, 20)
        cpu = cpu_seconds(pid)
        time.sleep(2)
        assert cpu_seconds(pid) - cpu < 0.5
        for s in waiting:
            s.close()
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    text = d.log.read_text()[log_before:]
    assert "out of file descriptors" in text
    assert text.count("out of file descriptors") <= 2 / limits.PAUSE + 2, text
    assert text.count("Traceback") <= 3, text
    assert len(text) <= 4 * LOG_GROWTH, text
    # And back to normal once the limit is.
    time.sleep(limits.PAUSE + 0.5)
    with contextlib.closing(socket.create_connection(tunnel.tcp_socket, timeout=10)) as s:
        s.sendall(b"again")
        assert s.recv(10) == b"AGAIN"
    create_and_exec_works(app, sandboxes)


# ---------------------------------------------------------------- the rate limit itself


def test_rate_limit_lets_n_lines_per_subject_through_then_counts_the_rest():
    """Attack: make the daemon log about one sandbox without end.  Defence: N lines per subject per interval,
    a note on the last one, the count of the rest on the next one let through; other subjects unaffected."""
    now = [0.0]
    f = RateLimit(lines=3, interval=10, clock=lambda: now[0], max_keys=2)
    assert [f.allow("a")[0] for _ in range(5)] == [True, True, True, False, False]
    assert f.allow("b") == (True, "")
    now[0] = 10.0
    ok, note = f.allow("a")
    assert ok and "2 similar lines about a were suppressed" in note
    f.allow("c")  # a third subject: the stalest is forgotten
    assert len(f._windows) == 2
