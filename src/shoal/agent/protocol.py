"""The daemon's side of the agent wire format (see ``agent.c`` for the other side).

Trust: every frame from an agent is hostile input.  Decoding is bounded (frame
size, field sizes, id syntax) and never raises anything but ``ProtocolError``;
the caller drops the connection on it.

Frame: ``u32 length-of-rest | u8 type | field*``; field: ``u8 tag | u32 len | bytes``;
integers are little-endian u64.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum

MAX_FRAME = 8 << 20
"""Largest frame either side accepts."""

MAX_STDIN_CHUNK = 1 << 20
"""Largest stdin payload the daemon puts in one frame."""

_ID_RE = re.compile(rb"\A[A-Za-z0-9_.\-]{1,64}\Z")
_HEADER = struct.Struct("<IB")
_FIELD = struct.Struct("<BI")
_U64 = struct.Struct("<Q")


class ProtocolError(Exception):
    """An agent sent something malformed; the connection must be dropped."""


class Msg(IntEnum):
    """Frame types.  1-99 travel daemon → agent, 101+ agent → daemon."""

    INIT = 1
    EXEC = 2
    STDIN = 3
    ACK = 4
    SIGNAL = 5
    EXIT_ACK = 6
    SUSPEND = 7
    RESUME = 8
    RESIZE = 9
    HELLO = 101
    STARTED = 102
    OUTPUT = 103
    EOF = 104
    EXIT = 105
    STDIN_ACK = 106
    SUSPENDED = 107


class Tag(IntEnum):
    """Field tags."""

    ID = 1
    ARG = 2
    ENV = 3
    CWD = 4
    TIMEOUT_MS = 5
    FLAGS = 6
    OFFSET = 7
    DATA = 8
    FD = 9
    PID = 10
    KIND = 11
    VALUE = 12
    TOKEN = 13
    VERSION = 14
    SIGNO = 15
    PROC = 16
    STATE = 17
    USER = 18
    ROWS = 19
    COLS = 20


class ExecFlag(IntEnum):
    """Bits of an EXEC frame's FLAGS field."""

    PTY = 1
    STDOUT_NULL = 2
    STDERR_NULL = 4
    ENTRYPOINT = 8


EOF_FLAG = 1
"""FLAGS bit on STDIN (close stdin after this data) and ACK (EOF recorded)."""

RESTORED_FLAG = 1
"""FLAGS bit on RESUME: the sandbox was restored from a checkpoint and this connection belongs to its daemon."""

PARK_FLAG = 1
"""FLAGS bit on SUSPEND: close the connection once SUSPENDED is sent (a connection gVisor cannot checkpoint)."""

PARK_VERSION = 2
"""The first agent version (HELLO's VERSION) that understands ``PARK_FLAG``."""

RESIZE_VERSION = 4
"""The first agent version that understands RESIZE (and a terminal size on EXEC)."""

FORGET_FLAG = 1
"""FLAGS bit on SIGNAL: kill the process and drop it without reporting anything more of it (a warm pool's
prestarted entrypoint that the request replaces; agent version 3)."""


class ExitKind(IntEnum):
    """How a process ended, as the agent reports it."""

    CODE = 0
    SIGNAL = 1
    TIMEOUT = 2
    SPAWN_FAILED = 3


def _field(tag: int, value: bytes) -> bytes:
    return _FIELD.pack(tag, len(value)) + value


def _u64(tag: int, value: int) -> bytes:
    return _FIELD.pack(tag, 8) + _U64.pack(value)


def frame(msg: Msg, *fields: bytes) -> bytes:
    """Assemble one frame from already-encoded fields."""
    body = b"".join(fields)
    return _HEADER.pack(len(body) + 1, msg) + body


def init_frame(token: bytes, workdir: str | None) -> bytes:
    """First frame on a new agent connection: the reconnection token, and a directory to create."""
    parts = [_field(Tag.TOKEN, token)]
    if workdir:
        parts.append(_field(Tag.CWD, workdir.encode()))
    return frame(Msg.INIT, *parts)


def exec_frame(
    exec_id: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    timeout_ms: int,
    flags: int,
    user: str | None = None,
    window: tuple[int, int] | None = None,
) -> bytes:
    """Ask the agent to start a process (idempotent on ``exec_id``), as ``user`` (the image's USER) if given;
    ``window``: a terminal's (rows, columns), else 24x80."""
    parts = [_field(Tag.ID, exec_id.encode())]
    parts += [_field(Tag.ARG, a.encode()) for a in argv]
    parts += [_field(Tag.ENV, f"{k}={v}".encode()) for k, v in env.items()]
    if cwd:
        parts.append(_field(Tag.CWD, cwd.encode()))
    if timeout_ms:
        parts.append(_u64(Tag.TIMEOUT_MS, timeout_ms))
    if user:
        parts.append(_field(Tag.USER, user.encode()))
    if window is not None:
        parts += [_u64(Tag.ROWS, window[0]), _u64(Tag.COLS, window[1])]
    parts.append(_u64(Tag.FLAGS, flags))
    return frame(Msg.EXEC, *parts)


def stdin_frame(exec_id: str, offset: int, data: bytes, eof: bool) -> bytes:
    """Bytes for a process's stdin starting at ``offset``."""
    return frame(
        Msg.STDIN,
        _field(Tag.ID, exec_id.encode()),
        _u64(Tag.OFFSET, offset),
        _field(Tag.DATA, data),
        _u64(Tag.FLAGS, EOF_FLAG if eof else 0),
    )


