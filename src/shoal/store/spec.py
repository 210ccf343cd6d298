"""A sandbox as the daemon stores it: the create request it was made from and what was resolved for it.

Stored as one flat JSON object per sandbox (the request's fields beside the resolved ones), the format
every version so far has written, so a daemon re-adopts the sandboxes of the one before it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from shoal.wire.sandboxes import CreateSandbox

log = logging.getLogger(__name__)

_REQUEST_FIELDS = frozenset(CreateSandbox.model_fields) - {"secret_env"}


@dataclass
class SandboxSpec:
    """What a sandbox was created with.  Secrets are never here in the clear: only ``sealed_env``."""

    request: CreateSandbox
    """The validated create request, its ``secret_env`` emptied (the values are in ``sealed_env``)."""
    image_id: str = ""
    image_env: dict[str, str] = field(default_factory=dict)
    image_workdir: str | None = None
    image_user: str | None = None
    """The image's USER: build steps run as it (sandboxes still start as root)."""
    image_layers: list[str] = field(default_factory=list)
    """Layer ids of the sandbox's root, bottom first: in use while the sandbox runs."""
    gpu_plan: dict[str, Any] | None = None
    """The GPUs it holds and how they are passed through (``shoal.gpu.scheduler``); None: no GPU."""
    sealed_env: str | None = None
    """Its secret environment, sealed (``shoal.secrets.store``)."""
    legacy_secret_env: dict[str, str] = field(default_factory=dict)
    """A secret environment an older version stored in the clear (sealed at the next start; build sandboxes)."""
    image_mounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Path → the image mounted there by ``sb.mount_image`` (``shoal.engine.snapshot``)."""
    mounted_layers: list[str] = field(default_factory=list)
    """The layers of those images: in use while the sandbox runs."""
    uid_slot: int | None = None
    """Its host id range (``shoal.engine.uids``); None: the range all sandboxes share (decision 0002)."""
    one_shoal_mount: bool = True
    """``/.shoal`` is one mount (decision 0079); False for sandboxes of older versions, whose memory snapshots
    restore only into the two mounts they had."""

    @property
    def runtime(self) -> str:
        """What it runs under: ``runc`` or ``gvisor`` (decided at create; older records: runc)."""
        return self.request.runtime or "runc"

    def to_json(self) -> dict[str, Any]:
        """The stored form: the request's fields and the resolved ones, side by side."""
        out = self.request.model_dump(mode="json", exclude={"secret_env"})
        for f in fields(self):
            if f.name == "request":
                continue
            value = getattr(self, f.name)
            if f.name == "legacy_secret_env":
                if value:
                    out["secret_env"] = dict(value)
            elif f.name in ("gpu_plan", "uid_slot"):
                if value is not None:
                    out[f.name] = value
            elif f.name == "sealed_env":
                if value:
                    out["sealed_env"] = value
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any], sandbox_id: str = "") -> SandboxSpec:
        """Inverse of ``to_json``; reads what older versions stored too."""
        body = {k: v for k, v in raw.items() if k in _REQUEST_FIELDS}
        try:
            request = CreateSandbox.model_validate(body)
        except ValidationError as exc:
            # Stored by an older version under rules since tightened: keep the sandbox, as it was accepted then.
            log.warning("sandbox %s: its stored request no longer validates (%s); using it as stored", sandbox_id, exc)
            request = CreateSandbox.model_construct(**body)
        legacy = raw.get("secret_env")
        return cls(
            request=request,
            image_id=str(raw.get("image_id") or ""),
            image_env=dict(raw.get("image_env") or {}),
            image_workdir=raw.get("image_workdir"),
            image_user=raw.get("image_user"),
            image_layers=list(raw.get("image_layers") or []),
            gpu_plan=raw.get("gpu_plan") if isinstance(raw.get("gpu_plan"), dict) else None,
            sealed_env=raw.get("sealed_env") or None,
            legacy_secret_env=dict(legacy) if isinstance(legacy, dict) else {},
            image_mounts=dict(raw.get("image_mounts") or {}),
            mounted_layers=list(raw.get("mounted_layers") or []),
            uid_slot=slot if isinstance(slot := raw.get("uid_slot"), int) and not isinstance(slot, bool) else None,
            one_shoal_mount=raw.get("one_shoal_mount") is True,
        )
