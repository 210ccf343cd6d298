"""The daemon's file descriptors: its limit raised at start, a reserve kept for its own work, and accept loops
that respect both (docs/decisions/0017).

Every connection a sandbox opens to the daemon (DNS over TCP) or that a client opens to a sandbox's tunnel
costs the daemon a descriptor.  Per-sandbox caps (``shoal.network.dns``, ``tunnels``, ``connect``) bound what
one sandbox costs; the reserve bounds what all of them together may take: when fewer than ``RESERVE``
descriptors are free, new connections on those listeners are closed at once, so the API, ``Sandbox.create``
(runc, pipes, the agent's socket, SQLite) keep working.  An accept that fails for want of descriptors
(``EMFILE``) pauses that listener for ``PAUSE`` seconds and says so in one rate-limited line: no traceback
per attempt and no busy loop on a listener the kernel keeps reporting readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import Callable, Hashable
from typing import Any

from shoal.util import ratelog

log = logging.getLogger(__name__)
log.addFilter(ratelog.PER_SANDBOX)

RESERVE = 256
"""Descriptors kept free for the daemon's own work: below this, sandbox-driven connections are refused."""
PAUSE = 0.5
"""Seconds a listener stops accepting after the process ran out of descriptors."""
BATCH = 64
"""Connections taken per readiness event of a listener (then other work gets its turn)."""
RECOUNT = 0.1
"""Seconds an open-descriptor count is trusted (plus what was accepted since)."""
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    _budget.at = float("-inf")
    return int(soft)


class _Budget:
    """The open-descriptor count, refreshed from /proc/self/fd at most every ``RECOUNT`` seconds."""

    def __init__(self) -> None:
        self.at = float("-inf")
        self.used = 0
        self.limit = 0

    def free(self) -> int:
        now = time.monotonic()
        if now - self.at >= RECOUNT:
            try:
                self.used = len(os.listdir("/proc/self/fd"))
            except OSError:  # itself out of descriptors
                self.used = self.limit
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            self.limit = 1 << 30 if soft == resource.RLIM_INFINITY else int(soft)
            self.at = now
        return self.limit - self.used


_budget = _Budget()


def free_fds() -> int:
    """Descriptors this process may still open (an estimate at most ``RECOUNT`` seconds old, never optimistic
    about what the accept loops took since)."""
    return _budget.free()


def spent(n: int = 1) -> None:
    """Note ``n`` descriptors opened since the last count."""
    _budget.used += n


def reserve_ok() -> bool:
    """Whether more than ``RESERVE`` descriptors are free: a sandbox-driven connection or query may go on."""
    return free_fds() > RESERVE


def refuse(sock: socket.socket) -> None:
    """Close an accepted connection at once, with a reset (nothing lingers on the daemon's side)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def listen_socket(bind: str, want: int, backlog: int = 256) -> socket.socket:
    """A listening TCP socket on ``bind``:``want``, or on any port if ``want`` is taken (``want`` 0: any)."""
    sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, want))
        except OSError:
            if not want:
                raise
            sock.bind((bind, 0))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Gate:
    """At most ``cap`` open connections per key; a connection counts until its socket is closed."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: dict[Hashable, list[socket.socket]] = {}

    def count(self, key: Hashable) -> int:
        """Connections open under ``key``."""
        socks = self._open.get(key)
        if socks is None:
            return 0
        socks[:] = [s for s in socks if s.fileno() != -1]
        if not socks:
            del self._open[key]
        return len(socks)

    def admit(self, key: Hashable, sock: socket.socket) -> bool:
        """Count ``sock`` under ``key`` if that stays within the cap; False (and nothing counted) if not."""
        socks = self._open.get(key)
        if socks is not None and len(socks) >= self.cap and self.count(key) >= self.cap:
            return False
        if len(self._open) > 1024:  # keys whose connections all closed
            for k in list(self._open):
                self.count(k)
        self._open.setdefault(key, []).append(sock)
        return True


class Acceptor:
    """Accepts on a listening socket and hands each new connection (non-blocking) to ``handle``, which then owns
    it; while fewer than ``RESERVE`` descriptors are free, a new connection is refused instead.  Running out
    of descriptors pauses accepting for ``PAUSE`` seconds (the kernel keeps the backlog)."""

    def __init__(self, sock: socket.socket, handle: Callable[[socket.socket, Any], None], name: str) -> None:
        self.sock = sock
        self.handle = handle
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._resume()

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections already handed on are not touched)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()

    def _resume(self) -> None:
        self._timer = None
        if self.sock.fileno() == -1 or self._loop is None:
            return
        self._loop.add_reader(self.sock.fileno(), self._ready)
        self._reading = True

    def _pause(self) -> None:
        assert self._loop is not None
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        self._timer = self._loop.call_later(PAUSE, self._resume)

    def _ready(self) -> None:
        for _ in range(BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                what = "out of file descriptors" if exc.errno in _RESOURCE_ERRNOS else "cannot accept"
                log.warning(
                    "%s (%s): %s stops accepting for %g s",
                    what,
                    exc.strerror,
                    self.name,
                    PAUSE,
                    extra=ratelog.about("accept"),
                )
                self._pause()
                return
            spent()
            if not reserve_ok():
                refuse(conn)
                log.warning(
                    "only %d file descriptors free (reserve %d): refusing new connections on %s and the like",
                    free_fds(),
                    RESERVE,
                    self.name,
                    extra=ratelog.about("reserve"),
                )
                continue
            conn.setblocking(False)
            try:
                self.handle(conn, addr)
            except Exception as exc:
                refuse(conn)
                log.warning("%s: a new connection failed: %r", self.name, exc, extra=ratelog.about(self.name))
