"""Build sandboxes: where ``run`` steps of image builds execute.

A build sandbox is an ordinary sandbox (same isolation, same outbound
network, the parent image's layers under a fresh upper directory) of the
internal app ``shoal-image-builds``, tagged ``shoal.image-build``, started
with no entrypoint (the image's CMD must not run during a build).  Each
command of the step is an exec; its stdout and stderr become the build log.
When all exit 0, the sandbox is terminated with its upper directory kept:
that directory is the new layer.  Anything else, and the upper directory is
deleted with the sandbox.

What the engine itself put in the upper directory is taken out again: the
resolver files the network writes into every sandbox (unless the step
changed them) and the mount points of shoal's own directories (``/.shoal``).

A daemon that stops mid-build leaves a build sandbox running; the next
daemon terminates it at start (:func:`recover`), so its half-done upper
directory never becomes a layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from shoal.engine.output import OutputStream
from shoal.engine.process import Process
from shoal.exception import Error, InvalidError
from shoal.images.builder import Builder, BuildSettings, LogFn, RunOutcome
from shoal.images.registry import Registry
from shoal.wire.image_config import ImageConfig
from shoal.wire.images import ImageRef
from shoal.wire.recipe import RunStep
from shoal.wire.sandboxes import CreateSandbox, ExecRequest, SandboxState

if TYPE_CHECKING:
    from shoal.engine.manager import Manager

log = logging.getLogger(__name__)

BUILD_APP = "shoal-image-builds"
BUILD_TAG = "shoal.image-build"
NETWORK_FILES = ("etc/resolv.conf", "etc/hosts")
TAIL = 60


def make_builder(mgr: Manager) -> Builder:
    """The image builder, whose ``run`` steps use the manager's build sandboxes."""
    cfg = mgr.cfg
    settings = BuildSettings(
        mounts_dir=cfg.runtime_dir / "image-mounts",
        trust_host_cas=cfg.trust_host_cas,
        host_ca_dir=cfg.host_ca_dir,
    )
    return Builder(mgr.state, mgr.layers, cfg.idmap.host_id, settings, BuildSandboxes(mgr))


async def recover(mgr: Manager) -> None:
    """At start, after re-adoption: end build sandboxes a previous daemon left, unmount host-step overlays."""
    builder = mgr.images.builder
    if builder is not None:
        builder.recover_mounts()
    stale = [
        sb for sb in mgr.sandboxes.values() if sb.row.tags.get(BUILD_TAG) and sb.state is not SandboxState.FINISHED
    ]
    for sb in stale:
        log.info("ending build sandbox %s left by a previous daemon (its build did not finish)", sb.id)
    await asyncio.gather(*(sb.terminate() for sb in stale), return_exceptions=True)


class BuildSandboxes:
    """The builder's runner for ``run`` steps."""

    def __init__(self, mgr: Manager) -> None:
        self.mgr = mgr

    async def run(self, parent_id: str, parent: ImageConfig, step: RunStep, upper: Path, log: LogFn) -> RunOutcome:
        """Run ``step``'s commands in a fresh build sandbox; on success its upper directory moves to ``upper``."""
        mgr = self.mgr
        app_id, _ = mgr.lookup_app(BUILD_APP, create_if_missing=True)
        try:
            req = CreateSandbox(
                app_id=app_id,
                image=ImageRef(kind="id", image_id=parent_id),
                tags={BUILD_TAG: "1"},
                timeout=mgr.cfg.image_build_timeout,
                gpu=step.gpu,
            )
        except ValidationError as exc:
            raise InvalidError(f"build step: {exc.errors()[0]['msg']}") from None
        sb = await mgr.create(req, log, build=True)
        sandbox_upper = sb.data_dir / "upper"
        before = _fingerprints(sandbox_upper)
        tail: list[str] = []
        outcome = RunOutcome(returncode=0, tail=tail)
        try:
            for i, argv in enumerate(step.commands):
                exec_req = ExecRequest(
                    args=argv,  # as the image's USER: the agent switches user for every process
                    env=step.env,
                    secret_env=step.secret_env,
                    secret_ids=step.secret_ids,
                    workdir=parent.workdir,
                )
                try:
                    proc = await mgr.exec(sb.id, exec_req)
                except Error as exc:
                    outcome = RunOutcome(-1, i, tail, f"the build sandbox stopped: {exc}")
                    break
                await _follow(proc, log, tail)
                rc = proc.returncode if proc.returncode is not None else -1
                if rc != 0:
                    message = ""
                    if sb.result is not None and sb.result.status == "timeout":
                        message = f"the build timed out after {mgr.cfg.image_build_timeout} s"
                    outcome = RunOutcome(rc, i, tail, message)
                    break
            else:
                sb.keep_upper = upper
        finally:
            await sb.terminate()
        if outcome.returncode == 0:
            kept = sb.keep_upper is not None and sb.result is not None and sb.result.status == "terminated"
            if not kept:
                return RunOutcome(-1, -1, tail, "the build sandbox's files could not be kept")
            await asyncio.to_thread(_strip, upper, before)
        return outcome


