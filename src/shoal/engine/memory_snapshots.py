"""Memory snapshots of gVisor sandboxes (``sb._experimental_snapshot()``) and sandboxes restored from them
(``Sandbox._experimental_from_snapshot``): a fork of a running sandbox whose processes carry on.

Taking one (the sandbox keeps running; it is frozen for the time of the copy):

1. the agent is suspended: it finishes the frame it is sending and sends nothing more, so the checkpoint holds
   no frame half sent;
2. the Sentry freezes every task (a Pause through its control socket, decision 0073); the filesystem becomes an
   image (``snapshot_filesystem``'s copy of the upper directory, consistent because nothing runs), and ``runsc
   checkpoint --leave-running`` saves the kernel's state and memory (files stay on the host, named by path);
3. the caller has its answer; then the Sentry's Resume and the agent's RESUME let the sandbox go on (what was sent
   to the agent meanwhile follows RESUME; a second snapshot of the same sandbox waits for this).

Restoring one starts a new sandbox from the snapshot's image with the snapshotted sandbox's create request (its
volumes, network settings, limits), its own id, address and uid slot, and ``runsc restore`` instead of ``run``.
The restored agent is still suspended; its standard input, the control socket, is the new sandbox's: RESUME
with the "restored" flag makes it number its streams anew and say HELLO with the old sandbox's token (so that
token is the new sandbox's too, as each sandbox's reconnection socket is its own).  The processes running at
the snapshot are recorded as the new sandbox's, so ``sb.wait()`` and ``sb.stdout`` follow its entrypoint.

Stored under ``<data dir>/memory-snapshots/<id>/``: ``meta.json`` and ``checkpoint/``; the filesystem is an image
in the image store.  Both expire after ``RETENTION`` (Modal keeps memory snapshots 7 days).

A sandbox re-adopted after a daemon restart talks to its agent over a host socket, which gVisor cannot save: its
agent "parks" (closes that socket once SUSPENDED is sent) and reconnects once the checkpoint is taken; a restored
copy reaches it through the descriptor it was first started with (see agent.c).  Decision 0070 records what this
does not carry (connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.engine.process import ENTRYPOINT_ID
from shoal.engine.sandbox import Sandbox
from shoal.exception import AlreadyExistsError, ExecutionError, InvalidError, NotFoundError
from shoal.images import usage
from shoal.runtime import host_room
from shoal.store.spec import SandboxSpec
from shoal.store.state import ExecRow, SandboxRow
from shoal.wire import ids
from shoal.wire.images import ImageRef
from shoal.wire.sandboxes import Result, SandboxState
from shoal.wire.snapshots import MemorySnapshotInfo

if TYPE_CHECKING:
    from shoal.engine.manager import Manager

log = logging.getLogger(__name__)

RETENTION = 7 * 24 * 3600
"""Seconds a memory snapshot (and its filesystem image) is kept."""
SUSPEND_TIMEOUT = 10.0
"""Seconds the agent has to finish the frame it is sending."""
COPY_TIMEOUT = 55
"""Seconds the filesystem copy may take (as ``snapshot_filesystem``'s default)."""
DIR_NAME = "memory-snapshots"


@dataclass
class SnapshotMeta:
    """What a restore needs besides the checkpoint: the snapshotted sandbox's request, token and processes."""

    info: MemorySnapshotInfo
    name: str | None
    tags: dict[str, str]
    spec: dict[str, Any]
    token: str
    execs: list[dict[str, Any]]
    """``{"id", "spec"}`` of each process running when it was taken."""

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {
            "info": self.info.model_dump(mode="json"),
            "name": self.name,
            "tags": self.tags,
            "spec": self.spec,
            "token": self.token,
            "execs": self.execs,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SnapshotMeta:
        """Inverse of ``to_json``."""
        return cls(
            info=MemorySnapshotInfo.model_validate(raw["info"]),
            name=raw.get("name"),
            tags=dict(raw.get("tags") or {}),
            spec=dict(raw["spec"]),
            token=str(raw["token"]),
            execs=list(raw.get("execs") or []),
        )


class MemorySnapshots:
    """Memory snapshots of one daemon."""

    def __init__(self, mgr: Manager) -> None:
        self.mgr = mgr
        self.root = mgr.cfg.data_dir / DIR_NAME
        self._locks: dict[str, asyncio.Lock] = {}
        self._resuming: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ taking

    async def take(self, sandbox_id: str) -> MemorySnapshotInfo:
        """``sb._experimental_snapshot()``: the sandbox keeps running."""
        sb = await self.mgr.snapshots._running(sandbox_id)
        if not sb.gvisor:
            raise InvalidError(
                f"sandbox {sb.id} runs under runc, which cannot save a running sandbox's memory on this host (CRIU"
                " does not work here): create it with runtime='gvisor' (or _experimental_enable_snapshot=True)"
            )
        await sb._await_agent()  # after a daemon restart: its version and connection are known once it is back
        if not sb.agent_on_stdin and not sb.can_park:
            raise ExecutionError(
                f"sandbox {sb.id} cannot be snapshotted: it was started by an older shoal, whose agent cannot let go"
                " of the host socket it reconnected over after a daemon restart (gVisor cannot save one); sandboxes"
                " started (or restored) by this version can be"
            )
        # Its checkpoint and image go to the data directory: keep the reserve a create keeps (processes and memory
        # are the sandbox's own already).
        cfg = self.mgr.cfg
        room = host_room.measure(cfg.cgroup_parent, cfg.data_dir)
        host_room.check(dataclasses.replace(room, pids_left=None, memory_left=None), cfg.min_free_disk_mib << 20)
        # One snapshot of a sandbox at a time: the next waits until the previous one has let the sandbox go.
        lock = self._locks.setdefault(sb.id, asyncio.Lock())
        await lock.acquire()
        try:
            return await self._take(sb, lock)
        except BaseException:
            if lock.locked():
                lock.release()
            raise

    async def _take(self, sb: Sandbox, lock: asyncio.Lock) -> MemorySnapshotInfo:
        """Suspend, pause, copy, checkpoint; answer, and resume in the background (``_resume``), which releases
        ``lock`` (on failure the sandbox is resumed here, and the caller releases it)."""
        snapshot_id = ids.new("memory_snapshot")
        staged = self.root / f".{snapshot_id}.tmp"
        staged.mkdir(parents=True, mode=0o700)
        t0 = time.monotonic()
        marks: list[tuple[str, float]] = []

        def mark(phase: str) -> None:
            marks.append((phase, time.monotonic()))

        try:
            # After a daemon restart the agent's connection is a host socket, which gVisor cannot save: it parks.
            await sb.suspend_agent(SUSPEND_TIMEOUT, park=not sb.agent_on_stdin)
            mark("suspend")
            paused = False
            try:
                execs = [
                    {"id": row.id, "spec": row.spec}
                    for row in self.mgr.state.execs(sb.id, unfinished=True)
                    if row.exit_kind is None
                ]
                await sb.runtime.pause(sb.container_id)
                paused = True
                mark("pause")
                image_id = await self.mgr.snapshots.filesystem(sb.id, COPY_TIMEOUT, RETENTION)
                mark("files")
                await sb.runtime.checkpoint(sb.container_id, str(staged / "checkpoint"))
                mark("checkpoint")
            except BaseException:
                if paused:
                    await sb.runtime.resume(sb.container_id)
                elif sb.runtime.frozen(sb.container_id) == "pausing":
                    # The Sentry's answer was lost: it may be paused, and a resume too many would panic it.
                    sb.finish_soon(Result(status="terminated", message="it could not be paused for a snapshot"))
                    raise
                await sb.resume_agent()
                raise
            now = time.time()
            info = MemorySnapshotInfo(
                snapshot_id=snapshot_id,
                sandbox_id=sb.id,
                app_id=sb.row.app_id,
                image_id=image_id,
                created_at=now,
                expires_at=now + RETENTION,
                size=usage.tree_bytes(staged / "checkpoint"),
            )
            meta = SnapshotMeta(
                info=info,
                name=sb.row.name,
                tags=dict(sb.row.tags),
                spec=sb.spec.to_json(),
                token=sb.row.token.hex(),
                execs=execs,
            )
            (staged / "meta.json").write_text(json.dumps(meta.to_json()))
            os.rename(staged, self.root / snapshot_id)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staged, True)
            raise
        task = asyncio.create_task(self._resume(sb, lock, snapshot_id, t0, marks))
        self._resuming.add(task)
        task.add_done_callback(self._resuming.discard)
        return info

    async def _resume(
        self, sb: Sandbox, lock: asyncio.Lock, snapshot_id: str, t0: float, marks: list[tuple[str, float]]
    ) -> None:
        """After the answer: thaw the sandbox and the agent (what was sent to it meanwhile follows RESUME).  A
        sandbox that cannot be resumed is ended: it would never run again."""
        try:
            await sb.runtime.resume(sb.container_id)
            marks.append(("resume", time.monotonic()))
            await sb.resume_agent()
        except Exception as exc:
            if sb.state is SandboxState.RUNNING:
                log.error("sandbox %s: could not resume after memory snapshot %s: %s", sb.id, snapshot_id, exc)
                sb.finish_soon(Result(status="terminated", message=f"it could not be resumed after a snapshot: {exc}"))
        finally:
            lock.release()
        steps, last = [], t0
        for phase, at in marks:
            steps.append(f"{phase} {(at - last) * 1000:.0f}")
            last = at
        log.info(
            "sandbox %s: memory snapshot %s in %.0f ms (%s ms)",
            sb.id,
            snapshot_id,
            (marks[-1][1] - t0) * 1000,
            ", ".join(steps),
        )

    # ------------------------------------------------------------ restoring

    async def restore(self, snapshot_id: str, name: str | None, keep_name: bool) -> Sandbox:
        """``Sandbox._experimental_from_snapshot(snapshot)``: a new sandbox whose processes carry on."""
        meta = self._meta(snapshot_id)
        mgr = self.mgr
        if mgr.gvisor is None:
            raise InvalidError(f"this daemon cannot run gVisor sandboxes: {mgr.gvisor_note}")
        old = SandboxSpec.from_json(meta.spec, meta.info.sandbox_id)
        new_name = meta.name if keep_name else name
        req = old.request.model_copy(
            # A snapshotted sidecar comes back as a sandbox of its own: its sandbox is not part of the snapshot.
            update={
                "image": ImageRef(kind="id", image_id=meta.info.image_id),
                "name": new_name,
                "sidecar_of": None,
                "sidecar_name": None,
            }
        )
        if mgr.state.app_by_id(req.app_id) is None:
            raise NotFoundError(f"App {req.app_id} of memory snapshot {snapshot_id} no longer exists")
        if new_name is not None:
            for other in mgr.sandboxes.values():
                if (
                    other.row.app_id == req.app_id
                    and other.row.name == new_name
                    and other.state != SandboxState.FINISHED
                ):
                    raise AlreadyExistsError(
                        f"a running sandbox of this app is already named {new_name!r}: restore with name=None or"
                        " another name"
                    )
        mgr._check_capacity()
        mgr._starting += 1
        try:
            image_id, image = await mgr.images.resolve(req.image, lambda line: None)
            spec = SandboxSpec(
                request=req,
                image_id=image_id,
                image_env=dict(image.env),
                image_workdir=image.workdir,
                image_user=image.user,
                image_layers=list(image.layers),
                one_shoal_mount=old.one_shoal_mount,  # the checkpoint restores only into the mounts it had
            )
            sandbox_id = ids.new("sandbox")
            secret_env = mgr.secrets.open_sandbox_env(meta.info.sandbox_id, old) if old.sealed_env else {}
            if secret_env:
                spec.sealed_env = mgr.secrets.seal_sandbox_env(sandbox_id, secret_env)
            if mgr.ctx.uids is not None:
                spec.uid_slot = mgr.ctx.uids.take(sandbox_id)  # released by the sandbox's teardown from here on
            now = time.time()
            row = SandboxRow(
                id=sandbox_id,
                app_id=req.app_id,
                name=new_name,
                tags=dict(meta.tags),
                spec=spec,
                state=SandboxState.CREATING,
                token=bytes.fromhex(meta.token),
                created_at=now,
                deadline=now + req.timeout,
            )
            mgr.state.add_sandbox(row)
            sb = Sandbox(mgr.ctx, row)
            mgr.sandboxes[row.id] = sb
            carried = [ExecRow(meta.info.sandbox_id, e["id"], e["spec"], "running", now) for e in meta.execs]
            if not any(e.id == ENTRYPOINT_ID for e in carried):
                # The entrypoint had ended: this sandbox's streams are empty and it runs until its timeout.
                carried.append(ExecRow(meta.info.sandbox_id, ENTRYPOINT_ID, _PLACEHOLDER, "running", now))
            t0 = time.monotonic()
            await sb.start_restored(req, mgr.images.lowers(image), self.root / snapshot_id / "checkpoint", carried)
        finally:
            mgr._starting -= 1
        log.info("sandbox %s: restored from %s in %.0f ms", sb.id, snapshot_id, (time.monotonic() - t0) * 1000)
        return sb

    # ------------------------------------------------------------ listing

    def _meta(self, snapshot_id: str) -> SnapshotMeta:
        if not ids.is_valid(snapshot_id, "memory_snapshot"):
            raise NotFoundError(f"SandboxSnapshot {snapshot_id!r} not found (not a snapshot id)")
        try:
            raw = json.loads((self.root / snapshot_id / "meta.json").read_text())
        except FileNotFoundError:
            raise NotFoundError(f"SandboxSnapshot {snapshot_id} not found") from None
        meta = SnapshotMeta.from_json(raw)
        if meta.info.expires_at is not None and meta.info.expires_at < time.time():
            raise NotFoundError(f"SandboxSnapshot {snapshot_id} expired (memory snapshots are kept 7 days)")
        return meta

    def get(self, snapshot_id: str) -> MemorySnapshotInfo:
        """One snapshot, or NotFoundError."""
        return self._meta(snapshot_id).info

    def list(self) -> list[MemorySnapshotInfo]:
        """Every snapshot kept, newest first."""
        out = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(NotFoundError, OSError, ValueError, KeyError):
                    out.append(self._meta(entry.name).info)
        return sorted(out, key=lambda i: i.created_at, reverse=True)

    async def delete(self, snapshot_id: str) -> None:
        """Remove a snapshot (its filesystem image stays until it expires or is removed)."""
        if not ids.is_valid(snapshot_id, "memory_snapshot"):
            raise NotFoundError(f"SandboxSnapshot {snapshot_id!r} not found (not a snapshot id)")
        path = self.root / snapshot_id
        if not path.is_dir():
            raise NotFoundError(f"SandboxSnapshot {snapshot_id} not found")
        gone = self.root / f".{snapshot_id}.deleted"
        os.rename(path, gone)
        await asyncio.to_thread(shutil.rmtree, gone, True)

    def prune(self, *, leftovers: bool = False) -> int:
        """Remove expired snapshots (and, ``leftovers``: what interrupted ones left, at start-up); how many went."""
        for sandbox_id in [k for k, lock in self._locks.items() if k not in self.mgr.sandboxes and not lock.locked()]:
            del self._locks[sandbox_id]
        removed = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                if leftovers:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                expires = json.loads((path / "meta.json").read_text())["info"].get("expires_at")
            except (OSError, ValueError, KeyError):
                continue
            if expires is not None and expires < now:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed


_PLACEHOLDER: dict[str, Any] = {"args": [], "workdir": None, "timeout": None, "pty": False}