def ack_frame(exec_id: str, fd: int, offset: int, eof: bool) -> bytes:
    """Tell the agent that output up to ``offset`` (and EOF) is safely stored."""
    return frame(
        Msg.ACK,
        _field(Tag.ID, exec_id.encode()),
        _u64(Tag.FD, fd),
        _u64(Tag.OFFSET, offset),
        _u64(Tag.FLAGS, EOF_FLAG if eof else 0),
    )


def signal_frame(exec_id: str, signo: int, *, forget: bool = False) -> bytes:
    """Send a signal to a process's group; ``forget``: kill it and drop it unreported (``signo`` is ignored)."""
    return frame(
        Msg.SIGNAL,
        _field(Tag.ID, exec_id.encode()),
        _u64(Tag.SIGNO, signo),
        _u64(Tag.FLAGS, FORGET_FLAG if forget else 0),
    )


def resize_frame(exec_id: str, rows: int, cols: int) -> bytes:
    """Set the size of a process's terminal (agent version 4; the agent ignores a process without one)."""
    return frame(Msg.RESIZE, _field(Tag.ID, exec_id.encode()), _u64(Tag.ROWS, rows), _u64(Tag.COLS, cols))


def exit_ack_frame(exec_id: str) -> bytes:
    """Tell the agent that a process's exit is recorded."""
    return frame(Msg.EXIT_ACK, _field(Tag.ID, exec_id.encode()))


def suspend_frame(*, park: bool = False) -> bytes:
    """Ask the agent to stop sending (it answers SUSPENDED, then is quiet until RESUME): before a checkpoint.
    ``park``: it also closes the connection once SUSPENDED is sent, and comes back by reconnecting."""
    return frame(Msg.SUSPEND, _u64(Tag.FLAGS, PARK_FLAG if park else 0))


def resume_frame(*, restored: bool) -> bytes:
    """End a SUSPEND; ``restored``: on a restored sandbox's new connection (the agent numbers its streams anew and
    says HELLO)."""
    return frame(Msg.RESUME, _u64(Tag.FLAGS, RESTORED_FLAG if restored else 0))


@dataclass(slots=True)
class Frame:
    """A decoded agent frame.  ``data`` is only set for OUTPUT frames."""

    msg: Msg
    exec_id: str = ""
    fd: int = 0
    offset: int = 0
    pid: int = 0
    kind: int = 0
    value: int = 0
    state: int = 0
    version: int = 0
    token: bytes = b""
    data: bytes = b""
    extra: dict[int, bytes] = field(default_factory=dict)


_INT_TAGS = {
    Tag.FD: "fd",
    Tag.OFFSET: "offset",
    Tag.PID: "pid",
    Tag.KIND: "kind",
    Tag.STATE: "state",
    Tag.VERSION: "version",
}


def _decode(msg_type: int, body: memoryview) -> Frame:
    try:
        msg = Msg(msg_type)
    except ValueError:
        raise ProtocolError(f"unknown frame type {msg_type}") from None
    if msg < Msg.HELLO:
        raise ProtocolError(f"frame type {msg.name} only travels to the agent")
    f = Frame(msg)
    pos = 0
    end = len(body)
    while pos < end:
        if end - pos < _FIELD.size:
            raise ProtocolError("truncated field header")
        tag, n = _FIELD.unpack_from(body, pos)
        pos += _FIELD.size
        if n > end - pos:
            raise ProtocolError("field runs past the frame")
        value = body[pos : pos + n]
        pos += n
        if tag == Tag.ID:
            raw = bytes(value)
            if not _ID_RE.match(raw):
                raise ProtocolError("malformed process id")
            f.exec_id = raw.decode()
        elif tag == Tag.DATA:
            f.data = bytes(value)
        elif tag == Tag.TOKEN:
            if n > 128:
                raise ProtocolError("token too long")
            f.token = bytes(value)
        elif tag == Tag.VALUE:
            if n != 8:
                raise ProtocolError("integer field of wrong size")
            f.value = struct.unpack("<q", value)[0]
        elif tag in _INT_TAGS:
            if n != 8:
                raise ProtocolError("integer field of wrong size")
            setattr(f, _INT_TAGS[Tag(tag)], _U64.unpack(value)[0])
        # Unknown tags are ignored so newer agents can add fields.
    if msg in (Msg.STARTED, Msg.OUTPUT, Msg.EOF, Msg.EXIT, Msg.STDIN_ACK) and not f.exec_id:
        raise ProtocolError(f"{msg.name} frame without a process id")
    if msg in (Msg.OUTPUT, Msg.EOF) and f.fd not in (1, 2):
        raise ProtocolError("output for an unknown stream")
    return f


class FrameReader:
    """Incremental decoder: feed bytes, take complete frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every frame now complete."""
        self._buf += data
        frames: list[Frame] = []
        view = memoryview(self._buf)
        pos = 0
        try:
            while len(self._buf) - pos >= _HEADER.size:
                length, msg_type = _HEADER.unpack_from(view, pos)
                if length < 1 or length > MAX_FRAME:
                    raise ProtocolError(f"frame length {length} out of bounds")
                if len(self._buf) - pos - 4 < length:
                    break
                frames.append(_decode(msg_type, view[pos + _HEADER.size : pos + 4 + length]))
                pos += 4 + length
        finally:
            view.release()
        del self._buf[:pos]
        return frames
