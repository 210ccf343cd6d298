"""The DNS forwarder's own answers for a sandbox's sidecars (and a sidecar's ``main``): pure logic over dnspython."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from shoal.network.dns import Client, DnsForwarder


def _ask(client: Client, name: str, rdtype: str = "A") -> dns.message.Message | None:
    raw = DnsForwarder._local(client, dns.message.make_query(name, rdtype).to_wire())
    return None if raw is None else dns.message.from_wire(raw)


def test_a_sidecar_name_is_answered_with_its_address():
    client = Client(domains=None, names={"web": "10.200.0.7"})
    for asked in ("web", "web.", "WEB"):
        answer = _ask(client, asked)
        assert answer is not None and answer.rcode() == dns.rcode.NOERROR and answer.flags & dns.flags.AA
        assert [rd.address for rrset in answer.answer for rd in rrset] == ["10.200.0.7"]


def test_other_record_types_of_a_sidecar_name_have_no_records():
    answer = _ask(Client(domains=None, names={"web": "10.200.0.7"}), "web", "AAAA")
    assert answer is not None and answer.rcode() == dns.rcode.NOERROR and answer.answer == []


def test_other_names_go_on_to_the_allowlist_and_upstream():
    client = Client(domains=["example.com"], names={"web": "10.200.0.7"})
    assert _ask(client, "example.com") is None
    assert _ask(client, "web.example.com") is None
    assert DnsForwarder._local(client, b"\x00" * 12) is None  # malformed: not ours to answer
