"""What a create asks of placement in a cluster (decision 0077): the named secrets that go with it, and whether it
must stay on the node that got it."""

from __future__ import annotations

from typing import Any


def secret_ids(data: dict[str, Any]) -> list[str]:
    """The named secrets a create uses: its environment's and its outbound policy's."""
    found = [str(i) for i in data.get("secret_ids") or []]
    found += [
        str(r["secret_id"]) for r in data.get("outbound_headers") or [] if isinstance(r, dict) and r.get("secret_id")
    ]
    return list(dict.fromkeys(found))


def needs_this_node(data: dict[str, Any]) -> bool:
    """Whether a create names objects that live in this node's store alone (decision 0077)."""
    image = data.get("image") or {}
    # An image id the node lacks is a 404 there, and the create moves on; steps or a registry pull would build there.
    custom_image = isinstance(image, dict) and (
        image.get("kind") not in (None, "id", "debian_slim") or image.get("steps")
    )
    # Volumes go with it: the node it lands on mounts a copy of each (decision 0078).
    return bool(custom_image or data.get("persistent") or data.get("gpu") or data.get("enable_snapshot"))
