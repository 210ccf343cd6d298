"""Resolve what a sandbox asks for (``debian_slim``, an image id) into layers and a config."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shoal.exception import InvalidError, NotFoundError
from shoal.images import base, layertar, portable_python
from shoal.images.registry import MAX_IMAGE_BYTES, MAX_IMAGE_ENTRIES
from shoal.images.store import LayerStore, shift_tree
from shoal.store.state import ImageRow, State
from shoal.wire import ids
from shoal.wire.image_config import ImageConfig
from shoal.wire.images import ImageRef, ImportRootfs
from shoal.wire.pythons import check_python_version

if TYPE_CHECKING:
    from shoal.images.builder import Builder
    from shoal.images.registry import Registry

LogFn = Callable[[str], None]
SCRATCH = {"kind": "scratch", "v": 1}
"""What identifies the empty image."""


class ImageSource(Protocol):
    """Where a node of a cluster finds the images other nodes built or pulled (``shoal.server.cluster_images``)."""

    async def find(self, image_id: str) -> tuple[str, dict[str, Any]] | None:
        """A node that holds ``image_id`` whole, and its row there (``recipe``, ``config``, ``created_at``)."""
        ...

    async def layer(self, node: str, image_id: str, index: int, dest: Path) -> None:
        """Write the image's ``index``-th layer, as ``layertar.pack`` writes it, to the file ``dest``."""
        ...


