"""A host id range per sandbox: its user namespace, and idmapped mounts of what is stored on disk.

Files on disk (image layers, upper directories, volumes) keep one shared owner range: sandbox id ``x`` is
host id ``STORAGE + x`` (decision 0002).  A sandbox runs in a range of its own, ``B + x``
(decision 0063).  Two user namespaces make that work, both made by :func:`make_namespaces`:

* the sandbox's own (``0 B 65536``), created by a process running as host uid ``B``, so that the
  kernel charges per-user limits (inotify instances, keys, user namespaces) to ``B`` and not to root;
  the runtime joins it instead of making one;
* an id-mapping (``0 0 1`` and ``STORAGE B 65536``) that is never entered: it is attached to clones of
  the stored trees (``open_tree`` + ``mount_setattr(MOUNT_ATTR_IDMAP)``), through which a file stored
  as ``STORAGE + x`` appears as ``B + x`` and a file the sandbox writes as ``B + x`` is stored as
  ``STORAGE + x``.  Root stays root, so the daemon's own writes through such a mount are unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shoal.runtime import rootfs

IDS_PER_SANDBOX = 65536
FIRST_SANDBOX_ID = 1 << 20
"""Host id of the first sandbox range: above the shared storage range (100000 + 65536) and any host user."""

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


@dataclass(frozen=True)
class IdRange:
    """Sandbox ids ``0..size-1`` are host ids ``host_id..host_id+size-1``."""

    host_id: int
    size: int = IDS_PER_SANDBOX

    def contains(self, host_id: int) -> bool:
        """Whether a host id is in this range."""
        return self.host_id <= host_id < self.host_id + self.size


@dataclass
class Namespaces:
    """Descriptors of a sandbox's user namespace and of its storage id-mapping; close when done."""

    sandbox: int
    storage: int

    def close(self) -> None:
        """Close both descriptors (mounts made with the mapping keep it)."""
        for fd in (self.sandbox, self.storage):
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def sandbox_path(self) -> str:
        """A path to the sandbox's namespace that another process may open while this one holds it."""
        return f"/proc/{os.getpid()}/fd/{self.sandbox}"


def _specs(ids: IdRange, storage_id: int, *, with_sandbox: bool) -> list[str]:
    storage = f"-/0:0:1,{storage_id}:{ids.host_id}:{ids.size}"
    return [f"{ids.host_id}/0:{ids.host_id}:{ids.size}", storage] if with_sandbox else [storage]