async def _follow(proc: Process, log: LogFn, tail: list[str]) -> None:
    """Log a process's stdout and stderr line by line until both end."""

    async def pump(stream: OutputStream) -> None:
        offset = 0
        pending = b""
        while True:
            data = stream.read(offset)
            if data:
                offset += len(data)
                pending += data
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    _emit(raw, log, tail)
                continue
            if stream.eof:
                break
            await stream.wait(offset, None)
        if pending:
            _emit(pending, log, tail)

    await asyncio.gather(pump(proc.streams[0]), pump(proc.streams[1]))
    await proc.wait(None)


def _emit(raw: bytes, log: LogFn, tail: list[str]) -> None:
    line = raw.decode(errors="replace").rstrip("\r").rsplit("\r", 1)[-1]
    log(line)
    tail.append(line)
    del tail[:-TAIL]


def _fingerprints(upper: Path) -> dict[str, tuple[int, int, int, str] | None]:
    """What the engine wrote into a fresh sandbox's upper directory, to tell later whether a step changed it."""
    out: dict[str, tuple[int, int, int, str] | None] = {}
    for rel in (*NETWORK_FILES, "etc"):
        out[rel] = _fingerprint(upper / rel)
    return out


def _fingerprint(path: Path) -> tuple[int, int, int, str] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    digest = ""
    if stat.S_ISREG(st.st_mode):
        with contextlib.suppress(OSError):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return st.st_mode, st.st_uid, st.st_gid, digest


def _strip(upper: Path, before: dict[str, tuple[int, int, int, str] | None]) -> None:
    """Take out of a finished build's upper directory what the engine (not the step) put there."""
    shoal_dir = upper / ".shoal"
    if shoal_dir.is_dir() and not shoal_dir.is_symlink():
        shutil.rmtree(shoal_dir, ignore_errors=True)
    for rel in NETWORK_FILES:
        fp = before.get(rel)
        if fp is not None and _fingerprint(upper / rel) == fp:
            (upper / rel).unlink(missing_ok=True)
    etc = upper / "etc"
    if before.get("etc") is not None and _fingerprint(etc) == before["etc"] and _is_plain_empty_dir(etc):
        etc.rmdir()


def _is_plain_empty_dir(path: Path) -> bool:
    """An empty directory without overlay xattrs (not opaque): removing it from a layer changes nothing."""
    try:
        if any(path.iterdir()):
            return False
        return not any(name.startswith("trusted.overlay.") for name in os.listxattr(path, follow_symlinks=False))
    except OSError:
        return False


def make_registry(mgr: Manager) -> Registry:
    """The registry puller (named secrets from the daemon's store; layers held like a build's while pulled)."""

    def named(name: str) -> dict[str, str]:
        row = mgr.secrets.lookup(name, [])
        return mgr.secrets.resolve([row.id])

    def hold(layers: list[str], delta: int) -> None:
        builder = mgr.images.builder  # prune keeps the layers its builds stand on: pulls use the same count
        if builder is None:
            return
        for layer in layers:
            n = builder.active_layers.get(layer, 0) + delta
            if n > 0:
                builder.active_layers[layer] = n
            else:
                builder.active_layers.pop(layer, None)

    return Registry(mgr.state, mgr.layers, mgr.cfg.idmap.host_id, mgr.cfg.idmap.size, named, hold)
