"""Special files at the file API: each test is one attack, a FIFO, socket or device given to one read, write or open
entry point (``sb.open``, ``sb.filesystem.read_*/write_*/copy_*``).

Before the defence, ``sb.open()`` of a FIFO blocked until the request timed out and then said "The Sandbox is
unavailable", and ``sb.open("/dev/zero").read()`` never ended.  The defence (``agent/fstool.c``, "special files"):
the tool checks the type before opening, opens with O_NONBLOCK and checks the descriptor again, so a FIFO, socket
or device is refused at once: ``OSError`` (EINVAL) from ``sb.open``, ``SandboxFilesystemError`` from
``sb.filesystem``, each saying what the path is; a write never replaces the special file.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import shoal
from shoal.exception import SandboxFilesystemError

DIR = "/tmp/specials"
FAST = 10.0
"""Seconds a refusal may take at most (a blocked open took a minute)."""

KINDS = {
    "fifo": (f"{DIR}/fifo", "FIFO", "fifo"),
    "fifo-via-symlink": (f"{DIR}/link", "FIFO", "fifo"),
    "socket": (f"{DIR}/sock", "socket", "socket"),
    "dev-null": ("/dev/null", "character device", "character special file"),
    "dev-zero": ("/dev/zero", "character device", "character special file"),
}
"""Attack name → (path in the sandbox, what the error calls it, what ``stat -c %F`` calls it)."""

SETUP = f"""
set -e
mkdir -p {DIR}
mkfifo {DIR}/fifo
ln -s {DIR}/fifo {DIR}/link
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("{DIR}/sock")'
"""


def sh(sb: shoal.Sandbox, script: str) -> str:
    p = sb.exec("bash", "-c", script)
    out, err = p.stdout.read(), p.stderr.read()
    assert p.wait() == 0, f"{script!r} failed: {err}"
    return out


@pytest.fixture(scope="module")
def specials(app) -> Iterator[shoal.Sandbox]:  # type: ignore[no-untyped-def]
    """One sandbox holding a FIFO, a symlink to it and a Unix socket (the attacks only read its state)."""
    sb = shoal.Sandbox.create(app=app, timeout=300)
    try:
        sh(sb, SETUP)
        yield sb
    finally:
        sb.terminate()


def _open(mode: str) -> Callable[[shoal.Sandbox, str, Path], Any]:
    def op(sb: shoal.Sandbox, path: str, tmp: Path) -> Any:
        f = sb.open(path, mode)  # type: ignore[call-overload]
        f.close()  # not reached when refused

    return op


def _copy_from_local(sb: shoal.Sandbox, path: str, tmp: Path) -> None:
    src = tmp / "src"
    src.write_bytes(b"overwrite me")
    sb.filesystem.copy_from_local(src, path)


OPEN_OPS: dict[str, Callable[[shoal.Sandbox, str, Path], Any]] = {
    "open-r": _open("r"),
    "open-rb": _open("rb"),
    "open-w": _open("w"),
    "open-a": _open("a"),
    "open-r+": _open("r+"),
}
FILESYSTEM_OPS: dict[str, Callable[[shoal.Sandbox, str, Path], Any]] = {
    "read_bytes": lambda sb, path, tmp: sb.filesystem.read_bytes(path),
    "read_text": lambda sb, path, tmp: sb.filesystem.read_text(path),
    "write_bytes": lambda sb, path, tmp: sb.filesystem.write_bytes(b"overwrite me", path),
    "write_text": lambda sb, path, tmp: sb.filesystem.write_text("overwrite me", path),
    "copy_to_local": lambda sb, path, tmp: sb.filesystem.copy_to_local(path, tmp / "copy"),
    "copy_from_local": _copy_from_local,
}


@pytest.mark.parametrize("op", list(OPEN_OPS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_open_refuses_special_files(specials, tmp_path, kind, op):
    """sb.open() of a FIFO, socket or device: OSError (EINVAL) naming the type at once, never a blocked open."""
    path, called, _ = KINDS[kind]
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        OPEN_OPS[op](specials, path, tmp_path)
    assert time.monotonic() - started < FAST
    assert type(info.value) is OSError and info.value.errno == errno.EINVAL, repr(info.value)
    assert "Not a regular file" in str(info.value) and called in str(info.value)


@pytest.mark.parametrize("op", list(FILESYSTEM_OPS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_filesystem_refuses_special_files(specials, tmp_path, kind, op):
    """sb.filesystem read/write/copy of a FIFO, socket or device: SandboxFilesystemError naming the type at once."""
    path, called, _ = KINDS[kind]
    started = time.monotonic()
    with pytest.raises(SandboxFilesystemError) as info:
        FILESYSTEM_OPS[op](specials, path, tmp_path)
    assert time.monotonic() - started < FAST
    assert type(info.value) is SandboxFilesystemError, repr(info.value)
    assert "Not a regular file" in str(info.value) and called in str(info.value)
    assert not (tmp_path / "copy").exists()


def test_fifo_with_a_writer_waiting_is_refused(specials):
    """A FIFO a process holds open with data waiting in it (a read would not block): still refused, not read."""
    specials.exec("bash", "-c", f"mkfifo {DIR}/busy && exec 3<>{DIR}/busy && echo secret >&3 && sleep 20")
    deadline = time.monotonic() + 10
    while "fifo" not in sh(specials, f"stat -c %F {DIR}/busy 2>/dev/null || true"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(OSError, match="FIFO"):
        specials.open(f"{DIR}/busy", "r")
    with pytest.raises(SandboxFilesystemError, match="FIFO"):
        specials.filesystem.read_text(f"{DIR}/busy")


def test_special_files_survive_and_no_tool_is_left_waiting(specials):
    """After every attack: each special file is still what it was (no write replaced it) and no fs tool waits."""
    for path, _, file_type in KINDS.values():
        if path.endswith("/link"):
            continue
        assert sh(specials, f"stat -c %F {path}").strip() == file_type, path
    assert sh(specials, f"readlink {DIR}/link").strip() == f"{DIR}/fifo"
    tools = sh(specials, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done")
    assert "shoal-agent fs" not in tools, tools


def test_regular_files_still_work(specials):
    """The defence refuses only special files: a regular file still opens, reads and writes as before."""
    specials.filesystem.write_text("plain\n", f"{DIR}/plain.txt")
    assert specials.filesystem.read_text(f"{DIR}/plain.txt") == "plain\n"
    with specials.open(f"{DIR}/plain.txt", "a") as f:
        f.write("more\n")
    with specials.open(f"{DIR}/plain.txt", "r") as f:
        assert f.read() == "plain\nmore\n"
    with pytest.raises(IsADirectoryError):
        specials.open(DIR, "r")


def test_the_tools_refusal_maps_to_each_apis_error():
    """The tool's NotAFile answer (from a hostile sandbox or not): OSError(EINVAL) for sb.open, the base
    SandboxFilesystemError for sb.filesystem, each with the tool's message and the path."""
    from shoal.sdk import _fstool as tool

    payload = b'{"error_kind":"NotAFile","errno":22,"message":"Not a regular file (a FIFO (named pipe))"}\n'
    failure = tool.parse_failure(1, payload)
    legacy = tool.legacy_error(failure, "/tmp/f")
    assert type(legacy) is OSError and legacy.errno == errno.EINVAL and legacy.filename == "/tmp/f"
    modern = tool.filesystem_error(failure, "/tmp/f")
    assert type(modern) is SandboxFilesystemError and str(modern) == "Not a regular file (a FIFO (named pipe)): /tmp/f"
