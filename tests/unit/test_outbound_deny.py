"""The outbound default-deny list: private and metadata ranges, the operator's allowances, the generated rules.

No packet is sent: these check the ruleset's output (decision 0016).
"""

from __future__ import annotations

import ipaddress
import re

import click
import pytest

from shoal.cli.serve import _config
from shoal.network import ruleset
from shoal.network.config import NetworkConfig

POOL = ipaddress.IPv4Network("10.200.0.0/14")
NAMES = ruleset.NetNames("ab12", ipaddress.IPv4Network("10.200.16.0/20"), POOL)

METADATA = ["168.63.129.16", "100.100.100.200", "192.0.0.192"]
"""Metadata addresses outside link-local (which is always denied)."""
LINK_LOCAL = ["169.254.169.254", "169.254.170.2", "169.254.170.23", "169.254.169.253", "169.254.0.1"]
PRIVATE_SAMPLES = [
    "10.0.0.1",
    "10.255.255.254",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.0.1",
    "192.168.255.254",
    "100.64.0.1",
    "100.127.255.254",
    "192.0.0.1",
    "192.0.0.170",
]
ALWAYS_SAMPLES = [*LINK_LOCAL, "0.0.0.1", "127.0.0.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255"]
OPEN_SAMPLES = ["1.1.1.1", "8.8.8.8", "172.32.0.1", "100.128.0.1", "192.169.0.1", "198.18.0.1", "203.0.113.7"]


def covered(cidrs: list[str], addr: str) -> bool:
    a = ipaddress.IPv4Address(addr)
    return any(a in ipaddress.IPv4Network(c) for c in cidrs)


def forward_deny_set(body: str) -> list[str]:
    """The destinations of the forward chain's deny rule (``ip daddr { ... } jump deny``), which only the exact
    pairs of a sandbox and its sidecars (``@peers``) come before."""
    m = re.search(
        r"chain from_sandbox_fwd \{\s*ip saddr \. ip daddr @peers accept\s*ip daddr \{ ([^}]*) \} jump deny", body
    )
    assert m, body
    return [c.strip() for c in m.group(1).split(",")]


def test_default_deny_covers_private_and_metadata_ranges_only():
    """Attack: reach the host's neighbours (RFC 1918, CGNAT, link-local) or cloud metadata; defence: all denied."""
    deny = ruleset.default_deny()
    for addr in [*PRIVATE_SAMPLES, *METADATA]:
        assert covered(deny, addr), addr
    for addr in OPEN_SAMPLES:
        assert not covered(deny, addr), addr


def test_table_denies_private_metadata_reserved_and_pool_before_any_allowlist():
    """Attack: list a private range in an outbound allowlist; defence: the deny rule comes before the allowlist."""
    body = ruleset.table_body(NAMES, NetworkConfig(allow_private=[], extra_deny=[]).deny)
    deny = forward_deny_set(body)
    for addr in [*PRIVATE_SAMPLES, *METADATA, *ALWAYS_SAMPLES, "10.200.16.7", "10.203.255.1"]:
        assert covered(deny, addr), addr
    for addr in OPEN_SAMPLES:
        assert not covered(deny, addr), addr
    fwd = body[body.index("chain from_sandbox_fwd") :]
    assert fwd.index("jump deny") < fwd.index("ct state established") < fwd.index("jump restricted")
    # Sandboxes have no IPv6: every IPv6 packet from them (fd00:ec2::254, fc00::/7, fe80::/10...) is dropped.
    assert re.search(r"chain from_sandbox_pre \{\s*meta nfproto ipv6 drop", body)
    # The DNS forwarder on the gateway stays reachable, and NAT to the internet stays.
    assert f"ip daddr {NAMES.gateway} udp dport 53 accept" in body
    assert f"ip saddr {NAMES.subnet} oifname != " in body and "masquerade" in body


