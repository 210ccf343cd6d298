"""Network test helpers shared by the integration and security tests: a DNS server on loopback, and the
script a sandbox runs to try a TCP connection."""

from __future__ import annotations

import socket
import threading

import dns.exception
import dns.message
import dns.rcode
import dns.rrset


class DnsServer:
    """An authoritative-looking DNS server on loopback (UDP) for ``records`` and, for every name under a key of
    ``zones``, that zone's address (a wildcard record); anything else is NXDOMAIN."""

    def __init__(
        self, records: dict[str, str] | None = None, address: str = "127.0.0.1", port: int = 0,
        zones: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.records: dict[str, str] = dict(records or {})
        self.zones: dict[str, str] = dict(zones or {})
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(4096)
                q = dns.message.from_wire(data)
            except (TimeoutError, OSError, dns.exception.DNSException):
                continue
            name = q.question[0].name.to_text(omit_final_dot=True).lower()
            self.queries.append(name)
            r = dns.message.make_response(q)
            zone = next((ip for suffix, ip in self.zones.items() if name.endswith("." + suffix)), None)
            if name in self.records or zone is not None:
                if q.question[0].rdtype == 1:  # A
                    address = self.records.get(name) or zone
                    r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", address))
            else:
                r.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(r.to_wire(), addr)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


CONNECT = """
import json, socket, sys
s = socket.socket(); s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print(json.dumps({"connected": s.recv(16).decode()}))
except OSError as e:
    print(json.dumps({"errno": e.errno}))
"""
"""Run in a sandbox with ``HOST PORT``: prints ``{"connected": first bytes}`` or ``{"errno": n}``."""


def host_port_reach(sb, port: int) -> list[str]:  # type: ignore[no-untyped-def]
    """From inside sandbox ``sb``: try a TCP connection to ``port`` on its own loopback and on its default
    gateway (the host's side of its network); a line ``reached HOST`` or ``refused HOST`` for each."""
    probe = (
        "import socket, struct\n"
        "gw = [l.split() for l in open('/proc/net/route').read().splitlines()[1:] if l.split()[1] == '00000000']\n"
        "hosts = ['127.0.0.1'] + [socket.inet_ntoa(struct.pack('<I', int(g[2], 16))) for g in gw]\n"
        "for host in hosts:\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=2).close()\n"
        "        print('reached', host)\n"
        "    except OSError:\n"
        "        print('refused', host)\n"
    )
    p = sb.exec("python3", "-c", probe)
    lines: list[str] = p.stdout.read().splitlines()
    assert p.wait() == 0, lines
    return lines
