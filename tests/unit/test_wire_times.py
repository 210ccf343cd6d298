"""Moments on the wire (``shoal.wire.times``): a time taken from an entry selects that entry exactly."""

from __future__ import annotations

import datetime as dt
import os
import struct
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.engine import logs
from shoal.sdk.logs import _micros
from shoal.wire import times

# UNIX times as the daemon stores them (time.time() floats), from 1970 to 2200.
stored_seconds = st.floats(min_value=0.0, max_value=7.3e9, allow_nan=False, allow_infinity=False)


@given(stored_seconds)
def test_a_stored_time_survives_the_trip_through_a_datetime(seconds: float) -> None:
    us = times.micros(seconds)
    # daemon -> JSON -> SDK datetime -> query parameter -> daemon: the same integer.
    assert int(_micros(times.to_datetime(us), "since")) == us
    assert times.of_datetime(times.to_datetime(us)) == us


@given(st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2200, 1, 1), timezones=st.just(dt.UTC)))
def test_a_users_datetime_is_exact_microseconds(moment: dt.datetime) -> None:
    assert times.to_datetime(times.of_datetime(moment)) == moment


def test_a_naive_datetime_is_local_time() -> None:
    aware = dt.datetime(2026, 12, 3, 12, 0, 0, 123457, tzinfo=dt.UTC)
    naive_local = aware.astimezone().replace(tzinfo=None)
    assert times.of_datetime(naive_local) == times.of_datetime(aware)


def _index(path: Path, pieces: list[tuple[float, int, int, int]]) -> None:
    path.write_bytes(b"".join(logs.INDEX.pack(*p) for p in pieces))


@settings(max_examples=200, deadline=None)
@given(st.lists(stored_seconds, min_size=2, max_size=12))
def test_windows_from_entries_own_timestamps_select_exactly(arrivals: list[float]) -> None:
    """``since=a.timestamp, until=b.timestamp`` holds a and every entry between, and never b."""
    arrivals = sorted(arrivals)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        out = data / "out.1"
        out.write_bytes(b"".join(b"line %d\n" % i for i in range(len(arrivals))))
        pieces, offset = [], 0
        for i, t in enumerate(arrivals):
            n = len(b"line %d\n" % i)
            pieces.append((t, 1, offset, n))
            offset += n
        _index(data / "logs.idx", pieces)
        entries = logs.read(data, {1: out})
        assert [e.message for e in entries] == [f"line {i}" for i in range(len(arrivals))]
        # Entries as the SDK sees them: datetimes built from the wire's integers.
        seen = [times.to_datetime(e.micros) for e in entries]
        for a in range(len(entries)):
            for b in range(a + 1, len(entries)):
                since, until = int(_micros(seen[a], "since")), int(_micros(seen[b], "until"))
                window = logs.read(data, {1: out}, since=since, until=until)
                expected = [e for e in entries if seen[a] <= times.to_datetime(e.micros) < seen[b]]
                assert window == expected
                assert entries[b] not in window
                assert (entries[a] in window) == (seen[a] < seen[b])  # two entries of one microsecond: empty


def test_a_torn_index_record_is_left_out() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "out.1").write_bytes(b"one\n")
        raw = logs.INDEX.pack(1.5, 1, 0, 4)
        (data / "logs.idx").write_bytes(raw + raw[:5])
        assert [(e.micros, e.message) for e in logs.read(data, {1: data / "out.1"})] == [(1_500_000, "one")]
        assert os.path.getsize(data / "logs.idx") == logs.INDEX.size + 5
        assert struct.calcsize("<dBQI") == logs.INDEX.size
