"""Sandbox networking: a network namespace per sandbox, NAT, DNS, allowlists and tunnels.

``service.Network`` is the engine's single entry point; the other modules are
its parts (namespaces and links, the nftables ruleset, the DNS forwarder, the
local CA and the tunnel listeners).
"""
