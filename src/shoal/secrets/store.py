"""Named secrets in the state database, and the sealed environments of sandboxes.

Trust: API callers (who may create, use and delete secrets, but never read a
value back: no operation returns one).  Defends against leaks: values are
sealed with :class:`~shoal.secrets.keyring.Keyring` before they touch the
database, never appear in an answer, a log line or an error message (errors
name keys, never values), and reach a sandbox only as environment variables
of its entrypoint and execs.  The sandbox row's stored create request keeps
its secret environment sealed too (``sealed_env``), so a restarted daemon can
give execs the sandbox's secrets without ever having stored them in the clear.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass

from shoal.exception import AlreadyExistsError, ConflictError, InvalidError, NotFoundError
from shoal.secrets.keyring import Keyring
from shoal.store.spec import SandboxSpec
from shoal.wire import ids
from shoal.wire.secrets import SecretInfo, check_secret_env
from shoal.wire.times import micros

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sealed BLOB NOT NULL
);
"""
HOME_COLUMN = "home"
"""Added to ``secrets`` where an older database lacks it: the node that holds a mirrored secret (decision 0077)."""
SANDBOX_CONTEXT = "sandbox-env:"
"""Associated data for a sandbox's sealed environment: this prefix and the sandbox's id."""


@dataclass
class SecretRow:
    """One row of ``secrets`` (still sealed)."""

    id: str
    name: str
    created_at: float
    updated_at: float
    sealed: bytes
    home: str | None = None
    """The cluster node whose secret this row mirrors (None: this node's own)."""

    def info(self) -> SecretInfo:
        """The secret as the API shows it."""
        return SecretInfo(
            secret_id=self.id,
            name=self.name,
            created_at_us=micros(self.created_at),
            updated_at_us=micros(self.updated_at),
        )


