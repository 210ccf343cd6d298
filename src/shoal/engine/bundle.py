"""A sandbox's OCI bundle: its overlay root, network, resources, volumes and GPUs, as the runtime reads them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.gpu import scheduler as gpu_scheduler
from shoal.runtime import rootfs, spec
from shoal.wire.sandboxes import CreateSandbox

if TYPE_CHECKING:
    from shoal.engine.sandbox import Sandbox


def write_bundle(sb: Sandbox, req: CreateSandbox, lowers: list[str]) -> Path:
    """Mount a sandbox's root, take its network address and write its OCI bundle; the bundle directory."""
    cfg = sb.ctx.cfg
    for d in (sb.run_dir, sb.out_dir):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(sb.run_dir, 0o711)
    ctl = sb.run_dir / "ctl"
    ctl.mkdir(exist_ok=True)
    os.chmod(ctl, 0o755)
    root = sb.run_dir / "rootfs"
    rootfs.mount_overlay(
        lowers,
        str(sb.data_dir / "upper"),
        str(sb.data_dir / "work"),
        str(root),
        cfg.idmap.host_id,
    )
    sb.ctx.network.prepare(sb.id, req, str(root))
    mem = req.memory_limit or req.memory or cfg.default_memory_mib
    container = spec.ContainerConfig(
        container_id=sb.container_id,
        rootfs=str(root),
        agent_dir=str(cfg.agent_dir),
        ctl_dir=str(ctl),
        idmap=cfg.idmap,
        cgroup_parent=cfg.cgroup_parent,
        resources=spec.Resources(
            cpu_request=req.cpu,
            cpu_limit=req.cpu_limit,
            memory_limit_mib=mem,
            pids_limit=cfg.pids_limit,
        ),
        binds=sb.ctx.volumes.prepare(sb.id, req.volumes) if sb.ctx.volumes else [],
    )
    gpu_scheduler.apply(container, sb.spec.gpu_plan)
    bundle = sb.run_dir / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(spec.build(container)))
    return bundle
