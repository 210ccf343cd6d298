"""Pure logic of sandbox networking: allowlist validation and matching, names, the upstream syntax."""

from __future__ import annotations

import ipaddress

import pytest

from shoal.network import ruleset
from shoal.network.config import parse_upstream
from shoal.wire import policy


def test_cidrs_are_normalised_and_checked():
    assert policy.check_cidrs(["10.1.2.3/8", "192.0.2.7", "10.0.0.0/8"], "x") == ["10.0.0.0/8", "192.0.2.7/32"]
    for bad in ("10.0.0.300/8", "example.com", "", "10.0.0.0/33"):
        with pytest.raises(ValueError, match="not a valid CIDR"):
            policy.check_cidrs([bad], "x")
    with pytest.raises(ValueError, match="IPv6"):
        policy.check_cidrs(["::1/128"], "x")


@pytest.mark.parametrize(
    ("name", "patterns", "allowed"),
    [
        ("example.com", ["example.com"], True),
        ("EXAMPLE.com.", ["example.com"], True),
        ("a.example.com", ["example.com"], False),
        ("a.example.com", ["*.example.com"], True),
        ("a.b.example.com", ["*.example.com"], True),
        ("example.com", ["*.example.com"], False),
        ("badexample.com", ["*.example.com"], False),
        ("anything.test", ["*"], True),
        ("x.test", [], False),
    ],
)
def test_domain_matching(name, patterns, allowed):
    assert policy.domain_allowed(name, policy.check_domains(patterns)) is allowed


def test_domain_patterns_are_checked():
    assert policy.check_domains(["Example.COM.", "*.x.org", "*"]) == ["example.com", "*.x.org", "*"]
    for bad in ("a.*.com", "exa mple.com", "-a.com", "a..com", "ünï.com", "x" * 64 + ".com"):
        with pytest.raises(ValueError, match="not a domain name"):
            policy.check_domains([bad])


def test_ports_are_checked():
    policy.check_ports([80], [443], [22])
    with pytest.raises(ValueError, match="more than once"):
        policy.check_ports([80], [], [80])
    for bad in (0, 65536, True, "80"):
        with pytest.raises(ValueError, match="port number"):
            policy.check_ports([bad], [], [])  # type: ignore[list-item]


def test_names_and_link_indexes_are_unique_per_address():
    pool = ipaddress.IPv4Network("10.200.0.0/14")
    a = ruleset.NetNames("ab12", ipaddress.IPv4Network("10.200.16.0/20"), pool)
    b = ruleset.NetNames("cd34", ipaddress.IPv4Network("10.200.32.0/20"), pool)
    ip = ipaddress.IPv4Address("10.200.16.5")
    assert (a.table, a.anchor, a.gateway, a.link_name(ip)) == ("shoal_ab12", "shoal-ab12", a.subnet[1], "svab125")
    assert len(a.link_name(a.subnet[-2])) <= 15  # IFNAMSIZ
    indexes = {a.link_index(a.subnet[n]) for n in range(2, 4095)} | {b.link_index(b.subnet[n]) for n in range(2, 4095)}
    assert len(indexes) == 2 * 4093
    body = ruleset.table_body(a, ["192.0.2.0/24"])
    assert "10.200.0.0/14" in body and "169.254.0.0/16" in body and "192.0.2.0/24" in body
    assert ruleset.generation(body) != ruleset.generation(ruleset.table_body(a, []))


def test_dns_upstream_syntax():
    assert parse_upstream("10.0.0.2") == ("10.0.0.2", 53)
    assert parse_upstream("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_upstream("[::1]:53") == ("::1", 53)
    with pytest.raises(ValueError):
        parse_upstream("resolver.example:53")
