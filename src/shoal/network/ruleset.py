"""The daemon's nftables table, and the per-sandbox element changes, as nft commands.

Trusts: its inputs are ``ipaddress`` objects and names this package made
(``NetNames``); nothing here interpolates caller text.

Defends, for every sandbox whatever its options (the table's chains only ever
match packets arriving from or leaving through this daemon's sandbox links,
``sv<netid>*``):
- source spoofing: a packet from a sandbox link must carry that sandbox's
  address (strict reverse-path check against the sandbox's /32 route);
- the host: a sandbox may reach nothing on the host (any host address,
  loopback services, the daemon's API port) but the daemon's DNS forwarder on
  its gateway address, and replies to connections the host opened (tunnels);
- other sandboxes, of this and every other shoal daemon (the whole pool),
  and non-unicast or reserved destinations (``ALWAYS_DENIED``) — except that a
  sandbox and its sidecars reach each other (``peers``: pairs of addresses, each
  direction added by the daemon when it makes the sidecar and removed when either
  ends; whatever their allowlists say, as a sidecar is part of its sandbox);
- link-local addresses, among them the cloud metadata address
  169.254.169.254, always; and by default other private networks the host
  can reach: ``PRIVATE_RANGES`` (RFC 1918, carrier-grade NAT, 192.0.0.0/24)
  less the ranges the operator allowed, and the other clouds' metadata
  addresses (``METADATA_ADDRESSES``) unless the operator allowed each by
  itself (``default_deny``; docs/decisions/0016-outbound-private-ranges-denied.md);
- IPv6 from sandboxes is dropped (they have IPv4 networking only), so IPv6
  metadata (fd00:ec2::254), unique-local and link-local addresses too;
- a sandbox with an outbound allowlist reaches only its listed CIDRs and the
  addresses its allowed names resolved to (pinned by the DNS forwarder, with a
  timeout), less everything denied above: the deny rule comes first, so an
  allowlist narrows and never widens (nor does a pin, whatever a name resolves
  to); established connections outlive a pin's expiry.  When its policy
  is replaced at run time, the connections it no longer allows lose their
  conntrack entries (``Network.set_policy``); their next packets then meet
  the allowlist again, and a mid-stream TCP packet is refused with a reset so
  the process sees the cut at once (a new connection gets "unreachable").
A sandbox with an outbound policy (``intercept``) has its new TCP connections to port 443 of destinations it
may reach (the same checks, before NAT) turned to the interceptor on its gateway (``egress.PORT``), the one
further service on the host it may reach.
New connections into a sandbox from outside the host are dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

EGRESS_PORT = 15443
"""The outbound-policy interceptor's port on the gateway address (``egress``; that address is the daemon's own)."""
ALWAYS_DENIED = (
    "0.0.0.0/8",  # "this network"
    "127.0.0.0/8",  # loopback (the sandbox's own; the host's is never routed to)
    "169.254.0.0/16",  # link-local: cloud metadata 169.254.169.254, ECS/EKS credentials 169.254.170.2/.23, ...
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the limited broadcast address 255.255.255.255
)
"""Destinations no sandbox may reach, whatever the operator allows, beside the host itself and the sandbox pool."""
PRIVATE_RANGES = (
    "10.0.0.0/8",  # RFC 1918
    "172.16.0.0/12",  # RFC 1918
    "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # RFC 6598 carrier-grade NAT (also overlay VPNs)
    "192.0.0.0/24",  # IETF protocol assignments
)
"""Denied unless the operator allows a range (``--allow-private-range``): networks beside the host, not the internet."""
METADATA_ADDRESSES = (
    "168.63.129.16",  # Azure's wire server (a public address)
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
)
"""Cloud metadata services outside link-local: denied unless the operator allows each address by itself (a /32),
even inside an allowed range.  The link-local ones (169.254.169.254 of AWS, GCP, Azure, ...) are always denied;
AWS's IPv6 one (fd00:ec2::254) is unreachable with all IPv6."""


def _subtract(
    nets: list[ipaddress.IPv4Network], remove: Iterable[ipaddress.IPv4Network]
) -> list[ipaddress.IPv4Network]:
    for r in remove:
        out: list[ipaddress.IPv4Network] = []
        for n in nets:
            if n.subnet_of(r):
                continue
            out.extend(n.address_exclude(r) if r.subnet_of(n) else [n])
        nets = out
    return nets


