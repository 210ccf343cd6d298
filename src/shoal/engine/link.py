"""The daemon's connection to one sandbox's agent.

Reads frames (hostile input, decoded by ``FrameReader`` with bounds) and hands
them to the sandbox; writes frames the sandbox queues.  Closing is idempotent
and always reported once through ``on_close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from shoal.agent.protocol import Frame, FrameReader, ProtocolError

log = logging.getLogger(__name__)

READ_SIZE = 1 << 18


class AgentLink:
    """A framed, bidirectional connection to an agent."""

    def __init__(
        self,
        on_frames: Callable[[AgentLink, list[Frame]], None],
        on_close: Callable[[AgentLink], None],
        label: str,
    ) -> None:
        self._on_frames = on_frames
        self._on_close = on_close
        self.label = label
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.verified = False
        """Whether this connection proved it is the sandbox's agent."""
        self._held: list[bytes] | None = None

    async def start(self, sock: socket.socket) -> None:
        """Begin reading from a connected socket."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=READ_SIZE)
        self.attach(reader, writer)

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Begin reading from streams (a connection accepted by an asyncio server)."""
        self._writer = writer
        self._task = asyncio.create_task(self._read_loop(reader), name=f"agent-{self.label}")

    def send(self, data: bytes) -> None:
        """Queue bytes for the agent (no-op once closed); held back while ``hold`` is in force."""
        if self._held is not None:
            self._held.append(data)
        elif self._writer is not None and not self.closed.is_set():
            self._writer.write(data)

    def hold(self) -> None:
        """Keep what is sent from now on until ``release``: the agent must receive nothing while a checkpoint may
        be taken (a frame half read would be in the checkpoint)."""
        if self._held is None:
            self._held = []

    def take_held(self) -> list[bytes]:
        """What ``hold`` kept, which is no longer this link's to send (its agent parked and reconnected)."""
        held, self._held = self._held or [], None
        return held

    def release(self, first: bytes | None) -> None:
        """Send ``first`` and then what ``hold`` kept."""
        held, self._held = self._held or [], None
        for data in [first, *held] if first is not None else held:
            self.send(data)

    async def drain(self) -> None:
        """Wait until queued bytes are handed to the kernel."""
        if self._writer is not None and not self.closed.is_set():
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.drain()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameReader()
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                frames = decoder.feed(data)
                if frames:
                    self._on_frames(self, frames)
        except ProtocolError as exc:
            log.warning("sandbox %s: dropping agent connection: %s", self.label, exc)
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("sandbox %s: agent link failed", self.label)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        if self._writer is not None:
            self._writer.close()
        self._on_close(self)

    def close_quietly(self) -> None:
        """Drop the connection without reporting it (the daemon is stopping; the agent will reconnect)."""
        self._on_close = lambda link: None
        self.close()

    def close(self) -> None:
        """Drop the connection."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._finish()
