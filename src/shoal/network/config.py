"""Networking settings of the daemon, with environment overrides.

Environment variables (all optional):
    SHOAL_NETWORK           0 turns networking off: every sandbox gets loopback only
    SHOAL_NETWORK_POOL      IPv4 range from which each daemon takes its sandbox subnet (default 10.200.0.0/14)
    SHOAL_NETWORK_PREFIX    size of one daemon's subnet, as a prefix length (default 20: 4094 sandboxes)
    SHOAL_NETWORK_DENY      extra CIDRs no sandbox may reach (comma-separated), beside the built-in list
    SHOAL_ALLOW_PRIVATE_RANGES
                            IPv4 CIDRs (comma-separated) taken out of the private ranges sandboxes are denied by
                            default (``shoal serve --allow-private-range``); a cloud metadata address stays
                            denied unless listed by itself, link-local ones always (``ruleset.default_deny``)
    SHOAL_DNS_UPSTREAM      resolvers the sandboxes' DNS is forwarded to, ``ip`` or ``ip:port``, comma-separated
                            (default: the nameservers of the host's /etc/resolv.conf)
    SHOAL_TUNNEL_BIND       address the tunnel listeners bind (default 127.0.0.1)
    SHOAL_TUNNEL_HOST       host name tunnels are advertised under and certified for (default: the bind address,
                            or this machine's name when binding a wildcard address)
    SHOAL_TUNNEL_DOMAIN     a DNS domain whose names all point at this machine: each TLS tunnel is then
                            ``<unique>.DOMAIN`` on one shared port, routed by name (``shoal serve --tunnel-domain``)
    SHOAL_TUNNEL_PORT       that shared port (default 443; 0: any free port)
    SHOAL_TUNNEL_CERT, SHOAL_TUNNEL_KEY
                            a certificate (PEM chain) and key for ``*.DOMAIN`` to serve instead of one from the
                            local CA, e.g. a publicly trusted wildcard certificate
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from shoal.network import ruleset

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def host_nameservers(path: Path = HOST_RESOLV_CONF) -> list[str]:
    """The ``nameserver`` lines of the host's resolv.conf (IPv4 and IPv6), in order."""
    servers = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            servers.append(parts[1])
    return servers


def parse_upstream(item: str) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[v6]:port`` → (ip, port)."""
    item = item.strip()
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif item.count(":") == 1:
        host, _, p = item.partition(":")
        port = int(p)
    else:
        host, port = item, 53
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"bad DNS upstream port in {item!r}")
    return host, port


def check_domain(domain: str) -> str:
    """``domain`` lower-cased without a trailing dot, if it can hold tunnel names; ValueError if not."""
    name = domain.strip().lower().rstrip(".")
    labels = name.split(".")
    ok = 0 < len(name) <= 240 and all(_LABEL.fullmatch(label) for label in labels)
    if not ok:
        raise ValueError(
            f"tunnel domain {domain!r} is not a DNS name (letters, digits and '-' in dot-separated labels)"
        )
    return name


def _default_tunnel_host(bind: str) -> str:
    if bind in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return bind


@dataclass
class NetworkConfig:
    """How sandboxes are networked."""

    enabled: bool = field(default_factory=lambda: os.environ.get("SHOAL_NETWORK", "1") not in ("0", "false", "no"))
    pool: str = field(default_factory=lambda: os.environ.get("SHOAL_NETWORK_POOL") or "10.200.0.0/14")
    prefix_len: int = field(default_factory=lambda: int(os.environ.get("SHOAL_NETWORK_PREFIX") or 20))
    extra_deny: list[str] = field(default_factory=lambda: _split(os.environ.get("SHOAL_NETWORK_DENY", "")))
    """CIDRs denied beside the built-in ones; they win over ``allow_private``."""
    allow_private: list[str] = field(default_factory=lambda: _split(os.environ.get("SHOAL_ALLOW_PRIVATE_RANGES", "")))
    """CIDRs taken out of the default-deny private ranges (a metadata address only when listed by itself)."""
    dns_upstream: list[str] = field(
        default_factory=lambda: _split(os.environ.get("SHOAL_DNS_UPSTREAM", "")) or host_nameservers()
    )
    tunnel_bind: str = field(default_factory=lambda: os.environ.get("SHOAL_TUNNEL_BIND") or "127.0.0.1")
    tunnel_host: str = ""
    tunnel_domain: str = field(default_factory=lambda: os.environ.get("SHOAL_TUNNEL_DOMAIN", ""))
    """Each TLS tunnel is ``<unique>.<tunnel_domain>:<tunnel_port>`` when set; else it has its own port."""
    tunnel_port: int = field(default_factory=lambda: int(os.environ.get("SHOAL_TUNNEL_PORT") or 443))
    tunnel_cert: str = field(default_factory=lambda: os.environ.get("SHOAL_TUNNEL_CERT", ""))
    tunnel_key: str = field(default_factory=lambda: os.environ.get("SHOAL_TUNNEL_KEY", ""))
    egress_ca_file: str = field(default_factory=lambda: os.environ.get("SHOAL_EGRESS_CA_FILE", ""))
    """CA certificates (PEM) trusted for servers that outbound policies add headers for, beside the host's store."""

    def __post_init__(self) -> None:
        if not self.tunnel_host:
            self.tunnel_host = os.environ.get("SHOAL_TUNNEL_HOST") or _default_tunnel_host(self.tunnel_bind)
        self.tunnel_domain = check_domain(self.tunnel_domain) if self.tunnel_domain else ""
        if not 0 <= self.tunnel_port < 65536:
            raise ValueError(f"tunnel port {self.tunnel_port} is not a TCP port")
        if bool(self.tunnel_cert) != bool(self.tunnel_key):
            raise ValueError("a tunnel certificate needs its key, and a key its certificate (give both)")
        if self.egress_ca_file and not os.path.isfile(self.egress_ca_file):
            raise ValueError(f"the egress CA file {self.egress_ca_file} does not exist")
        if self.tunnel_cert and not self.tunnel_domain:
            raise ValueError("a tunnel certificate is served for --tunnel-domain: give the domain too")
        pool = ipaddress.IPv4Network(self.pool)
        if not pool.prefixlen <= self.prefix_len <= 28:
            raise ValueError(f"network prefix /{self.prefix_len} must lie between the pool's /{pool.prefixlen} and /28")
        for what, cidrs in (("denied", self.extra_deny), ("allowed private", self.allow_private)):
            for cidr in cidrs:
                try:
                    net = ipaddress.IPv4Network(cidr, strict=False)
                except ValueError:
                    raise ValueError(
                        f"{what} range {cidr!r} is not an IPv4 CIDR (sandboxes have IPv4 networking only)"
                    ) from None
                always = [a for a in ruleset.ALWAYS_DENIED if net.subnet_of(ipaddress.IPv4Network(a))]
                if what != "denied" and always:
                    raise ValueError(f"{cidr!r} lies in {always[0]}, which sandboxes may never reach")
        for item in self.dns_upstream:
            parse_upstream(item)

    @property
    def deny(self) -> list[str]:
        """Every destination the packet filter refuses beside the always-denied ones, the host and the pool:
        the private and metadata ranges less what the operator allowed, and the extra denied ranges."""
        return ruleset.default_deny(self.allow_private, self.extra_deny)
