"""Host-side file operations inside an image's root, with the image's own symlink semantics.

Build steps that need no process (copying local files, creating a working
directory, installing the host's CA certificates) run on the host: the
daemon mounts an overlay of the parent image's layers with a fresh upper
directory (the new layer) at a private mount point and edits the tree there.

Trust: the image is hostile (a registry image, or one a RUN step shaped).
Every path is resolved by the kernel with ``openat2(RESOLVE_IN_ROOT)``
relative to a descriptor of the mounted root, exactly as a ``chroot`` would:
absolute and relative symlinks inside the image resolve inside it, ``..``
stops at its root, magic links are refused and no mount is crossed.  The last
component is always handled with ``*at`` calls on its parent's descriptor and
``O_NOFOLLOW``/``AT_SYMLINK_NOFOLLOW``, so a symlink there is replaced, never
written through.  New files are owned by the sandbox's root (``fchown`` on the
descriptor).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from shoal.runtime import rootfs
from shoal.util import safefs

RESOLVE_IN_ROOT = 0x10
IN_ROOT = RESOLVE_IN_ROOT | safefs.RESOLVE_NO_MAGICLINKS | safefs.RESOLVE_NO_XDEV
MAX_READ = 64 << 20


@contextlib.contextmanager
def mounted(lowers: list[str], upper: Path, work: Path, target: Path, owner: int) -> Iterator[int]:
    """Mount ``lowers`` (topmost first) + ``upper`` at ``target``; yields a descriptor of the root.

    The mount is removed, and ``work`` deleted, on the way out; ``upper`` then
    holds exactly what the block changed (whiteouts included).
    """
    target.mkdir(parents=True, exist_ok=True)
    rootfs.mount_overlay(lowers, str(upper), str(work), str(target), owner)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        rootfs.unmount(str(target))
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            target.rmdir()


def split(path: str) -> list[str]:
    """Components of an absolute image path (``..`` is resolved by the kernel, inside the root)."""
    return [p for p in path.split("/") if p not in ("", ".")]


def open_dir(root_fd: int, parts: list[str]) -> int:
    """A descriptor of the directory ``parts`` in the image."""
    if not parts:
        return os.dup(root_fd)
    return safefs.openat2(root_fd, "/".join(parts), os.O_RDONLY | os.O_DIRECTORY, resolve=IN_ROOT)


def lstat_in(dir_fd: int, name: str) -> os.stat_result | None:
    """The entry ``name`` of a directory, not followed; None if absent."""
    return safefs.lstat_at(dir_fd, name)


def make_dirs(root_fd: int, parts: list[str], uid: int, gid: int, mode: int = 0o755) -> int:
    """``mkdir -p`` in the image; returns the last directory's descriptor.  Existing directories keep
    their owner and mode; new ones get ``uid:gid`` and ``mode``."""
    i = len(parts)
    while True:
        try:
            fd = open_dir(root_fd, parts[:i])
            break
        except FileNotFoundError:
            i -= 1  # the root itself always opens
    if i == len(parts):
        return fd
    # parts[:i] exists; create the rest one by one, each from its parent's descriptor
    parent = fd
    try:
        for name in parts[i:]:
            st = lstat_in(parent, name)
            if st is not None and stat.S_ISLNK(st.st_mode):
                # a dangling link where a directory is wanted: the image's own business; replace it
                os.unlink(name, dir_fd=parent)
            elif st is not None and not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, f"/{'/'.join(parts)}: a file is in the way", name)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            os.fchown(nxt, uid, gid)
            os.fchmod(nxt, mode)
            os.close(parent)
            parent = nxt
        return parent
    except BaseException:
        os.close(parent)
        raise


def clear_entry(dir_fd: int, name: str) -> None:
    """Remove a non-directory entry (file, link, device) so a new one can take its name."""
    st = lstat_in(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "a directory is in the way", name)
    os.unlink(name, dir_fd=dir_fd)


def read_file(root_fd: int, parts: list[str]) -> bytes | None:
    """A regular file's content (symlinks followed inside the image), or None if it is not one."""
    try:
        fd = safefs.openat2(root_fd, "/".join(parts), os.O_RDONLY | os.O_NOCTTY, resolve=IN_ROOT)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_READ:
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_file(dir_fd: int, name: str, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Create (or replace) the regular file ``name`` in a directory."""
    clear_entry(dir_fd, name)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
