"""Snapshots of running sandboxes, and images mounted into them.

* ``snapshot_filesystem``: the sandbox's overlay upper directory, copied as it
  is (whiteouts and opaque directories included, so it is exactly the diff
  over its image), becomes one new layer on top of its image's layers; the
  snapshot's config is its image's.  An upper directory holding nothing of
  the sandbox's own gives a snapshot with no new layer.
* ``snapshot_directory``: one directory as the sandbox sees it (through its
  mount namespace: volumes and mounted images included, but not mounts below
  the directory) becomes a one-layer image, for ``mount_image``.
* ``mount_image``: an overlay of an image's layers with a fresh upper
  directory of its own (so the sandbox can write there), attached at a path
  inside the running sandbox's mount namespace by a helper process
  (:mod:`shoal.engine._nsmount`); ``unmount_image`` detaches it.

The sandbox keeps running during a snapshot (no freeze: see
docs/decisions/0060-snapshots-copy-the-upper-directory.md).  A copy is
staged in the layer store's staging area and published by an atomic rename,
so an interrupted or timed-out snapshot leaves no half layer.

Trust: everything in the sandbox's tree is hostile; the copy never follows
a link (:mod:`shoal.images.treecopy`), and the mount helper walks the target
inside the sandbox's own root (:mod:`shoal.engine._nsmount`).  Paths from the
API are checked here first: absolute, normalized, and not under /proc, /sys,
/dev or shoal's own /.shoal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.agent.build import BINARY_NAME
from shoal.exception import ConflictError, ExecutionError, InvalidError, NotFoundError, TimeoutError
from shoal.images import treecopy
from shoal.runtime import cgroups, idmap
from shoal.store.state import ImageRow
from shoal.util import safefs, spawn
from shoal.wire import ids, paths
from shoal.wire.image_config import ImageConfig
from shoal.wire.sandboxes import SandboxState

if TYPE_CHECKING:
    from shoal.engine.manager import Manager
    from shoal.engine.sandbox import Sandbox

log = logging.getLogger(__name__)

ENGINE_DIR = ".shoal"
"""Mount points of shoal's own directories in every root: never part of a snapshot."""
NETWORK_FILES = ("etc/resolv.conf", "etc/hosts")
"""Written by the engine into each networked sandbox before it starts: kept only if the sandbox changed them."""
SYSTEM_PREFIXES = ("/proc", "/sys", "/dev", "/.shoal")
MAX_MOUNT_OPTIONS = 3800
"""Overlay mount options must fit one page (4096 bytes): past this, a snapshot is flattened into one layer."""
MAX_LAYERS = 64
"""Deepest layer stack a snapshot makes; past it (or past MAX_MOUNT_OPTIONS) the snapshot is one flat layer.

``SHOAL_SNAPSHOT_MAX_LAYERS`` overrides it (tests use it to reach the flattening path quickly)."""
MOUNTS_DIR = "mounts"
"""Per-sandbox data directory of mounted images' upper and work directories."""
HELPER = Path(__file__).with_name("_nsmount.py")


