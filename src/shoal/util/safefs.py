"""Host-side file access inside a directory tree that sandboxes write: never outside it.

Trust: nothing below a volume's root.  Any sandbox that mounts the volume can
plant symbolic links (to ``/etc/shadow``, ``/``, another volume, the daemon's
data dir), hard links, FIFOs and sockets, and can rename directories while the
daemon works in the tree.  The daemon runs as root, so one followed link would
hand the sandbox the host.

Defences:

* Every path is resolved by the kernel relative to a directory file
  descriptor with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
  RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)``: no component may be a symbolic
  link (even one pointing inside), ``..`` cannot climb out, and no mount is
  crossed.  The checks happen atomically during the lookup, so a concurrent
  rename cannot redirect it.
* Paths are split and checked first (:func:`split`): no ``..``, no NUL, bounded
  length; absolute paths mean "from the volume's root".
* Files are opened ``O_PATH`` first and only re-opened for reading when
  ``fstat`` says they are regular files, so a FIFO, socket or device node is
  never opened (no blocking, no side effect).
* Anything the daemon creates is made with ``O_EXCL``/``mkdirat`` relative to a
  directory descriptor and then given to the sandbox's user with ``fchown``
  on the descriptor (never by path); renames and unlinks use
  ``renameat2``/``unlinkat`` on descriptors, so they act on the directory
  entry, never on what a link points to.
* Hard links need no special case: a sandbox can only link files that it sees
  in the same mount, i.e. files already inside the volume, and the daemon
  never follows or chowns through a path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Iterator

from shoal.wire.paths import join

O_PATH = getattr(os, "O_PATH", 0o10000000)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
SAFE_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
RENAME_NOREPLACE = 1
SYS_OPENAT2 = 437
"""The same number on x86_64 and arm64 (the generic syscall table)."""
MAX_DEPTH = 1024
"""Deepest directory tree the recursive operations walk (each level holds one descriptor)."""
MAX_REFILLS = 1000
"""How often ``remove_tree`` goes back into directories that were refilled while it emptied them."""

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.syncfs.argtypes = [ctypes.c_int]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = SAFE_RESOLVE) -> int:
    """``openat2(2)``: open ``path`` beneath ``dirfd`` without following any link.  Raises OSError."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = os.fsencode(path)
    while True:
        fd = _libc.syscall(SYS_OPENAT2, dirfd, raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            continue  # a concurrent rename raced the lookup: the kernel asks to retry
        raise OSError(err, os.strerror(err), path)


def renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int = 0) -> None:
    """``renameat2(2)`` on directory descriptors; ``RENAME_NOREPLACE`` fails if ``dst`` exists."""
    if _libc.renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding ``fd`` to disk."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_dir(dirfd: int, parts: list[str]) -> int:
    """A readable descriptor of the directory ``parts`` beneath ``dirfd`` (ENOTDIR, ENOENT, ELOOP, EXDEV)."""
    return openat2(dirfd, join(parts), os.O_RDONLY | os.O_DIRECTORY)


def open_regular(dirfd: int, parts: list[str]) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file ``parts``, and its stat.

    Raises IsADirectoryError for a directory and OSError(EINVAL) for anything
    that is not a regular file; such files are never opened for reading.
    """
    pfd = openat2(dirfd, join(parts), O_PATH)
    try:
        st = os.fstat(pfd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", join(parts))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", join(parts))
        # Re-opening through our own descriptor opens exactly the inode we checked.
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(pfd)
    return fd, st


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    """``fstatat(AT_SYMLINK_NOFOLLOW)`` of one entry, or None if it does not exist."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def make_dirs(dirfd: int, parts: list[str], uid: int, gid: int, mode: int = 0o755) -> int:
    """``mkdir -p`` beneath ``dirfd``, new directories owned by ``uid:gid``; returns the last one's descriptor."""
    fd = os.dup(dirfd)
    try:
        for name in parts:
            try:
                nxt = openat2(fd, name, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                created = False
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                    created = True
                nxt = openat2(fd, name, os.O_RDONLY | os.O_DIRECTORY)
                if created:
                    os.fchown(nxt, uid, gid)
                    os.fchmod(nxt, mode)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def walk(dirfd: int, parts: list[str], recursive: bool) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` of each entry below the directory ``parts``; never follows links.

    Subdirectories are re-resolved from ``dirfd`` with the safe lookup, so a
    directory swapped for a link while the walk runs is skipped, not followed.
    """
    queue = [parts]
    while queue:
        cur = queue.pop()
        try:
            fd = open_dir(dirfd, cur)
        except OSError:
            if cur is parts:
                raise
            continue  # gone, replaced by a link or a file meanwhile
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            for entry in sorted(entries, key=lambda e: e.name):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                sub = [*cur, entry.name]
                yield "/".join(sub), st
                if recursive and stat.S_ISDIR(st.st_mode) and len(sub) < MAX_DEPTH:
                    queue.append(sub)
        finally:
            os.close(fd)


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove the directory ``name`` in ``parent_fd`` and everything in it, never following a link.

    Iterative, one descriptor per level (at most MAX_DEPTH levels).  An entry
    that changes type meanwhile is handled as what it now is; a directory that
    keeps being refilled (a sandbox writing into it) ends in OSError(ENOTEMPTY).
    """
    stack: list[tuple[int, str]] = []  # (fd of the directory's parent, directory name)
    fds: list[int] = []
    retries = 0
    try:
        stack.append((parent_fd, name))
        fds.append(openat2(parent_fd, name, os.O_RDONLY | os.O_DIRECTORY))
        while fds:
            fd = fds[-1]
            descended = False
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        with contextlib.suppress(FileNotFoundError):
                            try:
                                os.unlink(entry.name, dir_fd=fd)
                            except IsADirectoryError:
                                is_dir = True  # became a directory meanwhile
                    if is_dir:
                        if len(fds) >= MAX_DEPTH:
                            raise OSError(errno.ELOOP, f"directory tree deeper than {MAX_DEPTH} levels")
                        try:
                            sub = openat2(fd, entry.name, os.O_RDONLY | os.O_DIRECTORY)
                        except FileNotFoundError:
                            continue
                        except OSError as exc:
                            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                                with contextlib.suppress(FileNotFoundError):
                                    os.unlink(entry.name, dir_fd=fd)  # now a link or file: remove the entry itself
                                continue
                            raise
                        stack.append((fd, entry.name))
                        fds.append(sub)
                        descended = True
                        break
            if descended:
                continue
            os.close(fds.pop())
            pfd, pname = stack.pop()
            try:
                os.rmdir(pname, dir_fd=pfd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                retries += 1
                if exc.errno != errno.ENOTEMPTY or retries > MAX_REFILLS:
                    raise
                # Refilled meanwhile: go round again.
                stack.append((pfd, pname))
                fds.append(openat2(pfd, pname, os.O_RDONLY | os.O_DIRECTORY))
    finally:
        for fd in fds:
            os.close(fd)


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy ``size`` bytes between two regular files in the kernel (a shorter source just ends early)."""
    offset = 0
    while offset < size:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(size - offset, 1 << 30))
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = os.sendfile(dst_fd, src_fd, None, min(size - offset, 1 << 30))
        if n == 0:
            break
        offset += n
