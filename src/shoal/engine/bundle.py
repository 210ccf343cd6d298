"""A sandbox's OCI bundle: its overlay root, network, resources, volumes and GPUs, as the runtime reads them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.gpu import scheduler as gpu_scheduler
from shoal.runtime import idmap, rootfs, spec
from shoal.runtime.idmap import Namespaces
from shoal.wire.sandboxes import CreateSandbox

if TYPE_CHECKING:
    from shoal.engine.sandbox import Sandbox


def write_bundle(sb: Sandbox, req: CreateSandbox, lowers: list[str], ns: Namespaces | None = None) -> Path:
    """Mount a sandbox's root, take its network address and write its OCI bundle; the bundle directory.

    ``ns``: the sandbox's own user namespace and storage id-mapping (``shoal.runtime.idmap``); None: the
    range all sandboxes share, mapped by the runtime (decision 0002).
    """
    cfg = sb.ctx.cfg
    ids = sb.host_ids
    for d in (sb.run_dir, sb.out_dir):
        d.mkdir(parents=True, exist_ok=True)
    if ns is None:
        os.chmod(sb.run_dir, 0o711)
    else:  # the sandbox's root (host gid B) walks to its rootfs; other host users may not
        os.chown(sb.run_dir, 0, ids.host_id)
        os.chmod(sb.run_dir, 0o710)
    ctl = sb.run_dir / "ctl"
    ctl.mkdir(exist_ok=True)
    os.chmod(ctl, 0o755)
    root = sb.run_dir / "rootfs"
    upper, work = str(sb.data_dir / "upper"), str(sb.data_dir / "work")
    if ns is None:
        rootfs.mount_overlay(lowers, upper, work, str(root), cfg.idmap.host_id)
    else:
        idmap.mount_overlay(lowers, upper, work, str(root), cfg.idmap.host_id, ns.storage)
    sb.ctx.network.prepare(sb.id, req, str(root), ids.host_id)
    mem = req.memory_limit or req.memory or cfg.default_memory_mib
    container = spec.ContainerConfig(
        container_id=sb.container_id,
        rootfs=str(root),
        agent_dir=str(cfg.agent_dir),
        ctl_dir=str(ctl),
        idmap=spec.IdMap(ids.host_id, ids.size),
        userns_path=ns.sandbox_path if ns is not None and not sb.gvisor else None,
        netns_path=str(sb.netns_path) if sb.gvisor and sb.ctx.network.wired(sb.id) else None,
        gvisor=sb.gvisor,
        cgroup_parent=cfg.cgroup_parent,
        resources=spec.Resources(
            cpu_request=req.cpu,
            cpu_limit=req.cpu_limit,
            memory_limit_mib=mem,
            pids_limit=cfg.pids_limit,
        ),
        binds=(
            sb.ctx.volumes.prepare(sb.id, req.volumes, ns.storage if ns is not None else None) if sb.ctx.volumes else []
        ),
    )
    tmp = root / "tmp"
    if sb.gvisor and tmp.is_dir() and not tmp.is_symlink():
        # runsc mounts a memory-backed tmpfs on an empty /tmp unless the spec mounts something there: keep /tmp in
        # the sandbox's root, as under runc (snapshots and the upper directory see what is written there)
        container.binds.append(spec.Bind(source=str(tmp), destination="/tmp", read_only=False))
    gpu_scheduler.apply(container, sb.spec.gpu_plan)
    bundle = sb.run_dir / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(spec.build(container)))
    return bundle