def default_deny(allowed: Iterable[str] = (), extra: Iterable[str] = ()) -> list[str]:
    """What every sandbox is denied beside ``ALWAYS_DENIED``, the host and the pool, as collapsed CIDRs.

    ``PRIVATE_RANGES`` less the operator's ``allowed`` CIDRs; each of ``METADATA_ADDRESSES`` unless ``allowed``
    holds exactly that address; and the operator's ``extra`` CIDRs (``SHOAL_NETWORK_DENY``), which win over
    ``allowed``.  Allowing anything outside these ranges changes nothing.
    """
    allow = [ipaddress.IPv4Network(c, strict=False) for c in allowed]
    deny = _subtract([ipaddress.IPv4Network(c) for c in PRIVATE_RANGES], allow)
    deny += [ipaddress.IPv4Network(a) for a in METADATA_ADDRESSES if ipaddress.IPv4Network(a) not in allow]
    deny += [ipaddress.IPv4Network(c, strict=False) for c in extra]
    return [str(n) for n in ipaddress.collapse_addresses(deny)]


PIN_SECONDS = 600
"""How long an address an allowed name resolved to stays reachable (at least; longer TTLs are kept)."""


@dataclass(frozen=True)
class NetNames:
    """The host-wide names and addresses of one daemon's sandbox network."""

    netid: str
    subnet: ipaddress.IPv4Network
    pool: ipaddress.IPv4Network

    @property
    def table(self) -> str:
        """The nftables table (family inet)."""
        return f"shoal_{self.netid}"

    @property
    def link_prefix(self) -> str:
        """Host-side names of sandbox links start with this."""
        return f"sv{self.netid}"

    @property
    def anchor(self) -> str:
        """The portless bridge holding the gateway address (it also reserves the subnet host-wide)."""
        return f"shoal-{self.netid}"

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The sandboxes' next hop and DNS server: the subnet's first address."""
        return self.subnet.network_address + 1

    def link_index(self, ip: ipaddress.IPv4Address) -> int:
        """The host-side ifindex for the sandbox with address ``ip``: 2^24 + its offset in the pool (unique
        host-wide among shoal daemons sharing the pool, and far above the indexes the kernel hands out)."""
        return (1 << 24) + int(ip) - int(self.pool.network_address)

    def link_name(self, ip: ipaddress.IPv4Address) -> str:
        """The host-side link of the sandbox with address ``ip`` (unique while that address is in use)."""
        return f"{self.link_prefix}{int(ip) - int(self.subnet.network_address):x}"


def table_body(names: NetNames, deny: Iterable[str]) -> str:
    """The table's static part: sets and chains, without elements.

    ``deny``: the destinations refused beside ``ALWAYS_DENIED`` and the pool, i.e. ``default_deny(...)`` (what
    ``NetworkConfig.deny`` gives); they are refused before any allowlist is looked at.
    """
    p = names.link_prefix
    nets = [ipaddress.IPv4Network(c, strict=False) for c in (*ALWAYS_DENIED, *deny)]
    deny_set = ", ".join(str(n) for n in ipaddress.collapse_addresses([*nets, names.pool]))
    return f"""
    set restricted {{ type ipv4_addr; }}
    set allow_cidr {{ type ipv4_addr . ipv4_addr; flags interval; }}
    set allow_pin {{ type ipv4_addr . ipv4_addr; flags timeout; }}
    set intercept {{ type ipv4_addr; }}
    set peers {{ type ipv4_addr . ipv4_addr; }}
    chain pre {{
        type filter hook prerouting priority -150; policy accept;
        iifname "{p}*" jump from_sandbox_pre
    }}
    chain from_sandbox_pre {{
        meta nfproto ipv6 drop
        ip saddr != {names.subnet} drop
        fib saddr . iif oif missing drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{p}*" jump from_sandbox_in
    }}
    chain from_sandbox_in {{
        ct state established,related accept
        ip daddr {names.gateway} udp dport 53 accept
        ip daddr {names.gateway} tcp dport 53 accept
        ip saddr @intercept ip daddr {names.gateway} tcp dport {EGRESS_PORT} accept
        jump deny
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{p}*" jump from_sandbox_fwd
        oifname "{p}*" ct state established,related accept
        oifname "{p}*" drop
    }}
    chain from_sandbox_fwd {{
        ip saddr . ip daddr @peers accept
        ip daddr {{ {deny_set} }} jump deny
        fib daddr type {{ local, broadcast, multicast }} jump deny
        ct state established,related accept
        ip saddr @restricted jump restricted
        accept
    }}
    chain restricted {{
        ip saddr . ip daddr @allow_cidr accept
        ip saddr . ip daddr @allow_pin accept
        tcp flags & (syn | ack) != syn reject with tcp reset
        jump deny
    }}
    chain deny {{
        reject with icmpx admin-prohibited
    }}
    chain egress {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{p}*" ip saddr @intercept tcp dport 443 jump egress_check
    }}
    chain egress_check {{
        ip daddr {{ {deny_set} }} return
        fib daddr type != unicast return
        ip saddr @restricted ip saddr . ip daddr != @allow_cidr return
        tcp dport 443 dnat ip to {names.gateway}:{EGRESS_PORT}
    }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {names.subnet} oifname != "{p}*" masquerade
    }}
