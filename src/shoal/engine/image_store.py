"""The daemon's image store as an operator sees it: disk use, ``image rm``, ``image prune``, build-context
uploads.  Which layers are in use depends on the sandboxes (running, being torn down, or precreated by the
warm pool) and on the builds in progress, so the rule lives here, beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator

from shoal.engine.manager import Manager
from shoal.engine.sandbox import FINISHED
from shoal.exception import ConflictError, InvalidError, NotFoundError
from shoal.images import build_logs, usage
from shoal.images.builder import Builder
from shoal.store.spec import SandboxSpec
from shoal.wire import ids, recipe
from shoal.wire.image_config import ImageConfig
from shoal.wire.images import ContextStored, ImageRemoved, ImageStoreUsage, PruneResult, StoredImage
from shoal.wire.sandboxes import LogEntries, LogEntry
from shoal.wire.times import micros

MAX_CONTEXT_BYTES = 1 << 36
"""Largest upload of local files for one build step (64 GiB)."""


def _builder(mgr: Manager) -> Builder:
    if mgr.images.builder is None:
        raise InvalidError("this daemon has no image builder")
    return mgr.images.builder


def live_specs(mgr: Manager) -> list[SandboxSpec]:
    """Specs of the sandboxes whose root is mounted: not finished, or finished and still being torn down."""
    return [
        sb.spec
        for sb in mgr.sandboxes.values()
        if sb.state is not FINISHED or (sb.teardown_task is not None and not sb.teardown_task.done())
    ] + mgr.pool.specs()


def in_use(mgr: Manager) -> set[str]:
    """The layers in use (the rule is :func:`shoal.images.usage.layers_in_use`)."""
    builder = mgr.images.builder
    building = list(builder.active_layers) if builder is not None else []
    return usage.layers_in_use(mgr.state.images(), live_specs(mgr), building)


async def store_context(mgr: Manager, digest: str, chunks: AsyncIterator[bytes]) -> ContextStored:
    """Keep an uploaded build context (a tar stream) if its files match ``digest``."""
    builder = _builder(mgr)
    if not recipe.DIGEST_RE.match(digest):
        raise InvalidError("the context name must be a sha256 hex digest")
    if builder.contexts.has(digest):
        return ContextStored(context=digest, stored=False)
    tmp = builder.store.tmp / f"upload-{digest[:16]}.{os.getpid()}.{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        total = 0
        try:
            async for chunk in chunks:
                total += len(chunk)
                if total > MAX_CONTEXT_BYTES:
                    raise InvalidError(f"the build context is larger than {MAX_CONTEXT_BYTES >> 30} GiB")
                await asyncio.to_thread(os.write, fd, chunk)
        finally:
            os.close(fd)
        await asyncio.to_thread(builder.contexts.add_archive, digest, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    return ContextStored(context=digest, stored=True)


async def usage_report(mgr: Manager) -> ImageStoreUsage:
    """Images with their sizes, and the store's disk use."""
    return await asyncio.to_thread(_usage, mgr, in_use(mgr))


def _usage(mgr: Manager, used: set[str]) -> ImageStoreUsage:
    store = mgr.layers
    rows = mgr.state.images()
    sandbox_images = {spec.image_id for spec in live_specs(mgr)}
    images = []
    for r in rows:
        cfg = ImageConfig.from_json(r.config)
        images.append(
            StoredImage(
                image_id=r.id,
                recipe=r.recipe,
                created_at_us=micros(r.created_at),
                layers=cfg.layers,
                size=sum(usage.layer_size(store, layer) for layer in cfg.layers),
                own_size=usage.layer_size(store, cfg.layers[-1]) if cfg.layers else 0,
                in_use=r.id in sandbox_images,
            )
        )
    own = usage.own_layers(store)
    layer_bytes = sum(usage.layer_size(store, x) for x in own)  # (cache stores' layers are not this store's)
    unused = [x for x in own if x not in used]
    builder = mgr.images.builder
    context_bytes = usage.tree_bytes(builder.contexts.root) if builder is not None else 0
    disk = shutil.disk_usage(store.root)
    return ImageStoreUsage(
        images=images,
        layers=len(own),
        layer_bytes=layer_bytes,
        unused_layers=len(unused),
        reclaimable_bytes=sum(usage.layer_size(store, x) for x in unused) + context_bytes,
        context_bytes=context_bytes,
        path=str(store.root),
        disk_free_bytes=disk.free,
        disk_total_bytes=disk.total,
    )