class SecretStore:
    """Every named secret of this daemon, and sealing for sandboxes' environments."""

    def __init__(self, db: sqlite3.Connection, keyring: Keyring) -> None:
        self.db = db
        self.keyring = keyring
        self.db.executescript(SCHEMA)
        if HOME_COLUMN not in {r[1] for r in self.db.execute("PRAGMA table_info(secrets)")}:
            self.db.execute(f"ALTER TABLE secrets ADD COLUMN {HOME_COLUMN} TEXT")

    # ---------------------------------------------------------------- rows

    def _rows(self, where: str, args: tuple[object, ...]) -> list[SecretRow]:
        cur = self.db.execute(f"SELECT id, name, created_at, updated_at, sealed, home FROM secrets {where}", args)
        return [SecretRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5]) for r in cur.fetchall()]

    def find(self, secret_id: str) -> SecretRow | None:
        """A secret (or a mirror of another node's) by id, if this node holds it."""
        rows = self._rows("WHERE id = ?", (secret_id,)) if ids.is_valid(secret_id, "secret") else []
        return rows[0] if rows else None

    def by_name(self, name: str) -> SecretRow | None:
        """The secret called ``name``, if any."""
        rows = self._rows("WHERE name = ?", (name,))
        return rows[0] if rows else None

    def get(self, secret_id: str) -> SecretRow:
        """A secret by id, or NotFoundError."""
        rows = self._rows("WHERE id = ?", (secret_id,)) if ids.is_valid(secret_id, "secret") else []
        if not rows:
            raise NotFoundError(f"Secret {secret_id!r} not found")
        return rows[0]

    def all(self) -> list[SecretRow]:
        """Every secret of this node, newest first (not the mirrors of other nodes' secrets)."""
        return self._rows("WHERE home IS NULL ORDER BY created_at DESC", ())

    def _env(self, row: SecretRow) -> dict[str, str]:
        return self.keyring.open_env(row.sealed.decode(), row.id)

    def create(self, name: str, env: dict[str, str], allow_existing: bool) -> SecretRow:
        """``Secret.objects.create``: an existing secret is kept as it is when ``allow_existing``."""
        existing = self.by_name(name)
        if existing is not None:
            if allow_existing:
                return existing
            raise AlreadyExistsError(f"Secret '{name}' already exists")
        secret_id = ids.new("secret")
        now = time.time()
        sealed = self.keyring.seal_env(env, secret_id).encode()
        try:
            self.db.execute(
                "INSERT INTO secrets (id, name, created_at, updated_at, sealed) VALUES (?, ?, ?, ?, ?)",
                (secret_id, name, now, now, sealed),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExistsError(f"Secret '{name}' already exists") from None
        return SecretRow(secret_id, name, now, now, sealed)

    def lookup(self, name: str, required_keys: list[str]) -> SecretRow:
        """``Secret.from_name``: NotFoundError if missing or without one of ``required_keys``."""
        row = self.by_name(name)
        if row is None:
            raise NotFoundError(f"Secret '{name}' not found; create it with `shoal secret create {name} KEY=VALUE`")
        if required_keys:
            missing = sorted(set(required_keys) - set(self._env(row)))
            if missing:
                raise NotFoundError(f"Secret '{name}' is missing key(s): {', '.join(missing)}")
        return row

    def mirror(
        self, secret_id: str, name: str, env: dict[str, str], updated_at: float, home: str, held_only: bool = False
    ) -> SecretRow | None:
        """Hold ``home``'s secret under its id (a create that names it lands here): its values as of ``updated_at``,
        newer than any held.  ConflictError where a secret of this node already has its name.  ``held_only``: update
        a mirror this node holds, and make none (None)."""
        check_secret_env(env)
        rows = self._rows("WHERE id = ?", (secret_id,)) if ids.is_valid(secret_id, "secret") else None
        if rows is None:
            raise InvalidError(f"{secret_id!r} is not a secret id")
        if rows and rows[0].home is None:
            return rows[0]  # this node's own: it holds the newest values
        if held_only and not rows:
            return None
        named = self.by_name(name)
        if named is not None and named.id != secret_id:
            raise ConflictError(f"this node has another secret named {name!r} ({named.id})")
        sealed = self.keyring.seal_env(env, secret_id).encode()
        if rows:
            row = rows[0]
            if row.updated_at < updated_at:
                self.db.execute(
                    "UPDATE secrets SET sealed = ?, updated_at = ? WHERE id = ?", (sealed, updated_at, secret_id)
                )
                row.sealed, row.updated_at = sealed, updated_at
            return row
        now = time.time()
        self.db.execute(
            "INSERT INTO secrets (id, name, created_at, updated_at, sealed, home) VALUES (?, ?, ?, ?, ?, ?)",
            (secret_id, name, now, updated_at, sealed, home),
        )
        return SecretRow(secret_id, name, now, updated_at, sealed, home)

    def forget_mirror(self, secret_id: str) -> None:
        """Drop this node's mirror of another node's secret (deleted there)."""
        self.db.execute("DELETE FROM secrets WHERE id = ? AND home IS NOT NULL", (secret_id,))

    def values(self, secret_id: str) -> tuple[SecretRow, dict[str, str]]:
        """A secret and its values (for a cluster node that needs it: ``mirror``)."""
        row = self.get(secret_id)
        return row, self._env(row)

    def update(self, secret_id: str, env: dict[str, str]) -> SecretRow:
        """``secret.update``: merge ``env`` into the stored keys."""
        row = self.get(secret_id)
        merged = {**self._env(row), **env}
        check_secret_env(merged)
        now = time.time()
        sealed = self.keyring.seal_env(merged, secret_id).encode()
        self.db.execute("UPDATE secrets SET sealed = ?, updated_at = ? WHERE id = ?", (sealed, now, secret_id))
        row.sealed, row.updated_at = sealed, now
        return row

    def delete_by_name(self, name: str, allow_missing: bool) -> None:
        """``Secret.objects.delete`` (running sandboxes keep the values they started with)."""
        if self.by_name(name) is None:
            if allow_missing:
                return
            raise NotFoundError(f"Secret '{name}' not found")
        self.db.execute("DELETE FROM secrets WHERE name = ?", (name,))

    # ---------------------------------------------------------------- use

    def resolve(self, secret_ids: list[str]) -> dict[str, str]:
        """The merged environment of ``secret_ids``, later ones winning (values stay in memory only)."""
        env: dict[str, str] = {}
        for secret_id in secret_ids:
            env.update(self._env(self.get(secret_id)))
        return env

    def seal_sandbox_env(self, sandbox_id: str, env: dict[str, str]) -> str:
        """A sandbox's secret environment, sealed for its stored spec."""
        return self.keyring.seal_env(env, SANDBOX_CONTEXT + sandbox_id)

    def open_sealed_env(self, owner_id: str, sealed: str) -> dict[str, str]:
        """What ``seal_sandbox_env(owner_id, …)`` sealed (empty for nothing sealed)."""
        return self.keyring.open_env(sealed, SANDBOX_CONTEXT + owner_id) if sealed else {}

    def open_sandbox_env(self, sandbox_id: str, spec: SandboxSpec) -> dict[str, str]:
        """The secret environment in a sandbox's stored spec (sealed, or from before sealing existed)."""
        if spec.sealed_env:
            return self.keyring.open_env(spec.sealed_env, SANDBOX_CONTEXT + sandbox_id)
        return dict(spec.legacy_secret_env)

    def seal_stored_specs(self) -> int:
        """Seal secret environments that older versions stored in the clear in sandbox rows; returns how many."""
        count = 0
        self.db.execute("PRAGMA secure_delete = ON")  # overwrite the clear text, not just unlink it
        for sandbox_id, raw in self.db.execute("SELECT id, spec FROM sandboxes").fetchall():
            spec = json.loads(raw)
            clear = spec.pop("secret_env", None)
            if not clear:
                continue
            spec["sealed_env"] = self.seal_sandbox_env(sandbox_id, clear)
            self.db.execute("UPDATE sandboxes SET spec = ? WHERE id = ?", (json.dumps(spec), sandbox_id))
            count += 1
        if count:
            log.info("sealed the secret environments of %d sandboxes stored in the clear by an older version", count)
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.execute("PRAGMA secure_delete = OFF")
        return count
