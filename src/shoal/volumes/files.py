"""Volume data operations that need no sandbox: upload, read, list, remove, copy.

Trust: the caller of the API (validated paths) and nothing inside the volume.
Every lookup below the volume's root goes through :mod:`shoal.util.safefs`
(``openat2`` without links, descriptors only), so a sandbox that planted links
or races renames cannot make these operations read, list, write, chown or
delete anything outside the volume.  Messages name the caller's volume path,
never a host path.

Writes are atomic per file: data goes to a temporary file in the volume's
staging directory (beside, not inside, the mounted tree), is flushed with
``syncfs``, and is renamed into place only when the whole batch has arrived.
A daemon killed mid-upload leaves only staging files, which the next start
removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from typing import Any

from shoal.exception import (
    AlreadyExistsError,
    Error,
    InternalError,
    InvalidError,
    NotFoundError,
    ResourceExhaustedError,
)
from shoal.util import safefs
from shoal.volumes.store import OpenVolume
from shoal.wire import paths
from shoal.wire.paths import PathError

FILE_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFLNK: 3,
    stat.S_IFIFO: 4,
    stat.S_IFSOCK: 5,
}
"""st_mode file type → Modal's FileEntryType."""
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_UPLOAD_FILES = 1_000_000
MAX_COPY_ENTRIES = 1_000_000


def parts_of(path: str) -> list[str]:
    """A volume path's components, or InvalidError."""
    try:
        return paths.split(path)
    except PathError as exc:
        raise InvalidError(str(exc)) from None


def fs_error(exc: OSError, path: str) -> Error:
    """The shoal error for a failed file operation on the volume path ``path`` (never names a host path)."""
    e = exc.errno
    shown = "/" + "/".join(parts_of(path)) if "\x00" not in path else repr(path)
    if e in (errno.ENOENT, errno.ENOTDIR):
        return NotFoundError(f"No such file or directory: '{shown}'")
    if e == errno.ELOOP:
        return InvalidError(f"'{shown}' is or passes through a symbolic link; volume operations never follow links")
    if e == errno.EXDEV:
        return InvalidError(f"'{shown}' crosses a mount point")
    if e == errno.EISDIR:
        return InvalidError(f"'{shown}' is a directory")
    if e == errno.EEXIST:
        return AlreadyExistsError(f"'{shown}' already exists")
    if e == errno.ENOTEMPTY:
        return InvalidError(f"'{shown}' is a directory that is not empty")
    if e in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhaustedError("no space left on the volume's filesystem")
    if e == errno.ENAMETOOLONG:
        return InvalidError(f"'{shown[:80]}…' is too long")
    if e == errno.EINVAL:
        return InvalidError(f"'{shown}' is not a regular file or directory")
    return InternalError(f"'{shown}': {exc.strerror or 'file operation failed'}")


def entry(path: str, st: os.stat_result, detail: bool = False) -> dict[str, Any]:
    """A FileEntry as JSON; ``detail`` adds its permission bits and its mtime in nanoseconds (what another node's
    copy of the volume needs)."""
    found = {
        "path": path,
        "type": FILE_TYPES.get(stat.S_IFMT(st.st_mode), 0),
        "mtime": int(st.st_mtime),
        "size": st.st_size,
    }
    if detail:
        found.update(mode=st.st_mode & 0o7777, mtime_ns=st.st_mtime_ns)
    return found


# ------------------------------------------------------------------ reading


def open_for_read(vol: OpenVolume, path: str) -> tuple[int, int]:
    """(descriptor, size) of a regular file in the volume."""
    parts = parts_of(path)
    if not parts:
        raise InvalidError("'/' is a directory")
    try:
        fd, st = safefs.open_regular(vol.root, parts)
    except OSError as exc:
        raise fs_error(exc, path) from None
    return fd, st.st_size


def list_entries(vol: OpenVolume, path: str, recursive: bool, detail: bool = False) -> Iterator[dict[str, Any]]:
    """FileEntries under ``path`` (the entry itself when it is not a directory).  Resolves ``path`` first."""
    parts = parts_of(path)
    if parts:
        try:
            pfd = safefs.open_dir(vol.root, parts[:-1])
        except OSError as exc:
            raise fs_error(exc, path) from None
        try:
            st = safefs.lstat_at(pfd, parts[-1])
        finally:
            os.close(pfd)
        if st is None:
            raise NotFoundError(f"No such file or directory: '/{'/'.join(parts)}'")
        if not stat.S_ISDIR(st.st_mode):
            return iter([entry("/".join(parts), st, detail)])
    try:
        os.close(safefs.open_dir(vol.root, parts))  # resolve now: errors come before the answer starts
    except OSError as exc:
        raise fs_error(exc, path) from None
    return _walk(vol, parts, recursive, detail)


