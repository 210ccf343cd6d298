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
  cloud metadata (169.254.0.0/16, 100.100.100.200) and non-unicast
  destinations;
- IPv6 from sandboxes is dropped (they have IPv4 networking only);
- a sandbox with an outbound allowlist reaches only its listed CIDRs and the
  addresses its allowed names resolved to (pinned by the DNS forwarder, with a
  timeout); established connections outlive a pin's expiry.  When its policy
  is replaced at run time, the connections it no longer allows lose their
  conntrack entries (``Network.set_policy``); their next packets then meet
  the allowlist again, and a mid-stream TCP packet is refused with a reset so
  the process sees the cut at once (a new connection gets "unreachable").
New connections into a sandbox from outside the host are dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

ALWAYS_DENIED = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, with the cloud metadata address 169.254.169.254
    "100.100.100.200/32",  # another cloud's metadata address
    "224.0.0.0/4",
    "240.0.0.0/4",
)
"""Destinations no sandbox may reach, beside the host itself and the sandbox pool."""
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


def table_body(names: NetNames, extra_deny: Iterable[str]) -> str:
    """The table's static part: sets and chains, without elements."""
    p = names.link_prefix
    deny = ", ".join(
        [*ALWAYS_DENIED, str(names.pool), *(str(ipaddress.ip_network(c, strict=False)) for c in extra_deny)]
    )
    return f"""
    set restricted {{ type ipv4_addr; }}
    set allow_cidr {{ type ipv4_addr . ipv4_addr; flags interval; }}
    set allow_pin {{ type ipv4_addr . ipv4_addr; flags timeout; }}
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
        jump deny
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{p}*" jump from_sandbox_fwd
        oifname "{p}*" ct state established,related accept
        oifname "{p}*" drop
    }}
    chain from_sandbox_fwd {{
        ip daddr {{ {deny} }} jump deny
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
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {names.subnet} oifname != "{p}*" masquerade
    }}
"""


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
