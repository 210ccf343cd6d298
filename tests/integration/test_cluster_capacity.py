"""A full cluster (issue 18): ``scripts/local-cluster up 2 --slots 2`` makes two nodes that take two sandboxes each
(their ``shoal_slot`` Ray resource), so four creates fill it and the fifth, through the head's API or its gateway,
fails with ResourceExhaustedError."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import shoal
from shoal.exception import ResourceExhaustedError
from tests.clusterkit import cluster_env, official_client

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, daemons)")
pytest.importorskip("ray", reason="the ray extra is not installed: make setup")

FULL_BY_MODAL = """
import json, modal
app = modal.App.lookup('cluster-full', create_if_missing=True)
try:
    modal.Sandbox.create(app=app)
    print(json.dumps('created'))
except Exception as exc:
    print(json.dumps(f'{type(exc).__name__}: {exc}'))
"""


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[dict[str, str]]:
    with cluster_env("2", "--slots", "2") as env:
        yield env


def test_a_full_cluster_refuses_a_create_and_takes_one_again_when_room_is_made(small_cluster):
    app = shoal.App.lookup("cluster-full", create_if_missing=True)
    made = [shoal.Sandbox.create(app=app, timeout=120) for _ in range(4)]
    try:
        assert sorted(shoal.Sandbox.from_id(sb.object_id)._info["node"] for sb in made) == [
            "node0",
            "node0",
            "node1",
            "node1",
        ]
        with pytest.raises(ResourceExhaustedError, match="every node of the cluster"):
            shoal.Sandbox.create(app=app, timeout=120)
        pinned = {"node_labels": "shoal.io/node=node1"}
        with pytest.raises(ResourceExhaustedError):
            shoal.Sandbox.create(app=app, timeout=120, experimental_options=pinned)
        refused = official_client(FULL_BY_MODAL)
        assert refused.startswith("ResourceExhaustedError") and "every node of the cluster" in refused, refused
        made.pop().terminate()
        again = shoal.Sandbox.create(app=app, timeout=120)
        made.append(again)
        assert again.exec("echo", "room again").stdout.read() == "room again\n"
    finally:
        for sb in made:
            sb.terminate()
