"""``sb.logs``: the entrypoint's output as timestamped lines, lifecycle events, kept after the sandbox ends."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

import shoal
from shoal.exception import InvalidError

SCRIPT = """
import sys, time
print("first line", flush=True)
time.sleep(0.6)
print("to stderr", file=sys.stderr, flush=True)
time.sleep(0.2)  # two streams written at the same moment may reach the daemon in either order
sys.stdout.write("half a "); sys.stdout.flush()
time.sleep(0.3)
print("line", flush=True)
print("caf\\u00e9 \\u2713 Traceback marker", flush=True)
sys.stdout.write("no newline at the end"); sys.stdout.flush()
"""


def test_logs_of_the_entrypoint_with_times_and_lifecycle(app):
    started = dt.datetime.now(dt.UTC)
    t0 = time.time()
    sb = shoal.Sandbox.create("python3", "-c", SCRIPT, app=app)
    sb.wait()
    t1 = time.time()
    entries = list(sb.logs.fetch(since=started - dt.timedelta(seconds=1)))
    assert [(e.source, e.message) for e in entries] == [
        ("system", "Sandbox started"),
        ("stdout", "first line"),
        ("stderr", "to stderr"),
        ("stdout", "half a line"),  # the line's two halves arrived 0.3 s apart: one entry, timed by its start
        ("stdout", "café ✓ Traceback marker"),
        ("stdout", "no newline at the end"),
        ("system", "Sandbox exited with code 0"),
    ]
    times = [e.timestamp.timestamp() for e in entries]
    assert times == sorted(times) and t0 - 1 <= times[0] and times[-1] <= t1 + 1
    assert times[2] - times[1] >= 0.5  # the sleep between them shows
    assert all(e.object_id == sb.object_id and e.timestamp.tzinfo is not None for e in entries)

    # Filters: source, search text, a time window, and the tail.
    assert [e.message for e in sb.logs.fetch(since=started, source="stderr")] == ["to stderr"]
    assert [e.message for e in sb.logs.fetch(since=started, search_text="Traceback")] == ["café ✓ Traceback marker"]
    window = list(sb.logs.fetch(since=entries[2].timestamp, until=entries[3].timestamp))
    assert [e.message for e in window] == ["to stderr"]
    assert [e.message for e in sb.logs.tail(2)] == ["no newline at the end", "Sandbox exited with code 0"]
    assert [e.message for e in sb.logs.tail(1, source="stdout")] == ["no newline at the end"]
    # The logs outlive the sandbox, also through a fresh handle.
    again = shoal.Sandbox.from_id(sb.object_id)
    assert len(list(again.logs.tail(100))) == len(entries)


def test_logs_of_a_terminated_sandbox_and_async(app):
    async def main() -> list[shoal.sdk.logs.LogEntry]:
        sb = await shoal.Sandbox.create.aio("bash", "-c", "echo up; sleep 60", app=app)
        async for _ in sb.stdout:  # "up" is out
            break
        await sb.terminate.aio(wait=True)
        return [e async for e in sb.logs.tail.aio(10)]

    got = asyncio.run(main())
    assert [(e.source, e.message) for e in got] == [
        ("system", "Sandbox started"),
        ("stdout", "up"),
        ("system", "Sandbox was terminated: Sandbox terminated"),
    ]


def test_log_argument_errors(sandbox):
    with pytest.raises(InvalidError, match="datetime"):
        list(sandbox.logs.fetch(since=1234))
    with pytest.raises(InvalidError, match="source"):
        list(sandbox.logs.tail(5, source="everything"))
    with pytest.raises(InvalidError, match="entries"):
        list(sandbox.logs.tail(0))
    # Execs are not in the sandbox's logs (as in Modal): only its entrypoint is.
    sandbox.exec("echo", "from an exec").wait()
    assert "from an exec" not in [e.message for e in sandbox.logs.tail(100)]


def test_verbose_records_execs_and_file_operations(app):
    sb = shoal.Sandbox.create(app=app, verbose=True)
    try:
        sb.exec("echo", "hello world").wait()
        sb.filesystem.write_text("x", "/tmp/verbose.txt")
        system = [e.message for e in sb.logs.tail(100, source="system")]
        assert "Exec: echo 'hello world'" in system
        assert any(m.startswith("File operation: write") and "/tmp/verbose.txt" in m for m in system), system
    finally:
        sb.terminate()
    quiet = shoal.Sandbox.create(app=app)
    try:
        quiet.exec("echo", "hi").wait()
        assert [e.message for e in quiet.logs.tail(100, source="system")] == ["Sandbox started"]
    finally:
        quiet.terminate()
