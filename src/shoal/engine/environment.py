"""The environment a sandbox's process starts with, from lowest to highest precedence: the image's, the GPU
passthrough's, the sandbox's secrets and variables, then the process's own secrets and variables."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shoal.gpu import scheduler as gpu_scheduler
from shoal.network.egress_ca import TRUST_ENV
from shoal.store.spec import SandboxSpec
from shoal.wire.sandboxes import ExecRequest

if TYPE_CHECKING:
    from shoal.secrets.store import SecretStore


def process_env(
    secrets: SecretStore | None, sandbox_id: str, spec: SandboxSpec, req: ExecRequest, image_env: dict[str, str]
) -> dict[str, str]:
    """A process's environment (its secrets unsealed from the sandbox's stored spec for this one process)."""
    env = dict(image_env)
    env.update(gpu_scheduler.env(spec.gpu_plan))
    if spec.request.outbound_headers is not None:
        env.update(TRUST_ENV)  # the egress CA's bundle (``shoal.network.egress``)
    env.update(dict(spec.legacy_secret_env) if secrets is None else secrets.open_sandbox_env(sandbox_id, spec))
    env.update(spec.request.env)
    env.update(req.secret_env)
    env.update(req.env)
    if req.pty:
        env.setdefault("TERM", "xterm-256color")
    return env
