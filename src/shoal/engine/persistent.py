"""Persistent sandboxes (``Sandbox.create(_experimental_persistent=True)``), as modal 1.6 has them.

A persistent sandbox runs as a sequence of ordinary sandboxes, its *sessions*.  Its object id is its first
session's id; its ``ps-…`` id names the sequence.  A session ends when it is paused (``_experimental_pause``),
times out (an hour) or idles (five minutes), or when its entrypoint exits; on the way out its filesystem becomes
the *exit snapshot* (an image), and the next session (``_experimental_resume``, or any call that needs a running
sandbox) starts from it with the same definition: processes start afresh, files carry on.  Terminating a
persistent sandbox ends it for good (and drops its exit snapshot); until then it is running to ``poll``/``wait``.

Calls addressed to the object id reach the session that can answer them (``session_for``): the running one
(started first when none runs, for calls that need one), or, for a process, the session that ran it.  Records
live in ``<data dir>/persistent/<ps-id>.json`` (the secret environment sealed) and survive a daemon restart.
Decision 0072 records the choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from shoal.engine.process import ENTRYPOINT_ID
from shoal.exception import ConflictError, Error, InvalidError, NotFoundError
from shoal.wire import ids
from shoal.wire.images import ImageRef
from shoal.wire.sandboxes import CreateSandbox, PersistentInfo, Result, SandboxInfo, SandboxState
from shoal.wire.times import micros

if TYPE_CHECKING:
    from collections.abc import Callable

    from shoal.engine.manager import Manager
    from shoal.engine.sandbox import Sandbox

log = logging.getLogger(__name__)

SESSION_TIMEOUT = 60 * 60
"""A session's lifetime (modal 1.6's); one that reaches it is paused, and resumed on next use."""
SESSION_IDLE_TIMEOUT = 5 * 60
"""A session with no activity this long is paused (modal 1.6's)."""
RETENTION = 7 * 24 * 3600
"""Seconds a terminated persistent sandbox's record is kept (for ``poll``/``wait`` on it)."""
EXIT_SNAPSHOT_TIMEOUT = 600.0


@dataclass
class Record:
    """One persistent sandbox, as stored."""

    persistent_id: str
    sandbox_id: str = ""
    """The object id: the first session's id (empty until that session exists)."""
    app_id: str = ""
    definition: dict[str, Any] = field(default_factory=dict)
    """The ``CreateSandbox`` every session starts from (without secrets)."""
    sealed_env: str = ""
    """The secret environment, sealed for this record."""
    session_id: str | None = None
    """The running session, None while paused."""
    sessions: list[str] = field(default_factory=list)
    exit_image: str | None = None
    """The last session's filesystem (an image id), which the next one starts from."""
    created_at: float = 0.0
    terminated_at: float | None = None


def check_request(req: CreateSandbox) -> None:
    """Refuse what modal 1.6 refuses for a persistent sandbox (with its words)."""
    if req.name is not None:
        raise InvalidError("Named persistent Sandboxes are not supported yet.")
    if req.gpu is not None or req.pty:
        raise InvalidError("GPUs, network file systems and PTYs are not supported by persistent Sandboxes yet.")
    if req.enable_snapshot:
        raise InvalidError("Memory snapshots are not supported by persistent Sandboxes.")
    if req.tags:
        raise InvalidError("`tags` are not supported by persistent Sandboxes yet.")


class Persistents:
    """The daemon's persistent sandboxes."""

    def __init__(self, mgr: Manager) -> None:
        self.mgr = mgr
        self.root = mgr.cfg.data_dir / "persistent"
        self._records: dict[str, Record] = {}
        """By persistent id."""
        self._by_object: dict[str, str] = {}
        """Object id → persistent id."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed: dict[str, asyncio.Event] = {}

    # ------------------------------------------------------------ records

    def load(self) -> None:
        """Read the records (at start, before sessions are re-adopted)."""
        self._ensure_root()
        for path in sorted(self.root.glob("ps-*.json")):
            try:
                rec = Record(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("ignoring unreadable persistent sandbox record %s: %s", path.name, exc)
                continue
            self._index(rec)

    def _ensure_root(self) -> None:
        # Records hold a sandbox's definition (its arguments and environment): root's alone, as sandboxes' data.
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def _index(self, rec: Record) -> None:
        self._records[rec.persistent_id] = rec
        if rec.sandbox_id:
            self._by_object[rec.sandbox_id] = rec.persistent_id

    def _save(self, rec: Record) -> None:
        path = self.root / f"{rec.persistent_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(rec)))
        os.replace(tmp, path)
        self._changed.setdefault(rec.persistent_id, asyncio.Event()).set()
        self._changed[rec.persistent_id] = asyncio.Event()

    def object_id(self, persistent_id: str) -> str:
        """The object id of the persistent sandbox ``ps-…`` (its first session's id), or NotFoundError."""
        rec = self._records.get(persistent_id)
        if rec is None or not rec.sandbox_id:
            raise NotFoundError(f"persistent Sandbox {persistent_id!r} not found")
        return rec.sandbox_id

    def running_session_id(self, object_id: str) -> str | None:
        """The id of the running session, or None while paused or terminated."""
        running = self._running_session(self._known(object_id))
        return None if running is None else running.id

    def record(self, object_id: str) -> Record | None:
        """The record of a persistent sandbox by its object id, or None for any other sandbox id."""
        ps = self._by_object.get(object_id)
        return self._records.get(ps) if ps else None

    def _lock(self, rec: Record) -> asyncio.Lock:
        return self._locks.setdefault(rec.persistent_id, asyncio.Lock())

    # ------------------------------------------------------------ lifecycle

    async def create(self, req: CreateSandbox, image_log: Callable[[str], None]) -> Sandbox:
        """``Sandbox.create(_experimental_persistent=True)``: its first session."""
        check_request(req)
        self._ensure_root()
        secret_env = {**self.mgr.secrets.resolve(req.secret_ids), **req.secret_env}
        rec = Record(persistent_id=ids.new("persistent"), app_id=req.app_id, created_at=time.time())
        rec.definition = req.model_copy(
            update={"secret_env": {}, "secret_ids": [], "persistent": False, "persistent_of": rec.persistent_id}
        ).model_dump(mode="json")
        if secret_env:
            rec.sealed_env = self.mgr.secrets.seal_sandbox_env(rec.persistent_id, secret_env)
        self._records[rec.persistent_id] = rec  # the session's end needs it, even during the create
        try:
            sb = await self.mgr.create(self._session_request(rec, secret_env, req.image), image_log)
        except BaseException:
            del self._records[rec.persistent_id]
            raise
        rec.sandbox_id = sb.id
        if rec.session_id is None and sb.state is SandboxState.RUNNING:
            rec.session_id = sb.id
        rec.sessions.append(sb.id)
        self._index(rec)
        self._save(rec)
        log.info("persistent sandbox %s (%s): first session %s", rec.sandbox_id, rec.persistent_id, sb.id)
        return sb

    def _session_request(self, rec: Record, secret_env: dict[str, str], image: ImageRef) -> CreateSandbox:
        req = CreateSandbox.model_validate(rec.definition)
        return req.model_copy(
            update={
                "image": image,
                "secret_env": secret_env,
                "timeout": SESSION_TIMEOUT,
                "idle_timeout": SESSION_IDLE_TIMEOUT,
            }
        )

    async def resume(self, object_id: str) -> Sandbox:
        """``_experimental_resume``: the running session, started from the exit snapshot when none runs."""
        rec = self._live(object_id)
        async with self._lock(rec):
            running = self._running_session(rec)
            if running is not None:
                return running
            if rec.terminated_at is not None:
                raise ConflictError(f"Persistent Sandbox {rec.persistent_id} has been terminated.")
            await self._settled(rec)  # a session that just ended may still be saving its files
            image = ImageRef(kind="id", image_id=rec.exit_image) if rec.exit_image else None
            if image is None:
                image = CreateSandbox.model_validate(rec.definition).image
            secret_env = self.mgr.secrets.open_sealed_env(rec.persistent_id, rec.sealed_env)
            t0 = time.monotonic()
            sb = await self.mgr.create(self._session_request(rec, secret_env, image), lambda line: None)
            if sb.state is SandboxState.RUNNING:
                rec.session_id = sb.id
            rec.sessions.append(sb.id)
            self._save(rec)
            log.info(
                "persistent sandbox %s: session %s resumed from %s in %.0f ms",
                rec.sandbox_id,
                sb.id,
                rec.exit_image or "its image",
                (time.monotonic() - t0) * 1000,
            )
            return sb

    async def pause(self, object_id: str) -> None:
        """``_experimental_pause``: end the running session, keeping its files as the exit snapshot."""
        rec = self._live(object_id)
        async with self._lock(rec):
            running = self._running_session(rec)
            if running is not None:
                await running.terminate()  # its teardown takes the exit snapshot (``session_ending``)

    async def terminate(self, object_id: str) -> None:
        """End a persistent sandbox for good (its exit snapshot goes too)."""
        rec = self._known(object_id)
        if rec.terminated_at is not None:
            return
        rec.terminated_at = time.time()
        self._save(rec)
        async with self._lock(rec):
            running = self._running_session(rec)
            if running is not None:
                await running.terminate()
            await self._drop_exit_image(rec)
            rec.session_id = None
            self._save(rec)

    async def stop_app(self, app_id: str) -> None:
        """Terminate the app's persistent sandboxes (``app.stop()``, the end of ``app.run()``)."""
        live = [r for r in self._records.values() if r.app_id == app_id and r.sandbox_id and r.terminated_at is None]
        await asyncio.gather(*(self.terminate(r.sandbox_id) for r in live))

    async def session_ending(self, sb: Sandbox) -> None:
        """A session's processes are gone and its files still there: keep them as the exit snapshot."""
        rec = self._records.get(sb.spec.request.persistent_of or "")
        if rec is None:
            return
        if rec.session_id == sb.id:
            rec.session_id = None
        if rec.terminated_at is None:
            log.info("persistent sandbox %s: session %s ended; keeping its files", rec.sandbox_id, sb.id)
            t0 = time.monotonic()
            try:
                image_id = await self.mgr.snapshots.exit_snapshot(sb, EXIT_SNAPSHOT_TIMEOUT)
            except Exception as exc:
                # The previous exit snapshot (or the image) stays what the next session starts from.
                log.error("persistent sandbox %s: exit snapshot of session %s failed: %s", rec.sandbox_id, sb.id, exc)
            else:
                await self._drop_exit_image(rec)
                rec.exit_image = image_id
                log.info(
                    "persistent sandbox %s: session %s paused, exit snapshot %s in %.0f ms",
                    rec.sandbox_id or rec.persistent_id,
                    sb.id,
                    image_id,
                    (time.monotonic() - t0) * 1000,
                )
        if rec.sandbox_id:
            self._save(rec)

    async def _settled(self, rec: Record) -> None:
        for sid in rec.sessions[-1:]:
            with contextlib.suppress(NotFoundError):
                task = self.mgr.get(sid).teardown_task
                if task is not None:
                    await asyncio.shield(task)

    async def _drop_exit_image(self, rec: Record) -> None:
        """Remove the exit snapshot and its layers that nothing else uses (a later one builds on them)."""
        if rec.exit_image is None:
            return
        old, rec.exit_image = rec.exit_image, None
        from shoal.engine import image_store  # (it imports the manager, which imports this module)

        try:
            await image_store.remove_image(self.mgr, old)
        except Error as exc:
            log.warning("persistent sandbox %s: removing its old exit snapshot %s: %s", rec.sandbox_id, old, exc)

    async def settle(self) -> None:
        """After re-adoption, before stray run directories are removed: a record whose session no longer runs is
        paused, and a session the last daemon died while ending gets its exit snapshot now, from what it left."""
        for rec in list(self._records.values()):
            if rec.session_id is None or self._running_session(rec) is not None:
                continue
            sid = rec.session_id
            try:
                sb = self.mgr.get(sid)
            except NotFoundError:
                sb = None
            if sb is not None and sb.teardown_task is not None and not sb.teardown_task.done():
                continue  # it ended while the daemon was away: its teardown (now) keeps its files
            rec.session_id = None
            if sb is not None and rec.terminated_at is None:
                await self._recover_exit_snapshot(rec, sb)
            self._save(rec)

    async def _recover_exit_snapshot(self, rec: Record, sb: Sandbox) -> None:
        if not await asyncio.to_thread(_files_left, sb):
            return  # its files are gone (or its root is): the last exit snapshot stays what resumes
        try:
            await sb.runtime.delete(sb.container_id)  # nothing may write on while the files are copied
            image_id = await self.mgr.snapshots.exit_snapshot(sb, EXIT_SNAPSHOT_TIMEOUT)
        except Exception as exc:
            log.error(
                "persistent sandbox %s: exit snapshot of session %s after a restart failed: %s",
                rec.sandbox_id,
                sb.id,
                exc,
            )
            return
        await self._drop_exit_image(rec)
        rec.exit_image = image_id
        log.info(
            "persistent sandbox %s: exit snapshot %s of session %s taken after a restart",
            rec.sandbox_id,
            image_id,
            sb.id,
        )

    def prune(self) -> int:
        """Forget persistent sandboxes terminated longer than ``RETENTION`` ago; how many."""
        cutoff = time.time() - RETENTION
        gone = [r for r in self._records.values() if r.terminated_at is not None and r.terminated_at < cutoff]
        for rec in gone:
            del self._records[rec.persistent_id]
            self._by_object.pop(rec.sandbox_id, None)
            with contextlib.suppress(FileNotFoundError):
                (self.root / f"{rec.persistent_id}.json").unlink()
        return len(gone)

    def last_sessions(self) -> set[str]:
        """The last session of each persistent sandbox not terminated (kept past the retention period)."""
        return {r.sessions[-1] for r in self._records.values() if r.sessions and r.terminated_at is None}

    def images(self) -> set[str]:
        """Exit snapshots still needed (``image rm``/``prune --all`` keep them)."""
        return {r.exit_image for r in self._records.values() if r.exit_image}

    # ------------------------------------------------------------ routing

    def _known(self, object_id: str) -> Record:
        rec = self.record(object_id)
        if rec is None:
            raise NotFoundError(f"Sandbox {object_id} is not a persistent sandbox")
        return rec

    def _live(self, object_id: str) -> Record:
        rec = self._known(object_id)
        if rec.terminated_at is not None:
            raise InvalidError(f"Persistent Sandbox {rec.persistent_id} has been terminated.")
        return rec

    def _running_session(self, rec: Record) -> Sandbox | None:
        if rec.session_id is None:
            return None
        try:
            sb = self.mgr.get(rec.session_id)
        except NotFoundError:
            return None
        return sb if sb.state is not SandboxState.FINISHED else None

    def latest_session(self, object_id: str) -> Sandbox:
        """The running session, else the last one (for what a paused sandbox can still answer: its logs)."""
        rec = self._known(object_id)
        running = self._running_session(rec)
        if running is not None:
            return running
        for sid in reversed(rec.sessions):
            with contextlib.suppress(NotFoundError):
                return self.mgr.get(sid)
        raise NotFoundError(f"the sessions of persistent sandbox {object_id} are no longer kept")

    def session_of_exec(self, object_id: str, exec_id: str) -> Sandbox:
        """The session that ran process ``exec_id``."""
        rec = self._known(object_id)
        for sid in reversed(rec.sessions):
            try:
                sb = self.mgr.get(sid)
                sb.process(exec_id)
            except NotFoundError:
                continue
            return sb
        raise NotFoundError(f"Sandbox {object_id} has no process {exec_id}")

    async def session_for(self, object_id: str, exec_id: str | None = None, *, start: bool = True) -> Sandbox:
        """The session a call to the object id goes to: the one that ran ``exec_id`` (other than the
        entrypoint's), else the running session, started first when none runs (``start``) or else the last."""
        if exec_id is not None and exec_id != ENTRYPOINT_ID:
            return self.session_of_exec(object_id, exec_id)
        if not start:
            return self.latest_session(object_id)
        return await self.resume(object_id)

    # ------------------------------------------------------------ what the API shows

    def info(self, object_id: str) -> SandboxInfo:
        """The persistent sandbox under its object id: running until terminated, whatever its sessions do."""
        rec = self._known(object_id)
        base = self.latest_session(object_id).info()
        terminated = rec.terminated_at is not None
        result = Result(status="terminated", message="Sandbox terminated") if terminated else None
        return base.model_copy(
            update={
                "sandbox_id": rec.sandbox_id,
                "created_at_us": micros(rec.created_at),
                "state": SandboxState.FINISHED if terminated else SandboxState.RUNNING,
                "result": result,
                "returncode": 137 if terminated else None,
                "timeout": SESSION_TIMEOUT,
                "idle_timeout": SESSION_IDLE_TIMEOUT,
                "persistent": PersistentInfo(
                    persistent_id=rec.persistent_id,
                    session_id=None if terminated else rec.session_id,
                    sessions=len(rec.sessions),
                    exit_image=rec.exit_image,
                ),
            }
        )

    def listed(self, app_id: str | None, include_terminated: bool) -> list[SandboxInfo]:
        """Persistent sandboxes for ``Sandbox.list``: running (paused or not) ones, and terminated ones if asked."""
        out = []
        for rec in list(self._records.values()):
            if not rec.sandbox_id or (app_id and rec.app_id != app_id):
                continue
            if rec.terminated_at is not None and not include_terminated:
                continue
            with contextlib.suppress(NotFoundError):
                out.append(self.info(rec.sandbox_id))
        return out

    async def wait(self, object_id: str, timeout: float) -> SandboxInfo:
        """Long poll until the persistent sandbox is terminated (its sessions come and go meanwhile)."""
        rec = self._known(object_id)
        deadline = time.monotonic() + timeout
        while rec.terminated_at is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = self._changed.setdefault(rec.persistent_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)
        return self.info(object_id)


def _files_left(sb: Sandbox) -> bool:
    """Whether an ended session's upper directory and mounted root are still there (a teardown cut short)."""
    return (sb.data_dir / "upper").is_dir() and os.path.ismount(sb.run_dir / "rootfs")
