"""Unpack one OCI/Docker image layer (a tar stream) into a shoal layer directory.

Each registry layer becomes one layer of the store, kept as a diff: OCI
whiteouts are translated to overlayfs's own form, so the stack of layers
mounts as the image.

* ``.wh.NAME`` (NAME deleted by this layer) → a character device 0/0 at NAME;
* ``.wh..wh..opq`` in a directory (its lower contents hidden) → the
  ``trusted.overlay.opaque="y"`` attribute on that directory;
* other ``.wh..wh.*`` names (AUFS bookkeeping) are ignored.

Trust: none in the tar.  A registry image is input from anyone who can push
to a registry the user names.  The daemon unpacks as root, so the tar is
treated as an attack on the host:

* Names: NUL, empty or over-long names and any ``..`` component refuse the
  image; a leading ``/`` is dropped (the name is relative to the layer root,
  as Docker reads it).
* Nothing is ever followed.  Each entry's parent is walked from the layer's
  root descriptor one component at a time with ``O_NOFOLLOW|O_DIRECTORY``, so
  an entry below a symlink (``etc -> /etc`` then ``etc/passwd``) refuses the
  image instead of writing through it; files are created ``O_EXCL|O_NOFOLLOW``
  relative to the parent's descriptor.  Symlinks are stored as text (absolute
  targets are the image's business: they resolve inside the sandbox).
* Hard links must name a file (or symlink) this same layer already holds,
  found the same way; nothing outside the layer can be linked in.
* Block and character devices (other than the 0/0 whiteout form) are dropped
  and counted: a sandbox gets its devices from the runtime.  FIFOs are kept;
  sparse (GNU) members refuse the image.
* Owners are shifted into the sandbox uid range; ids beyond the range become
  its ``nobody`` and lose set-id bits.  Set-id bits of files owned inside the
  range are kept (``su``, ``sudo``): they only ever act inside the sandbox.
* No extended attribute from the tar is applied (a crafted
  ``security.capability`` or ``trusted.overlay.*`` would act on the host or
  on overlayfs); the only attribute set is the opaque marker above.
* Sizes: the declared size of each member is checked against what is left of
  the image's budget before anything is written, and entries are counted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from shoal.exception import InvalidError
from shoal.images.store import LayerStore
from shoal.util import safefs
from shoal.wire import paths

OPAQUE_MARKER = ".wh..wh..opq"
WHITEOUT_PREFIX = ".wh."
OPAQUE_XATTR = "trusted.overlay.opaque"
NOBODY = 65534
READ_CHUNK = 1 << 20


class LayerError(Exception):
    """The layer is refused (hostile or broken); the message says why."""


@dataclass
class Budget:
    """What is left for one image: bytes of file data and entries."""

    bytes: int
    entries: int


@dataclass
class Stats:
    """What unpacking a layer did."""

    files: int = 0
    dirs: int = 0
    links: int = 0
    whiteouts: int = 0
    opaque: int = 0
    bytes: int = 0
    dropped: list[str] = field(default_factory=list)
    """Entries left out (device nodes, unknown types), at most 20 named."""
    dropped_count: int = 0


def _parts(name: str, what: str) -> list[str]:
    """The components of a tar member name, refusing anything that could leave the layer."""
    if "\x00" in name:
        raise LayerError(f"{what} {name!r} contains a NUL byte")
    raw = name.encode(errors="surrogateescape")
    if len(raw) > paths.MAX_PATH:
        raise LayerError(f"{what} is longer than {paths.MAX_PATH} bytes")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for p in parts:
        if p == "..":
            raise LayerError(f"{what} {name!r} climbs out of the layer with '..'")
        if len(p.encode(errors="surrogateescape")) > paths.MAX_NAME:
            raise LayerError(f"{what} {name!r} has a component longer than {paths.MAX_NAME} bytes")
    return parts


class _Unpacker:
    def __init__(self, root: int, owner_low: int, owner_count: int, budget: Budget) -> None:
        self.root = root
        self.owner_low = owner_low
        self.owner_count = owner_count
        self.budget = budget
        self.stats = Stats()
        self._cached: tuple[tuple[str, ...], int] | None = None
        self._dir_times: dict[tuple[str, ...], int] = {}

    # ------------------------------------------------------------ ownership

    def _ids(self, uid: int, gid: int, mode: int) -> tuple[int, int, int]:
        foreign = False
        if 0 <= uid < self.owner_count:
            uid += self.owner_low
        else:
            uid, foreign = self.owner_low + NOBODY, True
        if 0 <= gid < self.owner_count:
            gid += self.owner_low
        else:
            gid, foreign = self.owner_low + NOBODY, True
        if foreign:
            mode &= ~0o6000
        return uid, gid, mode & 0o7777

    # ------------------------------------------------------------ directories

    def _forget(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _dir(self, parts: list[str], create: bool, name: str) -> int:
        """A descriptor of directory ``parts`` (the caller must not close it); never follows a link."""
        key = tuple(parts)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._forget()
        fd = os.dup(self.root)
        try:
            for p in parts:
                try:
                    nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise LayerError(f"{name!r} refers to a path this layer does not have") from None
                    os.mkdir(p, 0o755, dir_fd=fd)
                    nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    os.fchown(nxt, self.owner_low, self.owner_low)
                    os.fchmod(nxt, 0o755)  # not the daemon's umask
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise LayerError(
                            f"{name!r} goes through {p!r}, which is a symlink or a file, not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self._cached = (key, fd)
        return fd

    def _clear(self, parent: int, name: str, keep_dir: bool) -> bool:
        """Make room for a new entry ``name``; True if a directory was kept (to be updated in place)."""
        st = safefs.lstat_at(parent, name)
        if st is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            safefs.remove_tree(parent, name)
            self._forget()  # the cached directory may have been inside (or be ``parent``: callers look it up again)
        else:
            os.unlink(name, dir_fd=parent)
        return False

    # ------------------------------------------------------------ entries

    def add(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.budget.entries -= 1
        if self.budget.entries < 0:
            raise LayerError("the image has too many files")
        parts = _parts(m.name, "entry")
        if not parts:
            if m.isdir():
                uid, gid, mode = self._ids(m.uid, m.gid, m.mode)
                os.fchown(self.root, uid, gid)
                os.fchmod(self.root, mode)
            return
        base = parts[-1]
        if base == OPAQUE_MARKER:
            d = self._dir(parts[:-1], True, m.name)
            os.setxattr(d, OPAQUE_XATTR, b"y")
            self.stats.opaque += 1
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs)
        if base.startswith(WHITEOUT_PREFIX):
            target = base[len(WHITEOUT_PREFIX) :]
            if target in ("", ".", ".."):
                raise LayerError(f"whiteout {m.name!r} names nothing")
            parent = self._dir(parts[:-1], True, m.name)
            self._clear(parent, target, keep_dir=False)
            parent = self._dir(parts[:-1], True, m.name)
            os.mknod(target, stat.S_IFCHR | 0o000, 0, dir_fd=parent)
            self.stats.whiteouts += 1
            return
        if m.issparse():
            raise LayerError(f"{m.name!r} is a sparse file entry, which shoal does not unpack")
        parent = self._dir(parts[:-1], True, m.name)
        uid, gid, mode = self._ids(m.uid, m.gid, m.mode)
        mtime = int(m.mtime) if isinstance(m.mtime, int | float) else 0
        if m.isdir():
            if not self._clear(parent, base, keep_dir=True):
                parent = self._dir(parts[:-1], True, m.name)
                os.mkdir(base, 0o700, dir_fd=parent)
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            try:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            self._dir_times[tuple(parts)] = mtime
            self.stats.dirs += 1
            return
        self._clear(parent, base, keep_dir=False)
        parent = self._dir(parts[:-1], True, m.name)
        if m.isreg():
            self._file(tf, m, parent, base, uid, gid, mode, mtime)
        elif m.issym():
            target = m.linkname
            if "\x00" in target or len(target.encode(errors="surrogateescape")) >= paths.MAX_PATH:
                raise LayerError(f"symlink {m.name!r} has an invalid target")
            os.symlink(target, base, dir_fd=parent)
            os.chown(base, uid, gid, dir_fd=parent, follow_symlinks=False)
            os.utime(base, (mtime, mtime), dir_fd=parent, follow_symlinks=False)
            self.stats.links += 1
        elif m.islnk():
            tparts = _parts(m.linkname, "hard link target")
            if not tparts:
                raise LayerError(f"hard link {m.name!r} points at the layer's root")
            tparent = os.dup(self._dir(tparts[:-1], False, m.linkname))
            try:
                st = safefs.lstat_at(tparent, tparts[-1])
                if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    raise LayerError(
                        f"hard link {m.name!r} points at {m.linkname!r}, which is not a file of this layer"
                    )
                parent = self._dir(parts[:-1], True, m.name)
                os.link(tparts[-1], base, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(tparent)
            self.stats.links += 1
        elif m.isfifo():
            os.mkfifo(base, 0o600, dir_fd=parent)
            os.chown(base, uid, gid, dir_fd=parent, follow_symlinks=False)
            os.chmod(base, mode & 0o777, dir_fd=parent)  # a FIFO we just made: nothing to follow
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            os.mknod(base, stat.S_IFCHR | 0o000, 0, dir_fd=parent)  # an overlay-style whiteout
            self.stats.whiteouts += 1
        else:
            kind = "device node" if (m.ischr() or m.isblk()) else f"entry of type {m.type!r}"
            self.stats.dropped_count += 1
            if len(self.stats.dropped) < 20:
                self.stats.dropped.append(f"/{'/'.join(parts)} ({kind})")

    def _file(
        self, tf: tarfile.TarFile, m: tarfile.TarInfo, parent: int, base: str, uid: int, gid: int, mode: int, mtime: int
    ) -> None:
        if m.size > self.budget.bytes:
            raise LayerError(f"{m.name!r} is {m.size} bytes: the image is larger than this daemon accepts")
        self.budget.bytes -= m.size
        src = tf.extractfile(m)
        if src is None:
            raise LayerError(f"{m.name!r} has no data")
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            left = m.size
            while left > 0:
                chunk = src.read(min(left, READ_CHUNK))
                if not chunk:
                    raise LayerError(f"{m.name!r} is cut short (the layer is truncated)")
                os.write(fd, chunk)
                left -= len(chunk)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)  # after chown, which clears set-id bits
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += m.size

    def finish(self) -> None:
        """Set directory times (adding entries changed them); close what is open."""
        self._forget()
        for parts, mtime in self._dir_times.items():
            with contextlib.suppress(OSError):
                fd = safefs.openat2(self.root, "/".join(parts), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.utime(fd, (mtime, mtime))
                finally:
                    os.close(fd)


def unpack_staged(
    store: LayerStore,
    layer_id: str,
    stream: Callable[[], contextlib.AbstractContextManager[IO[bytes]]],
    owner_low: int,
    owner_count: int,
    budget: Budget,
    source: str,
    meta: dict[str, object],
) -> Stats:
    """Unpack the tar that ``stream()`` opens into a new layer ``layer_id`` of ``store`` (published whole, or not at
    all).  InvalidError names ``source`` where the layer is refused."""
    staged = store.staging(layer_id)
    try:
        root = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fchown(root, owner_low, owner_low)
            os.fchmod(root, 0o755)
            with stream() as tar:
                stats = unpack(tar, root, owner_low, owner_count, budget)
        finally:
            os.close(root)
    except LayerError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise InvalidError(f"{source} was refused: {exc}") from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    store.publish(layer_id, staged, {**meta, "size": stats.bytes})
    return stats


def unpack(
    stream: IO[bytes],
    root: int,
    owner_low: int,
    owner_count: int,
    budget: Budget,
    check: Callable[[], None] | None = None,
) -> Stats:
    """Unpack the uncompressed tar ``stream`` into the empty directory open at ``root``.

    ``check`` is called between entries (to stop a cancelled pull).  Raises
    LayerError for a refused layer; the caller removes the directory.
    """
    unpacker = _Unpacker(root, owner_low, owner_count, budget)
    try:
        with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as tf:
            for member in tf:
                if check is not None:
                    check()
                unpacker.add(tf, member)
    except tarfile.TarError as exc:
        raise LayerError(f"the layer is not a valid tar archive: {exc}") from None
    finally:
        unpacker.finish()
    return unpacker.stats


def pack(root: str, owner_low: int, out: IO[bytes]) -> int:
    """Write the layer directory ``root`` to ``out`` as an uncompressed tar in the OCI form ``unpack`` reads (so
    another node of a cluster takes it in as it would a registry layer); returns the entries written.

    Owners go back from the sandbox range at ``owner_low`` to the ids the sandbox sees; whiteouts (character
    devices 0/0) become ``.wh.NAME`` and opaque directories get ``.wh..wh..opq``.  Nothing is followed: the walk
    lists symlinks as links.  Extended attributes other than the opaque marker stay behind, as ``unpack`` would
    refuse them anyway.
    """
    seen: dict[tuple[int, int], str] = {}
    count = 0

    def owner(value: int) -> int:
        return value - owner_low if owner_low <= value < owner_low + (1 << 16) else NOBODY

    def info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = owner(st.st_uid), owner(st.st_gid)
        ti.mtime = int(st.st_mtime)
        return ti

    def marker(name: str) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.mode = 0o600
        return ti

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                st = os.lstat(path)
                count += 1
                if stat.S_ISDIR(st.st_mode):
                    tf.addfile(info(rel, st, tarfile.DIRTYPE))
                    with contextlib.suppress(OSError):
                        if os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y":
                            tf.addfile(marker(f"{rel}/{OPAQUE_MARKER}"))
                elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    whiteout = WHITEOUT_PREFIX + name
                    tf.addfile(marker(whiteout if rel_dir == "." else f"{rel_dir}/{whiteout}"))
                elif stat.S_ISLNK(st.st_mode):
                    ti = info(rel, st, tarfile.SYMTYPE)
                    ti.linkname = os.readlink(path)
                    tf.addfile(ti)
                elif stat.S_ISFIFO(st.st_mode):
                    tf.addfile(info(rel, st, tarfile.FIFOTYPE))
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in seen:
                        ti = info(rel, st, tarfile.LNKTYPE)
                        ti.linkname = seen[key]
                        tf.addfile(ti)
                        continue
                    seen[key] = rel
                    ti = info(rel, st, tarfile.REGTYPE)
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as f:
                        ti.size = os.fstat(f.fileno()).st_size
                        tf.addfile(ti, f)
                else:
                    count -= 1  # sockets and devices: a sandbox gets its devices from the runtime
    return count