"""


def add_intercept(names: NetNames, ip: ipaddress.IPv4Address) -> str:
    """Commands that turn a sandbox's outbound HTTPS to the outbound-policy interceptor (``egress``)."""
    return f"add element inet {names.table} intercept {{ {ip} }}\n"


def remove_intercept(names: NetNames, ip: ipaddress.IPv4Address) -> str:
    """Commands that undo ``add_intercept``."""
    return f"delete element inet {names.table} intercept {{ {ip} }}\n"


def generation(body: str) -> str:
    """A short hash of the static part, kept as the table's comment to tell whether it is current."""
    return "shoal " + hashlib.sha256(body.encode()).hexdigest()[:16]


def replace_table(names: NetNames, body: str) -> str:
    """Commands that (re)create the table atomically, empty of elements."""
    t = names.table
    return (
        f'table inet {t} {{}}\ndelete table inet {t}\ntable inet {t} {{\n    comment "{generation(body)}"\n{body}}}\n'
    )


def delete_table(names: NetNames) -> str:
    """Commands that remove the table."""
    return f"table inet {names.table} {{}}\ndelete table inet {names.table}\n"


def _pairs(ip: ipaddress.IPv4Address, nets: Iterable[str]) -> str:
    return ", ".join(f"{ip} . {ipaddress.IPv4Network(n)}" for n in nets)


def add_restricted(names: NetNames, ip: ipaddress.IPv4Address, cidrs: list[str]) -> str:
    """Commands that put a sandbox under its allowlist."""
    cmds = f"add element inet {names.table} restricted {{ {ip} }}\n"
    if cidrs:
        cmds += f"add element inet {names.table} allow_cidr {{ {_pairs(ip, cidrs)} }}\n"
    return cmds


def remove_restricted(names: NetNames, ip: ipaddress.IPv4Address, cidrs: list[str]) -> str:
    """Commands that undo ``add_restricted``."""
    cmds = f"delete element inet {names.table} restricted {{ {ip} }}\n"
    if cidrs:
        cmds += f"delete element inet {names.table} allow_cidr {{ {_pairs(ip, cidrs)} }}\n"
    return cmds


def add_pins(names: NetNames, ip: ipaddress.IPv4Address, pins: dict[ipaddress.IPv4Address, int]) -> str:
    """Commands that allow ``ip`` to reach each pinned address for the given seconds."""
    items = ", ".join(f"{ip} . {addr} timeout {secs}s" for addr, secs in pins.items())
    return f"add element inet {names.table} allow_pin {{ {items} }}\n"


def delete_pins(names: NetNames, ip: ipaddress.IPv4Address, addrs: Iterable[ipaddress.IPv4Address]) -> str:
    """Commands that remove pins."""
    items = ", ".join(f"{ip} . {a}" for a in addrs)
    return f"delete element inet {names.table} allow_pin {{ {items} }}\n" if items else ""


def add_peers(names: NetNames, a: ipaddress.IPv4Address, b: ipaddress.IPv4Address) -> str:
    """Commands that let two sandboxes (a sandbox and its sidecar) reach each other."""
    return f"add element inet {names.table} peers {{ {a} . {b}, {b} . {a} }}\n"


def remove_peers(names: NetNames, a: ipaddress.IPv4Address, b: ipaddress.IPv4Address) -> str:
    """Commands that undo ``add_peers``."""
    return f"delete element inet {names.table} peers {{ {a} . {b}, {b} . {a} }}\n"
