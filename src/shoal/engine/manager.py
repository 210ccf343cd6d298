"""The engine's front door: apps, sandboxes and processes, and recovery after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.agent.build import BINARY_NAME, ensure_agent, stage_agent
from shoal.cluster.membership import Membership
from shoal.engine import build as image_build
from shoal.engine.agent_frames import new_token
from shoal.engine.config import Config
from shoal.engine.memory_snapshots import MemorySnapshots
from shoal.engine.metrics import Metrics
from shoal.engine.persistent import Persistents
from shoal.engine.pool import WarmPool
from shoal.engine.process import ENTRYPOINT_ID, Process
from shoal.engine.sandbox import CREATING, FINISHED, RUNNING, Context, Sandbox, unmount_netns
from shoal.engine.sidecars import Sidecars
from shoal.engine.snapshot import Snapshots
from shoal.engine.uids import UidSlots
from shoal.engine.usage import UsageSampler
from shoal.exception import AlreadyExistsError, ConflictError, InvalidError, NotFoundError, ResourceExhaustedError
from shoal.gpu import inventory as gpu_inventory
from shoal.gpu import scheduler as gpu_scheduler
from shoal.images import base as image_base
from shoal.images.service import ImageService
from shoal.images.store import LayerStore
from shoal.network.service import Network
from shoal.runtime import cgroups, gvisor, host_limits, host_room, idmap, rootfs
from shoal.runtime import registry as runtimes
from shoal.secrets.keyring import Keyring
from shoal.secrets.store import SecretStore
from shoal.store.spec import SandboxSpec
from shoal.store.state import AppRow, SandboxRow, State
from shoal.util import reaper
from shoal.volumes.mounts import VolumeBinds, check_mounts
from shoal.volumes.store import VolumeStore
from shoal.wire import gpu as gpu_request
from shoal.wire import ids
from shoal.wire.sandboxes import CreateSandbox, ExecRequest, Result, SandboxInfo

log = logging.getLogger(__name__)

FINISHED_CACHE = 64
"""Finished sandboxes kept in memory after their last use (the rest are read from the store when asked for)."""


def check_traversable(path: Path, gid: int | None) -> None:
    """The runtime sets up a sandbox's mounts as the sandbox's own root (host uid and gid ``gid``; None: a
    gid of its own per sandbox): it must be able to walk to them.  A directory passes if others may search
    it, or if it is group ``gid``'s and the group may."""
    for p in [path, *path.parents]:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if not st.st_mode & 0o001 and not (gid is not None and st.st_gid == gid and st.st_mode & 0o010):
            raise InvalidError(
                f"{p} is not searchable by other users (mode {oct(st.st_mode & 0o777)}), so sandboxes cannot"
                f" mount their files from {path}: run `chmod o+x {p}` or choose other shoal directories"
            )


def seal_top_dir(path: Path, gid: int) -> None:
    """Make one of shoal's own top directories (data, runtime) ``root:gid`` and ``0710``.

    Other host users can then neither list nor enter anything under it (sandbox roots, outputs, the state
    database and its WAL, bundles); the sandboxes' root group (``gid``) may pass through it, which the
    runtime needs to mount a sandbox's root and binds.
    """
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 0, gid)
    os.chmod(path, 0o710)


