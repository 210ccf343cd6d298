"""Outbound default-deny for private ranges and cloud metadata (docs/decisions/0016).

All traffic stays on this machine: the "private host" is a network namespace
this module makes, linked to the host by a veth and addressed in
192.168.K.0/24 (RFC 1918); the same namespace also answers on 198.19.J.2, an
address outside every denied range, as the control a sandbox may reach.
Metadata addresses are checked on the daemon's generated nftables rules,
without a packet sent to them.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import shoal
from tests.conftest import Daemon, restore_environ, running_daemon
from tests.netkit import CONNECT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

PORT = 7000

LISTENER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    print("conn", peer[0], c.getsockname()[0], flush=True)
    c.sendall(b"PRIVATE\n"); c.close()
"""


REACHED = {"connected": "PRIVATE\n"}
REFUSED = {"errno": errno.EHOSTUNREACH}
"""What the deny rule answers (ICMP admin-prohibited): at once, not a timeout (errno None)."""


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class PrivateHost:
    """A network namespace reachable from the host at 192.168.K.2 (RFC 1918) and at 198.19.J.2 (not private)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.netns = f"shoalp-{tag}"
        self.host_if = f"tp{tag}"
        used = run("ip", "-4", "-o", "addr", "show") + run("ip", "-4", "route", "show", "table", "all")
        k = random.choice([k for k in range(2, 250) if f"192.168.{k}." not in used])
        j = random.choice([j for j in range(2, 250) if f"198.19.{j}." not in used])
        self.host_ip, self.ip, self.public_ip = f"192.168.{k}.1", f"192.168.{k}.2", f"198.19.{j}.2"
        self.cidr = f"192.168.{k}.0/24"
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.pump: threading.Thread | None = None
        run("ip", "netns", "add", self.netns)
        try:
            run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
            run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            run("ip", "link", "set", self.host_if, "up")
            run("ip", "-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
            run("ip", "-n", self.netns, "addr", "add", f"{self.public_ip}/32", "dev", "eth0")
            run("ip", "-n", self.netns, "link", "set", "eth0", "up")
            run("ip", "-n", self.netns, "link", "set", "lo", "up")
            run("ip", "-n", self.netns, "route", "add", "default", "via", self.host_ip)
            run("ip", "route", "add", f"{self.public_ip}/32", "via", self.ip, "dev", self.host_if)
            cmd = ["ip", "netns", "exec", self.netns, sys.executable, "-u", "-c", LISTENER, str(PORT)]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert self.proc.stdout is not None
            assert self.proc.stdout.readline() == "ready\n"
            out = self.proc.stdout

            def pump() -> None:
                for line in out:
                    self.lines.append(line.strip())

            self.pump = threading.Thread(target=pump, daemon=True)
            self.pump.start()
        except BaseException:
            self.close()
            raise

    def accepted_on(self, local: str) -> int:
        """Connections the listener accepted on its address ``local``."""
        return sum(1 for line in list(self.lines) if line.split()[-1] == local)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        if self.pump is not None:
            self.pump.join(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)  # its routes go with it
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def default_daemon() -> Iterator[Daemon]:
    """A daemon with the default policy (no allowance or extra deny from this environment), DNS on loopback."""
    keys = ("SHOAL_ALLOW_PRIVATE_RANGES", "SHOAL_NETWORK_DENY", "SHOAL_DNS_UPSTREAM")
    saved = {k: os.environ.pop(k, None) for k in keys}
    os.environ["SHOAL_DNS_UPSTREAM"] = f"127.0.0.1:{free_port()}"  # nothing answers; no sandbox here asks
    try:
        with running_daemon() as d:
            yield d
    finally:
        restore_environ(saved)


@dataclass
class Setup:
    host: PrivateHost
    daemon: Daemon
    app: shoal.App


@pytest.fixture(scope="module")
def private_host() -> Iterator[PrivateHost]:
    host = PrivateHost()
    try:
        yield host
    finally:
        host.close()


@pytest.fixture(scope="module")
def setup(private_host: PrivateHost) -> Iterator[Setup]:
    with default_daemon() as d:
        yield Setup(private_host, d, shoal.App.lookup("outbound-private-tests", create_if_missing=True))


def create(app: shoal.App, made: list, **kwargs) -> shoal.Sandbox:
    sb = shoal.Sandbox.create(app=app, timeout=300, **kwargs)
    made.append(sb)
    return sb


def connect(sb, host: str, port: int = PORT) -> dict:
    p = sb.exec("python3", "-c", CONNECT, host, str(port), timeout=30)
    rc = p.wait()
    out, err = p.stdout.read(), p.stderr.read()
    assert rc == 0, err
    return json.loads(out)


def forward_deny_set(d: Daemon) -> list[ipaddress.IPv4Network]:
    """The destinations of the daemon's forward-chain deny rule, read back from the kernel, and check that this
    rule comes before the allowlist (``jump restricted``)."""
    netid = json.loads((d.data_dir / "network.json").read_text())["netid"]
    listing = json.loads(run("nft", "-j", "list", "chain", "inet", f"shoal_{netid}", "from_sandbox_fwd"))
    rules = [item["rule"]["expr"] for item in listing["nftables"] if "rule" in item]
    daddr = {"payload": {"protocol": "ip", "field": "daddr"}}

    def is_deny(expr: list) -> bool:
        return {"jump": {"target": "deny"}} in expr and any(e.get("match", {}).get("left") == daddr for e in expr)

    deny_at = next(i for i, expr in enumerate(rules) if is_deny(expr))
    restricted_at = next(i for i, expr in enumerate(rules) if {"jump": {"target": "restricted"}} in expr)
    assert deny_at < restricted_at
    elements = next(e["match"]["right"]["set"] for e in rules[deny_at] if "match" in e)
    nets = []
    for el in elements:
        if isinstance(el, str):
            nets.append(ipaddress.IPv4Network(el))
        elif "prefix" in el:
            nets.append(ipaddress.IPv4Network(f"{el['prefix']['addr']}/{el['prefix']['len']}"))
        else:
            lo, hi = (ipaddress.IPv4Address(a) for a in el["range"])
            nets.extend(ipaddress.summarize_address_range(lo, hi))
    return nets


def denied(nets: list[ipaddress.IPv4Network], addr: str) -> bool:
    return any(ipaddress.IPv4Address(addr) in n for n in nets)


METADATA = ["169.254.169.254", "169.254.170.2", "168.63.129.16", "100.100.100.200", "192.0.0.192"]
PRIVATE = ["10.0.0.1", "172.16.0.1", "172.31.255.1", "192.168.0.1", "100.64.0.1", "169.254.1.1", "192.0.0.8"]
RESERVED = ["0.0.0.1", "224.0.0.251", "239.255.255.250", "240.0.0.1", "255.255.255.255"]


# ---------------------------------------------------------------- default policy


def test_default_sandbox_cannot_reach_a_private_host(setup, sandboxes):
    """Attack: a default sandbox connects to a server on an RFC 1918 address beside the host; defence: refused."""
    host = setup.host
    with socket.create_connection((host.ip, PORT), timeout=5) as s:  # control: the host reaches it
        assert s.recv(16) == b"PRIVATE\n"
    deadline = time.monotonic() + 10  # the listener's "conn" line reaches us through a pump thread
    while host.accepted_on(host.ip) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    before = host.accepted_on(host.ip)
    assert before >= 1, "the control connection was never seen by the listener"
    sb = create(setup.app, sandboxes)
    assert connect(sb, host.ip) == REFUSED
    assert connect(sb, host.host_ip) == REFUSED  # the host's own address on that network
    assert host.accepted_on(host.ip) == before
    # Control: the same listener, on its non-private address, is reachable through NAT.
    assert connect(sb, host.public_ip) == REACHED


def test_cidr_allowlist_cannot_widen_past_the_private_deny(setup, sandboxes):
    """Attack: list the private range in the sandbox's own allowlist; defence: an allowlist only narrows."""
    host = setup.host
    before = host.accepted_on(host.ip)
    sb = create(setup.app, sandboxes, outbound_cidr_allowlist=[host.cidr, host.public_ip])
    assert connect(sb, host.ip) == REFUSED
    assert connect(sb, host.public_ip) == REACHED  # the list is in force for what it may allow
    with pytest.warns(shoal.exception.DeprecationError, match="outbound_cidr_allowlist"):
        old = create(setup.app, sandboxes, cidr_allowlist=[host.ip])
    assert connect(old, host.ip) == REFUSED
    # Changed at run time, too.
    sb._experimental_set_outbound_network_policy(outbound_cidr_allowlist=[host.ip])
    assert connect(sb, host.ip) == REFUSED
    assert host.accepted_on(host.ip) == before


