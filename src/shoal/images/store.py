"""The image store: read-only root filesystem layers owned by the sandbox uid range.

An image is a stack of layers (bottom first) and a config (env, cmd,
entrypoint, workdir).  Layers live in ``<data>/images/layers/<id>`` and are
published by an atomic rename, so a crashed build never leaves half a layer;
a file lock makes concurrent builds of one layer (by the daemon and by ``make
setup``) build it once.  Files are shifted into the sandbox uid range as they
arrive, because overlayfs shows lower files with their host owners.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def shift_tree(root: Path, offset: int) -> None:
    """Add ``offset`` to the owner and group of every file under ``root`` (set-id bits kept)."""
    if offset == 0:
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            _shift(os.path.join(dirpath, name), offset)
    _shift(str(root), offset)


def _shift(path: str, offset: int) -> None:
    st = os.lstat(path)
    if st.st_uid >= offset and st.st_gid >= offset:
        return
    os.lchown(
        path,
        st.st_uid + offset if st.st_uid < offset else st.st_uid,
        st.st_gid + offset if st.st_gid < offset else st.st_gid,
    )
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o6000:
        os.chmod(path, stat.S_IMODE(st.st_mode))  # chown cleared setuid/setgid


class LayerStore:
    """Layers on disk."""

    def __init__(self, root: Path, caches: list[Path] | None = None) -> None:
        self.root = root
        self.caches = [c / "layers" for c in caches or [] if c.resolve() != root.resolve()]
        self.layers = root / "layers"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        for d in (self.layers, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)
            # Root only: layers hold files owned by the sandbox uid, set-id bits included, which no host user
            # may reach.  Overlayfs reads lower layers with the mounter's (root's) credentials, so sandboxes
            # need no access of their own.
            os.chmod(d, 0o700)
        os.chmod(root, 0o711)

    def roots(self) -> list[Path]:
        """This store's layer directory and those of its caches."""
        return [self.layers, *self.caches]

    def path(self, layer_id: str) -> Path:
        """Root directory of a layer (here, or in a read-only cache store)."""
        own = self.layers / layer_id
        if own.is_dir():
            return own
        for cache in self.caches:
            if (cache / layer_id).is_dir():
                return cache / layer_id
        return own

    def exists(self, layer_id: str) -> bool:
        """Whether a layer is complete on disk."""
        return self.path(layer_id).is_dir()

    @contextlib.contextmanager
    def lock(self, layer_id: str) -> Iterator[None]:
        """Hold the build lock of one layer (across processes)."""
        fd = os.open(self.locks / layer_id, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def staging(self, layer_id: str) -> Path:
        """A fresh, empty directory to build a layer in."""
        d = self.tmp / f"{layer_id}.{os.getpid()}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        return d

    def publish(self, layer_id: str, staged: Path, meta: dict[str, Any]) -> Path:
        """Move a finished staging directory into place atomically."""
        (staged.parent / f"{staged.name}.json").write_text(json.dumps(meta))
        dest = self.layers / layer_id
        os.rename(staged, dest)
        os.rename(staged.parent / f"{staged.name}.json", self.layers / f"{layer_id}.json")
        return dest

    def clean_staging(self) -> None:
        """Remove leftovers of interrupted builds."""
        for p in self.tmp.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def remove(self, layer_id: str) -> None:
        """Delete a layer."""
        shutil.rmtree(self.layers / layer_id, ignore_errors=True)
        (self.layers / f"{layer_id}.json").unlink(missing_ok=True)

    def size(self, layer_id: str) -> int:
        """Bytes used by a layer (apparent size)."""
        total = 0
        for dirpath, _, filenames in os.walk(self.layers / layer_id):
            for name in filenames:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total
