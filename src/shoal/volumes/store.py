"""Named and ephemeral volumes: rows in the state database, directories in the data dir.

Layout (all on the data dir's filesystem, so renames from staging are atomic)::

    <data>/volumes/                 0711 root
        vo-…/                       0711 root
            root/                   0755 sandbox root (host uid 100000): the volume's content, bind-mounted
            staging/                0700 root: uploads and copies being written, never visible to sandboxes
        .trash/                     0700 root: deleted volumes, emptied in the background

In a cluster (decision 0078) a row may be a *replica*: this node's copy of a volume another node (its ``home``)
holds, under the same id, with no name; ``base`` records what the copy held when it was last in step with its home.

Trust: the rows and the directory names are the daemon's own; everything
below ``root/`` is written by sandboxes and is only ever touched through
:mod:`shoal.util.safefs`.  A volume's directory is named by its id, never by
its (user-chosen) name, so renaming a volume moves nothing on disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shoal.exception import AlreadyExistsError, InvalidError, NotFoundError
from shoal.util import safefs
from shoal.wire import ids
from shoal.wire.times import micros
from shoal.wire.volumes import VolumeInfo

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    created_at REAL NOT NULL,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    heartbeat_at REAL,
    version INTEGER
);
"""
REPLICA_COLUMNS = (("home", "TEXT"), ("base", "TEXT"))
"""Added to ``volumes`` where an older database lacks them."""
EPHEMERAL_TTL = 900.0
"""An ephemeral volume whose client has not sent a heartbeat for this long is deleted."""
DEFAULT_VERSION = 2
"""Every shoal volume behaves as Modal's v2 (``sync`` inside a sandbox commits, recursive copies)."""


@dataclass
class VolumeRow:
    """One row of ``volumes``."""

    id: str
    name: str | None
    created_at: float
    ephemeral: bool
    heartbeat_at: float | None
    version: int | None
    home: str | None = None
    """The node that holds the volume, where this row is a replica of it (None: this node's own volume)."""

    def info(self, size: int | None = None) -> VolumeInfo:
        """The volume as the API shows it."""
        return VolumeInfo(
            volume_id=self.id,
            name=self.name,
            created_at_us=micros(self.created_at),
            ephemeral=self.ephemeral,
            version=self.version or DEFAULT_VERSION,
            size_bytes=size,
        )


@dataclass
class OpenVolume:
    """Descriptors of one volume's content root and staging directory."""

    id: str
    root: int
    staging: int
    uid: int
    gid: int