def build_log(mgr: Manager, image_id: str, layers: int | None, tail: int | None) -> LogEntries:
    """What the image's last ``layers`` build steps printed (``image.logs``), oldest first; ``tail``: the last
    lines only."""
    if not ids.is_valid(image_id, "image"):
        raise NotFoundError(f"no image {image_id!r} (not an image id)")
    if mgr.state.image(image_id) is None:
        raise NotFoundError(f"no image {image_id} on this daemon")
    lines = build_logs.read(mgr.state, image_id, layers=layers, tail=tail)
    return LogEntries(
        entries=[LogEntry(timestamp_us=ln.timestamp_us, source="stdout", message=ln.message) for ln in lines]
    )


async def remove_image(mgr: Manager, image_id: str) -> ImageRemoved:
    """Remove an image, and its layers that nothing else uses; refused while a sandbox runs it."""
    if not ids.is_valid(image_id, "image"):
        raise NotFoundError(f"no image {image_id!r} (not an image id)")
    row = mgr.state.image(image_id)
    if row is None:
        raise NotFoundError(f"no image {image_id} on this daemon")
    held = [i.snapshot_id for i in mgr.memory_snapshots.list() if i.image_id == image_id]
    if held:
        raise ConflictError(
            f"image {image_id} is the filesystem of memory snapshot {held[0]}: remove the snapshot first"
            f" (`shoal snapshot rm {held[0]}`)"
        )
    if image_id in mgr.persistents.images():
        raise ConflictError(
            f"image {image_id} is the files of a paused persistent sandbox, which its next session starts from:"
            " terminate that sandbox first"
        )
    users = [sb.id for sb in mgr.sandboxes.values() if sb.state is not FINISHED and sb.spec.image_id == image_id]
    if users:
        raise ConflictError(f"image {image_id} is used by running sandboxes ({', '.join(users[:5])}); end them first")
    if image_id in {spec.image_id for spec in mgr.pool.specs()}:
        raise ConflictError(
            f"image {image_id} is used by running sandboxes (the daemon's warm pool of precreated sandboxes);"
            " run `shoal serve --warm-pool 0` to remove it"
        )
    mgr.state.delete_image(image_id)
    builder = mgr.images.builder
    if builder is not None:
        builder.forget_dangling()
    unused = usage.unused_layers(mgr.layers, in_use(mgr), row.config.get("layers", []))
    pruned = await asyncio.to_thread(usage.remove_layers, mgr.layers, unused)
    return ImageRemoved(image_id=image_id, removed_layers=pruned.layers, freed_bytes=pruned.bytes)


async def prune(mgr: Manager, all_images: bool) -> PruneResult:
    """Remove layers no image, sandbox or build uses, and uploaded build contexts; with ``all_images``, first
    every image that no running sandbox or memory snapshot uses."""
    removed_images = 0
    if all_images:
        keep = {spec.image_id for spec in live_specs(mgr)} | {i.image_id for i in mgr.memory_snapshots.list()}
        keep |= mgr.persistents.images()
        for row in mgr.state.images():
            if row.id not in keep:
                mgr.state.delete_image(row.id)
                removed_images += 1
    builder = mgr.images.builder
    contexts = context_bytes = 0
    if builder is not None:
        builder.forget_dangling()
        context_bytes = await asyncio.to_thread(usage.tree_bytes, builder.contexts.root)
        with contextlib.suppress(OSError):
            contexts = await asyncio.to_thread(builder.contexts.remove_all, set(builder.active_contexts))
    unused = usage.unused_layers(mgr.layers, in_use(mgr))
    pruned = await asyncio.to_thread(usage.remove_layers, mgr.layers, unused)
    return PruneResult(
        removed_images=removed_images,
        removed_layers=pruned.layers,
        removed_contexts=contexts,
        freed_bytes=pruned.bytes + (context_bytes if contexts else 0),
    )
