"""The warm pool: sandboxes of the default shape made ahead of time, so ``Sandbox.create`` skips most of a start.

A pooled sandbox is precreated (``Sandbox.precreate``): its root is mounted, ``runc create`` has made the
container (namespaces, cgroup, mounts, seccomp) and its network is wired, but its init has not run a single
instruction of the agent, so nothing from any request is in it yet.  A request of the default shape takes one
(``take``), gets a database row, and the container starts (``Sandbox.activate``); the pool refills in the
background.  Pooled sandboxes have no row: a stopping daemon removes them, and a daemon that crashed leaves them
to the next one's stray clean-up (containers, run and data dirs, network records without a row).

The default shape: the default image (``Image.debian_slim()``), the daemon's default runtime, no volumes, GPUs,
ports or allowlists, the default cpu and memory.  Anything else starts the usual way.  Env, secrets, workdir,
the command, timeouts, names and tags are all applied when the sandbox is taken, so they do not make a request
ineligible.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from typing import TYPE_CHECKING, Any

from shoal.engine.sandbox import CREATING, Sandbox
from shoal.store.spec import SandboxSpec
from shoal.store.state import SandboxRow
from shoal.wire import ids
from shoal.wire.image_config import ImageConfig
from shoal.wire.images import ImageRef
from shoal.wire.sandboxes import CreateSandbox

if TYPE_CHECKING:
    from shoal.engine.manager import Manager

log = logging.getLogger(__name__)

REFILL_DELAY = 0.05
"""Seconds to wait after a take before refilling, so the refill does not compete with the new sandbox's start."""
RETRY_DELAY = 5.0
"""Seconds to wait after a failed precreate."""
RECHECK_EVERY = 2.0
"""Seconds between two checks that the default image is still the pool's (a create of another image asks)."""
CLOSE_WAIT = 30.0
"""Seconds a stopping daemon waits for a precreate in progress (building the default image can take longer)."""


def eligible(req: CreateSandbox) -> bool:
    """Whether ``req`` (image aside) has the default shape a pooled sandbox was made with."""
    return (
        not req.volumes
        and req.gpu is None
        and req.cpu is None
        and req.cpu_limit is None
        and req.memory is None
        and req.memory_limit is None
        and not req.block_network
        and req.outbound_cidr_allowlist is None
        and req.outbound_domain_allowlist is None
        and req.inbound_cidr_allowlist is None
        and req.outbound_headers is None
        and not req.encrypted_ports
        and not req.h2_ports
        and not req.unencrypted_ports
    )


