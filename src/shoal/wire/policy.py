"""What a create request may ask of the network, validated: allowlists and tunnel ports.

Trust: everything here comes from the caller.  CIDRs are parsed into
networks and domain patterns into lower-case labels of letters, digits and
hyphens before anything else sees them, so the nftables commands built from
them (``ruleset``) can never carry text the caller chose.
"""

from __future__ import annotations

import ipaddress
import re

MAX_CIDRS = 1000
MAX_DOMAINS = 1000
MAX_PORTS = 64
_LABEL = re.compile(r"\A(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


def check_cidrs(values: list[str], what: str) -> list[str]:
    """IPv4 CIDRs (a bare address means /32), normalised; raises ValueError naming the bad entry."""
    if len(values) > MAX_CIDRS:
        raise ValueError(f"{what} has {len(values)} entries; the limit is {MAX_CIDRS}")
    out: list[str] = []
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"{what} entries must be strings such as '10.0.0.0/8', got {v!r}")
        try:
            net = ipaddress.ip_network(v.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{what}: {v!r} is not a valid CIDR (e.g. '203.0.113.0/24' or '203.0.113.7')") from None
        if net.version != 4:
            raise ValueError(f"{what}: {v!r} is IPv6; shoal sandboxes have IPv4 networking only")
        if str(net) not in out:
            out.append(str(net))
    return out


def normalize_domain(name: str) -> str:
    """A domain name as compared here: lower case, no trailing dot."""
    return name.strip().lower().rstrip(".")


def check_domains(values: list[str], what: str = "outbound_domain_allowlist") -> list[str]:
    """Domain names, ``*.suffix`` wildcards or ``*``; normalised; raises ValueError naming the bad entry."""
    if len(values) > MAX_DOMAINS:
        raise ValueError(f"{what} has {len(values)} entries; the limit is {MAX_DOMAINS}")
    out: list[str] = []
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"{what} entries must be strings such as 'example.com' or '*.example.com', got {v!r}")
        d = normalize_domain(v)
        if d != "*":
            name = d[2:] if d.startswith("*.") else d
            labels = name.split(".")
            if len(name) > 253 or len(labels) < 1 or not all(_LABEL.match(label) for label in labels):
                raise ValueError(
                    f"{what}: {v!r} is not a domain name; use names like 'example.com', wildcards like"
                    " '*.example.com' (subdomains), or '*' (any name); write non-ASCII names in punycode"
                )
        if d not in out:
            out.append(d)
    return out


def domain_allowed(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` matches a pattern: exact, ``*.suffix`` (any depth of subdomain, not the suffix) or ``*``."""
    name = normalize_domain(name)
    for p in patterns:
        if p == "*" or p == name or (p.startswith("*.") and name.endswith(p[1:]) and len(name) > len(p) - 1):
            return True
    return False


def check_ports(encrypted: list[int], h2: list[int], unencrypted: list[int]) -> None:
    """Ports are 1-65535 and each is listed once across the three kinds."""
    seen: set[int] = set()
    for kind, ports in (("encrypted_ports", encrypted), ("h2_ports", h2), ("unencrypted_ports", unencrypted)):
        for p in ports:
            if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
                raise ValueError(f"{kind}: {p!r} is not a port number (1-65535)")
            if p in seen:
                raise ValueError(
                    f"port {p} is listed more than once among encrypted_ports, h2_ports and unencrypted_ports"
                )
            seen.add(p)
    if len(seen) > MAX_PORTS:
        raise ValueError(f"{len(seen)} tunnel ports asked for; the limit is {MAX_PORTS}")
