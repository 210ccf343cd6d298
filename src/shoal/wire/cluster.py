"""What ``GET /v1/cluster`` answers: the daemons of a Ray cluster that this one belongs to (decision 0077)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from shoal.wire.base import WireModel


class ClusterNode(BaseModel):
    """One Ray node, and the shoal daemon registered on it (``url`` None: none is)."""

    name: str
    """The daemon's node name (``shoal serve --node-name``); the Ray node id where no daemon is registered."""
    ray_node_id: str
    address: str
    """The Ray node's IP address."""
    alive: bool
    """Whether Ray holds the node alive and a daemon is registered on it."""
    url: str | None
    """Where the daemon's API is reached (``--advertise-url``)."""
    gateway: str | None = None
    """Where the daemon's gateway takes calls that other nodes' gateways pass on (None: it runs no gateway)."""
    gateway_blocks: str | None = None
    """Where the block URLs its gateway signs for its volumes are reached from other nodes."""
    labels: dict[str, str]
    """The daemon's node labels (``--node-labels``), which a create may ask for."""
    slots: int
    """Sandboxes the node takes (its ``shoal_slot`` Ray resource, else its ``max_sandboxes``)."""
    live: int = 0
    """Sandboxes running or starting there, as it last said (each second)."""
    said_at: float = 0.0
    """When it said so (its clock, seconds since the epoch)."""
    this: bool
    """The node whose API answered."""


class ClusterInfo(BaseModel):
    """``shoal cluster nodes`` and the cluster part of ``shoal status``."""

    enabled: bool
    """Whether the daemon runs with ``--ray``."""
    ray_address: str | None = None
    node_name: str | None = None
    nodes: list[ClusterNode] = []
    problem: str | None = None
    """Why the daemon's link to Ray is down, while it is (it reconnects)."""


class AppMirror(WireModel):
    """``PUT /v1/cluster/apps/{app_id}``: an app of the cluster that a create on this node names."""

    name: Annotated[str, Field(max_length=1024)] | None = None
    ephemeral: bool = False


class SecretMirror(WireModel):
    """``PUT /v1/cluster/secrets/{secret_id}``: a secret of the cluster that a create on this node names, with its
    values (sealed again by this node's key on arrival)."""

    name: Annotated[str, Field(min_length=1, max_length=1024)]
    env: dict[str, str]
    updated_at: float
    home: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """The node that holds the secret (its own, not a mirror); by default the node that sends it."""


def parse_labels(text: str) -> dict[str, str]:
    """Node labels written ``k=v,k2=v2`` as a dict (ValueError names a malformed pair)."""
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"a node label is KEY=VALUE, not {pair!r}")
        out[key.strip()] = value.strip()
    return out
