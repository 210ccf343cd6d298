"""Build contexts: trees of local files that ``add_local_*`` and Dockerfile COPY put into images.

A context is named by the digest of its *manifest*: every entry's relative
path, kind, permission bits, and for files the size and sha256 of the
content, for symlinks the target.  The client computes it (that is the cache
key of the copy step) and uploads the tree only when the daemon needs it: a
tar stream, extracted here into ``<images>/contexts/<digest>/``.

Trust: the uploaded archive is hostile input.  Only regular files,
directories and symbolic links are accepted; names must be relative, without
``..``, NUL or empty parts, bounded in length; nothing is ever written
through a symbolic link (every parent is opened with ``RESOLVE_NO_SYMLINKS``
beneath the context root, files are created ``O_EXCL | O_NOFOLLOW``), and
the extracted tree is hashed again and must match the digest it was uploaded
under, so a context cannot be stored under a name that is not its content.
Link targets are kept as written: they are resolved inside a sandbox's root,
never on the host.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from shoal.exception import InvalidError
from shoal.util import safefs
from shoal.wire.manifest import CHUNK, MAX_ENTRIES, MAX_PATH, Entry, check_name, digest, hash_file


def tree_manifest(root: Path) -> list[Entry]:
    """The manifest of a tree on this host, walked without following any link."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        entries: list[Entry] = []
        for rel, st in safefs.walk(root_fd, [], recursive=True):
            mode = stat.S_IMODE(st.st_mode) & 0o777
            if stat.S_ISDIR(st.st_mode):
                entries.append([rel, "d", mode])
            elif stat.S_ISLNK(st.st_mode):
                entries.append([rel, "l", os.readlink(rel, dir_fd=root_fd)])
            elif stat.S_ISREG(st.st_mode):
                fd, _ = safefs.open_regular(root_fd, rel.split("/"))
                try:
                    size, sha = hash_file(fd)
                finally:
                    os.close(fd)
                entries.append([rel, "f", mode, size, sha])
            else:
                raise InvalidError(f"build context entry {rel} is not a file, directory or symlink")
        return entries
    finally:
        os.close(root_fd)


class ContextStore:
    """Uploaded contexts, complete and verified, by digest."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    def path(self, context: str) -> Path:
        """Where a context's tree is (whether or not it exists)."""
        return self.root / context

    def has(self, context: str) -> bool:
        """Whether the context is here."""
        return (self.root / context).is_dir()

    def add_archive(self, context: str, archive: Path) -> None:
        """Extract an uploaded tar archive and keep it as ``context`` if its content has that digest.

        Blocking (run it in a thread).  Raises InvalidError for a bad archive or a digest mismatch.
        """
        if self.has(context):
            return
        dest = self.tmp / f"context-{context}.{os.getpid()}.{os.urandom(4).hex()}"
        dest.mkdir(mode=0o700)
        try:
            with open(archive, "rb") as f:
                extract(f, dest)
            got = digest(tree_manifest(dest))
            if got != context:
                raise InvalidError(
                    f"the uploaded files do not match their digest ({got[:12]} ≠ {context[:12]}):"
                    " did they change while being uploaded? Try again."
                )
            try:
                os.rename(dest, self.root / context)
            except OSError:
                if not self.has(context):
                    raise
        finally:
            if dest.exists():
                shutil.rmtree(dest, ignore_errors=True)

    def remove_all(self, keep: set[str]) -> int:
        """Delete every context but ``keep``; returns how many were removed."""
        n = 0
        for p in self.root.iterdir():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n


def extract(f: IO[bytes], dest: Path) -> None:
    """Extract a tar stream into the empty directory ``dest`` (see the module's trust notes)."""
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    kinds: dict[str, str] = {}
    try:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")  # noqa: SIM115 - closed by the with below
        except tarfile.TarError as exc:
            raise InvalidError(f"the build context is not a tar archive: {exc}") from None
        with tar:
            for count, m in enumerate(_members(tar), 1):
                if count > MAX_ENTRIES:
                    raise InvalidError(f"the build context has more than {MAX_ENTRIES} entries")
                parts = check_name(m.name)
                rel = "/".join(parts)
                for i in range(1, len(parts)):
                    parent = "/".join(parts[:i])
                    if kinds.get(parent, "d") != "d":
                        raise InvalidError(f"build context entry {rel} lies under a non-directory")
                if rel in kinds:
                    raise InvalidError(f"build context entry {rel} appears twice")
                parent_fd = safefs.make_dirs(root_fd, parts[:-1], 0, 0, 0o755)
                try:
                    name = parts[-1]
                    mode = m.mode & 0o777
                    if m.isdir():
                        os.mkdir(name, 0o700, dir_fd=parent_fd)
                        fd = safefs.openat2(parent_fd, name, os.O_RDONLY | os.O_DIRECTORY)
                        os.fchmod(fd, mode)
                        os.close(fd)
                        kinds[rel] = "d"
                    elif m.issym():
                        if not m.linkname or "\x00" in m.linkname or len(m.linkname) > MAX_PATH:
                            raise InvalidError(f"invalid symlink target for {rel}")
                        os.symlink(m.linkname, name, dir_fd=parent_fd)
                        kinds[rel] = "l"
                    elif m.isreg():
                        src = tar.extractfile(m)
                        assert src is not None
                        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                        fd = os.open(name, flags, 0o600, dir_fd=parent_fd)
                        try:
                            while chunk := src.read(CHUNK):
                                os.write(fd, chunk)
                            os.fchmod(fd, mode)
                        finally:
                            os.close(fd)
                        kinds[rel] = "f"
                    else:
                        raise InvalidError(f"build context entry {rel} is not a file, directory or symlink")
                finally:
                    os.close(parent_fd)
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidError(f"the build context archive is damaged: {exc}") from None
    except FileExistsError as exc:
        raise InvalidError(f"build context entry appears twice: {exc.filename}") from None
    finally:
        os.close(root_fd)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (m := tar.next()) is not None:
        yield m
