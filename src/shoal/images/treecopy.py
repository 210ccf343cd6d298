"""Copy a directory tree that a sandbox writes into the layer store, never following anything.

Used by snapshots: a sandbox's overlay upper directory becomes a layer
(``snapshot_filesystem``), or a directory seen through its mount namespace
becomes an image of its own (``snapshot_directory``).

Trust: nothing in the source tree.  The sandbox keeps running while the copy
runs, so it can plant symbolic links (to ``/etc/shadow``, ``/``), hard links,
FIFOs, sockets, files with set-id bits or foreign owners, trees thousands of
levels deep, and can swap a directory for a link between two steps of the
copy.  The daemon copies as root, so one followed link would put a host file
into an image the sandbox can read.

Defences:

* Every entry is reached relative to its parent's descriptor with
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
  RESOLVE_NO_XDEV)`` (:mod:`shoal.util.safefs`): a component that became a
  link fails the lookup, and a mount point is never entered (it is copied as
  an empty directory, like ``cp -x``).
* Files are opened ``O_PATH`` and re-opened for reading only when ``fstat``
  says they are regular, so a FIFO or device is never opened; at most the
  size seen at open is copied (a file that keeps growing cannot stall the copy).
* Links are copied as links (their targets are text; nothing resolves them on
  the host).  Hard links are recreated only between files of this copy.
* Devices and sockets are dropped, except overlay whiteouts (character device
  0/0) when copying an upper directory, where they are the record of a deletion.
* Owners outside the sandbox uid range become the range's ``nobody`` and lose
  their set-id bits; extended attributes are dropped except ``user.*``, a
  namespaced file capability of the range's root (``security.capability``
  v3), and ``trusted.overlay.opaque`` of an upper directory.
* Depth, entry count and the deadline are bounded; a cancelled or failed copy
  raises and leaves the destination for the caller to remove (it is a staging
  directory that is published only when complete).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass, field

from shoal.exception import TimeoutError
from shoal.util import safefs

MAX_DEPTH = 256
"""Deepest directory level copied (each level holds two descriptors)."""
MAX_ENTRIES = 5_000_000
OPAQUE = "trusted.overlay.opaque"
CAPS = "security.capability"
VFS_CAP_REVISION_3 = 0x03000000
NOBODY = 65534


CHUNK = 64 << 20
"""Bytes copied between two deadline checks."""


def _copy_range(src: int, dst: int, offset: int, count: int) -> int:
    """Copy ``count`` bytes at ``offset`` from ``src`` to the same offset of ``dst``; returns bytes copied."""
    try:
        return os.copy_file_range(src, dst, count, offset, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(src, min(count, 1 << 20), offset)
    return os.pwrite(dst, data, offset) if data else 0


class CopyError(Exception):
    """The tree cannot be copied (too deep, too many entries)."""


@dataclass
class CopyOptions:
    """How to copy."""

    owner_low: int
    """First host uid of the stored range (the sandbox's root as stored on disk)."""
    owner_count: int = 65536
    source_low: int | None = None
    """First host uid of the source's range, when it differs (a sandbox's own range, read through its root):
    owners are shifted from it to ``owner_low``.  None: the source is stored ids already."""
    exclude: frozenset[str] = frozenset()
    """Paths relative to the source root that are not copied (nor anything below them)."""
    whiteouts: bool = False
    """The source is an overlay upper directory: keep whiteouts and opaque markers."""
    deadline: float | None = None
    """``time.monotonic()`` value after which the copy stops with TimeoutError."""
    cancel: threading.Event | None = None


@dataclass
class CopyStats:
    """What a copy did."""

    files: int = 0
    dirs: int = 0
    links: int = 0
    whiteouts: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    """Entries left out (devices, sockets, unreadable), at most 20 named."""
    skipped_count: int = 0


@dataclass
class _Level:
    """One open directory of the walk: source and destination descriptors, and the entries left to copy."""

    src: int
    dst: int
    rel: str
    st: os.stat_result | None
    entries: list[os.DirEntry[str]] = field(default_factory=list)

    def finish(self, copier: _Copier) -> None:
        """Set the copied directory's owner, mode and times, and close both descriptors."""
        try:
            if self.st is not None:
                uid, gid, mode = copier._owner(self.st.st_uid, self.st.st_gid, stat.S_IMODE(self.st.st_mode))
                os.fchown(self.dst, uid, gid)
                os.fchmod(self.dst, mode)
                os.utime(self.dst, ns=(self.st.st_atime_ns, self.st.st_mtime_ns))
        finally:
            self.close()

    def close(self) -> None:
        """Close both descriptors (once)."""
        for fd in (self.src, self.dst):
            if fd >= 0:
                os.close(fd)
        self.src = self.dst = -1


class _Copier:
    def __init__(self, opts: CopyOptions, dst_root: int) -> None:
        self.opts = opts
        self.dst_root = dst_root
        self.stats = CopyStats()
        self.links: dict[tuple[int, int], str] = {}
        self.entries = 0

    # ------------------------------------------------------------ helpers

    def _owner(self, uid: int, gid: int, mode: int) -> tuple[int, int, int]:
        low = self.opts.owner_low
        src = low if self.opts.source_low is None else self.opts.source_low
        foreign = False
        if 0 <= uid - src < self.opts.owner_count:
            uid = uid - src + low
        else:
            uid, foreign = low + NOBODY, True
        if 0 <= gid - src < self.opts.owner_count:
            gid = gid - src + low
        else:
            gid, foreign = low + NOBODY, True
        if foreign:
            mode &= ~0o6000
        return uid, gid, mode

    def _skip(self, rel: str, why: str) -> None:
        self.stats.skipped_count += 1
        if len(self.stats.skipped) < 20:
            self.stats.skipped.append(f"{rel} ({why})")

    def _tick(self) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise CopyError(f"more than {MAX_ENTRIES} entries")
        if self.entries & 63 == 0:
            self._check_time()

    def _check_time(self) -> None:
        o = self.opts
        if o.cancel is not None and o.cancel.is_set():
            raise TimeoutError("the copy was cancelled")
        if o.deadline is not None and time.monotonic() > o.deadline:
            raise TimeoutError("the copy did not finish in time")

    def _xattrs(self, src: int, dst: int, is_dir: bool) -> None:
        """Copy the extended attributes worth keeping from one descriptor to another."""
        try:
            names = os.listxattr(src)
        except OSError:
            return
        for name in names:
            keep = (
                name.startswith("user.")
                or (name == CAPS and not is_dir)
                or (name == OPAQUE and is_dir and self.opts.whiteouts)
            )
            if not keep:
                continue
            try:
                value = os.getxattr(src, name)
            except OSError:
                continue
            if (name == CAPS and not self._namespaced_caps(value)) or (name == OPAQUE and value != b"y"):
                continue
            if name == CAPS and self.opts.source_low is not None:
                value = value[:20] + struct.pack("<I", self.opts.owner_low)  # its root as stored
            try:
                os.setxattr(dst, name, value)
            except OSError:
                continue

    def _namespaced_caps(self, value: bytes) -> bool:
        """A v3 file capability whose root is the sandbox's root (meaningless outside the sandbox)."""
        if len(value) != 24:
            return False
        fields: tuple[int, ...] = struct.unpack("<IIIIII", value)
        src = self.opts.owner_low if self.opts.source_low is None else self.opts.source_low
        return (fields[0] & 0xFF000000) == VFS_CAP_REVISION_3 and fields[5] == src

    # ------------------------------------------------------------ the walk

    def run(self, src_root: int) -> CopyStats:
        # Depth first, one level open at a time per depth; a directory's owner, mode and times are set after
        # its entries are copied (creating them changes its mtime).
        levels: list[_Level] = [_Level(os.dup(src_root), os.dup(self.dst_root), "", None)]
        try:
            with os.scandir(levels[0].src) as it:
                levels[0].entries = sorted(it, key=lambda e: e.name, reverse=True)
            while levels:
                level = levels[-1]
                sub: _Level | None = None
                while level.entries and sub is None:
                    sub = self._entry(level, level.entries.pop())
                if sub is not None:
                    levels.append(sub)
                    if len(levels) > MAX_DEPTH:
                        raise CopyError(f"directory tree deeper than {MAX_DEPTH} levels at /{sub.rel}")
                    with os.scandir(sub.src) as it:
                        sub.entries = sorted(it, key=lambda e: e.name, reverse=True)
                    continue
                levels.pop()
                level.finish(self)
        finally:
            for level in levels:
                level.close()
        return self.stats

    def _entry(self, level: _Level, entry: os.DirEntry[str]) -> _Level | None:
        """Copy one entry; for a directory, return the level to descend into."""
        self._tick()
        sfd, dfd, name = level.src, level.dst, entry.name
        rel = f"{level.rel}/{name}" if level.rel else name
        if rel in self.opts.exclude:
            return None
        try:
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        mode = st.st_mode
        try:
            if stat.S_ISDIR(mode):
                return self._dir(sfd, dfd, rel, name, st)
            if stat.S_ISREG(mode):
                self._file(sfd, dfd, rel, name, st)
            elif stat.S_ISLNK(mode):
                target = os.readlink(name, dir_fd=sfd)
                os.symlink(target, name, dir_fd=dfd)
                uid, gid, _ = self._owner(st.st_uid, st.st_gid, 0)
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
                self.stats.links += 1
            elif stat.S_ISCHR(mode) and st.st_rdev == 0 and self.opts.whiteouts:
                os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=dfd)
                self.stats.whiteouts += 1
            elif stat.S_ISFIFO(mode):
                uid, gid, perm = self._owner(st.st_uid, st.st_gid, stat.S_IMODE(mode))
                os.mkfifo(name, 0o600, dir_fd=dfd)
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
                os.chmod(name, perm, dir_fd=dfd)  # a FIFO we just made: no link to follow
            else:
                self._skip(rel, "device or socket")
        except FileNotFoundError:
            return None  # removed while we copied: the snapshot is of a moment just after
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                return None  # swapped for a link or another type meanwhile
            raise
        return None

    def _dir(self, sfd: int, dfd: int, rel: str, name: str, st: os.stat_result) -> _Level | None:
        try:
            child = safefs.openat2(sfd, name, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            child = -1  # a mount point: copied empty
        os.mkdir(name, 0o700, dir_fd=dfd)
        dchild = safefs.openat2(dfd, name, os.O_RDONLY | os.O_DIRECTORY)
        self.stats.dirs += 1
        if child < 0:
            uid, gid, mode = self._owner(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            os.fchown(dchild, uid, gid)
            os.fchmod(dchild, mode)
            os.close(dchild)
            return None
        self._xattrs(child, dchild, True)
        return _Level(child, dchild, rel, os.fstat(child))

    def _file(self, sfd: int, dfd: int, rel: str, name: str, st: os.stat_result) -> None:
        pfd = safefs.openat2(sfd, name, safefs.O_PATH)
        try:
            fst = os.fstat(pfd)
            if not stat.S_ISREG(fst.st_mode):
                return
            if fst.st_nlink > 1:
                first = self.links.get((fst.st_dev, fst.st_ino))
                if first is not None:
                    os.link(first, name, src_dir_fd=self.dst_root, dst_dir_fd=dfd, follow_symlinks=False)
                    return
            src = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        finally:
            os.close(pfd)
        try:
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                self._copy_data(src, dst, fst.st_size)
                uid, gid, mode = self._owner(fst.st_uid, fst.st_gid, stat.S_IMODE(fst.st_mode))
                os.fchown(dst, uid, gid)
                os.fchmod(dst, mode)  # after chown, which clears set-id bits
                self._xattrs(src, dst, False)
                os.utime(dst, ns=(fst.st_atime_ns, fst.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
        if fst.st_nlink > 1:
            self.links[(fst.st_dev, fst.st_ino)] = rel
        self.stats.files += 1

    def _copy_data(self, src: int, dst: int, size: int) -> None:
        """Copy the data of ``src`` up to ``size`` bytes, keeping holes (a sparse terabyte stays free).

        Only allocated ranges are copied (``SEEK_DATA``/``SEEK_HOLE``), in the
        kernel, in chunks with a deadline check between them.
        """
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole is left
                raise
            if start >= size:
                break
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
            while start < end:
                n = _copy_range(src, dst, start, min(end - start, CHUNK))
                if n == 0:
                    break
                start += n
                self.stats.bytes += n
                self._check_time()
            if start < end:
                break  # the file shrank meanwhile
            pos = end
        os.ftruncate(dst, size)


def copy_tree(src_root: int, dst_root: int, opts: CopyOptions) -> CopyStats:
    """Copy the directory open at ``src_root`` into the empty directory open at ``dst_root``.

    The root's own owner and mode are copied too.  Raises TimeoutError past
    the deadline or when cancelled, CopyError for trees beyond the limits.
    """
    copier = _Copier(opts, dst_root)
    st = os.fstat(src_root)
    copier._xattrs(src_root, dst_root, True)
    stats = copier.run(src_root)
    uid, gid, mode = copier._owner(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    os.fchown(dst_root, uid, gid)
    os.fchmod(dst_root, mode)
    return stats
