"""Process output kept per stream in a file, addressed by byte offset.

A reader asks for bytes from an offset and waits for more, so a dropped
connection resumes where it stopped, and output outlives the daemon.  The
agent's offsets are absolute; a resent chunk (after a reconnection) is
trimmed to the bytes not stored yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

MEMORY_FIRST = 256 << 10
"""Bytes a ``memory_first`` stream keeps in memory before it moves to its file."""


class OutputBudget:
    """The bytes of output one sandbox may still store on the host's disk, over all its recorded streams.

    Output past it is discarded (its offsets still count, so readers and the agent stay in step), and
    ``on_full`` is called once, so that the loss is reported rather than silent.
    """

    def __init__(self, left: int, on_full: Callable[[], None] | None = None) -> None:
        self.left = max(0, left)
        self.full = False
        self._on_full = on_full

    def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` bytes; returns how many may be stored."""
        granted = min(wanted, self.left)
        self.left -= granted
        if granted < wanted and not self.full:
            self.full = True
            if self._on_full is not None:
                self._on_full()
        return granted


class OutputStream:
    """stdout or stderr of one process.

    ``memory_first``: for a process whose output need not outlive the daemon (an attached file operation), the
    first ``MEMORY_FIRST`` bytes stay in memory, so a small operation touches no file at all.
    """

    def __init__(
        self,
        path: Path,
        limit: int,
        *,
        eof: bool = False,
        memory_first: bool = False,
        budget: OutputBudget | None = None,
    ) -> None:
        self.path = path
        self.limit = limit
        self.budget = budget
        """The sandbox's disk quota for output, shared by its streams (None: only ``limit`` applies)."""
        self.eof = eof
        self._fd: int | None = None
        self._mem: bytearray | None = bytearray() if memory_first else None
        self.size = 0
        if not memory_first:
            with contextlib.suppress(FileNotFoundError):
                self.size = path.stat().st_size
        self.received = self.size
        """Bytes the agent has delivered, stored or not (beyond ``limit`` they are dropped)."""
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def truncated(self) -> bool:
        """Whether output beyond ``limit`` was dropped."""
        return self.received > self.size

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def append(self, offset: int, data: bytes) -> bool:
        """Store ``data`` that starts at stream offset ``offset``; False if it leaves a gap."""
        if offset > self.received:
            return False
        skip = self.received - offset
        if skip >= len(data):
            return True
        data = data[skip:]
        room = min(self.limit - self.size, len(data))
        if room > 0 and self.budget is not None:
            room = self.budget.take(room)
        if room > 0 and self._mem is not None:
            if self.size + len(data) <= MEMORY_FIRST:
                self._mem += data
                self.size += len(data)
                self.received += len(data)
                self._wake()
                return True
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            os.write(self._fd, self._mem)
            self._mem = None
        if room > 0:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            chunk = data[:room]
            os.write(self._fd, chunk)
            self.size += len(chunk)
        self.received += len(data)
        self._wake()
        return True

    def mark_eof(self) -> None:
        """No more bytes will come."""
        if not self.eof:
            self.eof = True
            self.close()
            self._wake()

    def discard(self) -> None:
        """Delete the stored bytes of an ended stream whose one reader has them all (an attached process's
        output): reads then find nothing, and the disk holds nothing for it."""
        if self.eof:
            self.close()
            if self._mem is not None:
                self._mem = bytearray()
            else:
                self.path.unlink(missing_ok=True)
            self.size = 0

    def close(self) -> None:
        """Release the write descriptor."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, offset: int, limit: int = 1 << 20) -> bytes:
        """Stored bytes from ``offset`` (at most ``limit``)."""
        n = min(limit, self.size - offset)
        if n <= 0:
            return b""
        if self._mem is not None:
            return bytes(self._mem[offset : offset + n])
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(n)

    async def follow(self, offset: int = 0, limit: int = 1 << 20) -> AsyncIterator[bytes]:
        """The stored bytes from ``offset`` on, in chunks of at most ``limit``, as they arrive, until the end."""
        while True:
            data = self.read(offset, limit)
            if data:
                yield data
                offset += len(data)
                continue
            if self.eof:
                return
            await self.wait(offset, None)

    async def wait(self, offset: int, timeout: float | None) -> None:
        """Return once bytes beyond ``offset`` exist, the stream ended, or ``timeout`` passed."""
        if self.size > offset or self.eof:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
