"""The image builder: applies build steps on a base image, one cached layer at a time.

Each step's result is remembered under its cache key (:mod:`shoal.wire.recipe`)
in the ``image_steps`` table: key → image id; the image's config (layers,
env, …) is in the ``images`` table.  A resolve walks the steps: a key whose
image and layers exist is a hit; the first miss and every step after it are
built.  Before building anything, the contexts (uploaded local files) that
the missing copy steps need are checked: the client is told which to upload
(:class:`MissingContexts`) and asks again, so files are uploaded only on a
cache miss.

How steps are built:

* ``run``: in a *build sandbox* (:mod:`shoal.engine.build`), an ordinary
  sandbox of the parent image with outbound network access; when every
  command exits 0, the sandbox's upper directory becomes the new layer
  (overlay whiteouts and opaque directories included: they are valid in a
  lower layer).
* ``copy``, ``workdir``, ``host_cas``: on the host, in an overlay of the
  parent's layers mounted at a private point (:mod:`shoal.images.inroot`).
* ``env``, ``cmd``, ``entrypoint``, ``user``: the config only.

A step that changes nothing adds no layer.  A layer is built in the store's
staging area and published by an atomic rename under the layer's file lock,
so concurrent builds of one step (in this daemon or another process) build
it once, and a build that dies leaves only staging files, which are cleaned
at start.  A failed step raises :class:`~shoal.exception.ImageBuildError`
and records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shoal.exception import Error, ImageBuildError, InvalidError
from shoal.images import build_logs, inroot, trust
from shoal.images import context as ctx
from shoal.images.store import LayerStore
from shoal.runtime import rootfs
from shoal.store.state import ImageRow, State
from shoal.util import safefs
from shoal.wire import recipe
from shoal.wire.image_config import ImageConfig
from shoal.wire.images import ImageRef
from shoal.wire.recipe import AnyStep, CopyStep, HostCasStep, RunStep, WorkdirStep

LogFn = Callable[[str], None]
TRUSTING_KINDS = ("debian_slim", "registry")
"""Bases the daemon takes from outside; they get the host's CA certificates (see :mod:`shoal.images.trust`)."""
TAIL_LINES = 30
SCHEMA = """
CREATE TABLE IF NOT EXISTS image_steps (
    key TEXT PRIMARY KEY,
    image_id TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


class MissingContexts(Error):
    """The build needs local files the daemon does not have yet: the client uploads them and asks again."""

    def __init__(self, contexts: list[str]) -> None:
        super().__init__(f"upload these build contexts first: {', '.join(contexts)}")
        self.contexts = contexts


class Progress(str):
    """A log line that also carries a structured step event (the resolve route sends it as such)."""

    event: dict[str, Any]

    def __new__(cls, text: str, event: dict[str, Any]) -> Progress:
        obj = super().__new__(cls, text)
        obj.event = event
        return obj


@dataclass
class RunOutcome:
    """How a build sandbox's commands ended."""

    returncode: int
    failed_command: int = -1
    """Index of the command that failed (-1: none)."""
    tail: list[str] = field(default_factory=list)
    message: str = ""


class StepRunner(Protocol):
    """Runs a ``run`` step in a build sandbox (implemented by :mod:`shoal.engine.build`)."""

    async def run(self, parent_id: str, parent: ImageConfig, step: RunStep, upper: Path, log: LogFn) -> RunOutcome:
        """Run ``step``'s commands; on success the sandbox's upper directory is moved to ``upper``."""
        ...


@dataclass
class BuildSettings:
    """The daemon options that shape builds."""

    mounts_dir: Path
    """Where host-side steps mount their overlays (a private runtime directory)."""
    trust_host_cas: bool = True
    host_ca_dir: Path = trust.DEFAULT_CA_DIR


