"""A sandbox's OCI bundle: its overlay root, network, resources, volumes and GPUs, as the runtime reads them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.agent.build import BINARY_NAME
from shoal.gpu import scheduler as gpu_scheduler
from shoal.runtime import idmap, rootfs, spec
from shoal.runtime.idmap import Namespaces
from shoal.wire.sandboxes import CreateSandbox

if TYPE_CHECKING:
    from shoal.engine.sandbox import Sandbox

SHOAL_SUBDIR = "shoal"
"""The directory in a sandbox's run directory mounted at ``/.shoal``: ``bin`` (the agent) and ``ctl``."""


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
        shoal_dir=str(sb.run_dir / SHOAL_SUBDIR),
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
    if sb.spec.one_shoal_mount:
        _make_shoal_dir(sb.run_dir / SHOAL_SUBDIR, cfg.staged_agent, container.binds)
    else:
        ctl = sb.run_dir / "ctl"
        ctl.mkdir(exist_ok=True)
        os.chmod(ctl, 0o755)
        container.split_shoal_dirs = (str(cfg.agent_dir), str(ctl))
    bundle = sb.run_dir / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(spec.build(container)))
    return bundle


def ctl_dir(run_dir: Path) -> Path:
    """The host side of a sandbox's ``/.shoal/ctl`` (the sandboxes of older versions had it at ``ctl``)."""
    ours = run_dir / SHOAL_SUBDIR / "ctl"
    return ours if ours.is_dir() else run_dir / "ctl"


def _make_shoal_dir(shoal: Path, agent: Path, binds: list[spec.Bind]) -> None:
    """The one directory the sandbox sees at ``/.shoal`` (decision 0079): the agent, linked to the daemon's
    staged copy, the control directory, and the mount points of binds under ``/.shoal`` (the mount is read-only,
    so the runtime could not make them)."""
    for d in (shoal, shoal / "bin", shoal / "ctl"):
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o755)
    binary = shoal / "bin" / BINARY_NAME
    if not binary.exists():
        try:
            os.link(agent, binary)
        except OSError:  # another filesystem than the staged copy's: a copy of its own
            shutil.copy2(agent, binary)
    prefix = spec.SHOAL_DIR + "/"
    for b in binds:
        if not b.destination.startswith(prefix):
            continue
        rel = os.path.normpath(b.destination[len(prefix) :])
        if rel.startswith(("..", "/")):
            continue
        point = shoal / rel
        for d in reversed(point.parents):
            if d.is_relative_to(shoal) and not d.is_dir():
                d.mkdir()
                os.chmod(d, 0o755)  # the runtime walks to it as the sandbox's user
        if os.path.isdir(b.source):
            point.mkdir(mode=0o755, exist_ok=True)
        else:
            point.touch(mode=0o644, exist_ok=True)
