"""The agent wire format, daemon side: round trips and hostile frames."""

from __future__ import annotations

import struct

import pytest

from shoal.agent import protocol as P


def agent_frame(msg: int, *fields: tuple[int, bytes]) -> bytes:
    """A frame as an agent (or an attacker holding its socket) would send it."""
    body = b"".join(struct.pack("<BI", tag, len(v)) + v for tag, v in fields)
    return struct.pack("<IB", len(body) + 1, msg) + body


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def test_output_frame_decodes():
    raw = agent_frame(
        P.Msg.OUTPUT, (P.Tag.ID, b"ex-1"), (P.Tag.FD, u64(2)), (P.Tag.OFFSET, u64(7)), (P.Tag.DATA, b"hi")
    )
    [f] = P.FrameReader().feed(raw)
    assert (f.msg, f.exec_id, f.fd, f.offset, f.data) == (P.Msg.OUTPUT, "ex-1", 2, 7, b"hi")


def test_frames_split_at_every_byte_boundary():
    raw = agent_frame(P.Msg.EXIT, (P.Tag.ID, b"a"), (P.Tag.KIND, u64(0)), (P.Tag.VALUE, struct.pack("<q", -3))) * 2
    for cut in range(len(raw) + 1):
        reader = P.FrameReader()
        frames = reader.feed(raw[:cut]) + reader.feed(raw[cut:])
        assert [(f.msg, f.value) for f in frames] == [(P.Msg.EXIT, -3)] * 2


def test_daemon_frames_encode_as_the_agent_expects():
    raw = P.exec_frame("ex-9", ["echo", "hé"], {"A": "1"}, "/tmp", 1500, P.ExecFlag.PTY)
    length, msg = struct.unpack_from("<IB", raw)
    assert length == len(raw) - 4 and msg == P.Msg.EXEC
    pos, fields = 5, []
    while pos < len(raw):
        tag, n = struct.unpack_from("<BI", raw, pos)
        fields.append((tag, raw[pos + 5 : pos + 5 + n]))
        pos += 5 + n
    assert fields == [
        (P.Tag.ID, b"ex-9"),
        (P.Tag.ARG, b"echo"),
        (P.Tag.ARG, "hé".encode()),
        (P.Tag.ENV, b"A=1"),
        (P.Tag.CWD, b"/tmp"),
        (P.Tag.TIMEOUT_MS, u64(1500)),
        (P.Tag.FLAGS, u64(P.ExecFlag.PTY)),
    ]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (struct.pack("<IB", P.MAX_FRAME + 1, P.Msg.OUTPUT), "out of bounds"),
        (struct.pack("<IB", 0, P.Msg.OUTPUT), "out of bounds"),
        (agent_frame(99), "unknown frame type"),
        (agent_frame(P.Msg.EXEC, (P.Tag.ID, b"x")), "only travels to the agent"),
        (agent_frame(P.Msg.OUTPUT, (P.Tag.ID, b"../../etc"), (P.Tag.FD, u64(1))), "malformed process id"),
        (agent_frame(P.Msg.OUTPUT, (P.Tag.ID, b"a" * 65), (P.Tag.FD, u64(1))), "malformed process id"),
        (agent_frame(P.Msg.OUTPUT, (P.Tag.ID, b"ok"), (P.Tag.FD, u64(3))), "unknown stream"),
        (agent_frame(P.Msg.EXIT, (P.Tag.KIND, u64(0))), "without a process id"),
        (agent_frame(P.Msg.EXIT, (P.Tag.ID, b"ok"), (P.Tag.KIND, b"\x01")), "wrong size"),
        (agent_frame(P.Msg.HELLO, (P.Tag.TOKEN, b"t" * 129)), "token too long"),
        (struct.pack("<IB", 4, P.Msg.HELLO) + b"\x0d\xff\xff", "truncated field"),
        (struct.pack("<IB", 8, P.Msg.HELLO) + struct.pack("<BI", 13, 1000) + b"xx", "runs past"),
    ],
)
def test_hostile_frames_are_refused(raw, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.FrameReader().feed(raw)


def test_unknown_tags_are_ignored():
    raw = agent_frame(P.Msg.STDIN_ACK, (P.Tag.ID, b"a"), (200, b"future"), (P.Tag.OFFSET, u64(5)))
    [f] = P.FrameReader().feed(raw)
    assert f.offset == 5


def test_a_partial_huge_frame_is_not_buffered_past_its_header():
    reader = P.FrameReader()
    with pytest.raises(P.ProtocolError):
        reader.feed(struct.pack("<IB", 1 << 31, P.Msg.OUTPUT) + b"x" * 10)