class Builder:
    """Applies steps; owns the step cache."""

    def __init__(
        self,
        state: State,
        store: LayerStore,
        uid_offset: int,
        settings: BuildSettings,
        runner: StepRunner | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.uid_offset = uid_offset
        self.settings = settings
        self.runner = runner
        self.contexts = ctx.ContextStore(store.root / "contexts", store.tmp)
        self.active_layers: dict[str, int] = {}
        self.step_counts: dict[str, int] = {"built": 0, "cached": 0, "failed": 0}
        """Build steps applied since the daemon started, by outcome (``/metrics``)."""
        """Layers that builds in progress stand on (counted), so prune keeps them."""
        self.active_contexts: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        state.db.executescript(SCHEMA)
        build_logs.ensure_schema(state.db)

    # ------------------------------------------------------------------------------------ resolve

    async def apply(self, ref: ImageRef, base: tuple[str, ImageConfig], log: LogFn) -> tuple[str, ImageConfig]:
        """The image ``ref`` names: its base, then its steps (built where not cached)."""
        steps: list[AnyStep] = list(ref.steps)
        if self.settings.trust_host_cas and ref.kind in TRUSTING_KINDS:
            certs = trust.host_certs(self.settings.host_ca_dir)
            if certs:
                steps.insert(0, trust.step_for(certs))
        if not steps:
            return base
        force_all = ref.force_build
        self._check_contexts(base[1], steps, force_all)
        image_id, cfg = base
        total = len(steps)
        for index, step in enumerate(steps, 1):
            image_id, cfg = await self._step(index, total, image_id, cfg, step, force_all, log)
        return image_id, cfg

    def _check_contexts(self, cfg: ImageConfig, steps: list[AnyStep], force_all: bool) -> None:
        """Raise MissingContexts if a copy step that will be built has no uploaded files here."""
        missing: list[str] = []
        building = False
        for step in steps:
            if not building:
                key = recipe.step_key(cfg, step)
                hit = None if (force_all or step.force_build) else self._lookup(key)
                if hit is None:
                    building = True
                else:
                    cfg = hit[1]
            if (
                building
                and isinstance(step, CopyStep)
                and not self.contexts.has(step.context)
                and step.context not in missing
            ):
                missing.append(step.context)
        if missing:
            raise MissingContexts(missing)

    def _lookup(self, key: str) -> tuple[str, ImageConfig] | None:
        row = self.state.db.execute("SELECT image_id FROM image_steps WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        image = self.state.image(row[0])
        if image is None:
            return None
        cfg = ImageConfig.from_json(image.config)
        if not all(self.store.exists(layer) for layer in cfg.layers):
            return None
        return image.id, cfg

    def _record(self, key: str, parent_id: str, step: AnyStep, cfg: ImageConfig) -> str:
        image_id = recipe.image_id_for(cfg)
        if self.state.image(image_id) is None:
            desc = {"kind": "step", "op": step.op, "step": recipe.describe(step), "parent": parent_id}
            self.state.add_image(ImageRow(image_id, desc, cfg.to_json(), time.time()))
        self.state.db.execute(
            "INSERT OR REPLACE INTO image_steps (key, image_id, created_at) VALUES (?, ?, ?)",
            (key, image_id, time.time()),
        )
        return image_id

    def forget_dangling(self) -> int:
        """Drop cached steps whose image is gone; returns how many."""
        cur = self.state.db.execute("DELETE FROM image_steps WHERE image_id NOT IN (SELECT id FROM images)")
        build_logs.forget_dangling(self.state.db)
        return cur.rowcount

    # ------------------------------------------------------------------------------------ one step

    async def _step(
        self,
        index: int,
        total: int,
        parent_id: str,
        parent: ImageConfig,
        step: AnyStep,
        force_all: bool,
        log: LogFn,
    ) -> tuple[str, ImageConfig]:
        key = recipe.step_key(parent, step)
        forced = force_all or step.force_build
        label = recipe.describe(step)
        event = {"index": index, "total": total, "label": label}
        if not forced and (hit := self._lookup(key)) is not None:
            self.step_counts["cached"] += 1
            log(Progress(f"[{index}/{total}] {label}: cached", {**event, "status": "cached"}))
            return hit
        if step.op in recipe.CONFIG_ONLY:
            self.step_counts["built"] += 1
            cfg = recipe.apply_config(parent, step)
            log(Progress(f"[{index}/{total}] {label}", {**event, "status": "done", "seconds": 0.0}))
            image_id = self._record(key, parent_id, step, cfg)
            header = build_logs.StepLog()
            header.add(time.time_ns() // 1000, label)
            build_logs.record(self.state.db, image_id, key, header)
            return image_id, cfg
        async with self._build_lock(key):
            if not forced and (hit := self._lookup(key)) is not None:  # built meanwhile, by someone else
                self.step_counts["cached"] += 1
                log(Progress(f"[{index}/{total}] {label}: cached", {**event, "status": "cached"}))
                return hit
            log(Progress(f"[{index}/{total}] {label}", {**event, "status": "building"}))
            started = time.monotonic()
            kept = build_logs.StepLog()
            kept.add(time.time_ns() // 1000, label)

            def log_and_keep(line: str) -> None:
                if not isinstance(line, Progress):
                    kept.add(time.time_ns() // 1000, line)
                log(line)

            for layer in parent.layers:
                self.active_layers[layer] = self.active_layers.get(layer, 0) + 1
            try:
                cfg = await self._build(key, parent_id, parent, step, forced, log_and_keep, index, total)
            except ImageBuildError as exc:
                self.step_counts["failed"] += 1
                seconds = time.monotonic() - started
                log(Progress(f"[{index}/{total}] {label}: failed", {**event, "status": "failed", "seconds": seconds}))
                exc.image_id = recipe.failed_image_id(key)
                raise
            finally:
                for layer in parent.layers:
                    self.active_layers[layer] -= 1
                    if not self.active_layers[layer]:
                        del self.active_layers[layer]
            self.step_counts["built"] += 1
            image_id = self._record(key, parent_id, step, cfg)
            build_logs.record(self.state.db, image_id, key, kept)
            seconds = time.monotonic() - started
            log(
                Progress(
                    f"[{index}/{total}] {label}: built in {seconds:.1f}s",
                    {**event, "status": "built", "seconds": round(seconds, 3)},
                )
            )
            return image_id, cfg

    @contextlib.asynccontextmanager
    async def _build_lock(self, key: str) -> AsyncIterator[None]:
        """One builder per step key: an asyncio lock in this daemon, a file lock across processes."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            fd = os.open(self.store.locks / f"step-{key[:32]}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)
        if not lock.locked() and self._locks.get(key) is lock:
            del self._locks[key]

    async def _build(
        self,
        key: str,
        parent_id: str,
        parent: ImageConfig,
        step: AnyStep,
        forced: bool,
        log: LogFn,
        index: int,
        total: int,
    ) -> ImageConfig:
        layer = recipe.layer_id_for(key)
        if forced or self.store.exists(layer):
            # a forced rebuild, or the step's layer outlived its cache entry (its image was removed while a
            # child image still lists the layer): build under a fresh id, never over a published layer
            layer = recipe.layer_id_for(key, secrets.token_hex(8))
        staged = self.store.staging(layer)
        try:
            cfg = recipe.apply_config(parent, step)
            if isinstance(step, RunStep):
                await self._run(parent_id, parent, step, staged, log, index, total)
            else:
                env = await asyncio.to_thread(self._host_step, parent, step, staged)
                cfg.env.update(env)
            if not any(staged.iterdir()):
                shutil.rmtree(staged)
                return cfg  # nothing changed: no layer
            meta = {"key": key, "step": recipe.describe(step), "size": _tree_size(staged)}
            self.store.publish(layer, staged, meta)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            (staged.parent / f"{staged.name}.json").unlink(missing_ok=True)
            raise
        cfg.layers = [*parent.layers, layer]
        return cfg

    async def _run(
        self, parent_id: str, parent: ImageConfig, step: RunStep, staged: Path, log: LogFn, index: int, total: int
    ) -> None:
        if self.runner is None:
            raise InvalidError("this daemon cannot run build steps (no sandbox runner)")
        outcome = await self.runner.run(parent_id, parent, step, staged, log)
        if outcome.returncode == 0:
            return
        cmd = step.commands[outcome.failed_command] if outcome.failed_command >= 0 else step.commands[0]
        shown = cmd[2] if cmd[:2] == recipe.SHELL and len(cmd) == 3 else " ".join(cmd)
        tail = "\n".join(outcome.tail[-TAIL_LINES:]) or "(no output)"
        why = f" ({outcome.message})" if outcome.message else ""
        raise ImageBuildError(
            f"Image build failed at step {index}/{total}: `{shown}` exited with code {outcome.returncode}{why}."
            f" Last lines of its output:\n{tail}"
        )

    def _host_step(self, parent: ImageConfig, step: AnyStep, upper: Path) -> dict[str, str]:
        """Build a copy/workdir/host_cas step in an overlay mounted on the host; returns env to add."""
        work = upper.parent / f"{upper.name}.work"
        target = self.settings.mounts_dir / upper.name
        lowers = [str(self.store.path(layer)) for layer in reversed(parent.layers)]
        owner = self.uid_offset
        if isinstance(step, CopyStep):
            self.active_contexts.add(step.context)
        try:
            with inroot.mounted(lowers, upper, work, target, owner) as root_fd:
                if isinstance(step, WorkdirStep):
                    workdir = inroot.split(recipe.resolve_dir(parent, step.path))
                    os.close(inroot.make_dirs(root_fd, workdir, owner, owner))
                elif isinstance(step, HostCasStep):
                    certs = trust.host_certs(self.settings.host_ca_dir)
                    if trust.step_for(certs) != step:
                        raise InvalidError("the host's CA certificates changed during the build; try again")
                    return trust.install(root_fd, certs, owner)
                elif isinstance(step, CopyStep):
                    _copy_tree(
                        self.contexts.path(step.context), root_fd, recipe.resolve_dir(parent, step.dest), step, owner
                    )
        except (OSError, InvalidError) as exc:
            raise ImageBuildError(f"{recipe.describe(step)} failed: {exc}") from exc
        finally:
            if isinstance(step, CopyStep):
                self.active_contexts.discard(step.context)
        return {}

    # ------------------------------------------------------------------------------------ maintenance

    def recover_mounts(self) -> None:
        """After a crash: unmount host-step overlays left mounted (their staging is cleaned with the store's)."""
        d = self.settings.mounts_dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        for p in d.iterdir():
            with contextlib.suppress(OSError):
                rootfs.unmount(str(p))
                p.rmdir()


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _copy_tree(src: Path, root_fd: int, dest: str, step: CopyStep, owner: int) -> None:
    """Merge the context tree ``src`` into directory ``dest`` of the mounted image.

    Existing directories keep their owner and mode; files and links replace
    what was there.  The source tree is the daemon's own verified copy; the
    image side is resolved with :mod:`shoal.images.inroot`.
    """
    uid, gid = owner, owner
    if step.chown is not None:
        u, _, g = step.chown.partition(":")
        uid, gid = owner + int(u), owner + int(g or u)
    dest_parts = inroot.split(dest)
    top = inroot.make_dirs(root_fd, dest_parts, uid, gid)
    os.close(top)
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        entries = sorted(safefs.walk(src_fd, [], recursive=True), key=lambda e: e[0])
        for rel, st in entries:
            parts = rel.split("/")
            mode = step.chmod if step.chmod is not None else (st.st_mode & 0o777)
            parent = inroot.make_dirs(root_fd, dest_parts + parts[:-1], uid, gid)
            try:
                name = parts[-1]
                if stat.S_ISDIR(st.st_mode):
                    existing = inroot.lstat_in(parent, name)
                    if existing is not None and stat.S_ISDIR(existing.st_mode):
                        continue
                    os.close(inroot.make_dirs(root_fd, dest_parts + parts, uid, gid, mode))
                elif stat.S_ISLNK(st.st_mode):
                    inroot.clear_entry(parent, name)
                    os.symlink(os.readlink(rel, dir_fd=src_fd), name, dir_fd=parent)
                    os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
                else:
                    fd, _ = safefs.open_regular(src_fd, parts)
                    try:
                        inroot.clear_entry(parent, name)
                        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                        out = os.open(name, flags, 0o600, dir_fd=parent)
                        try:
                            safefs.copy_data(fd, out, st.st_size)
                            os.fchown(out, uid, gid)
                            os.fchmod(out, mode)
                        finally:
                            os.close(out)
                    finally:
                        os.close(fd)
            finally:
                os.close(parent)
    finally:
        os.close(src_fd)
