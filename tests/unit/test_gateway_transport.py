"""The gateway's connections send what one turn of the event loop wrote as one send (``_CoalescingTransport``)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("grpclib", reason="the gateway's extra (modal) is not installed")

from shoal.gateway.server import _CoalescingTransport


class Recording(asyncio.Transport):
    """A transport that records each write it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:  # type: ignore[no-untyped-def]
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):  # type: ignore[no-untyped-def]
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_writes_of_one_turn_leave_as_one_send_in_order():
    asyncio.run(_one_turn())


async def _one_turn() -> None:
    inner = Recording()
    t = _CoalescingTransport(inner)
    t.write(b"headers|")
    t.write(b"")
    t.write(memoryview(b"message|"))
    t.write(bytearray(b"trailers"))
    assert inner.writes == []  # nothing before the turn ends
    await asyncio.sleep(0)
    assert inner.writes == [b"headers|message|trailers"]
    t.write(b"next")
    await asyncio.sleep(0)
    assert inner.writes[-1] == b"next" and len(inner.writes) == 2


def test_close_sends_what_is_pending_first_and_other_calls_pass_through():
    asyncio.run(_close())


async def _close() -> None:
    inner = Recording()
    t = _CoalescingTransport(inner)
    t.write(b"goaway")
    t.close()
    assert inner.writes == [b"goaway"] and inner.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left, and a closed transport gets nothing
    assert inner.writes == [b"goaway"]
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)