def _spawn(helper: Path, specs: list[str]) -> list[int]:
    """Run ``shoal-agent userns`` and open the namespaces of its children; blocks for a few milliseconds."""
    proc = subprocess.Popen(
        [str(helper), "userns", *specs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        env={},
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    fds: list[int] = []
    try:
        line = proc.stdout.readline().decode(errors="replace").split()
        if len(line) != len(specs):
            proc.stdin.close()
            proc.wait(5)
            message = proc.stderr.read().decode(errors="replace").strip()[-300:]
            raise OSError(errno.EPERM, f"could not make a user namespace: {message or f'exit {proc.returncode}'}")
        for pid in line:
            fds.append(os.open(f"/proc/{int(pid)}/ns/user", os.O_RDONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        proc.kill()
        raise
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return fds


def make_namespaces(helper: Path, ids: IdRange, storage_id: int) -> Namespaces:
    """A new user namespace for a sandbox with ``ids`` (owned by its root), and its storage id-mapping."""
    sandbox, storage = _spawn(helper, _specs(ids, storage_id, with_sandbox=True))
    return Namespaces(sandbox=sandbox, storage=storage)


def storage_mapping(helper: Path, ids: IdRange, storage_id: int) -> int:
    """Only the storage id-mapping of ``ids`` (a descriptor): for mounts into a running sandbox."""
    (fd,) = _spawn(helper, _specs(ids, storage_id, with_sandbox=False))
    return fd


def gvisor_storage_mapping(helper: Path, storage_id: int, size: int = IDS_PER_SANDBOX) -> int:
    """The storage id-mapping of a gVisor sandbox (a descriptor): ``STORAGE + x`` appears as ``x``.

    runsc's gofer, which does a gVisor sandbox's file operations, runs as host root in the host's user
    namespace and creates files as the sandbox's own ids (root: 0); through a root mounted with this mapping
    they are stored in the shared range, as runc sandboxes' files are (decision 0069)."""
    # Host root keeps a mapping (to the id just past the sandbox's range) or the daemon could not use the
    # root-owned directories that hold the layers and the upper directory through such a mount.
    (fd,) = _spawn(helper, [f"-/{storage_id}:0:{size},0:{size}:1"])
    return fd


def clone(source: str | int, target: str, mapping: int, *, read_only: bool = False, recursive: bool = False) -> None:
    """Attach at ``target`` (a directory) a copy of the mount tree at ``source`` (a path or a descriptor of
    a directory), id-mapped through ``mapping``; ``nosuid,nodev``, and read-only if asked."""
    tree = detached(source, mapping, read_only=read_only, recursive=recursive)
    try:
        _check(
            _libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
            f"move_mount to {target}",
        )
    finally:
        os.close(tree)


def detached(source: str | int, mapping: int, *, read_only: bool = False, recursive: bool = False) -> int:
    """A descriptor of a detached copy of the mount tree at ``source`` (a path or a directory's descriptor),
    id-mapped through ``mapping``, ``nosuid,nodev`` and read-only if asked; it goes away when closed, unless
    attached somewhere (``clone``) or used as an overlay layer (which keeps its own reference)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    if isinstance(source, int):
        tree = _check(_libc.syscall(SYS_OPEN_TREE, source, b"", flags | AT_EMPTY_PATH), "open_tree")
    else:
        tree = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, source.encode(), flags), f"open_tree {source}")
    try:
        attr = _MountAttr(
            MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if read_only else 0),
            0,
            0,
            mapping,
        )
        _check(
            _libc.syscall(
                SYS_MOUNT_SETATTR,
                tree,
                b"",
                AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0),
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            "mount_setattr(MOUNT_ATTR_IDMAP)",
        )
    except BaseException:
        os.close(tree)
        raise
    return tree


def probe(helper: Path, directory: Path, scratch: Path, storage_id: int) -> str | None:
    """Why id-mapped mounts of ``directory`` cannot be made here (None: they can); ``scratch``: a directory of
    the daemon's where the probe's mount point may go."""
    point = scratch / f".idmap-probe-{os.getpid()}"
    try:
        mapping = storage_mapping(helper, IdRange(FIRST_SANDBOX_ID), storage_id)
    except OSError as exc:
        return str(exc)
    try:
        point.mkdir(mode=0o700, exist_ok=True)
        clone(str(directory), str(point), mapping, read_only=True)
    except OSError as exc:
        return f"{directory} cannot be id-mapped ({exc.strerror or exc})"
    finally:
        os.close(mapping)
        with contextlib.suppress(OSError):
            rootfs.unmount(str(point))
        with contextlib.suppress(OSError):
            point.rmdir()
    return None


def mount_overlay(lowers: list[str], upper: str, work: str, target: str, owner: int, mapping: int) -> None:
    """``rootfs.mount_overlay`` through id-mapped copies: the sandbox sees stored ids shifted into its range.

    Each lower layer is copied read-only, and the directory holding ``upper`` and ``work`` writable, as
    detached mount trees that only the overlay keeps.  ``owner``: the stored owner of ``upper``.
    """
    rootfs.prepare_upper(upper, work, target, owner)
    trees: list[int] = []
    try:
        for lower in lowers:
            trees.append(detached(lower, mapping, read_only=True))
        trees.append(detached(os.path.dirname(upper), mapping))
        rootfs.mount_overlay_fds(trees[:-1], trees[-1], os.path.basename(upper), os.path.basename(work), target)
    finally:
        for fd in trees:
            os.close(fd)