def test_metadata_private_and_reserved_ranges_are_in_the_deny_rule(setup):
    """Attack: reach cloud metadata (169.254.169.254, Azure, Alibaba, Oracle) or a private range; defence: the
    kernel's deny rule lists them all, before any allowlist (checked on the rules, no packet sent to them)."""
    nets = forward_deny_set(setup.daemon)
    for addr in METADATA + PRIVATE + RESERVED:
        assert denied(nets, addr), addr
    for addr in ("1.1.1.1", "198.18.0.1", setup.host.public_ip):
        assert not denied(nets, addr), addr
    netid = json.loads((setup.daemon.data_dir / "network.json").read_text())["netid"]
    pre = run("nft", "list", "chain", "inet", f"shoal_{netid}", "from_sandbox_pre")
    assert "meta nfproto ipv6 drop" in pre  # IPv6 (fd00:ec2::254, fc00::/7, fe80::/10): none at all


# ---------------------------------------------------------------- operator allowance


@pytest.mark.restart
def test_operator_allowance_opens_the_range_and_nothing_else(private_host):
    """Attack: the operator's allowance of one range opens metadata or other ranges; defence: only that range."""
    host = private_host
    with default_daemon() as d:  # its exit terminates the sandboxes made here, also on failure
        app = shoal.App.lookup("outbound-private-allowed", create_if_missing=True)

        def sandbox(**kwargs) -> shoal.Sandbox:
            return shoal.Sandbox.create(app=app, timeout=300, **kwargs)

        assert connect(sandbox(), host.ip) == REFUSED  # control: denied before the allowance
        d.restart_with("--allow-private-range", host.cidr, "--allow-private-range", "100.64.0.0/10")
        before = host.accepted_on(host.ip)
        assert connect(sandbox(), host.ip) == REACHED
        assert host.accepted_on(host.ip) == before + 1
        # A sandbox's own allowlist still narrows within what the operator allowed.
        assert connect(sandbox(outbound_cidr_allowlist=[host.cidr]), host.ip) == REACHED
        assert connect(sandbox(outbound_cidr_allowlist=[host.public_ip]), host.ip) == REFUSED
        assert connect(sandbox(), host.host_ip) == REFUSED  # the host's own addresses stay closed
        nets = forward_deny_set(d)
        assert not denied(nets, host.ip) and not denied(nets, "100.64.0.1")
        for addr in [*METADATA, "192.168.0.1", "192.168.255.1", "10.0.0.1", "172.16.0.1", "192.0.0.8", *RESERVED]:
            assert denied(nets, addr), addr
        # The same through the environment; and a restart without it closes the range again.
        d.env["SHOAL_ALLOW_PRIVATE_RANGES"] = host.cidr
        d.restart()
        assert connect(sandbox(), host.ip) == REACHED
        assert denied(forward_deny_set(d), "100.64.0.1")
        del d.env["SHOAL_ALLOW_PRIVATE_RANGES"]
        d.restart()
        assert connect(sandbox(), host.ip) == REFUSED
