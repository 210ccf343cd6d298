"""Network policy through the gateway: sandboxes the official ``modal`` client makes and changes, checked from
shoal's side against two test hosts (``test_network.py``'s ``net``: a daemon of its own, hosts in network
namespaces of their own)."""

from __future__ import annotations

import pytest

import shoal
from tests.integration.test_gateway import run_client
from tests.integration.test_network import connect, fetch, net  # noqa: F401 - the fixture

pytest.importorskip("modal_proto", reason="the official modal client is a test dependency: make setup")


def test_allowlists_block_network_and_policy_changes(net):  # noqa: F811 - the fixture
    web, other = net.web, net.other
    ids = run_client(
        f"""
        import json, modal
        app = modal.App.lookup("gateway-network", create_if_missing=True)
        allowed = modal.Sandbox.create(app=app, outbound_cidr_allowlist=["{web.ip}/32"])
        blocked = modal.Sandbox.create(app=app, block_network=True)
        changing = modal.Sandbox.create(app=app)
        print(json.dumps([allowed.object_id, blocked.object_id, changing.object_id]))
        """
    )
    allowed, blocked, changing = (shoal.Sandbox.from_id(i) for i in ids)
    try:
        assert "body" in fetch(allowed, f"http://{web.ip}:8000/")
        assert "errno" in connect(allowed, other.ip, 8000)  # not on the allowlist
        assert "errno" in connect(blocked, web.ip, 8000)
        assert "body" in fetch(changing, f"http://{web.ip}:8000/")  # open until told otherwise
        run_client(
            f"""
            import json, modal
            sb = modal.Sandbox.from_id({ids[2]!r})
            sb._experimental_set_outbound_network_policy(outbound_cidr_allowlist=["{other.ip}/32"])
            print(json.dumps("set"))
            """
        )
        assert "errno" in connect(changing, web.ip, 8000)
        assert "body" in fetch(changing, f"http://{other.ip}:8000/")
        run_client(
            f"""
            import json, modal
            modal.Sandbox.from_id({ids[2]!r})._experimental_set_outbound_network_policy()
            print(json.dumps("opened"))
            """
        )
        assert "body" in fetch(changing, f"http://{web.ip}:8000/")
    finally:
        for sb in (allowed, blocked, changing):
            sb.terminate()
