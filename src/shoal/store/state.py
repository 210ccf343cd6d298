"""The daemon's persistent state: SQLite in WAL mode in the data dir.

Everything a restarted daemon needs to re-adopt its sandboxes is written here
before the change it records is acknowledged to anyone.  Calls are short and
synchronous on the event loop thread (a few tens of microseconds each).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.store.spec import SandboxSpec
from shoal.wire.sandboxes import SandboxState

SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    created_at REAL NOT NULL,
    ephemeral INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS app_meta (
    app_id TEXT PRIMARY KEY,
    tags TEXT NOT NULL DEFAULT '{}',
    stopped_at REAL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    name TEXT,
    tags TEXT NOT NULL DEFAULT '{}',
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    token BLOB,
    created_at REAL NOT NULL,
    deadline REAL,
    finished_at REAL,
    result_status TEXT,
    result_code INTEGER,
    result_message TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_state ON sandboxes(state);
CREATE TABLE IF NOT EXISTS execs (
    sandbox_id TEXT NOT NULL,
    id TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    exit_kind INTEGER,
    exit_value INTEGER,
    eof_mask INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sandbox_id, id)
);
CREATE TABLE IF NOT EXISTS usage (
    sandbox_id TEXT NOT NULL,
    at REAL NOT NULL,
    seconds REAL NOT NULL,
    cpu_cores REAL NOT NULL,
    memory_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_sandbox ON usage(sandbox_id, at);
CREATE TABLE IF NOT EXISTS image_handles (
    handle TEXT PRIMARY KEY,
    image_id TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    recipe TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass
class AppRow:
    """One app, from ``apps`` and ``app_meta``."""

    id: str
    name: str | None
    created_at: float
    ephemeral: bool
    tags: dict[str, str]
    stopped_at: float | None


@dataclass
class SandboxRow:
    """One row of ``sandboxes``."""

    id: str
    app_id: str
    name: str | None
    tags: dict[str, str]
    spec: SandboxSpec
    state: SandboxState
    token: bytes
    created_at: float
    deadline: float | None
    finished_at: float | None = None
    result_status: str | None = None
    result_code: int | None = None
    result_message: str | None = None


@dataclass
class ExecRow:
    """One row of ``execs``."""

    sandbox_id: str
    id: str
    spec: dict[str, Any]
    state: str
    created_at: float
    finished_at: float | None = None
    exit_kind: int | None = None
    exit_value: int | None = None
    eof_mask: int = 0


@dataclass
class ImageRow:
    """One row of ``images``."""

    id: str
    recipe: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0


class State:
    """Typed access to the state database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    # apps

    def app_by_name(self, name: str) -> tuple[str, str] | None:
        """(id, name) of the app called ``name``."""
        row = self.db.execute("SELECT id, name FROM apps WHERE name = ?", (name,)).fetchone()
        return (row[0], row[1]) if row else None

    def app_by_id(self, app_id: str) -> tuple[str, str | None] | None:
        """(id, name) of an app."""
        row = self.db.execute("SELECT id, name FROM apps WHERE id = ?", (app_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def add_app(self, app_id: str, name: str | None, ephemeral: bool) -> None:
        """Record a new app."""
        self.db.execute(
            "INSERT INTO apps (id, name, created_at, ephemeral) VALUES (?, ?, ?, ?)",
            (app_id, name, time.time(), int(ephemeral)),
        )

    def delete_app(self, app_id: str) -> None:
        """Forget an app."""
        self.db.execute("DELETE FROM apps WHERE id = ?", (app_id,))
        self.db.execute("DELETE FROM app_meta WHERE app_id = ?", (app_id,))

    _APP_COLUMNS = (
        "SELECT a.id, a.name, a.created_at, a.ephemeral, m.tags, m.stopped_at"
        " FROM apps a LEFT JOIN app_meta m ON m.app_id = a.id"
    )

    def app_row(self, app_id: str) -> AppRow | None:
        """An app with what is recorded about it."""
        row = self.db.execute(f"{self._APP_COLUMNS} WHERE a.id = ?", (app_id,)).fetchone()
        if row is None:
            return None
        return AppRow(row[0], row[1], row[2], bool(row[3]), json.loads(row[4] or "{}"), row[5])

    def app_rows(self) -> list[AppRow]:
        """Every app, newest first."""
        rows = self.db.execute(f"{self._APP_COLUMNS} ORDER BY a.created_at DESC").fetchall()
        return [AppRow(r[0], r[1], r[2], bool(r[3]), json.loads(r[4] or "{}"), r[5]) for r in rows]

    def set_app_tags(self, app_id: str, tags: dict[str, str]) -> None:
        """Replace an app's tags."""
        self.db.execute(
            "INSERT INTO app_meta (app_id, tags) VALUES (?, ?) ON CONFLICT(app_id) DO UPDATE SET tags = excluded.tags",
            (app_id, json.dumps(tags)),
        )

    def set_app_stopped(self, app_id: str, when: float) -> None:
        """Record when an app was last stopped."""
        self.db.execute(
            "INSERT INTO app_meta (app_id, stopped_at) VALUES (?, ?)"
            " ON CONFLICT(app_id) DO UPDATE SET stopped_at = excluded.stopped_at",
            (app_id, when),
        )

    # sandboxes

    def add_sandbox(self, row: SandboxRow) -> None:
        """Record a new sandbox."""
        self.db.execute(
            "INSERT INTO sandboxes (id, app_id, name, tags, spec, state, token, created_at, deadline)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.id,
                row.app_id,
                row.name,
                json.dumps(row.tags),
                json.dumps(row.spec.to_json()),
                row.state.value,
                row.token,
                row.created_at,
                row.deadline,
            ),
        )

    def set_sandbox_state(self, sandbox_id: str, state: SandboxState) -> None:
        """Move a sandbox to ``state``."""
        self.db.execute("UPDATE sandboxes SET state = ? WHERE id = ?", (state.value, sandbox_id))

    def set_sandbox_spec(self, sandbox_id: str, spec: SandboxSpec) -> None:
        """Replace a sandbox's stored spec (images mounted into it since it started)."""
        self.db.execute("UPDATE sandboxes SET spec = ? WHERE id = ?", (json.dumps(spec.to_json()), sandbox_id))

    def finish_sandbox(
        self, sandbox_id: str, status: str, code: int | None, message: str, at: float | None = None
    ) -> None:
        """Record a sandbox's result (and when it finished: ``at``, else now)."""
        self.db.execute(
            "UPDATE sandboxes SET state = 'finished', finished_at = ?, result_status = ?,"
            " result_code = ?, result_message = ? WHERE id = ?",
            (time.time() if at is None else at, status, code, message, sandbox_id),
        )

    def set_name(self, sandbox_id: str, name: str) -> None:
        """Give a sandbox its name."""
        self.db.execute("UPDATE sandboxes SET name = ? WHERE id = ?", (name, sandbox_id))

    def set_tags(self, sandbox_id: str, tags: dict[str, str]) -> None:
        """Replace a sandbox's tags."""
        self.db.execute("UPDATE sandboxes SET tags = ? WHERE id = ?", (json.dumps(tags), sandbox_id))

    def sandbox(self, sandbox_id: str) -> SandboxRow | None:
        """One sandbox."""
        rows = self._sandboxes("WHERE id = ?", (sandbox_id,))
        return rows[0] if rows else None

    def sandboxes_in(self, *states: SandboxState) -> list[SandboxRow]:
        """Sandboxes in any of ``states``, newest first."""
        marks = ",".join("?" * len(states))
        return self._sandboxes(f"WHERE state IN ({marks}) ORDER BY created_at DESC", tuple(s.value for s in states))

    def finished_before(self, cutoff: float) -> list[str]:
        """Ids of sandboxes that finished before ``cutoff``."""
        rows = self.db.execute(
            "SELECT id FROM sandboxes WHERE state = 'finished' AND finished_at < ?", (cutoff,)
        ).fetchall()
        return [r[0] for r in rows]

    def delete_sandbox(self, sandbox_id: str) -> None:
        """Forget a sandbox and its processes."""
        self.db.execute("DELETE FROM execs WHERE sandbox_id = ?", (sandbox_id,))
        self.db.execute("DELETE FROM usage WHERE sandbox_id = ?", (sandbox_id,))
        self.db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def add_usage(self, samples: list[tuple[str, float, float, float, int]]) -> None:
        """Record usage samples: (sandbox id, when, seconds the sample stands for, CPU cores, memory bytes)."""
        if samples:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?, ?)", samples)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def usage(self, sandbox_id: str, since: float, until: float) -> list[tuple[float, float, float, int]]:
        """A sandbox's usage samples taken in [since, until): (when, seconds, CPU cores, memory bytes)."""
        cur = self.db.execute(
            "SELECT at, seconds, cpu_cores, memory_bytes FROM usage WHERE sandbox_id = ? AND at >= ? AND at < ?"
            " ORDER BY at",
            (sandbox_id, since, until),
        )
        return [(float(a), float(s), float(c), int(m)) for a, s, c, m in cur.fetchall()]

    def _sandboxes(self, where: str, args: tuple[Any, ...]) -> list[SandboxRow]:
        cur = self.db.execute(
            "SELECT id, app_id, name, tags, spec, state, token, created_at, deadline, finished_at,"
            f" result_status, result_code, result_message FROM sandboxes {where}",
            args,
        )
        return [
            SandboxRow(
                id=r[0],
                app_id=r[1],
                name=r[2],
                tags=json.loads(r[3]),
                spec=SandboxSpec.from_json(json.loads(r[4]), r[0]),
                state=SandboxState(r[5]),
                token=r[6] or b"",
                created_at=r[7],
                deadline=r[8],
                finished_at=r[9],
                result_status=r[10],
                result_code=r[11],
                result_message=r[12],
            )
            for r in cur.fetchall()
        ]

    # execs

    def add_exec(self, row: ExecRow) -> None:
        """Record a new process."""
        self.db.execute(
            "INSERT INTO execs (sandbox_id, id, spec, state, created_at) VALUES (?, ?, ?, ?, ?)",
            (row.sandbox_id, row.id, json.dumps(row.spec), row.state, row.created_at),
        )

    def finish_exec(self, sandbox_id: str, exec_id: str, kind: int, value: int) -> None:
        """Record how a process ended."""
        self.db.execute(
            "UPDATE execs SET state = 'exited', finished_at = ?, exit_kind = ?, exit_value = ?"
            " WHERE sandbox_id = ? AND id = ?",
            (time.time(), kind, value, sandbox_id, exec_id),
        )

    def set_eof(self, sandbox_id: str, exec_id: str, eof_mask: int) -> None:
        """Record which of a process's streams have ended (bit 1: stdout, bit 2: stderr)."""
        self.db.execute(
            "UPDATE execs SET eof_mask = ? WHERE sandbox_id = ? AND id = ?",
            (eof_mask, sandbox_id, exec_id),
        )

    def execs(self, sandbox_id: str, *, unfinished: bool = False) -> list[ExecRow]:
        """Every process of a sandbox (``unfinished``: only those still running or with output to come)."""
        where = " AND (exit_kind IS NULL OR eof_mask != 3)" if unfinished else ""
        cur = self.db.execute(
            "SELECT sandbox_id, id, spec, state, created_at, finished_at, exit_kind, exit_value, eof_mask"
            f" FROM execs WHERE sandbox_id = ?{where} ORDER BY created_at",
            (sandbox_id,),
        )
        return [ExecRow(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7], r[8]) for r in cur.fetchall()]

    def exec(self, sandbox_id: str, exec_id: str) -> ExecRow | None:
        """One process of a sandbox."""
        r = self.db.execute(
            "SELECT sandbox_id, id, spec, state, created_at, finished_at, exit_kind, exit_value, eof_mask"
            " FROM execs WHERE sandbox_id = ? AND id = ?",
            (sandbox_id, exec_id),
        ).fetchone()
        return None if r is None else ExecRow(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7], r[8])

    # images

    def add_image(self, row: ImageRow) -> None:
        """Record a built image."""
        self.db.execute(
            "INSERT OR REPLACE INTO images (id, recipe, config, created_at) VALUES (?, ?, ?, ?)",
            (row.id, json.dumps(row.recipe), json.dumps(row.config), row.created_at or time.time()),
        )

    def image(self, image_id: str) -> ImageRow | None:
        """One image."""
        r = self.db.execute("SELECT id, recipe, config, created_at FROM images WHERE id = ?", (image_id,)).fetchone()
        return ImageRow(r[0], json.loads(r[1]), json.loads(r[2]), r[3]) if r else None

    def images(self) -> list[ImageRow]:
        """Every image."""
        cur = self.db.execute("SELECT id, recipe, config, created_at FROM images ORDER BY created_at")
        return [ImageRow(r[0], json.loads(r[1]), json.loads(r[2]), r[3]) for r in cur.fetchall()]

    def delete_image(self, image_id: str) -> None:
        """Forget an image (and the handles that named it)."""
        self.db.execute("DELETE FROM images WHERE id = ?", (image_id,))
        self.db.execute("DELETE FROM image_handles WHERE image_id = ?", (image_id,))

    def add_image_handle(self, handle: str, image_id: str) -> None:
        """Record that ``handle`` (an id a client was given while the image was built) names ``image_id``."""
        self.db.execute("INSERT OR REPLACE INTO image_handles VALUES (?, ?, ?)", (handle, image_id, time.time()))

    def image_handle(self, handle: str) -> str | None:
        """The image a build handle names, if it was recorded."""
        row = self.db.execute("SELECT image_id FROM image_handles WHERE handle = ?", (handle,)).fetchone()
        return None if row is None else str(row[0])
