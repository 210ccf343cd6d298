"""A sandbox's logs (``sb.logs``): its entrypoint's output with the time each piece arrived, and its lifecycle.

The output itself stays where it is, in the entrypoint's stream files (``shoal.engine.output``).  Beside them,
``logs.idx`` records each piece as it arrived — (time, stream, first byte, length) — and ``system.log`` holds
lifecycle events as JSON lines.  Reading joins the two into line entries: a line carries the time its first
byte arrived.  Both files live in the sandbox's data dir and are kept as long as its output.

Trust: the output is the sandbox's (hostile) bytes; it is decoded with replacement and returned as data only.
The index and the system log are written by the daemon alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.wire.times import micros

INDEX = struct.Struct("<dBQI")
"""One piece of output: arrival time (UNIX seconds), stream (1 stdout, 2 stderr), first byte, length."""
MAX_SCAN = 64 << 20
"""Bytes of output per stream that reading considers (the most recent ones)."""
MAX_LINE = 64 << 10
"""Longer lines are cut into entries of this many bytes."""
SOURCES = ("stdout", "stderr", "system")
LIMIT = 10_000
"""Entries one logs request returns at most."""


@dataclass(frozen=True)
class Entry:
    """One log line, timed in whole microseconds since the epoch (the wire's unit: ``shoal.wire.times``)."""

    micros: int
    source: str
    message: str


class LogWriter:
    """Appends to a sandbox's log index and system log (on the event loop: small unbuffered writes)."""

    def __init__(self, data_dir: Path) -> None:
        self.index_path = data_dir / "logs.idx"
        self.system_path = data_dir / "system.log"
        self._fd: int | None = None

    def output(self, fd: int, start: int, length: int) -> None:
        """Bytes ``[start, start + length)`` of stream ``fd`` arrived now."""
        if length <= 0:
            return
        if self._fd is None:
            self._fd = os.open(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.write(self._fd, INDEX.pack(time.time(), fd, start, length))

    def system(self, message: str) -> None:
        """A lifecycle event."""
        line = json.dumps({"t": time.time(), "m": message}) + "\n"
        with contextlib.suppress(OSError):
            fd = os.open(self.system_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def close(self) -> None:
        """Release the index's descriptor (it reopens on the next write)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read(
    data_dir: Path,
    stream_paths: dict[int, Path],
    *,
    since: int | None = None,
    until: int | None = None,
    source: str | None = None,
    search: str = "",
    tail: int | None = None,
    limit: int = LIMIT,
) -> list[Entry]:
    """Entries in time order: ``since <= micros < until`` (microseconds since the epoch), of ``source``,
    containing ``search``; with ``tail``, the last ``tail`` of them; at most ``limit`` (the most recent ones
    when ``tail`` is given, else the first)."""
    entries: list[Entry] = []
    pieces = _pieces(data_dir / "logs.idx")
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if source in (None, name) and fd in stream_paths:
            entries += _lines(stream_paths[fd], [p for p in pieces if p[1] == fd], name)
    if source in (None, "system"):
        entries += _system(data_dir / "system.log")
    entries.sort(key=lambda e: e.micros)
    chosen = [
        e
        for e in entries
        if (since is None or e.micros >= since)
        and (until is None or e.micros < until)
        and (not search or search in e.message)
    ]
    if tail is not None:
        return chosen[-min(tail, limit) :] if tail > 0 else []
    return chosen[:limit]


def _pieces(path: Path) -> list[tuple[float, int, int, int]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    usable = len(raw) - len(raw) % INDEX.size  # a torn last record (a crash mid-write) is left out
    return [INDEX.unpack_from(raw, off) for off in range(0, usable, INDEX.size)]


def _lines(path: Path, pieces: list[tuple[float, int, int, int]], name: str) -> list[Entry]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return []
    first = max(0, size - MAX_SCAN)
    out: list[Entry] = []
    pending = bytearray()
    started = 0.0
    with open(path, "rb") as f:
        for t, _fd, start, length in pieces:
            end = min(start + length, size)
            start = max(start, first)
            if start >= end:
                continue
            f.seek(start)
            data = f.read(end - start)
            while data:
                if not pending:
                    started = t
                nl = data.find(b"\n")
                if nl < 0:
                    pending += data
                    data = b""
                else:
                    pending += data[:nl]
                    data = data[nl + 1 :]
                    out.append(Entry(micros(started), name, _text(pending)))
                    pending.clear()
                while len(pending) >= MAX_LINE:
                    out.append(Entry(micros(started), name, _text(pending[:MAX_LINE])))
                    del pending[:MAX_LINE]
    if pending:
        out.append(Entry(micros(started), name, _text(pending)))  # a line still being written
    return out


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "replace").removesuffix("\r")


def _system(path: Path) -> list[Entry]:
    out: list[Entry] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            item = json.loads(line)
            out.append(Entry(micros(float(item["t"])), "system", str(item["m"])))
        except (ValueError, KeyError, TypeError, OverflowError):
            continue
    return out
