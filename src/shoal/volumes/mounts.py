"""Volumes in a sandbox: the bind mounts of its OCI spec.

Trust: the volume ids (checked against the store) and the daemon's own
directories.  A ``sub_path`` lies inside the volume, where any sandbox sharing
it may have planted a link or may swap a directory for one while this
sandbox starts; the OCI runtime resolves bind sources by path and follows
links as host root, so handing it ``<volume>/<sub_path>`` could mount ``/``.

Defence: the ``sub_path`` directory is opened with the safe lookup
(``openat2`` without links), bind-mounted *from that descriptor* onto a
staging point in a daemon-only directory, and the runtime binds from the
staging point; once the container has its own copy of the mount, the staging
mount is removed.  Staging points are only ever unmounted and ``rmdir``-ed,
never removed recursively, so a failed unmount cannot delete volume data.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from shoal.exception import InvalidError
from shoal.runtime import idmap, rootfs
from shoal.runtime.spec import Bind
from shoal.util import safefs
from shoal.volumes.files import fs_error, parts_of
from shoal.volumes.store import VolumeStore
from shoal.wire.volumes import VolumeMount

log = logging.getLogger(__name__)

MS_BIND = 4096
MS_PRIVATE = 1 << 18


def check_mounts(mounts: list[VolumeMount]) -> None:
    """Modal's rules: one volume once per sandbox, one volume per path."""
    paths: set[str] = set()
    volumes: set[str] = set()
    for m in mounts:
        if m.path in paths:
            raise InvalidError(f"two volumes are mounted at {m.path}")
        if m.volume_id in volumes:
            raise InvalidError(f"volume {m.volume_id} is mounted more than once; mount it at one path")
        paths.add(m.path)
        volumes.add(m.volume_id)


class VolumeBinds:
    """Turns a sandbox's volume mounts into binds, staging ``sub_path`` mounts safely."""

    def __init__(self, store: VolumeStore, stage_dir: Path) -> None:
        self.store = store
        self.stage_dir = stage_dir
        stage_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(stage_dir, 0o700)
        self._staged: dict[str, list[str]] = {}

    def prepare(self, sandbox_id: str, mounts: list[VolumeMount], mapping: int | None = None) -> list[Bind]:
        """The binds for ``mounts`` (parents before children).  Call ``release`` once the container runs.

        ``mapping``: the sandbox's storage id-mapping (``shoal.runtime.idmap``); every volume is then staged as
        an id-mapped clone, so the sandbox sees the stored owners in its own id range.
        """
        check_mounts(mounts)
        binds: list[Bind] = []
        try:
            for i, m in enumerate(sorted(mounts, key=lambda m: m.path.count("/"))):
                self.store.get(m.volume_id)
                if mapping is None and (m.sub_path is None or not parts_of(m.sub_path)):
                    source = str(self.store.root_path(m.volume_id))
                else:
                    source = self._stage(sandbox_id, i, m.volume_id, m.sub_path or "", mapping)
                binds.append(Bind(source=source, destination=m.path, read_only=m.read_only))
        except BaseException:
            self.release(sandbox_id)
            raise
        return binds

    def _stage(self, sandbox_id: str, index: int, volume_id: str, sub_path: str, mapping: int | None) -> str:
        with self.store.open(volume_id) as vol:
            try:
                fd = safefs.make_dirs(vol.root, parts_of(sub_path), vol.uid, vol.gid)
            except OSError as exc:
                raise fs_error(exc, sub_path) from None
        try:
            point = self.stage_dir / f"{sandbox_id}.{index}"
            point.mkdir(mode=0o700, exist_ok=True)
            self._staged.setdefault(sandbox_id, []).append(str(point))
            if mapping is not None:
                idmap.clone(fd, str(point), mapping)
            else:
                rootfs.mount(f"/proc/self/fd/{fd}", str(point), "", MS_BIND)
                rootfs.mount("", str(point), "", MS_PRIVATE)
        finally:
            os.close(fd)
        return str(point)

    def release(self, sandbox_id: str) -> None:
        """Remove a sandbox's staging mounts (its container keeps its own copies)."""
        for point in self._staged.pop(sandbox_id, []):
            self._remove_point(point)

    def release_all(self) -> None:
        """At start-up: remove staging points left by a daemon that stopped while starting a sandbox."""
        self._staged.clear()
        for entry in self.stage_dir.iterdir():
            self._remove_point(str(entry))

    @staticmethod
    def _remove_point(point: str) -> None:
        try:
            rootfs.unmount(point)
        except OSError as exc:
            log.warning("could not unmount volume staging point %s: %s", point, exc)
            return
        with contextlib.suppress(FileNotFoundError):
            try:
                os.rmdir(point)
            except OSError as exc:
                log.warning("could not remove volume staging point %s: %s", point, exc)