def _walk(vol: OpenVolume, parts: list[str], recursive: bool, detail: bool) -> Iterator[dict[str, Any]]:
    try:
        for rel, st in safefs.walk(vol.root, parts, recursive):
            yield entry(rel, st, detail)
    except OSError:
        return  # the directory went away meanwhile


# ------------------------------------------------------------------ removing


def remove(vol: OpenVolume, path: str, recursive: bool) -> None:
    """``vol.remove_file``: a file, link or empty directory; a whole tree with ``recursive``."""
    parts = parts_of(path)
    if not parts:
        raise InvalidError("the volume's root cannot be removed; delete the volume instead")
    try:
        pfd = safefs.open_dir(vol.root, parts[:-1])
    except OSError as exc:
        raise fs_error(exc, path) from None
    name = parts[-1]
    try:
        st = safefs.lstat_at(pfd, name)
        if st is None:
            raise NotFoundError(f"No such file or directory: '/{'/'.join(parts)}'")
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                safefs.remove_tree(pfd, name)
            else:
                try:
                    os.rmdir(name, dir_fd=pfd)
                except OSError as exc:
                    if exc.errno == errno.ENOTEMPTY:
                        raise InvalidError(
                            f"'/{'/'.join(parts)}' is a directory that is not empty; pass recursive=True"
                        ) from None
                    raise
        else:
            os.unlink(name, dir_fd=pfd)
    except OSError as exc:
        raise fs_error(exc, path) from None
    finally:
        os.close(pfd)


# ------------------------------------------------------------------ writing


def _temp_name() -> str:
    return f"tmp-{secrets.token_hex(8)}"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class UploadBatch:
    """Files of one ``batch_upload``: written to staging, renamed into place together by ``commit``."""

    def __init__(self, vol: OpenVolume, force: bool) -> None:
        self.vol = vol
        self.force = force
        self._temps: list[str] = []
        self._targets: dict[tuple[str, ...], str] = {}  # target parts → temp name (the last upload of a path wins)

    def open_file(self, path: str) -> tuple[int, list[str]]:
        """A new staging file for the volume path ``path``: (descriptor, target parts)."""
        parts = parts_of(path)
        if not parts:
            raise InvalidError(f"upload path {path!r} names the volume's root, not a file")
        if len(self._temps) >= MAX_UPLOAD_FILES:
            raise InvalidError(f"a batch may upload at most {MAX_UPLOAD_FILES} files")
        name = _temp_name()
        fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=self.vol.staging)
        self._temps.append(name)
        return fd, parts

    def write(self, fd: int, data: bytes | memoryview) -> None:
        """Append to a staging file."""
        try:
            _write_all(fd, data)
        except OSError as exc:
            raise fs_error(exc, "") from None

    def close_file(self, fd: int, parts: list[str], mode: int) -> None:
        """Finish a staging file: the sandbox's root owns it, with ``mode``'s permission bits."""
        try:
            os.fchmod(fd, mode & 0o777)
            os.fchown(fd, self.vol.uid, self.vol.gid)
        finally:
            os.close(fd)
        self._targets[tuple(parts)] = self._temps[-1]

    def commit(self) -> int:
        """Check every target, then rename every file into place; returns how many."""
        vol = self.vol
        for target in self._targets:
            self._check(list(target))
        safefs.syncfs(vol.staging)
        for target, temp in self._targets.items():
            parts = list(target)
            shown = "/".join(parts)
            try:
                pfd = safefs.make_dirs(vol.root, parts[:-1], vol.uid, vol.gid)
            except OSError as exc:
                raise fs_error(exc, shown) from None
            try:
                safefs.renameat2(vol.staging, temp, pfd, parts[-1], 0 if self.force else safefs.RENAME_NOREPLACE)
            except OSError as exc:
                raise fs_error(exc, shown) from None
            finally:
                os.close(pfd)
            self._temps.remove(temp)
        safefs.syncfs(vol.root)
        return len(self._targets)

    def _check(self, parts: list[str]) -> None:
        shown = "/" + "/".join(parts)
        try:
            pfd = safefs.open_dir(self.vol.root, parts[:-1])
        except FileNotFoundError:
            return  # parents are created on commit
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                raise InvalidError(f"cannot upload {shown}: a parent directory is a file") from None
            raise fs_error(exc, shown) from None
        try:
            st = safefs.lstat_at(pfd, parts[-1])
        finally:
            os.close(pfd)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            raise InvalidError(f"cannot upload {shown}: a directory is there (directories are never overwritten)")
        if not self.force:
            raise AlreadyExistsError(f"{shown} already exists; pass force=True to overwrite it")

    def abort(self) -> None:
        """Remove every staging file not committed."""
        for name in self._temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.vol.staging)
        self._temps.clear()


