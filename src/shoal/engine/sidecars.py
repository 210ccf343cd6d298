"""Sidecars (``sb._experimental_sidecars``): containers beside a sandbox, as modal 1.6 has them.

A sidecar is a sandbox of the daemon's own making (its request says ``sidecar_of`` and ``sidecar_name``): its
own image, process, environment, secrets, volumes and outbound policy (open unless it says otherwise), under the
sandbox's runtime, app and deadline.  What makes it the sandbox's:

* the network: the two reach each other whatever their allowlists (``peers`` in the packet filter) and resolve
  each other by name through the daemon's DNS forwarder (the sandbox knows the sidecar by its name, the sidecar
  knows the sandbox as ``main``), so ``outbound_cidr_allowlist=[]`` on the sandbox leaves it its sidecars;
* the lifecycle: it ends when its sandbox ends (terminated, timed out or finished), also across a daemon
  restart; it does not appear in ``Sandbox.list`` and cannot be made through ``POST /v1/sandboxes``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from shoal.exception import AlreadyExistsError, ConflictError, InvalidError, NotFoundError
from shoal.wire.sandboxes import CreateSandbox, CreateSidecar, Result, SandboxState, SidecarInfo

if TYPE_CHECKING:
    from shoal.engine.manager import Manager
    from shoal.engine.sandbox import Sandbox

log = logging.getLogger(__name__)

MAIN_NAME = "main"
"""What a sidecar calls its sandbox."""


def info(sb: Sandbox) -> SidecarInfo:
    """A sidecar as the API shows it."""
    req = sb.spec.request
    full = sb.info()
    return SidecarInfo(
        sidecar_id=sb.id,
        name=req.sidecar_name or "",
        sandbox_id=req.sidecar_of or "",
        state=full.state,
        result=full.result,
        returncode=full.returncode,
    )


class Sidecars:
    """The sidecars of one daemon's sandboxes."""

    def __init__(self, mgr: Manager) -> None:
        self.mgr = mgr

    def of(self, sandbox_id: str, include_terminated: bool = False) -> list[Sandbox]:
        """A sandbox's sidecars (running ones, unless asked), oldest first."""
        self.mgr.get(sandbox_id)  # NotFoundError for an unknown sandbox
        found = []
        for row in self.mgr.state.sandboxes_in(SandboxState.CREATING, SandboxState.RUNNING, SandboxState.FINISHED):
            if row.spec.request.sidecar_of == sandbox_id:
                sb = self.mgr.get(row.id)
                if include_terminated or sb.state is not SandboxState.FINISHED:
                    found.append(sb)
        return sorted(found, key=lambda s: s.row.created_at)

    def get(self, sandbox_id: str, name: str, include_terminated: bool = False) -> Sandbox:
        """A sandbox's sidecar by name (the newest of that name with ``include_terminated``)."""
        if name == MAIN_NAME:
            raise InvalidError("the main container is not a sidecar: use the Sandbox's own methods to interact with it")
        matches = [s for s in self.of(sandbox_id, include_terminated) if s.spec.request.sidecar_name == name]
        if not matches:
            raise NotFoundError(f"sandbox {sandbox_id} has no sidecar named {name!r}")
        return matches[-1]

    async def create(self, sandbox_id: str, body: CreateSidecar) -> Sandbox:
        """Start a sidecar beside a running sandbox; returns once its container runs."""
        main = await self.mgr.started(sandbox_id)
        if main.state is not SandboxState.RUNNING:
            raise ConflictError(f"sandbox {sandbox_id} is {main.state}: sidecars go beside a running sandbox")
        parent = main.spec.request
        if parent.sidecar_of is not None:
            raise InvalidError("a sidecar cannot have sidecars of its own: add them to its sandbox")
        if parent.block_network or not self.mgr.network.wired(sandbox_id):
            raise InvalidError(
                "sidecars reach their sandbox over its network, and this sandbox has none (block_network, or the"
                " daemon runs without networking)"
            )
        if any(s.spec.request.sidecar_name == body.name for s in self.of(sandbox_id)):
            raise AlreadyExistsError(f"sandbox {sandbox_id} already has a running sidecar named {body.name!r}")
        remaining = int((main.row.deadline or time.time() + parent.timeout) - time.time())
        if remaining < 1:
            raise ConflictError(f"sandbox {sandbox_id} is about to time out")
        req = CreateSandbox(
            app_id=main.row.app_id,
            args=body.args,
            image=body.image,
            env=body.env,
            secret_env=body.secret_env,
            secret_ids=body.secret_ids,
            timeout=remaining,
            workdir=body.workdir,
            volumes=body.volumes,
            outbound_cidr_allowlist=body.outbound_cidr_allowlist,
            outbound_domain_allowlist=body.outbound_domain_allowlist,
            pty=body.pty,
            runtime=main.spec.runtime,  # type: ignore[arg-type]
            sidecar_of=sandbox_id,
            sidecar_name=body.name,
        )
        sidecar = await self.mgr.create(req, lambda line: None)
        try:
            if main.state is not SandboxState.RUNNING:
                raise ConflictError(f"sandbox {sandbox_id} ended while its sidecar started")
            await self.mgr.network.link_peers(sandbox_id, body.name, sidecar.id, MAIN_NAME)
        except BaseException:
            await sidecar.terminate()
            raise
        log.info("sandbox %s: sidecar %r is %s", sandbox_id, body.name, sidecar.id)
        return sidecar

    def sandbox_ended(self, sandbox_id: str) -> None:
        """End the sidecars of a sandbox that finished."""
        for sb in list(self.mgr.sandboxes.values()):
            if sb.spec.request.sidecar_of == sandbox_id and sb.state is not SandboxState.FINISHED:
                sb.finish_soon(Result(status="terminated", message=f"its sandbox {sandbox_id} ended"))

    def end_orphans(self) -> None:
        """After a restart: end the sidecars whose sandbox is no longer running."""
        for sb in list(self.mgr.sandboxes.values()):
            parent = sb.spec.request.sidecar_of
            if parent is None or sb.state is SandboxState.FINISHED:
                continue
            main = self.mgr.sandboxes.get(parent)
            if main is None or main.state is SandboxState.FINISHED:
                self.sandbox_ended(parent)