def check_path(path: str, what: str, *, allow_root: bool) -> str:
    """``path`` normalized; InvalidError unless absolute, NUL-free and outside the kernel's and shoal's trees."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidError(f"{what} must be an absolute path (starting with '/'), got {path!r}")
    if "\x00" in path or len(path.encode()) > paths.MAX_PATH:
        raise InvalidError(f"{what} must be at most {paths.MAX_PATH} bytes without NUL")
    if ".." in path.split("/"):
        raise InvalidError(f"{what} must not contain '..': {path!r}")
    norm = posixpath.normpath(path)
    norm = "/" + norm.lstrip("/")
    if norm == "/" and not allow_root:
        raise InvalidError(f"{what} cannot be '/'")
    if any(norm == p or norm.startswith(p + "/") for p in SYSTEM_PREFIXES):
        raise InvalidError(f"{what} cannot be under {', '.join(SYSTEM_PREFIXES)}: {norm}")
    return norm


def refuse_gvisor(sb: Sandbox) -> None:
    """InvalidError for mounting into a gVisor sandbox: its mounts are in gVisor's kernel, out of the host's reach
    (decision 0069)."""
    if sb.gvisor:
        raise InvalidError(
            f"sandbox {sb.id} runs under gVisor, whose mounts live in its own kernel: mount_image works in runc"
            " sandboxes only for now (snapshot_filesystem and snapshot_directory work under both)"
        )


def open_init(sb: Sandbox) -> tuple[int, int]:
    """The pid and a pidfd of the sandbox's init (its agent, pid 1 inside), checked to be in the sandbox's cgroup.

    A pidfd names one process for good: once it is open and the process was
    seen in the cgroup afterwards, a recycled pid can no longer confuse us.
    """
    refuse_gvisor(sb)
    for _ in range(3):
        for pid in cgroups.processes(sb.cgroup_path):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspid = next((ln.split() for ln in status.splitlines() if ln.startswith("NSpid:")), [])
            if not nspid or nspid[-1] != "1":
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            if pid in cgroups.processes(sb.cgroup_path):
                return pid, pidfd
            os.close(pidfd)
    raise ConflictError(f"sandbox {sb.id} has no running init process")


class Snapshots:
    """Snapshot and mount operations of one daemon."""

    def __init__(self, mgr: Manager) -> None:
        self.mgr = mgr
        self._locks: dict[str, asyncio.Lock] = {}
        self.max_layers = int(os.environ.get("SHOAL_SNAPSHOT_MAX_LAYERS", "") or MAX_LAYERS)

    # ------------------------------------------------------------ helpers

    async def _running(self, sandbox_id: str) -> Sandbox:
        sb = await self.mgr.started(sandbox_id)
        if sb.state is not SandboxState.RUNNING:
            raise ConflictError(f"sandbox {sb.id} is {sb.state}: snapshots and mounts need a running sandbox")
        return sb

    def _image(self, image_id: str) -> ImageConfig:
        if not ids.is_valid(image_id, "image"):
            raise InvalidError(f"{image_id!r} is not an image id")
        row = self.mgr.state.image(image_id)
        if row is None:
            raise NotFoundError(f"no image {image_id} on this daemon")
        cfg = ImageConfig.from_json(row.config)
        for layer in cfg.layers:
            if not self.mgr.layers.exists(layer):
                raise NotFoundError(f"image {image_id} lost its layer {layer}; rebuild it")
        return cfg

    def _sandbox_image(self, sb: Sandbox) -> tuple[str, ImageConfig]:
        image_id = sb.spec.image_id
        row = self.mgr.state.image(image_id)
        if row is None:
            raise NotFoundError(f"the image of sandbox {sb.id} ({image_id}) was removed; cannot snapshot it")
        return image_id, ImageConfig.from_json(row.config)

    async def _copy(
        self,
        sb: Sandbox,
        work: Callable[[Path, treecopy.CopyOptions], treecopy.CopyStats | None],
        timeout: float,
        what: str,
        *,
        source_low: int | None = None,
        ending: bool = False,
    ) -> tuple[str, Path, treecopy.CopyStats | None]:
        """Run ``work(staging, opts) -> stats | None`` in a thread into a fresh staging directory.

        Returns (new layer id, staging path, stats).  On any failure the staging directory is removed.
        ``source_low``: the first host id of the source's owners when it is not stored ids (the sandbox's view).
        ``ending``: the sandbox is finished and its teardown waits for this copy (an exit snapshot).
        """
        layer_id = ids.new("image")
        staged = self.mgr.layers.staging(layer_id)
        cancel = threading.Event()
        opts = treecopy.CopyOptions(
            owner_low=self.mgr.cfg.idmap.host_id,
            source_low=source_low,
            owner_count=self.mgr.cfg.idmap.size,
            deadline=time.monotonic() + timeout,
            cancel=cancel,
        )
        task = asyncio.ensure_future(asyncio.to_thread(work, staged, opts))
        try:
            stats = await asyncio.wait_for(asyncio.shield(task), timeout)
        except BaseException as exc:
            cancel.set()
            with contextlib.suppress(BaseException):
                await task  # the thread stops at its next check; then the staging directory can go
            await asyncio.to_thread(shutil.rmtree, staged, True)
            if isinstance(exc, asyncio.TimeoutError | TimeoutError):
                raise TimeoutError(f"{what} of sandbox {sb.id} did not finish within {timeout:g} s") from None
            if isinstance(exc, treecopy.CopyError):
                raise ExecutionError(f"{what} of sandbox {sb.id} failed: {exc}") from None
            if isinstance(exc, FileNotFoundError) and sb.state is not SandboxState.RUNNING and not ending:
                raise ConflictError(f"sandbox {sb.id} ended during the {what}") from None
            raise
        if sb.state is not SandboxState.RUNNING and not ending:
            # Its files were being removed while we copied: what we have may be partial.
            await asyncio.to_thread(shutil.rmtree, staged, True)
            raise ConflictError(f"sandbox {sb.id} ended during the {what}")
        return layer_id, staged, stats

    def _add_image(self, image_id: str, recipe: dict[str, Any], cfg: ImageConfig) -> None:
        self.mgr.state.add_image(ImageRow(image_id, recipe, cfg.to_json(), time.time()))

    # ------------------------------------------------------------ snapshot_filesystem

    async def filesystem(self, sandbox_id: str, timeout: float, ttl: int | None) -> str:
        """``sb.snapshot_filesystem()``: a new image id."""
        return await self._filesystem(await self._running(sandbox_id), timeout, ttl)

    async def exit_snapshot(self, sb: Sandbox, timeout: float) -> str:
        """The files of a finished sandbox whose processes are gone and whose root is still mounted (a persistent
        sandbox's session on its way out): a new image id."""
        return await self._filesystem(sb, timeout, None, ending=True)

    async def _filesystem(self, sb: Sandbox, timeout: float, ttl: int | None, *, ending: bool = False) -> str:
        parent_id, parent = self._sandbox_image(sb)
        upper = sb.data_dir / "upper"
        started = sb.run_dir / "bundle" / "config.json"
        lowers = self.mgr.images.lowers(parent)
        too_long = len(",".join(lowers)) + 2 * len(str(upper)) + 200 > MAX_MOUNT_OPTIONS
        flatten = too_long or len(parent.layers) + 1 > self.max_layers
        exclude = {ENGINE_DIR}
        for rel in NETWORK_FILES:
            if _written_before(upper / rel, started):
                exclude.add(rel)

        def work(staged: Path, opts: treecopy.CopyOptions) -> treecopy.CopyStats | None:
            opts.exclude = frozenset(exclude)
            if flatten:
                # The whole root as the host sees the overlay (no mounts of the sandbox's namespace): one layer.
                src = os.open(sb.run_dir / "rootfs", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            else:
                opts.whiteouts = True
                src = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                dst = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    stats = treecopy.copy_tree(src, dst, opts)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            if not flatten:
                _drop_unchanged_dirs(staged, [Path(p) for p in lowers])
                if not any(staged.iterdir()):
                    staged.rmdir()
                    return None
            return stats

        t0 = time.monotonic()
        layer_id, staged, stats = await self._copy(sb, work, timeout, "snapshot", ending=ending)
        if stats is None:
            layers = list(parent.layers)
        else:
            self.mgr.layers.publish(layer_id, staged, {"snapshot_of": sb.id, "size": stats.bytes})
            layers = [layer_id] if flatten else [*parent.layers, layer_id]
        cfg = ImageConfig.from_json({**parent.to_json(), "layers": layers})
        image_id = layer_id
        recipe: dict[str, Any] = {"kind": "snapshot", "sandbox_id": sb.id, "parent": parent_id, "flattened": flatten}
        if ttl is not None:
            recipe["expires_at"] = time.time() + ttl
        self._add_image(image_id, recipe, cfg)
        log.info(
            "sandbox %s: snapshot %s in %.0f ms (%s)",
            sb.id,
            image_id,
            (time.monotonic() - t0) * 1000,
            "no changes" if stats is None else f"{stats.files} files, {stats.bytes} bytes",
        )
        return image_id

    # ------------------------------------------------------------ snapshot_directory

    async def directory(self, sandbox_id: str, path: str, timeout: float, ttl: int | None) -> str:
        """``sb.snapshot_directory(path)``: a new one-layer image of that directory."""
        path = check_path(path, "the directory to snapshot", allow_root=True)
        sb = await self._running(sandbox_id)
        rel = path.lstrip("/") or "."
        exclude: frozenset[str] = frozenset()
        if sb.gvisor:
            root, source_low = self._gvisor_root(sb, path)
            if rel == ".":
                exclude = frozenset({ENGINE_DIR})  # the engine's own mounts, empty directories on the host side
        else:
            root, source_low = self._init_root(sb), sb.host_ids.host_id

        def work(staged: Path, opts: treecopy.CopyOptions) -> treecopy.CopyStats:
            try:
                # Components may cross mounts (a volume, a mounted image) but never a link.
                src = safefs.openat2(
                    root,
                    rel,
                    os.O_RDONLY | os.O_DIRECTORY,
                    resolve=safefs.RESOLVE_BENEATH | safefs.RESOLVE_NO_SYMLINKS | safefs.RESOLVE_NO_MAGICLINKS,
                )
            except FileNotFoundError:
                raise NotFoundError(f"{path} does not exist in sandbox {sb.id}") from None
            except OSError as exc:
                raise InvalidError(f"{path} is not a directory in sandbox {sb.id} (links are not followed)") from exc
            opts.exclude = exclude
            try:
                dst = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    return treecopy.copy_tree(src, dst, opts)
                finally:
                    os.close(dst)
            finally:
                os.close(src)

        try:
            # Owners are as the source shows them (``source_low``), stored shifted back.
            layer_id, staged, stats = await self._copy(sb, work, timeout, "directory snapshot", source_low=source_low)
        finally:
            os.close(root)
        assert stats is not None
        self.mgr.layers.publish(layer_id, staged, {"snapshot_of": sb.id, "path": path, "size": stats.bytes})
        recipe: dict[str, Any] = {"kind": "directory_snapshot", "sandbox_id": sb.id, "path": path}
        if ttl is not None:
            recipe["expires_at"] = time.time() + ttl
        self._add_image(layer_id, recipe, ImageConfig(layers=[layer_id]))
        return layer_id

    def _init_root(self, sb: Sandbox) -> int:
        """The sandbox's root as its init sees it, mounts included (runc): an O_PATH descriptor."""
        pid, pidfd = open_init(sb)
        try:
            root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(pidfd)
            raise ConflictError(f"sandbox {sb.id} ended") from None
        try:
            signal.pidfd_send_signal(pidfd, 0)  # still the process whose root we opened
        except ProcessLookupError:
            os.close(root)
            raise ConflictError(f"sandbox {sb.id} ended") from None
        finally:
            os.close(pidfd)
        return root

    def _gvisor_root(self, sb: Sandbox, path: str) -> tuple[int, int]:
        """A gVisor sandbox's root as the host holds it (its files reach the host through the gofer, with the ids
        the sandbox sees) and the first id of its owners.  Volumes are mounted by the gofer, out of this view: a
        path on one, or holding one, is refused rather than copied without the volume's files."""
        for mount in sb.spec.request.volumes:
            inside = path == mount.path or path.startswith(mount.path.rstrip("/") + "/")
            holds = mount.path.startswith(path.rstrip("/") + "/")
            if inside or holds:
                raise InvalidError(
                    f"{path} {'is on' if inside else 'holds'} the volume mounted at {mount.path}: under gVisor"
                    " snapshot_directory copies the sandbox's own files only; read the volume itself"
                    " (Volume.read_file / listdir), or snapshot a directory beside it"
                )
        try:
            root = os.open(sb.run_dir / "rootfs", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise ConflictError(f"sandbox {sb.id} ended") from None
        return root, 0

    # ------------------------------------------------------------ mount_image

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _save_mounts(self, sb: Sandbox, mounts: dict[str, dict[str, Any]]) -> None:
        spec = sb.row.spec
        spec.image_mounts = mounts
        spec.mounted_layers = sorted({layer for m in mounts.values() for layer in m["layers"]})
        self.mgr.state.set_sandbox_spec(sb.id, spec)

    def mounts(self, sandbox_id: str) -> dict[str, str]:
        """Path → image id of the images mounted in a sandbox."""
        sb = self.mgr.get(sandbox_id)
        return {p: str(m["image_id"]) for p, m in sb.spec.image_mounts.items()}

    async def mount(self, sandbox_id: str, path: str, image_id: str) -> None:
        """``sb.mount_image(path, image)``."""
        path = check_path(path, "the mount path", allow_root=False)
        cfg = self._image(image_id)
        sb = await self._running(sandbox_id)
        refuse_gvisor(sb)
        async with self._lock(sb.id):
            mounts: dict[str, dict[str, Any]] = dict(sb.spec.image_mounts)
            if path in mounts:
                await self._detach(sb, path, mounts)
            name = os.urandom(6).hex()
            base = sb.data_dir / MOUNTS_DIR / name
            upper, work, stage, empty = (base / d for d in ("upper", "work", "stage", "empty"))
            for d in (upper, work, stage, empty):
                d.mkdir(parents=True, exist_ok=True)
            host_id = self.mgr.cfg.idmap.host_id  # as stored; the sandbox sees it in its own range
            os.chown(upper, host_id, host_id)
            os.chmod(upper, 0o755)
            lowers = self.mgr.images.lowers(cfg) or [str(empty)]
            options = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},redirect_dir=off,index=off,xino=off"
            if len(options) > MAX_MOUNT_OPTIONS:
                shutil.rmtree(base, ignore_errors=True)
                raise InvalidError(f"image {image_id} has too many layers ({len(lowers)}) to mount")
            # Recorded before the mount, so a prune never removes layers a mount may be using.
            mounts[path] = {"image_id": image_id, "layers": list(cfg.layers), "dir": name}
            self._save_mounts(sb, mounts)
            try:
                await self._helper(sb, ["mount", path, str(sb.host_ids.host_id), str(stage), options])
            except BaseException:
                mounts.pop(path, None)
                self._save_mounts(sb, mounts)
                await asyncio.to_thread(_remove_mount_dir, base)
                raise
        log.info("sandbox %s: image %s mounted at %s", sb.id, image_id, path)

    async def unmount(self, sandbox_id: str, path: str) -> None:
        """``sb.unmount_image(path)``."""
        path = check_path(path, "the mount path", allow_root=False)
        sb = await self._running(sandbox_id)
        async with self._lock(sb.id):
            mounts: dict[str, dict[str, Any]] = dict(sb.spec.image_mounts)
            if path not in mounts:
                raise InvalidError(f"no image is mounted at {path} in sandbox {sb.id}")
            await self._detach(sb, path, mounts)

    async def _detach(self, sb: Sandbox, path: str, mounts: dict[str, dict[str, Any]]) -> None:
        # InvalidError: the path is gone (an outer mount was removed, or the sandbox moved things): nothing is left.
        with contextlib.suppress(InvalidError):
            await self._helper(sb, ["umount", path])
        entry = mounts.pop(path)
        self._save_mounts(sb, mounts)
        await asyncio.to_thread(_remove_mount_dir, sb.data_dir / MOUNTS_DIR / str(entry["dir"]))

    async def _helper(self, sb: Sandbox, args: list[str]) -> None:
        _, pidfd = open_init(sb)
        fds = {3: pidfd}
        try:
            if sb.spec.uid_slot is not None and args[0] == "mount":
                helper = self.mgr.cfg.agent_dir / BINARY_NAME
                mapping = await asyncio.to_thread(
                    idmap.storage_mapping, helper, sb.host_ids, self.mgr.cfg.idmap.host_id
                )
                fds[4] = mapping
            res = await spawn.run([sys.executable, "-I", "-S", str(HELPER), *args], fds=fds, env={})
        finally:
            for fd in fds.values():
                os.close(fd)
        message = res.stderr.decode(errors="replace").strip()[-500:]
        if res.returncode == 2:
            raise InvalidError(message)
        if res.returncode != 0:
            raise ExecutionError(f"{args[0]} in sandbox {sb.id} failed: {message or f'exit {res.returncode}'}")


def _remove_mount_dir(path: Path) -> None:
    """Delete a mount's upper and work directories without following anything in them.

    The sandbox may still hold files open in a lazily detached mount and write
    there while this runs: the descriptor-based removal never follows a link
    or opens a FIFO, whatever appears meanwhile.
    """
    try:
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        safefs.remove_tree(parent, path.name)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
    finally:
        os.close(parent)


def _written_before(path: Path, mark: Path) -> bool:
    """Whether ``path`` was last written no later than ``mark`` (i.e. by the engine before the sandbox started)."""
    try:
        return os.lstat(path).st_mtime_ns <= os.stat(mark).st_mtime_ns
    except OSError:
        return False


def _drop_unchanged_dirs(staged: Path, lowers: list[Path]) -> None:
    """Remove empty directories that only mirror the image (an overlay copies a directory up to write in it).

    A directory stays if it is opaque, not empty, or differs in mode or owner
    from the topmost layer that has it.  Lower layers are looked into without
    following links: they too were shaped by untrusted content.
    """
    for dirpath, dirnames, filenames in os.walk(staged, topdown=False):
        here = Path(dirpath)
        if here == staged or filenames or any((here / d).exists() or (here / d).is_symlink() for d in dirnames):
            continue
        try:
            if os.getxattr(here, treecopy.OPAQUE, follow_symlinks=False):
                continue
        except OSError:
            pass
        rel = str(here.relative_to(staged))
        st = os.lstat(here)
        for lower in lowers:
            below = _lstat_beneath(lower, rel)
            if below is None:
                continue
            if (below.st_mode, below.st_uid, below.st_gid) == (st.st_mode, st.st_uid, st.st_gid):
                here.rmdir()
            break


def _lstat_beneath(root: Path, rel: str) -> os.stat_result | None:
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        sub = safefs.openat2(fd, rel, safefs.O_PATH)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return os.fstat(sub)
    finally:
        os.close(sub)
