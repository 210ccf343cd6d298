"""A process in a sandbox (an exec, or the entrypoint) as the daemon tracks it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from shoal.agent.protocol import ExitKind
from shoal.engine.output import OutputBudget, OutputStream

ENTRYPOINT_ID = "entrypoint"
SIGKILL = 9


def returncode(kind: int, value: int) -> int:
    """Modal's return code: the exit code, 128+N for signal N, -1 for a passed deadline."""
    if kind == ExitKind.CODE or kind == ExitKind.SPAWN_FAILED:
        return value
    if kind == ExitKind.SIGNAL:
        return 128 + value
    return -1


class Process:
    """One process and its two output streams."""

    def __init__(
        self,
        sandbox_id: str,
        exec_id: str,
        spec: dict[str, Any],
        out_dir: Path,
        limit: int,
        *,
        eof_mask: int = 0,
        persist: bool = True,
        budget: OutputBudget | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.id = exec_id
        self.spec = spec
        self.persist = persist
        """Whether the process is recorded in the database (not so for per-request file operations)."""
        # Recorded output counts against the sandbox's disk quota; a file operation's is deleted once delivered.
        budget = budget if persist else None
        self.streams = (
            OutputStream(
                out_dir / f"{exec_id}.1", limit, eof=bool(eof_mask & 1), memory_first=not persist, budget=budget
            ),
            OutputStream(
                out_dir / f"{exec_id}.2", limit, eof=bool(eof_mask & 2), memory_first=not persist, budget=budget
            ),
        )
        self.pid: int | None = None
        self.unacknowledged_exec: bytes | None = None
        """Its EXEC frame, until the agent says it started it: a connection that broke with the frame in it leaves
        the agent without it, and the next connection sends it again (``AgentFrames._reconcile``)."""
        self.exit_kind: int | None = None
        self.exit_value: int | None = None
        self.started_at = time.monotonic()
        self.stdin_offset = 0
        """Bytes of stdin forwarded to the agent."""
        self.stdin_acked = 0
        """Bytes of stdin the agent has written into the process."""
        self.stdin_eof = False
        self._exit = asyncio.Event()
        self._stdin_room = asyncio.Event()

    @property
    def placeholder(self) -> bool:
        """An entrypoint record standing for no process (a sandbox started with no command)."""
        return not self.spec.get("args")

    @property
    def is_entrypoint(self) -> bool:
        """Whether this is the sandbox's main process."""
        return self.id == ENTRYPOINT_ID

    @property
    def exited(self) -> bool:
        """Whether the process has ended."""
        return self.exit_kind is not None

    @property
    def returncode(self) -> int | None:
        """Return code once ended."""
        if self.exit_kind is None or self.exit_value is None:
            return None
        return returncode(self.exit_kind, self.exit_value)

    @property
    def eof_mask(self) -> int:
        """Bit 1: stdout ended; bit 2: stderr ended."""
        return int(self.streams[0].eof) | (int(self.streams[1].eof) << 1)

    def set_exit(self, kind: int, value: int) -> bool:
        """Record the end; False if it was already recorded."""
        if self.exit_kind is not None:
            return False
        self.exit_kind = kind
        self.exit_value = value
        self._exit.set()
        self._stdin_room.set()
        return True

    def end_streams(self) -> None:
        """Nothing more can arrive (the sandbox is gone): end both streams."""
        for s in self.streams:
            s.mark_eof()

    async def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for the end; True if ended."""
        if self.exited:
            return True
        try:
            await asyncio.wait_for(self._exit.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def stdin_acknowledged(self, offset: int) -> None:
        """The agent wrote stdin up to ``offset`` into the process."""
        if offset > self.stdin_acked:
            self.stdin_acked = min(offset, self.stdin_offset)
            self._stdin_room.set()

    async def wait_stdin_room(self, limit: int) -> None:
        """Wait until fewer than ``limit`` forwarded stdin bytes are still pending in the agent."""
        while self.stdin_offset - self.stdin_acked >= limit and not self.exited:
            self._stdin_room.clear()
            await self._stdin_room.wait()

    def close(self) -> None:
        """Release file descriptors."""
        for s in self.streams:
            s.close()
        self._stdin_room.set()