class WarmPool:
    """Up to ``size`` precreated sandboxes of the default image."""

    def __init__(self, mgr: Manager, size: int) -> None:
        self.mgr = mgr
        self.size = size
        self.ready: list[Sandbox] = []
        self.image_id: str | None = None
        self._image: ImageConfig | None = None
        self._filling = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._litter: list[Sandbox] = []
        """Failed precreates whose removal failed too (e.g. out of descriptors): removed again on the next fill."""
        self.taken = 0
        """Requests served from the pool since the daemon started."""
        self.missed = 0
        """Creates the pool could have served but had nothing ready for (``/metrics``)."""
        self._recheck_task: asyncio.Task[None] | None = None
        self._rechecked_at = -RECHECK_EVERY

    @property
    def runtime(self) -> str:
        """What the pool's sandboxes run under: the daemon's default runtime (a request for another is not
        served from the pool)."""
        return self.mgr.cfg.default_runtime

    def start(self) -> None:
        """Begin filling in the background (building the default image first if it is missing)."""
        if self.size > 0:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            image_id, image = await self.mgr.images.resolve(ImageRef(), lambda line: None)
        except Exception:
            log.exception("warm pool: the default image could not be resolved; the pool stays empty")
            return
        self.image_id, self._image = image_id, image
        while not self._closed:
            while len(self.ready) + self._filling < self.size and not self._closed:
                await self._sweep()
                self._filling += 1
                try:
                    assert self._image is not None
                    await self._add(self._image)
                except Exception as exc:
                    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                        log.warning("warm pool: out of file descriptors; retrying in %.0f s", RETRY_DELAY)
                    else:
                        log.exception("warm pool: precreating a sandbox failed; retrying in %.0f s", RETRY_DELAY)
                    self._wake.clear()
                    if not self._closed:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), RETRY_DELAY)  # close() cuts it short
                finally:
                    self._filling -= 1
            if self._closed:
                return
            self._wake.clear()
            await self._wake.wait()
            if not self._closed:
                await asyncio.sleep(REFILL_DELAY)

    async def _add(self, image: ImageConfig) -> None:
        assert self.image_id is not None
        req = CreateSandbox.model_validate({"app_id": "", "runtime": self.runtime})
        spec = SandboxSpec(
            request=req,
            image_id=self.image_id,
            image_env=dict(image.env),
            image_workdir=image.workdir,
            image_user=image.user,
            image_layers=list(image.layers),
        )
        row = SandboxRow(
            id=ids.new("sandbox"),
            app_id="",
            name=None,
            tags={},
            spec=spec,
            state=CREATING,
            token=b"",
            created_at=time.time(),
            deadline=None,
        )
        sb = Sandbox(self.mgr.ctx, row)
        try:
            await sb.precreate(req, image, self.mgr.images.lowers(image))
        except BaseException:
            try:
                await sb.discard()
            except Exception:
                self._litter.append(sb)
            raise
        if self._closed or spec.image_id != self.image_id:  # stopping, or the default image changed meanwhile
            await sb.discard()
            return
        self.ready.append(sb)

    def take(self, image_id: str, req: CreateSandbox) -> Sandbox | None:
        """A pooled sandbox for ``req`` if it has the default shape and image (the caller activates it)."""
        if not eligible(req) or req.runtime != self.runtime or self._task is None:
            return None
        if image_id != self.image_id:
            self._recheck(image_id)  # another image, or the default one changed (new host CA certificates)
            return None
        while self.ready:
            sb = self.ready.pop(0)
            self._wake.set()
            if sb.runtime.waiting_init_alive(sb.container_id) is False:
                log.warning("pooled sandbox %s: its init died while it waited; removing it", sb.id)
                self._litter.append(sb)  # the refill loop removes it
                continue
            self.taken += 1
            return sb
        self.missed += 1
        return None

    def _recheck(self, wanted: str) -> None:
        """Check, at most every ``RECHECK_EVERY`` seconds, whether the default image is still the pool's."""
        now = time.monotonic()
        idle = self._recheck_task is None and self.image_id is not None and not self._closed
        if idle and now - self._rechecked_at >= RECHECK_EVERY:
            self._rechecked_at = now
            self._recheck_task = asyncio.create_task(self._retarget(wanted))

    async def _retarget(self, wanted: str) -> None:
        """Follow the default image when it changed: ``wanted`` (what a create of the default shape ran) is a miss
        if it is the default image now; the pooled sandboxes of the old one are replaced."""
        try:
            image_id, image = await self.mgr.images.resolve(ImageRef(), lambda line: None)
            if image_id == wanted:
                self.missed += 1
            if image_id != self.image_id and not self._closed:
                log.info("warm pool: the default image is now %s; replacing the pooled sandboxes", image_id)
                stale, self.ready = self.ready, []
                self.image_id, self._image = image_id, image
                self._wake.set()
                for sb in stale:
                    try:
                        await sb.discard()
                    except Exception:
                        self._litter.append(sb)
        except Exception:
            log.exception("warm pool: checking the default image failed")
        finally:
            self._recheck_task = None

    def specs(self) -> list[SandboxSpec]:
        """What the pool holds, as sandbox specs: the layers of its image are in use while it runs."""
        if self.image_id is None or self._image is None:
            return []
        return [SandboxSpec(CreateSandbox(app_id=""), image_id=self.image_id, image_layers=list(self._image.layers))]

    def status(self) -> dict[str, Any]:
        """For ``GET /v1/status``."""
        return {
            "size": self.size,
            "ready": len(self.ready),
            "taken": self.taken,
            "missed": self.missed,
            "image_id": self.image_id,
            "runtime": self.runtime,
        }

    async def _sweep(self) -> None:
        """Remove again the failed precreates whose first removal failed."""
        litter, self._litter = self._litter, []
        for sb in litter:
            try:
                await sb.discard()
            except Exception:
                self._litter.append(sb)

    async def close(self) -> None:
        """Stop filling and remove every pooled sandbox.

        A precreate in progress is let finish (then discarded): cancelling it would leave its ``runc create`` to
        complete unseen, a container nobody removes.
        """
        self._closed = True
        self._wake.set()
        if self._recheck_task is not None:
            with contextlib.suppress(Exception):
                await self._recheck_task
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), CLOSE_WAIT)
            except (TimeoutError, Exception):
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
        ready, self.ready = self.ready + self._litter, []
        self._litter = []
        for sb in ready:
            try:
                await sb.discard()
            except Exception:
                log.exception("warm pool: removing sandbox %s failed", sb.id)
