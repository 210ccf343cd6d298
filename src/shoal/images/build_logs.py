"""What each build step printed, kept per step image so ``image.logs`` can show it later (Modal's ``Image.logs``).

A step's lines are recorded when the step is built (a cached step keeps the
lines of the build that made it); a step that failed records nothing (its
error carries the last lines).  An image's build steps are found by walking
the ``parent`` links of its step images back to its base, so ``layers=N``
means the image's last N steps, newest counted first, shown oldest first.
A step that changed nothing has its parent's id: its lines join the parent's.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.store.state import State

SCHEMA = """
CREATE TABLE IF NOT EXISTS image_logs (
    image_id TEXT NOT NULL,
    step_key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    timestamp_us INTEGER NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS image_logs_by_image ON image_logs (image_id, seq);
"""
KEPT_LINES = 10_000
"""Lines kept per step (the last ones): a step that prints without end must not fill the database."""
LINE_CHARS = 4096
"""Characters kept of one line."""
MAX_STEPS = 10_000
"""How far back a chain of parents is followed (a guard against a corrupt, looping chain)."""


@dataclass(frozen=True)
class Line:
    """One line a step printed."""

    timestamp_us: int
    message: str


class StepLog:
    """Collects a building step's lines, keeping the last :data:`KEPT_LINES`."""

    def __init__(self) -> None:
        self.lines: deque[Line] = deque(maxlen=KEPT_LINES)

    def add(self, timestamp_us: int, message: str) -> None:
        """Keep one line (cut to :data:`LINE_CHARS`)."""
        self.lines.append(Line(timestamp_us, message[:LINE_CHARS]))


def ensure_schema(db: sqlite3.Connection) -> None:
    """Create the table if this data directory has none yet."""
    db.executescript(SCHEMA)


def record(db: sqlite3.Connection, image_id: str, step_key: str, log: StepLog) -> None:
    """Store a built step's lines under its image (replacing those of an earlier build of the same step)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DELETE FROM image_logs WHERE image_id = ? AND step_key = ?", (image_id, step_key))
        start = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM image_logs WHERE image_id = ?", (image_id,))
        first = int(start.fetchone()[0])
        db.executemany(
            "INSERT INTO image_logs (image_id, step_key, seq, timestamp_us, message) VALUES (?, ?, ?, ?, ?)",
            ((image_id, step_key, first + i, ln.timestamp_us, ln.message) for i, ln in enumerate(log.lines)),
        )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def step_chain(state: State, image_id: str) -> list[str]:
    """The image's build steps' image ids, newest first (empty for a base image)."""
    chain: list[str] = []
    current: str | None = image_id
    while current is not None and current not in chain and len(chain) < MAX_STEPS:
        row = state.image(current)
        if row is None or row.recipe.get("kind") != "step":
            break
        chain.append(current)
        parent = row.recipe.get("parent")
        current = parent if isinstance(parent, str) else None
    return chain


def read(state: State, image_id: str, *, layers: int | None = None, tail: int | None = None) -> list[Line]:
    """The lines of the image's last ``layers`` steps (None: all), oldest first; with ``tail``, only the last
    ``tail`` of those."""
    chain = step_chain(state, image_id)
    if layers is not None:
        chain = chain[:layers]
    out: list[Line] = []
    for step_image in reversed(chain):
        out.extend(_lines(state.db, step_image))
    return out[-tail:] if tail is not None else out


def _lines(db: sqlite3.Connection, image_id: str) -> Iterable[Line]:
    cur = db.execute("SELECT timestamp_us, message FROM image_logs WHERE image_id = ? ORDER BY seq", (image_id,))
    return [Line(int(r[0]), str(r[1])) for r in cur.fetchall()]


def forget_dangling(db: sqlite3.Connection) -> int:
    """Drop the lines of images that are gone; returns how many lines."""
    cur = db.execute("DELETE FROM image_logs WHERE image_id NOT IN (SELECT id FROM images)")
    return cur.rowcount