def test_operator_allowance_removes_a_range_but_not_the_metadata_inside_it():
    """Attack: an operator allows 100.64/10 or 192.0.0/24, opening metadata; defence: metadata needs its own entry."""
    deny = ruleset.default_deny(["100.64.0.0/10", "192.0.0.0/24", "192.168.7.0/24"])
    for addr in ("100.64.0.1", "100.100.100.100", "192.0.0.1", "192.168.7.9"):
        assert not covered(deny, addr), addr
    for addr in [*METADATA, "192.168.6.1", "192.168.8.1", "10.0.0.1", "172.16.0.1"]:
        assert covered(deny, addr), addr
    # Everything allowed at once still keeps the metadata addresses.
    assert ruleset.default_deny(["0.0.0.0/0"]) == sorted(f"{a}/32" for a in METADATA)
    # Listed by itself, a metadata address is allowed.
    deny = ruleset.default_deny(["100.100.100.200", "168.63.129.16/32"])
    assert not covered(deny, "100.100.100.200") and not covered(deny, "168.63.129.16")
    assert covered(deny, "100.100.100.201") and covered(deny, "192.0.0.192")


def test_operator_deny_wins_over_allow_and_always_denied_stay():
    """Attack: an allowance reopens loopback, multicast or the pool; defence: those are outside what it can remove."""
    deny = ruleset.default_deny(["10.0.0.0/8"], ["10.1.0.0/16"])
    assert covered(deny, "10.1.2.3") and not covered(deny, "10.2.0.1")
    table = forward_deny_set(ruleset.table_body(NAMES, ruleset.default_deny(["0.0.0.0/0"])))
    for addr in [*ALWAYS_SAMPLES, "10.200.16.7", *METADATA]:
        assert covered(table, addr), addr
    assert not covered(table, "10.0.0.1")


def test_allowance_changes_the_table_generation():
    """Attack: a restarted daemon keeps a stale table; defence: a changed allowance changes the table's hash."""
    a = ruleset.table_body(NAMES, ruleset.default_deny())
    b = ruleset.table_body(NAMES, ruleset.default_deny(["192.168.0.0/16"]))
    assert ruleset.generation(a) != ruleset.generation(b)


def test_environment_and_cli_set_the_allowance(monkeypatch):
    """Attack: a malformed or IPv6 allowance is silently ignored; defence: it is refused at start."""
    monkeypatch.setenv("SHOAL_ALLOW_PRIVATE_RANGES", " 10.1.0.0/16, 192.168.5.7 ")
    monkeypatch.delenv("SHOAL_NETWORK_DENY", raising=False)
    cfg = NetworkConfig()
    assert cfg.allow_private == ["10.1.0.0/16", "192.168.5.7"]
    assert not covered(cfg.deny, "10.1.9.9") and not covered(cfg.deny, "192.168.5.7")
    assert covered(cfg.deny, "192.168.5.8")
    # The command line replaces the environment's list.
    assert _config(None, None, None, None, None, allow_private_ranges=("172.20.0.0/16",)).network.allow_private == [
        "172.20.0.0/16"
    ]
    assert _config(None, None, None, None, None).network.allow_private == ["10.1.0.0/16", "192.168.5.7"]
    for bad in ("fc00::/7", "10.0.0.300/8", "private"):
        with pytest.raises(ValueError, match="not an IPv4 CIDR"):
            NetworkConfig(allow_private=[bad])
        with pytest.raises(click.BadParameter, match="not an IPv4 CIDR"):
            _config(None, None, None, None, None, allow_private_ranges=(bad,))
    # Link-local (cloud metadata and credential endpoints), loopback, multicast: never allowed.
    for never in ("169.254.169.254", "169.254.0.0/16", "169.254.170.0/24", "127.0.0.1", "224.0.0.0/4"):
        with pytest.raises(ValueError, match="may never reach"):
            NetworkConfig(allow_private=[never])
    monkeypatch.setenv("SHOAL_ALLOW_PRIVATE_RANGES", "fe80::/10")
    with pytest.raises(ValueError, match="not an IPv4 CIDR"):
        NetworkConfig()
