"""``SandboxSnapshot``: a memory snapshot of a gVisor sandbox, as Modal's ``modal.snapshot.SandboxSnapshot``.

Taken with ``sb._experimental_snapshot()``; ``Sandbox._experimental_from_snapshot(snapshot)`` starts a new sandbox
from it whose processes carry on where they were (restoring it twice gives two independent sandboxes).

Examples:
    sb = shoal.Sandbox.create("python3", "-c", counter, app=app, _experimental_enable_snapshot=True)
    snap = sb._experimental_snapshot()
    fork = shoal.Sandbox._experimental_from_snapshot(snap)
    same = shoal.SandboxSnapshot.from_id(snap.object_id)
"""

from __future__ import annotations

from typing import Any

from shoal.exception import InvalidError
from shoal.wire import ids


class SandboxSnapshot:
    """A memory snapshot, by id (what the daemon knows of it is fetched when a restore needs it)."""

    def __init__(self, snapshot_id: str, info: dict[str, Any] | None = None) -> None:
        self._id = snapshot_id
        self._info = dict(info or {})

    @property
    def object_id(self) -> str:
        """Its id (``sn-…``)."""
        return self._id

    @staticmethod
    def from_id(sandbox_snapshot_id: str, client: Any = None) -> SandboxSnapshot:
        """A handle to a snapshot taken earlier (no request is made: a missing one fails at restore)."""
        if not isinstance(sandbox_snapshot_id, str) or not ids.is_valid(sandbox_snapshot_id, "memory_snapshot"):
            raise InvalidError(f"{sandbox_snapshot_id!r} is not a sandbox snapshot id (they start with 'sn-')")
        return SandboxSnapshot(sandbox_snapshot_id)

    def __repr__(self) -> str:
        return f"SandboxSnapshot({self._id!r})"
