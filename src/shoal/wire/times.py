"""Moments on the wire: whole microseconds since the UNIX epoch, as integers, never float seconds.

A float of seconds does not survive the trip through a ``datetime`` and back (``fromtimestamp`` rounds
to a microsecond, ``timestamp()`` gives a float again), so a boundary taken from an object's own time
could move by a microsecond and select the wrong side.  Integers of microseconds hold exactly what a
``datetime`` holds, so ``since=entry.timestamp`` always includes that entry and ``until=`` always
excludes it.

The daemon keeps float seconds in its files and database; ``micros`` turns one into the value it is
known by on the wire, and is the only place that rounds.
"""

from __future__ import annotations

import datetime as dt

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE = dt.timedelta(microseconds=1)


def micros(seconds: float) -> int:
    """The whole microseconds of a stored UNIX time in float seconds (half to even)."""
    return round(seconds * 1_000_000)


def to_datetime(us: int) -> dt.datetime:
    """The aware UTC ``datetime`` of ``us`` microseconds since the epoch (exact)."""
    return EPOCH + dt.timedelta(microseconds=us)


def of_datetime(value: dt.datetime) -> int:
    """Microseconds since the epoch of ``value`` (exact); a naive ``datetime`` is local time, as Python takes it."""
    if value.tzinfo is None:
        value = value.astimezone()
    return (value - EPOCH) // _ONE
