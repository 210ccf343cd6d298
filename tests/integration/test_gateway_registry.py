"""Registry images through the gateway (``Image.from_registry`` with the official client), against a local
registry (``test_registry.py``'s; a module of its own, so that the registry ends before any test that checks a
daemon of its own for leftover processes)."""

from __future__ import annotations

import pytest

from tests.integration.test_gateway import run_client
from tests.integration.test_registry import busybox_layer, make_registry, registry  # noqa: F401 - fixtures

pytest.importorskip("modal_proto", reason="the official modal client is a test dependency: make setup")


def test_registry_images_through_the_official_client(daemon, registry):  # noqa: F811 - the fixture
    ref = registry.push([busybox_layer()], "gateway/busybox:v1", {"Env": ["PATH=/bin", "GREETING=from the registry"]})
    got = run_client(
        f"""
        import json, modal
        app = modal.App.lookup("gateway-tests", create_if_missing=True)
        image = modal.Image.from_registry({ref!r}).env({{"EXTRA": "layered"}})
        sb = modal.Sandbox.create(app=app, image=image)
        p = sb.exec("sh", "-c", "echo $GREETING $EXTRA; test -e /usr/bin/python3 || echo no-python")
        out = p.stdout.read()
        sb.terminate()
        print(json.dumps(out))
        """
    )
    assert got == "from the registry layered\nno-python\n"