# ------------------------------------------------------------------ copying


class _Copier:
    def __init__(self, vol: OpenVolume) -> None:
        self.vol = vol
        self.count = 0

    def _tick(self) -> None:
        self.count += 1
        if self.count > MAX_COPY_ENTRIES:
            raise InvalidError(f"a copy may create at most {MAX_COPY_ENTRIES} entries")

    def _place(self, temp: str, target: list[str]) -> None:
        vol = self.vol
        pfd = safefs.make_dirs(vol.root, target[:-1], vol.uid, vol.gid)
        try:
            safefs.renameat2(vol.staging, temp, pfd, target[-1])
        except BaseException:
            os.unlink(temp, dir_fd=vol.staging)
            raise
        finally:
            os.close(pfd)

    def file(self, src: list[str], target: list[str]) -> None:
        self._tick()
        vol = self.vol
        sfd, st = safefs.open_regular(vol.root, src)
        try:
            temp = _temp_name()
            dfd = os.open(temp, CREATE_FLAGS, 0o600, dir_fd=vol.staging)
            try:
                safefs.copy_data(sfd, dfd, st.st_size)
                os.fchmod(dfd, st.st_mode & 0o777)
                os.fchown(dfd, vol.uid, vol.gid)
            except BaseException:
                os.unlink(temp, dir_fd=vol.staging)
                raise
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        self._place(temp, target)

    def link(self, src: list[str], target: list[str]) -> None:
        self._tick()
        vol = self.vol
        pfd = safefs.open_dir(vol.root, src[:-1])
        try:
            value = os.readlink(src[-1], dir_fd=pfd)
        finally:
            os.close(pfd)
        temp = _temp_name()
        os.symlink(value, temp, dir_fd=vol.staging)  # copied as a link; never followed by the daemon
        os.chown(temp, vol.uid, vol.gid, dir_fd=vol.staging, follow_symlinks=False)
        self._place(temp, target)

    def tree(self, src: list[str], target: list[str]) -> None:
        vol = self.vol
        os.close(safefs.make_dirs(vol.root, target, vol.uid, vol.gid))
        for rel, st in safefs.walk(vol.root, src, recursive=True):
            sub = rel.split("/")[len(src) :]
            here = [*src, *sub]
            there = [*target, *sub]
            kind = stat.S_IFMT(st.st_mode)
            try:
                if kind == stat.S_IFDIR:
                    self._tick()
                    os.close(safefs.make_dirs(vol.root, there, vol.uid, vol.gid))
                elif kind == stat.S_IFREG:
                    self.file(here, there)
                elif kind == stat.S_IFLNK:
                    self.link(here, there)
            except FileNotFoundError:
                continue  # removed while copying


def copy(vol: OpenVolume, src_paths: list[str], dst_path: str, recursive: bool) -> None:
    """``vol.copy_files``, with ``cp`` semantics: into ``dst_path`` when it is a directory, else onto it."""
    dst = parts_of(dst_path)
    try:
        os.close(safefs.open_dir(vol.root, dst))
        dst_is_dir = True
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise fs_error(exc, dst_path) from None
        dst_is_dir = False
    if len(src_paths) > 1 and not dst_is_dir:
        raise InvalidError(f"copying several paths needs an existing directory as destination, not '{dst_path}'")
    copier = _Copier(vol)
    for src_path in src_paths:
        src = parts_of(src_path)
        if not src:
            raise InvalidError("the volume's root cannot be copied; copy the paths inside it")
        target = [*dst, src[-1]] if dst_is_dir else dst
        if not target:
            raise InvalidError("cannot copy onto the volume's root")
        try:
            pfd = safefs.open_dir(vol.root, src[:-1])
            try:
                st = safefs.lstat_at(pfd, src[-1])
            finally:
                os.close(pfd)
            if st is None:
                raise NotFoundError(f"No such file or directory: '/{'/'.join(src)}'")
            if stat.S_ISDIR(st.st_mode):
                if not recursive:
                    raise InvalidError(f"'/{'/'.join(src)}' is a directory; pass recursive=True to copy it")
                if target[: len(src)] == src:
                    raise InvalidError(f"cannot copy '/{'/'.join(src)}' into itself")
                copier.tree(src, target)
            elif stat.S_ISREG(st.st_mode):
                if target == src:
                    continue
                copier.file(src, target)
            elif stat.S_ISLNK(st.st_mode):
                copier.link(src, target)
            else:
                raise InvalidError(f"'/{'/'.join(src)}' is not a regular file, directory or link")
        except OSError as exc:
            raise fs_error(exc, src_path) from None
    safefs.syncfs(vol.root)