class VolumeStore:
    """Every volume of this daemon."""

    def __init__(self, db: sqlite3.Connection, base: Path, owner: int) -> None:
        self.db = db
        self.base = base
        self.trash = base / ".trash"
        self.uid = self.gid = owner
        self._trash_lock = threading.Lock()
        self._trash_thread: threading.Thread | None = None
        self._trash_again = False
        for d, mode in ((base, 0o711), (self.trash, 0o700)):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, mode)
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(volumes)")}
        for column, kind in REPLICA_COLUMNS:
            if column not in have:
                self.db.execute(f"ALTER TABLE volumes ADD COLUMN {column} {kind}")

    # ---------------------------------------------------------------- start-up

    def recover(self) -> None:
        """After a (re)start: drop half-written uploads, trash orphans, give ephemeral volumes a fresh grace."""
        known = {r[0] for r in self.db.execute("SELECT id FROM volumes")}
        for d in self.base.iterdir():
            if d.name == ".trash":
                continue
            if d.name not in known:
                # A crash between making the directory and recording its row leaves an empty volume: trash it.
                # Anything with content is kept (a lost or replaced database must not cost the volumes' data).
                root = d / "root"
                if not d.is_symlink() and (not root.is_dir() or root.is_symlink() or not any(root.iterdir())):
                    self._to_trash(d.name)
                else:
                    log.warning("volume directory %s has no record in the state database; keeping it", d)
                continue
            staging = d / "staging"
            if staging.is_dir():
                for f in staging.iterdir():
                    f.unlink(missing_ok=True)
        self.db.execute("UPDATE volumes SET heartbeat_at = ? WHERE ephemeral = 1", (time.time(),))

    def empty_trash_soon(self) -> None:
        """Empty the trash in a background thread (a deleted volume may be large).

        A deletion while a pass runs asks for another pass, so nothing trashed is left behind.
        """
        with self._trash_lock:
            self._trash_again = True
            if self._trash_thread is not None and self._trash_thread.is_alive():
                return
            self._trash_thread = threading.Thread(target=self._trash_loop, name="shoal-volume-trash", daemon=True)
            self._trash_thread.start()

    def _trash_loop(self) -> None:
        while True:
            with self._trash_lock:
                if not self._trash_again:
                    self._trash_thread = None
                    return
                self._trash_again = False
            self.empty_trash()

    def empty_trash(self) -> None:
        """Remove deleted volumes' files (safely: they were written by sandboxes)."""
        fd = os.open(self.trash, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in os.listdir(fd):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        safefs.remove_tree(fd, name)
                    else:
                        os.unlink(name, dir_fd=fd)
                except OSError as exc:
                    log.warning("could not remove deleted volume files %s: %s", self.trash / name, exc)
        finally:
            os.close(fd)

    def prune_ephemeral(self, now: float | None = None) -> list[str]:
        """Delete ephemeral volumes whose client stopped sending heartbeats; returns their ids."""
        cutoff = (now or time.time()) - EPHEMERAL_TTL
        rows = self.db.execute("SELECT id FROM volumes WHERE ephemeral = 1 AND heartbeat_at < ?", (cutoff,)).fetchall()
        for (volume_id,) in rows:
            log.info("volume %s: ephemeral volume without heartbeat; deleting it", volume_id)
            self.delete(volume_id)
        return [r[0] for r in rows]

    # ---------------------------------------------------------------- rows

    def _rows(self, where: str, args: tuple[object, ...]) -> list[VolumeRow]:
        cur = self.db.execute(
            f"SELECT id, name, created_at, ephemeral, heartbeat_at, version, home FROM volumes {where}", args
        )
        return [VolumeRow(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6]) for r in cur.fetchall()]

    def get(self, volume_id: str) -> VolumeRow:
        """A volume by id, or NotFoundError."""
        rows = self._rows("WHERE id = ?", (volume_id,)) if ids.is_valid(volume_id, "volume") else []
        if not rows:
            raise NotFoundError(f"Volume {volume_id!r} not found")
        return rows[0]

    def find(self, volume_id: str) -> VolumeRow | None:
        """A volume (or replica) by id, if this node holds it."""
        rows = self._rows("WHERE id = ?", (volume_id,)) if ids.is_valid(volume_id, "volume") else []
        return rows[0] if rows else None

    def by_name(self, name: str) -> VolumeRow | None:
        """The named volume, if any."""
        rows = self._rows("WHERE name = ?", (name,))
        return rows[0] if rows else None

    def all(self) -> list[VolumeRow]:
        """Named volumes, newest first (ephemeral ones are not listed, as in Modal)."""
        return self._rows("WHERE ephemeral = 0 AND home IS NULL ORDER BY created_at DESC", ())

    def replicas(self) -> list[VolumeRow]:
        """This node's copies of other nodes' volumes."""
        return self._rows("WHERE home IS NOT NULL", ())

    def create_replica(self, volume_id: str, home: str) -> VolumeRow:
        """An empty copy of ``home``'s volume ``volume_id``, under that id (filled by ``shoal.engine.replicas``)."""
        if not ids.is_valid(volume_id, "volume"):
            raise NotFoundError(f"Volume {volume_id!r} not found")
        self._make_dirs(volume_id)
        row = VolumeRow(volume_id, None, time.time(), False, None, None, home)
        try:
            self.db.execute(
                "INSERT INTO volumes (id, name, created_at, ephemeral, heartbeat_at, version, home)"
                " VALUES (?, NULL, ?, 0, NULL, NULL, ?)",
                (volume_id, row.created_at, home),
            )
        except sqlite3.IntegrityError:
            self._to_trash(volume_id)
            raise AlreadyExistsError(f"this node already holds volume {volume_id}") from None
        return row

    def replica_base(self, volume_id: str) -> str | None:
        """What a replica last recorded of its state (JSON, ``shoal.engine.replicas``)."""
        row = self.db.execute("SELECT base FROM volumes WHERE id = ?", (volume_id,)).fetchone()
        return row[0] if row else None

    def set_replica_base(self, volume_id: str, base: str) -> None:
        self.db.execute("UPDATE volumes SET base = ? WHERE id = ?", (base, volume_id))

    def _make_dirs(self, volume_id: str) -> None:
        d = self.base / volume_id
        d.mkdir(mode=0o711)
        os.chmod(d, 0o711)
        (d / "staging").mkdir(mode=0o700)
        root = d / "root"
        root.mkdir(mode=0o755)
        os.chown(root, self.uid, self.gid)
        os.chmod(root, 0o755)

    def _new(self, name: str | None, ephemeral: bool, version: int | None) -> VolumeRow:
        volume_id = ids.new("volume")
        self._make_dirs(volume_id)
        now = time.time()
        row = VolumeRow(volume_id, name, now, ephemeral, now if ephemeral else None, version)
        try:
            self.db.execute(
                "INSERT INTO volumes (id, name, created_at, ephemeral, heartbeat_at, version)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (row.id, row.name, row.created_at, int(ephemeral), row.heartbeat_at, version),
            )
        except sqlite3.IntegrityError:
            self._to_trash(volume_id)
            raise AlreadyExistsError(f"Volume '{name}' already exists") from None
        return row

    def lookup(self, name: str, create_if_missing: bool, version: int | None = None) -> VolumeRow:
        """``Volume.from_name``: the volume called ``name``, created if asked."""
        row = self.by_name(name)
        if row is None:
            if not create_if_missing:
                raise NotFoundError(f"Volume '{name}' not found; pass create_if_missing=True to create it")
            try:
                return self._new(name, False, version)
            except AlreadyExistsError:
                row = self.by_name(name)  # created concurrently
                assert row is not None
        if version is not None and row.version is not None and version != row.version:
            raise InvalidError(f"Volume '{name}' exists with version {row.version}, not {version}")
        return row

    def create(self, name: str, allow_existing: bool, version: int | None = None) -> VolumeRow:
        """``Volume.objects.create``."""
        row = self.by_name(name)
        if row is not None:
            if allow_existing:
                return row
            raise AlreadyExistsError(f"Volume '{name}' already exists")
        return self._new(name, False, version)

    def create_ephemeral(self, version: int | None = None) -> VolumeRow:
        """``Volume.ephemeral()``: a nameless volume that lives while its client sends heartbeats."""
        return self._new(None, True, version)

    def heartbeat(self, volume_id: str) -> None:
        """Keep an ephemeral volume alive."""
        self.get(volume_id)
        self.db.execute("UPDATE volumes SET heartbeat_at = ? WHERE id = ?", (time.time(), volume_id))

    def rename(self, old_name: str, new_name: str) -> VolumeRow:
        """``Volume.rename``: only the row changes; the directory is named by id."""
        row = self.by_name(old_name)
        if row is None:
            raise NotFoundError(f"Volume '{old_name}' not found")
        try:
            self.db.execute("UPDATE volumes SET name = ? WHERE id = ?", (new_name, row.id))
        except sqlite3.IntegrityError:
            raise AlreadyExistsError(f"Volume '{new_name}' already exists") from None
        row.name = new_name
        return row

    def delete(self, volume_id: str) -> None:
        """Forget a volume and move its files to the trash (emptied by ``empty_trash``).

        Sandboxes that still mount it keep a working (now detached) directory until they end.
        """
        self.get(volume_id)
        self.db.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))
        self._to_trash(volume_id)

    def delete_by_name(self, name: str, allow_missing: bool) -> None:
        """``Volume.objects.delete``."""
        row = self.by_name(name)
        if row is None:
            if allow_missing:
                return
            raise NotFoundError(f"Volume '{name}' not found")
        self.delete(row.id)

    def _to_trash(self, volume_id: str) -> None:
        src = self.base / volume_id
        if src.is_symlink() or not src.exists():
            return
        os.rename(src, self.trash / f"{volume_id}.{secrets.token_hex(4)}")

    # ---------------------------------------------------------------- directories

    def root_path(self, volume_id: str) -> Path:
        """The host directory holding the volume's content (its components are all the daemon's)."""
        return self.base / volume_id / "root"

    @contextlib.contextmanager
    def open(self, volume_id: str) -> Iterator[OpenVolume]:
        """Descriptors of the volume's root and staging directories for the duration of the block."""
        self.get(volume_id)
        with self._open_dirs(volume_id) as vol:
            yield vol

    @contextlib.contextmanager
    def _open_dirs(self, volume_id: str) -> Iterator[OpenVolume]:
        """``open`` without the database lookup (safe in worker threads)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            root = os.open(self.root_path(volume_id), flags)
        except FileNotFoundError:
            raise NotFoundError(f"Volume {volume_id!r} not found") from None
        try:
            staging = os.open(self.base / volume_id / "staging", flags)
        except BaseException:
            os.close(root)
            raise
        try:
            yield OpenVolume(volume_id, root, staging, self.uid, self.gid)
        finally:
            os.close(root)
            os.close(staging)

    def usage(self, volume_id: str) -> int:
        """Bytes of disk the volume's files use (each inode counted once).  Runs in worker threads: no database."""
        with self._open_dirs(volume_id) as vol:
            seen: set[int] = set()
            total = 0
            for _, st in safefs.walk(vol.root, [], recursive=True):
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                total += st.st_blocks * 512
            return total
