"""Local files for image builds: what ``add_local_*`` and COPY put in, their manifest and their upload.

The manifest (see :mod:`shoal.wire.manifest`) is computed when the image is
resolved: it is the copy step's cache key.  The files travel only when the
daemon asks for them (a cache miss), as a tar stream written on the fly, so a
large tree is never held in memory.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from shoal.exception import InvalidError
from shoal.wire import manifest

UPLOAD_CHUNK = 1 << 20
IgnoreFn = Callable[[Path], bool]


@dataclass(frozen=True)
class Source:
    """One local file or directory and where its content goes in the step's tree.

    A file lands at ``target``; a directory's *contents* land under ``target``
    ("" for the tree's top), each path filtered through ``ignore`` with the
    path relative to ``pattern_base`` (the directory, or a Dockerfile's
    context directory).
    """

    local: Path
    target: str
    ignore: IgnoreFn | None = None
    pattern_base: Path | None = None


@dataclass
class LocalTree:
    """The local files of one copy step."""

    sources: list[Source]
    _entries: list[manifest.Entry] | None = field(default=None, repr=False)
    _locals: dict[str, Path] = field(default_factory=dict, repr=False)

    def manifest(self) -> list[manifest.Entry]:
        """The manifest entries (computed once per resolve; files are hashed)."""
        if self._entries is None:
            self._entries, self._locals = _manifest(self.sources)
        return self._entries

    def digest(self) -> str:
        """The context digest: the copy step's cache key."""
        return manifest.digest(self.manifest())

    def reset(self) -> None:
        """Forget the manifest (the next resolve looks at the files again)."""
        self._entries = None
        self._locals = {}

    def total_bytes(self) -> int:
        """Bytes of file content in the tree."""
        return sum(e[3] for e in self.manifest() if e[1] == "f")

    async def tar_stream(self) -> AsyncIterator[bytes]:
        """The tree as an uncompressed tar stream, in manifest order."""
        for entry in self.manifest():
            rel, kind = entry[0], entry[1]
            info = tarfile.TarInfo(rel)
            info.uid = info.gid = 0
            info.mtime = 0
            if kind == "d":
                info.type = tarfile.DIRTYPE
                info.mode = entry[2]
                yield info.tobuf(format=tarfile.PAX_FORMAT)
            elif kind == "l":
                info.type = tarfile.SYMTYPE
                info.linkname = entry[2]
                info.mode = 0o777
                yield info.tobuf(format=tarfile.PAX_FORMAT)
            else:
                info.type = tarfile.REGTYPE
                info.mode = entry[2]
                info.size = size = entry[3]
                yield info.tobuf(format=tarfile.PAX_FORMAT)
                with open(self._locals[rel], "rb") as f:  # noqa: ASYNC230 - local disk reads between network writes
                    remaining = size
                    while remaining:
                        chunk = f.read(min(UPLOAD_CHUNK, remaining))
                        if not chunk:
                            raise InvalidError(f"{self._locals[rel]} shrank while it was being uploaded; try again")
                        remaining -= len(chunk)
                        yield chunk
                if size % tarfile.BLOCKSIZE:
                    yield b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
        yield b"\0" * (tarfile.BLOCKSIZE * 2)


def _manifest(sources: list[Source]) -> tuple[list[manifest.Entry], dict[str, Path]]:
    entries: dict[str, manifest.Entry] = {}
    locals_: dict[str, Path] = {}

    def add_dirs(rel: str) -> None:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, [parent, "d", 0o755])

    def add_file(rel: str, path: Path, st: os.stat_result) -> None:
        manifest.check_name(rel)
        add_dirs(rel)
        if stat.S_ISLNK(st.st_mode):
            entries[rel] = [rel, "l", os.readlink(path)]
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size, sha = manifest.hash_file(fd)
            finally:
                os.close(fd)
            entries[rel] = [rel, "f", stat.S_IMODE(st.st_mode) & 0o777, size, sha]
            locals_[rel] = path

    for src in sources:
        try:
            st = src.local.stat()
        except OSError as exc:
            raise InvalidError(f"cannot read local path {src.local}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            base = src.pattern_base or src.local
            prefix = src.target.strip("/")
            if prefix:
                manifest.check_name(prefix)
                add_dirs(prefix + "/x")
                entries.setdefault(prefix, [prefix, "d", stat.S_IMODE(st.st_mode) & 0o777])
            _walk_dir(src, base, prefix, entries, add_file)
        elif stat.S_ISREG(st.st_mode):
            add_file(src.target.strip("/"), src.local, st)
        else:
            raise InvalidError(f"{src.local} is neither a file nor a directory")
    return sorted(entries.values(), key=lambda e: e[0]), locals_


def _walk_dir(
    src: Source,
    base: Path,
    prefix: str,
    entries: dict[str, manifest.Entry],
    add_file: Callable[[str, Path, os.stat_result], None],
) -> None:
    ignore = src.ignore
    prune = ignore is not None and not getattr(ignore, "has_exclusions", True)
    for dirpath, dirnames, filenames in os.walk(src.local, followlinks=False):
        here = Path(dirpath)
        kept_dirs = []
        for d in sorted(dirnames):
            path = here / d
            if path.is_symlink():
                filenames.append(d)  # a link to a directory is copied as a link
                continue
            rel_pattern = path.relative_to(base)
            ignored = ignore is not None and ignore(rel_pattern)
            if ignored and prune:
                continue
            kept_dirs.append(d)
            if not ignored:
                rel = _join(prefix, path.relative_to(src.local))
                manifest.check_name(rel)
                entries.setdefault(rel, [rel, "d", stat.S_IMODE(path.lstat().st_mode) & 0o777])
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            path = here / name
            if ignore is not None and ignore(path.relative_to(base)):
                continue
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                add_file(_join(prefix, path.relative_to(src.local)), path, st)


def _join(prefix: str, rel: Path) -> str:
    return str(PurePosixPath(prefix) / rel.as_posix()) if prefix else rel.as_posix()