class Manager:
    """Owns every sandbox on this machine."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        for d in (cfg.data_dir, cfg.runtime_dir):
            seal_top_dir(d, cfg.idmap.host_id)
        for d in (cfg.run_sandboxes_dir, cfg.oci_state_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o711)
        # Upper dirs hold what sandboxes wrote (set-id files of the sandbox uid too): root only.  The overlay
        # uses them with the mounter's credentials.
        cfg.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.sandboxes_dir, 0o700)
        self.state = State(cfg.db_path)
        self.runtime = runtimes.choose(cfg.runtime, str(cfg.oci_state_dir))
        self.gvisor, self.gvisor_note = runtimes.gvisor(str(cfg.oci_state_dir))
        """gVisor's runtime, None where this daemon cannot run gVisor sandboxes (``gvisor_note`` says why)."""
        self.layers = LayerStore(cfg.images_dir, cfg.image_caches)
        self.images = ImageService(self.state, self.layers, cfg.idmap.host_id)
        self.images.builder = image_build.make_builder(self)  # image build steps run in build sandboxes
        self.network = Network(cfg.network, cfg.data_dir, cfg.runtime_dir, cfg.idmap.host_id)
        self.volumes = VolumeStore(self.state.db, cfg.data_dir / "volumes", cfg.idmap.host_id)
        self.volume_binds = VolumeBinds(self.volumes, cfg.runtime_dir / "volume-binds")
        self.secrets = SecretStore(self.state.db, Keyring(cfg.data_dir / "secrets.key"))
        self.network.secret_values = lambda secret_id: self.secrets.resolve([secret_id])
        self.images.registry = image_build.make_registry(self)  # after secrets: a pull may use a named one
        self._reaper: reaper.InitReaper | None = None
        self.ctx = Context(
            cfg,
            self.state,
            self.runtime,
            self.network,
            volumes=self.volume_binds,
            secrets=self.secrets,
            torn_down=self._torn_down,
        )
        self.ctx.runtimes["runc"] = self.runtime
        self.sandboxes: dict[str, Sandbox] = {}
        """Sandboxes on this machine: running, or finished and still being removed."""
        self._finished: OrderedDict[str, Sandbox] = OrderedDict()
        """Recently used finished sandboxes, least recent first (at most FINISHED_CACHE)."""
        self.gpus = gpu_scheduler.GpuScheduler(gpu_inventory.Inventory(problem="not discovered yet"))
        self._prune_task: asyncio.Task[None] | None = None
        self.pool = WarmPool(self, cfg.warm_pool)
        self.usage = UsageSampler(self, cfg.usage_interval)
        self.metrics = Metrics(self)
        self.dashboard: tuple[str, str] | None = None
        """The web dashboard's URL and its login URL (``shoal dashboard``); None: off."""
        self.cluster: Membership | None = None
        """This daemon's place in a cluster (``shoal serve --ray``); None: it runs alone."""
        self.gateway_env: dict[str, str] | None = None
        """What points the official modal client at this daemon's gateway (``shoal gateway env``); None: off."""
        self._starting = 0
        """Creates in progress (``max_sandboxes`` counts them)."""
        self.snapshots = Snapshots(self)
        self.memory_snapshots = MemorySnapshots(self)
        self.sidecars = Sidecars(self)
        self.persistents = Persistents(self)
        self.ctx.ending = self.persistents.session_ending
        """Snapshots and image mounts of running sandboxes."""
        self.uid_mode = "shared"
        """``per-sandbox`` (decision 0063) or ``shared`` (0002): chosen at start (``_choose_uid_mode``)."""
        self.uid_note = ""
        """Why the mode is what it is, for ``shoal status``."""

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Prepare the agent, clear leftovers of a crash, re-adopt running sandboxes."""
        agent = await asyncio.to_thread(ensure_agent, self.cfg.agent_dir, self.cfg.agent_cache)
        await asyncio.to_thread(stage_agent, agent, self.cfg.staged_agent)
        self.uid_mode, self.uid_note = await asyncio.to_thread(self._choose_uid_mode)
        log.info("uid ranges: %s (%s)", self.uid_mode, self.uid_note)
        await asyncio.to_thread(self._check_gvisor)
        if self.uid_mode == "per-sandbox":
            self.ctx.uids = UidSlots(self.cfg.uid_slots, self.cfg.uid_first_slot)
            # Each sandbox's root (its own gid) walks to its run directory, which is root:<its gid> 0710.
            os.chmod(self.cfg.runtime_dir, 0o711)
            check_traversable(self.cfg.runtime_dir, None)
        else:
            for d in (self.cfg.runtime_dir, self.cfg.agent_dir.parent):
                check_traversable(d, self.cfg.idmap.host_id)
        pids, memory = cgroups.host_limits()
        cgroups.limit_parent(
            self.cfg.cgroup_parent,
            self.cfg.total_pids_limit or pids,
            (self.cfg.total_memory_mib << 20) if self.cfg.total_memory_mib else memory,
        )
        if reaper.become_subreaper():
            loop = asyncio.get_running_loop()
            self._reaper = reaper.InitReaper(loop, self._is_sandbox_process)
            loop.add_signal_handler(signal.SIGCHLD, self._reaper.on_sigchld)
        self.layers.clean_staging()
        self.volume_binds.release_all()
        self.volumes.recover()
        self.secrets.seal_stored_specs()
        self.gpus.inventory = await asyncio.to_thread(gpu_inventory.discover)
        log.info("GPUs: %s (from %s)", self.gpus.inventory.describe(), self.gpus.inventory.source)
        await self.network.start({row.id for row in self.state.sandboxes_in(CREATING, RUNNING)})
        self.persistents.load()  # before adoption: a session that died meanwhile keeps its files on the way out
        known: set[str] = set()
        for row in self.state.sandboxes_in(CREATING, RUNNING):
            sb = Sandbox(self.ctx, row)
            self.sandboxes[row.id] = sb
            known.add(row.id)
            self._hold_slot(sb)
            if row.state == CREATING:
                sb.load_processes()
                sb.finish_soon(
                    Result(
                        status="init_failure",
                        message="the daemon stopped while creating the sandbox",
                    )
                )
            else:
                await sb.adopt()
        self.sidecars.end_orphans()
        await self.persistents.settle()
        await self._remove_strays(known)
        await image_build.recover(self)
        self._prune_task = asyncio.create_task(self._prune_loop())
        self.usage.start()
        self.pool.start()

    async def _remove_strays(self, known: set[str]) -> None:
        """Containers, mounts and runtime dirs that belong to no live sandbox (a crash mid-teardown)."""
        for runtime in self.ctx.runtimes.values():
            for cid in await runtime.list_ids():
                if cid not in known:
                    log.info("removing stray %s container %s", runtime.name, cid)
                    await runtime.delete(cid)
        for d in self.cfg.run_sandboxes_dir.iterdir():
            if d.name not in known:
                with contextlib.suppress(OSError):
                    rootfs.unmount(str(d / "rootfs"))
                unmount_netns(d / "netns")
                shutil.rmtree(d, ignore_errors=True)
        self.memory_snapshots.prune(leftovers=True)
        for d in self.cfg.sandboxes_dir.iterdir():
            if ids.is_valid(d.name, "sandbox") and self.state.sandbox(d.name) is None:
                shutil.rmtree(d, ignore_errors=True)  # a warm pool's sandbox, never taken, from a crashed daemon
                for name in ("upper", "work", "mounts"):  # mounts: images mounted with sb.mount_image
                    shutil.rmtree(self.cfg.sandboxes_dir / d.name / name, ignore_errors=True)

    def _choose_uid_mode(self) -> tuple[str, str]:
        """Per-sandbox uid ranges where the stored trees can be id-mapped (decision 0063), else the shared one."""
        if self.cfg.uid_ranges == "shared":
            return "shared", "chosen with SHOAL_UID_RANGES=shared"
        why = self._idmap_problem()
        if why is not None:
            if self.cfg.uid_ranges == "per-sandbox":
                raise InvalidError(
                    f"per-sandbox uid ranges need id-mapped mounts, and {why}: put the data directory on"
                    " ext4, xfs, btrfs or tmpfs, or run with SHOAL_UID_RANGES=shared"
                )
            return "shared", f"per-sandbox ranges are off: {why}"
        return (
            "per-sandbox",
            f"{self.cfg.uid_slots} ranges of {idmap.IDS_PER_SANDBOX} ids from"
            f" {UidSlots.ids(self.cfg.uid_first_slot).host_id}",
        )

    def _idmap_problem(self) -> str | None:
        """Why the stored trees (data dir, image caches) cannot be id-mapped here; None: they can."""
        helper = self.cfg.agent_dir / BINARY_NAME
        for d in [self.cfg.data_dir, *self.cfg.image_caches]:
            why = idmap.probe(helper, d, self.cfg.runtime_dir, self.cfg.idmap.host_id)
            if why is not None:
                return why
        return None

    def _check_gvisor(self) -> None:
        """Offer gVisor where runsc is installed and the stored trees can be id-mapped (its sandboxes' files are
        stored through an id-mapped root, decision 0069); refuse to start if it is the default and cannot be."""
        if self.gvisor is not None and self.uid_mode != "per-sandbox":  # else the probe passed already
            why = self._idmap_problem()
            if why is not None:
                self.gvisor, self.gvisor_note = None, f"gVisor sandboxes need id-mapped mounts, and {why}"
        if self.gvisor is not None:
            self.gvisor.helper = str(self.cfg.agent_dir / BINARY_NAME)
            self.ctx.runtimes["gvisor"] = self.gvisor
        elif self.cfg.default_runtime == "gvisor":
            raise InvalidError(f"--default-runtime gvisor, but this daemon cannot run gVisor: {self.gvisor_note}")
        log.info("gVisor: %s", self.gvisor_note)

    def runtime_status(self) -> dict[str, Any]:
        """The runtimes for ``shoal status``: the default, and each kind's binary or why it is missing."""
        kinds: dict[str, Any] = {"runc": {"binary": self.runtime.binary, "name": self.runtime.name}}
        if self.gvisor is not None:
            kinds["gvisor"] = {"binary": self.gvisor.binary, "name": self.gvisor.name, "platform": gvisor.PLATFORM}
        else:
            kinds["gvisor"] = {"missing": self.gvisor_note}
        return {"default": self.cfg.default_runtime, "kinds": kinds}

    def _hold_slot(self, sb: Sandbox) -> None:
        slot = sb.spec.uid_slot
        if slot is None:
            return
        if self.ctx.uids is None or not self.ctx.uids.first <= slot < self.ctx.uids.first + self.ctx.uids.count:
            log.warning("sandbox %s: its uid range (slot %s) is outside this daemon's; it keeps it", sb.id, slot)
            return
        self.ctx.uids.hold(sb.id, slot)

    def _is_sandbox_uid(self, uid: int) -> bool:
        """Whether a host uid is a sandbox's (the shared range's root, or a per-sandbox range)."""
        return uid == self.cfg.idmap.host_id or (self.ctx.uids is not None and self.ctx.uids.is_sandbox_id(uid))

    def _is_sandbox_process(self, pid: int, uid: int) -> bool:
        """Whether an exited child was a sandbox's: a runc init (by its uid) or one of runsc's processes."""
        return self._is_sandbox_uid(uid) or (self.gvisor is not None and self.gvisor.is_ours(pid, uid))

    async def _remove_late_strays(self) -> None:
        """Containers of no sandbox that appeared after the start's sweep: a ``runc create`` that a killed
        daemon (its warm pool) had in flight can finish after the next daemon has looked."""
        try:
            for runtime in self.ctx.runtimes.values():
                for cid in await runtime.list_ids():
                    if cid not in self.sandboxes and ids.is_valid(cid, "sandbox") and self.state.sandbox(cid) is None:
                        log.info("removing stray %s container %s", runtime.name, cid)
                        await runtime.delete(cid)
        except Exception:
            log.exception("removing stray containers failed")

    async def close(self) -> None:
        """Stop managing (sandboxes keep running and are re-adopted by the next daemon)."""
        if self._prune_task is not None:
            self._prune_task.cancel()
        image_base.stop_builds()  # a first base-image bootstrap would otherwise hold the stop for minutes
        await self.usage.close()
        await self.pool.close()
        await self._remove_late_strays()
        teardowns = [t for sb in self.sandboxes.values() if (t := sb.teardown_task) is not None and not t.done()]
        if teardowns:
            # Finish removing ended sandboxes, so no mount or container outlives its record.
            await asyncio.wait(teardowns, timeout=15)
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
        if self._reaper is not None:
            self._reaper.close()
        for sb in self.sandboxes.values():
            sb._close_listener()
            if sb.link is not None:
                sb.link.close_quietly()
        await self.network.close(sandboxes_remain=any(sb.state != FINISHED for sb in self.sandboxes.values()))
        self.state.close()

    async def _prune_loop(self) -> None:
        while True:
            self.prune()
            await asyncio.sleep(600)

    def prune(self) -> None:
        """Forget finished sandboxes older than the retention period; delete abandoned ephemeral volumes."""
        self.volumes.prune_ephemeral()
        if self.ctx.replicas is not None:
            in_use = {
                m.volume_id for sb in self.sandboxes.values() if sb.state != FINISHED for m in sb.spec.request.volumes
            }
            self.ctx.replicas.prune(in_use)
        self.volumes.empty_trash_soon()
        self.memory_snapshots.prune()
        self.persistents.prune()
        cutoff = time.time() - self.cfg.retention_seconds
        keep = self.persistents.last_sessions()
        for sandbox_id in self.state.finished_before(cutoff):
            if sandbox_id in keep:
                continue  # what a paused persistent sandbox shows (``Sandbox.from_id``, its logs)
            self._finished.pop(sandbox_id, None)
            sb = self.sandboxes.pop(sandbox_id, None)
            self.state.delete_sandbox(sandbox_id)
            if sb is not None:
                sb.remove_data()
            else:
                shutil.rmtree(self.cfg.sandboxes_dir / sandbox_id, ignore_errors=True)

    async def reload_volumes(self, sb: Sandbox) -> None:
        """``sb.reload_volumes()``: its copies of other nodes' volumes take in what their homes hold now (this
        node's own volumes are shared directories: nothing to do)."""
        if self.ctx.replicas is None:
            return
        for mount in sb.spec.request.volumes:
            await self.ctx.replicas.reload(mount.volume_id)

    async def volumes_sent(self, sb: Sandbox, timeout: float) -> None:
        """Wait (``timeout`` at most) until a finished sandbox's changes to other nodes' volumes were sent back: a
        program that waited for the sandbox then reads them from the volume."""
        task = sb.teardown_task
        if self.ctx.replicas is None or task is None or task.done() or timeout <= 0:
            return
        if any(self.ctx.replicas.is_replica(m.volume_id) for m in sb.spec.request.volumes if not m.read_only):
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout)

    def _torn_down(self, sb: Sandbox) -> None:
        """A finished sandbox is gone from the machine: from now on the store holds it."""
        if self.sandboxes.get(sb.id) is sb:
            del self.sandboxes[sb.id]
            self._remember_finished(sb)
        self.sidecars.sandbox_ended(sb.id)
        if self.cluster is not None:
            self.cluster.sandbox_ended(sb.id)

    def _remember_finished(self, sb: Sandbox) -> None:
        self._finished[sb.id] = sb
        self._finished.move_to_end(sb.id)
        while len(self._finished) > FINISHED_CACHE:
            self._finished.popitem(last=False)

    # ---------------------------------------------------------------- apps

    def lookup_app(self, name: str, create_if_missing: bool) -> tuple[str, str]:
        """``App.lookup``."""
        found = self.state.app_by_name(name)
        if found:
            return found
        if not create_if_missing:
            raise NotFoundError(f"App '{name}' not found; pass create_if_missing=True to create it")
        app_id = ids.new("app")
        self.state.add_app(app_id, name, ephemeral=False)
        return app_id, name

    def mirror_app(self, app_id: str, name: str | None, ephemeral: bool) -> str | None:
        """Record an app another node of the cluster made, under its id, if this node lacks it; its name too unless
        an app of this node has it already.  The name it has here."""
        if not ids.is_valid(app_id, "app"):
            raise InvalidError(f"{app_id!r} is not an app id")
        found = self.state.app_by_id(app_id)
        if found is not None:
            return found[1]
        if name is not None and self.state.app_by_name(name) is not None:
            name = None
        self.state.add_app(app_id, name, ephemeral=ephemeral)
        return name

    def create_ephemeral_app(self, name: str | None) -> str:
        """An app that lives for one ``app.run()`` block."""
        app_id = ids.new("app")
        self.state.add_app(app_id, None, ephemeral=True)
        return app_id

    async def stop_app(self, app_id: str) -> None:
        """``app.stop()`` (and the end of ``app.run()``): terminate the app's sandboxes; the app stays known."""
        self.app(app_id)
        self.state.set_app_stopped(app_id, time.time())
        await self.persistents.stop_app(app_id)  # for good: a paused one would otherwise outlive its app
        await asyncio.gather(*(sb.terminate() for sb in self.sandboxes.values() if sb.row.app_id == app_id))

    def app(self, app_id: str) -> AppRow:
        """An app, or NotFoundError."""
        row = self.state.app_row(app_id) if ids.is_valid(app_id, "app") else None
        if row is None:
            raise NotFoundError(f"App {app_id!r} not found")
        return row

    def set_app_tags(self, app_id: str, tags: dict[str, str]) -> None:
        """``app.set_tags``: replace the app's tags."""
        self.app(app_id)
        self.state.set_app_tags(app_id, dict(tags))

    def running_in_app(self, app_id: str) -> int:
        """How many of the app's sandboxes are creating or running."""
        return sum(1 for sb in self.sandboxes.values() if sb.row.app_id == app_id and sb.state != FINISHED)

    def app_log_sources(self, app_id: str) -> list[tuple[str, Path, dict[int, Path]]]:
        """For ``app.logs``: each of the app's sandboxes whose logs are kept, as (id, data dir, entrypoint output
        files by descriptor)."""
        self.app(app_id)
        out = []
        for row in self.state.sandboxes_in(CREATING, RUNNING, FINISHED):
            if row.app_id == app_id:
                data_dir = self.cfg.sandboxes_dir / row.id
                out.append((row.id, data_dir, {fd: data_dir / "out" / f"{ENTRYPOINT_ID}.{fd}" for fd in (1, 2)}))
        return out

    # ---------------------------------------------------------------- sandboxes

    async def create(
        self,
        req: CreateSandbox,
        image_log: Callable[[str], None],
        *,
        build: bool = False,
        on_admitted: Callable[[Sandbox], None] | None = None,
    ) -> Sandbox:
        """``Sandbox.create``: returns once the sandbox runs.  ``build``: an image build sandbox (no entrypoint).

        ``on_admitted`` is called with the sandbox once every check has passed and it is listed (CREATING), before
        its container starts: a caller may hand out its id then (``sb.settled`` is set once the start ends)."""
        started = time.monotonic()
        try:
            self._check_capacity()
            self._starting += 1
            try:
                sb, pooled = await self._create(req, image_log, build=build, on_admitted=on_admitted)
            finally:
                self._starting -= 1
        except Exception as exc:
            if not build:
                self.metrics.create_failures.labels(type(exc).__name__).inc()
            raise
        if not build:
            runtime = sb.spec.runtime or "runc"
            if self.cluster is not None:
                self.cluster.sandbox_started(sb.id, sb.info().model_dump(mode="json"))
            self.metrics.creates.labels(runtime, "pool" if pooled else "cold").inc()
            self.metrics.create_seconds.labels(runtime).observe(time.monotonic() - started)
        return sb

    def _runtime_for(self, req: CreateSandbox, build: bool) -> str:
        """What the sandbox runs under: what it asks, else what it needs (gVisor for memory snapshots, runc for
        GPUs), else the daemon's default; build steps run under runc."""
        if build:
            return "runc"
        kind: str | None = req.runtime
        if kind is None:
            # Unset: what the request needs decides first (memory snapshots need gVisor; GPUs need runc here).
            if req.enable_snapshot and self.gvisor:
                kind = "gvisor"
            elif req.gpu is not None:
                kind = "runc"
            else:
                kind = self.cfg.default_runtime
        if kind == "gvisor":
            if self.gvisor is None:
                raise InvalidError(f"this daemon cannot run gVisor sandboxes: {self.gvisor_note}")
            if req.gpu is not None:
                raise InvalidError(
                    "GPUs cannot be passed into a gVisor sandbox here: that needs runsc's nvproxy, which this runsc"
                    " (Debian's) does not have; leave runtime unset, or use runtime='runc', for a GPU sandbox"
                )
        return kind

    def _check_outbound_policy(self, req: CreateSandbox) -> None:
        """Refuse, before any image work, an outbound policy this daemon cannot apply."""
        if not self.network.enabled:
            raise InvalidError("this daemon runs with networking off: there is no outbound HTTPS to add headers to")
        assert req.outbound_headers is not None
        try:
            self.network.resolve_policy([r.model_dump(mode="json") for r in req.outbound_headers])
        except KeyError as exc:
            raise InvalidError(
                f"an outbound policy header names the secret key ${exc.args[0]}, which its secret does not hold"
            ) from None

    async def _create(
        self,
        req: CreateSandbox,
        image_log: Callable[[str], None],
        *,
        build: bool,
        on_admitted: Callable[[Sandbox], None] | None,
    ) -> tuple[Sandbox, bool]:
        """The sandbox, running, and whether the warm pool gave it."""
        req = req.model_copy(update={"runtime": self._runtime_for(req, build)})
        if self.state.app_by_id(req.app_id) is None:
            raise NotFoundError(f"App {req.app_id} not found: look it up with App.lookup(name, create_if_missing=True)")
        unmatched = {k: v for k, v in (req.node_labels or {}).items() if self.cfg.node_labels.get(k) != v}
        if unmatched:
            raise InvalidError(
                f"this daemon (node {self.cfg.node_name}, labels {self.cfg.node_labels or 'none'}) lacks the labels"
                f" {unmatched} the create asks for: start it with --node-labels, or join it to a cluster that has such"
                " a node (--ray)"
            )
        if req.name is not None:
            for sb in self.sandboxes.values():
                if sb.row.app_id == req.app_id and sb.row.name == req.name and sb.state != FINISHED:
                    raise AlreadyExistsError(f"a running sandbox of this app is already named {req.name!r}")
        gpu_req = gpu_request.parse(req.gpu) if req.gpu is not None else None
        if gpu_req is not None:  # fail before any image work when the GPUs cannot be had
            gpu_scheduler.check_runtime(self.runtime.name, self.runtime.binary)
            self.gpus.choose(gpu_req, self.gpu_holders())
        check_mounts(req.volumes)
        for mount in req.volumes:
            if self.ctx.replicas is not None:
                await self.ctx.replicas.ensure(mount.volume_id)  # another node's volume: a copy, in step
            self.volumes.get(mount.volume_id)  # NotFoundError before any image work
        secret_env = {**self.secrets.resolve(req.secret_ids), **req.secret_env}
        if req.outbound_headers is not None:
            self._check_outbound_policy(req)
        image_id, image = await self.images.resolve(req.image, image_log)
        spec = SandboxSpec(
            request=req.model_copy(update={"secret_env": {}}),  # secrets are stored sealed (below), never in the clear
            image_id=image_id,
            image_env=dict(image.env),
            image_workdir=image.workdir,
            image_user=image.user,
            image_layers=list(image.layers),
        )
        if gpu_req is not None:
            # No await from here until the sandbox is in self.sandboxes: that is what reserves its GPUs.
            spec.gpu_plan = self.gpus.plan(gpu_req, self.gpu_holders(), image.env)
        now = time.time()
        pooled = None if build or gpu_req is not None else self.pool.take(image_id, req)
        sandbox_id = pooled.id if pooled is not None else ids.new("sandbox")
        try:
            if pooled is not None:
                spec.uid_slot = pooled.spec.uid_slot
            elif self.ctx.uids is not None:
                spec.uid_slot = self.ctx.uids.take(sandbox_id)  # stored with the row: kept across a kill -9
            if secret_env:
                spec.sealed_env = self.secrets.seal_sandbox_env(sandbox_id, secret_env)
            row = SandboxRow(
                id=sandbox_id,
                app_id=req.app_id,
                name=req.name,
                tags=dict(req.tags),
                spec=spec,
                state=CREATING,
                token=new_token(),
                created_at=now,
                deadline=now + req.timeout,
            )
            self.state.add_sandbox(row)
        except BaseException:
            if pooled is not None:
                await pooled.discard()  # taken from the pool, but no row: nothing else would remove it
            elif self.ctx.uids is not None:
                self.ctx.uids.release(sandbox_id, spec.uid_slot)
            raise
        if pooled is not None:
            self.sandboxes[row.id] = pooled
            pooled.claim(row)
            if on_admitted is not None:
                on_admitted(pooled)
            await pooled.activate(req, image)
            return pooled, True
        sb = Sandbox(self.ctx, row)
        self.sandboxes[row.id] = sb
        if on_admitted is not None:
            on_admitted(sb)
        started = dataclasses.replace(image, cmd=None, entrypoint=None) if build else image
        await sb.start(req, started, self.images.lowers(image))
        return sb, False

    def _live(self) -> int:
        """Sandboxes running, and creates in progress (counted once, whether or not they are listed yet)."""
        return sum(1 for sb in self.sandboxes.values() if sb.state is RUNNING) + self._starting

    def knows(self, sandbox_id: str) -> bool:
        """Whether this daemon runs or ran ``sandbox_id`` (or holds the persistent sandbox of that id)."""
        return (
            sandbox_id in self.sandboxes
            or sandbox_id in self._finished
            or self.persistents.record(sandbox_id) is not None
            or (ids.is_valid(sandbox_id, "sandbox") and self.state.sandbox(sandbox_id) is not None)
        )

    def live_count(self) -> int:
        """Sandboxes running or starting (what a cluster's placement weighs)."""
        return self._live()

    def _check_capacity(self) -> None:
        """Refuse a create past the daemon's ceiling (in a cluster, its node's ``shoal_slot`` Ray resource too) or the
        host's room (processes, memory, disk)."""
        limit = self._limit()
        live = self._live()
        if live >= limit:
            how = (
                "raise the limit with `shoal serve --max-sandboxes N` (or $SHOAL_MAX_SANDBOXES)"
                if limit == self.cfg.max_sandboxes
                else "start this node's Ray with more of the `shoal_slot` resource"
            )
            raise ResourceExhaustedError(
                f"this daemon holds at most {limit} sandboxes and {live} are running or starting: end some, or {how}"
            )
        host_room.check(host_room.measure(self.cfg.cgroup_parent, self.cfg.data_dir), self.cfg.min_free_disk_mib << 20)

    def _limit(self) -> int:
        slots = self.cluster.slots if self.cluster is not None else None
        return min(self.cfg.max_sandboxes, slots) if slots else self.cfg.max_sandboxes

    def capacity(self) -> dict[str, int]:
        """How many more sandboxes this daemon and the host take (``shoal status``)."""
        live = self._live()
        limit = self._limit()
        room = {"max_sandboxes": limit, "live": live, "left": max(0, limit - live)}
        room.update(host_room.measure(self.cfg.cgroup_parent, self.cfg.data_dir).as_dict())
        if self.ctx.uids is not None:
            room["uid_slots"] = self.ctx.uids.count
            room["uid_slots_left"] = self.ctx.uids.free
            room["left"] = min(room["left"], self.ctx.uids.free)
            return room
        keys = host_limits.key_quota_left(self.cfg.idmap.host_id)
        if keys is not None:
            room["key_quota_left"] = keys
            room["left"] = min(room["left"], keys)
        return room

    def uid_ranges(self) -> dict[str, Any]:
        """How sandboxes' ids map to the host's (``shoal status``)."""
        out: dict[str, Any] = {"mode": self.uid_mode, "note": self.uid_note}
        if self.ctx.uids is not None:
            out.update(first_host_id=UidSlots.ids(self.ctx.uids.first).host_id, ids_per_sandbox=idmap.IDS_PER_SANDBOX)
        else:
            out.update(first_host_id=self.cfg.idmap.host_id, ids_per_sandbox=self.cfg.idmap.size)
        return out

    def gpu_holders(self) -> dict[str, str]:
        """GPU key → id of the sandbox holding it: every sandbox whose container is not yet removed."""
        return gpu_scheduler.held_gpus(
            (sb.id, sb.spec.gpu_plan)
            for sb in self.sandboxes.values()
            if sb.state != FINISHED or (sb.teardown_task is not None and not sb.teardown_task.done())
        )

    async def started(self, sandbox_id: str) -> Sandbox:
        """A sandbox by id once its start has ended (a create that answered early may still be starting it)."""
        sb = self.get(sandbox_id)
        await sb.settled.wait()
        return sb

    def get(self, sandbox_id: str) -> Sandbox:
        """A sandbox by id (running or retained), or NotFoundError."""
        sb = self.sandboxes.get(sandbox_id) or self._finished.get(sandbox_id)
        if sb is not None:
            if sb.state == FINISHED and sb.id in self._finished:
                self._finished.move_to_end(sb.id)
            return sb
        if not ids.is_valid(sandbox_id, "sandbox"):
            raise NotFoundError(f"Sandbox {sandbox_id!r} not found (not a sandbox id)")
        row = self.state.sandbox(sandbox_id)
        if row is None:
            raise NotFoundError(f"Sandbox {sandbox_id} not found")
        sb = Sandbox(self.ctx, row)
        if sb.state == FINISHED:
            self._remember_finished(sb)  # its processes are read from the store when asked for
        else:
            # Only after a crash: a sandbox recorded as live that this daemon did not adopt.
            sb.load_processes()
            self.sandboxes[sandbox_id] = sb
        return sb

    def from_name(self, app_name: str, name: str, include_terminated: bool = False) -> Sandbox:
        """The running sandbox called ``name`` in the app called ``app_name``; with ``include_terminated``, the
        most recently created one that ended when none runs (finished sandboxes are kept for the retention time)."""
        app = self.state.app_by_name(app_name)
        if app is None:
            raise NotFoundError(f"App '{app_name}' not found")
        for sb in self.sandboxes.values():
            if sb.row.app_id == app[0] and sb.row.name == name and sb.state == RUNNING:
                return sb
        if include_terminated:
            ended = [r for r in self.state.sandboxes_in(FINISHED) if r.app_id == app[0] and r.name == name]
            if ended:
                row = max(ended, key=lambda r: r.created_at)
                return self.sandboxes.get(row.id) or self._finished.get(row.id) or Sandbox(self.ctx, row)
        raise NotFoundError(f"no running sandbox named {name!r} in app '{app_name}'")

    def list(self, app_id: str | None, tags: dict[str, str], include_finished: bool) -> list[SandboxInfo]:
        """Sandboxes (running only unless asked), newest first, with at least ``tags``."""
        states = (CREATING, RUNNING, FINISHED) if include_finished else (RUNNING,)
        out = []
        for row in self.state.sandboxes_in(*states):
            if app_id and row.app_id != app_id:
                continue
            if row.spec.request.sidecar_of is not None:
                continue  # listed with its sandbox (sb._experimental_sidecars.list())
            if row.spec.request.persistent_of is not None:
                continue  # a persistent sandbox's session: the sandbox is listed once, under its object id
            if any(row.tags.get(k) != v for k, v in tags.items()):
                continue
            sb = self.sandboxes.get(row.id)
            out.append(sb.info() if sb else Sandbox(self.ctx, row).info())
        if not tags:  # (persistent sandboxes have no tags)
            out += self.persistents.listed(app_id, include_finished)
            out.sort(key=lambda info: info.created_at_us, reverse=True)
        return out

    def set_name(self, sandbox_id: str, name: str) -> None:
        """``sb._experimental_set_name``: name a running sandbox created without one (once; the same name again is a
        no-op), unique among the app's running sandboxes."""
        sb = self.get(sandbox_id)
        if sb.row.name == name:
            return
        if sb.state == FINISHED:
            raise ConflictError(f"Sandbox {sb.id} has finished: it can no longer be named")
        if sb.row.name is not None:
            raise ConflictError(f"Sandbox {sb.id} is already named {sb.row.name!r}: a name is set once")
        for other in self.sandboxes.values():
            if other.row.app_id == sb.row.app_id and other.row.name == name and other.state != FINISHED:
                raise AlreadyExistsError(f"a running sandbox of this app is already named {name!r}")
        sb.row.name = name
        self.state.set_name(sb.id, name)

    def set_tags(self, sandbox_id: str, tags: dict[str, str]) -> None:
        """Replace a sandbox's tags."""
        sb = self.get(sandbox_id)
        sb.row.tags = dict(tags)
        self.state.set_tags(sandbox_id, sb.row.tags)

    # ---------------------------------------------------------------- processes

    async def exec(self, sandbox_id: str, req: ExecRequest, *, persist: bool = True) -> Process:
        """Start a process (idempotent on ``req.exec_id``)."""
        sb = self.get(sandbox_id)
        exec_id = req.exec_id or ids.new("exec")
        if not ids.EXEC_ID_RE.match(exec_id) or exec_id == ENTRYPOINT_ID:
            raise InvalidError(f"invalid exec id {exec_id!r}: use 1-64 letters, digits, '-', '_' or '.'")
        if req.secret_ids:
            req = req.model_copy(update={"secret_env": {**self.secrets.resolve(req.secret_ids), **req.secret_env}})
        started = time.monotonic()
        proc = await sb.exec(req, exec_id, persist=persist)
        self.metrics.exec_seconds.labels(sb.spec.runtime or "runc").observe(time.monotonic() - started)
        return proc
