"""What the image store holds, what is in use, and removing what is not.

The rule for "in use", in one place (:func:`layers_in_use`).  A layer is in use when

* an image in the image table lists it (its config's ``layers``): built,
  pulled, imported and snapshot images alike; or
* a sandbox that is not finished, or is still being torn down, stands on it:
  its spec's ``image_layers`` (recorded at create; the layers of its
  ``image_id`` for sandboxes created before that was recorded), and
  ``mounted_layers`` (images mounted into it with ``sb.mount_image``); or
* a build in progress stands on it (the builder's ``active_layers``).

Only layers of this daemon's own store are ever removed; read-only cache
stores (``SHOAL_IMAGE_CACHE``) are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shoal.images.store import LayerStore
from shoal.store.spec import SandboxSpec
from shoal.store.state import ImageRow

_sizes: dict[str, int] = {}
"""Layer sizes by path: layers never change once published."""


def layers_in_use(
    images: Iterable[ImageRow],
    sandbox_specs: Iterable[SandboxSpec],
    building: Iterable[str] = (),
) -> set[str]:
    """Every layer an image, a live sandbox or a running build uses (see the module docstring)."""
    rows = list(images)
    by_id = {r.id: r for r in rows}
    used: set[str] = set(building)
    for r in rows:
        used.update(r.config.get("layers", []))
    for spec in sandbox_specs:
        layers = spec.image_layers
        if not layers:  # stored by a version that did not record them
            row = by_id.get(spec.image_id)
            layers = row.config.get("layers", []) if row is not None else []
        used.update(layers)
        used.update(spec.mounted_layers)
    return used


def layer_size(store: LayerStore, layer_id: str) -> int:
    """Bytes in a layer (apparent size), wherever it is (this store or a read-only cache); 0 if missing."""
    path = store.path(layer_id)
    key = str(path)
    if key in _sizes:
        return _sizes[key]
    if not path.is_dir():
        return 0
    try:
        meta = json.loads((path.parent / f"{layer_id}.json").read_text())
        size = int(meta["size"])
    except (OSError, ValueError, KeyError, TypeError):
        size = tree_bytes(path)
    _sizes[key] = size
    return size


def own_layers(store: LayerStore) -> list[str]:
    """Ids of the layers in this store (not its caches)."""
    return sorted(p.name for p in store.layers.iterdir() if p.is_dir() and not p.name.endswith(".json"))


@dataclass
class Pruned:
    """What a prune removed."""

    layers: int = 0
    images: int = 0
    contexts: int = 0
    bytes: int = 0


def unused_layers(store: LayerStore, in_use: set[str], among: Iterable[str] | None = None) -> list[str]:
    """Layers of this store (all, or those ``among``) that are not in use.

    Call it on the event loop together with :func:`layers_in_use`, then remove
    in a thread: a layer published after this list was made is not on it.
    """
    candidates = own_layers(store) if among is None else [x for x in among if (store.layers / x).is_dir()]
    return [x for x in candidates if x not in in_use]


def remove_layers(store: LayerStore, layers: Iterable[str]) -> Pruned:
    """Delete these layers of this store (from :func:`unused_layers`).

    Each is first renamed into the staging area (atomic: a concurrent reader
    sees it whole or not at all), then deleted.
    """
    out = Pruned()
    for layer in layers:
        size = layer_size(store, layer)
        trash = store.tmp / f"removing-{layer}.{os.getpid()}"
        try:
            os.rename(store.layers / layer, trash)
        except OSError:
            continue
        (store.layers / f"{layer}.json").unlink(missing_ok=True)
        shutil.rmtree(trash, ignore_errors=True)
        _sizes.pop(str(store.layers / layer), None)
        out.layers += 1
        out.bytes += size
    return out


def tree_bytes(root: Path) -> int:
    """Apparent size of the files under ``root``."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