class ImageService:
    """The daemon's images."""

    def __init__(self, state: State, store: LayerStore, uid_offset: int) -> None:
        self.state = state
        self.store = store
        self.uid_offset = uid_offset
        self._locks: dict[str, asyncio.Lock] = {}
        self.builder: Builder | None = None
        """Applies build steps (set by the engine: ``shoal.engine.build``)."""
        self.registry: Registry | None = None
        """Pulls ``Image.from_registry`` images (set by the engine at start: ``shoal.engine.build.make_registry``)."""
        self.source: ImageSource | None = None
        """Other nodes of the cluster, from which an image this node lacks is fetched (None: none)."""

    async def resolve(self, ref: ImageRef, log: LogFn) -> tuple[str, ImageConfig]:
        """The image id and config for ``ref``: its base, then its build steps (``shoal.images.builder``)."""
        base = await self.resolve_base(ref, log)
        return base if self.builder is None else await self.builder.apply(ref, base, log)

    async def resolve_base(self, ref: ImageRef, log: LogFn) -> tuple[str, ImageConfig]:
        """The image id and config of ``ref``'s base, building the base image if it is missing."""
        if ref.kind == "registry":
            if self.registry is None:
                raise InvalidError("this daemon cannot pull registry images")
            if ref.registry is not None and ref.registry.add_python is not None:
                version = check_python_version(ref.registry.add_python)  # before any pull
                pulled = await self.registry.resolve(ref, log)
                return await self._add_python(pulled, version, log)
            return await self.registry.resolve(ref, log)
        if ref.kind == "id":
            if not ref.image_id or not ids.is_valid(ref.image_id, "image"):
                raise InvalidError(f"invalid image id {ref.image_id!r}")
            row = self.state.image(ref.image_id)
            if self.source is not None and (row is None or not self._whole(row)):
                row = await self._fetch(ref.image_id, log) or row
            if row is None:
                where = "on any node of the cluster" if self.source is not None else "on this daemon"
                raise NotFoundError(f"no image {ref.image_id!r} {where}")
            cfg = ImageConfig.from_json(row.config)
            for layer in cfg.layers:
                if not self.store.exists(layer):
                    raise NotFoundError(f"image {ref.image_id} lost its layer {layer}; rebuild it")
            return row.id, cfg
        if ref.kind == "scratch":
            image_id = await asyncio.to_thread(self._scratch_layer)
            cfg = ImageConfig(env={"PATH": base.BASE_ENV["PATH"]}, layers=[image_id])
            if self.state.image(image_id) is None:
                self.state.add_image(ImageRow(image_id, dict(SCRATCH), cfg.to_json(), time.time()))
            return image_id, cfg
        version = check_python_version(ref.python_version)
        image_id = base.image_id(version)
        if not self.store.exists(image_id):
            async with self._locks.setdefault(image_id, asyncio.Lock()):
                await asyncio.to_thread(base.build, self.store, version, self.uid_offset, _from_thread(log))
        # The base image's config is defined by this code, not by what an older version stored.
        cfg = base.config(version, image_id)
        row = self.state.image(image_id)
        if row is None or row.config != cfg.to_json():
            self.state.add_image(ImageRow(image_id, base.recipe(version), cfg.to_json(), time.time()))
        return image_id, cfg

    async def _add_python(self, pulled: tuple[str, ImageConfig], version: str, log: LogFn) -> tuple[str, ImageConfig]:
        """A pulled image with ``version``'s self-contained Python laid over it (its own, cached image)."""
        pulled_id, cfg = pulled
        base_id, _ = await self.resolve_base(ImageRef(kind="debian_slim", python_version=version), log)
        layer = await asyncio.to_thread(
            portable_python.build, self.store, version, base_id, self.uid_offset, _from_thread(log)
        )
        env = dict(cfg.env)
        path = env.get("PATH") or base.BASE_ENV["PATH"]
        if "/usr/local/bin" not in path.split(":"):
            env["PATH"] = "/usr/local/bin:" + path
        out = replace(cfg, env=env, layers=[*cfg.layers, layer], python=version)
        source = {"kind": "add_python", "from": pulled_id, "python": version, "layer": layer}
        image_id = ids.from_digest("image", hashlib.sha256(json.dumps(source, sort_keys=True).encode()).digest())
        row = self.state.image(image_id)
        if row is None or row.config != out.to_json():
            self.state.add_image(ImageRow(image_id, source, out.to_json(), time.time()))
        return image_id, out

    def _whole(self, row: ImageRow) -> bool:
        return all(self.store.exists(layer) for layer in ImageConfig.from_json(row.config).layers)

    async def _fetch(self, image_id: str, log: LogFn) -> ImageRow | None:
        """Take in ``image_id`` from the node of the cluster that holds it: its layers this node lacks, unpacked
        as a registry layer is (the other node's tar is input like any other), then its row."""
        assert self.source is not None
        async with self._locks.setdefault(image_id, asyncio.Lock()):
            row = self.state.image(image_id)
            if row is not None and self._whole(row):
                return row
            found = await self.source.find(image_id)
            if found is None:
                return None
            node, raw = found
            cfg = ImageConfig.from_json(dict(raw["config"]))
            budget = layertar.Budget(MAX_IMAGE_BYTES, MAX_IMAGE_ENTRIES)
            for index, layer in enumerate(cfg.layers):
                if not ids.is_valid(layer, "image"):
                    raise InvalidError(f"node {node} described image {image_id} with a layer id {layer!r}")
                if self.store.exists(layer):
                    continue
                started = time.monotonic()
                tar = self.store.tmp / f"{layer}.{os.getpid()}.fetch"
                try:
                    await self.source.layer(node, image_id, index, tar)
                    stats = await asyncio.to_thread(self._unpack_fetched, layer, tar, node, budget)
                finally:
                    tar.unlink(missing_ok=True)
                log(
                    f"layer {index + 1}/{len(cfg.layers)} fetched from node {node}: {stats.files} files,"
                    f" {stats.bytes / 1e6:.1f} MB in {time.monotonic() - started:.1f} s"
                )
            row = ImageRow(image_id, dict(raw.get("recipe") or {}), cfg.to_json(), float(raw.get("created_at") or 0))
            self.state.add_image(row)
            return row

    def _unpack_fetched(self, layer: str, tar: Path, node: str, budget: layertar.Budget) -> layertar.Stats:
        with self.store.lock(layer):
            if self.store.exists(layer):
                return layertar.Stats()
            return layertar.unpack_staged(
                self.store,
                layer,
                lambda: open(tar, "rb"),
                self.uid_offset,
                1 << 16,
                budget,
                f"layer {layer} from node {node}",
                {"fetched_from": node},
            )

    def export_layer(self, image_id: str, index: int, dest: Path) -> None:
        """Write the ``index``-th layer of ``image_id`` to ``dest`` for another node (``layertar.pack``)."""
        row = self.state.image(image_id)
        layers = ImageConfig.from_json(row.config).layers if row is not None else []
        if not 0 <= index < len(layers) or not self.store.exists(layers[index]):
            raise NotFoundError(f"no layer {index} of image {image_id!r} on this node")
        with open(dest, "wb") as out:
            layertar.pack(str(self.store.path(layers[index])), self.uid_offset, out)

    def _scratch_layer(self) -> str:
        """The empty layer of ``Image.from_scratch()`` (the overlay needs a lower directory), made once."""
        image_id = ids.from_digest("image", hashlib.sha256(json.dumps(SCRATCH, sort_keys=True).encode()).digest())
        with self.store.lock(image_id):
            if not self.store.exists(image_id):
                staged = self.store.staging(image_id)
                os.chmod(staged, 0o755)
                shift_tree(staged, self.uid_offset)
                self.store.publish(image_id, staged, dict(SCRATCH))
        return image_id

    def lowers(self, cfg: ImageConfig) -> list[str]:
        """Overlay lower directories, topmost first."""
        return [str(self.store.path(layer)) for layer in reversed(cfg.layers)]

    async def import_rootfs(self, req: ImportRootfs) -> str:
        """Copy a root filesystem directory from the host into a new image."""
        src = Path(req.path)
        if not src.is_absolute() or not await asyncio.to_thread(src.is_dir):
            raise InvalidError(f"{req.path!r} is not an absolute path to a directory on the daemon's host")
        image_id = ids.new("image")
        staged = self.store.staging(image_id)
        try:
            await asyncio.to_thread(_copy_tree, src, staged, self.uid_offset)
        except OSError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            raise InvalidError(f"cannot import {req.path}: {exc}") from exc
        self.store.publish(image_id, staged, {"imported_from": str(src)})
        cfg = ImageConfig(
            env={"PATH": base.BASE_ENV["PATH"], **req.env},
            cmd=req.cmd,
            entrypoint=req.entrypoint,
            workdir=req.workdir,
            layers=[image_id],
        )
        self.state.add_image(ImageRow(image_id, {"kind": "import", "path": str(src)}, cfg.to_json(), time.time()))
        return image_id

    def list(self) -> list[ImageRow]:
        """Every image."""
        return self.state.images()


def _from_thread(log: LogFn) -> LogFn:
    """``log`` made callable from a worker thread (each line handed to the running event loop)."""
    loop = asyncio.get_running_loop()

    def threadsafe_log(line: str) -> None:
        loop.call_soon_threadsafe(log, line)

    return threadsafe_log


def _copy_tree(src: Path, dest: Path, uid_offset: int) -> None:
    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    os.chmod(dest, 0o755)
    shift_tree(dest, uid_offset)
