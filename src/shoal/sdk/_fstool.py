"""How the SDK runs shoal's filesystem tool in a sandbox, and how the tool's answers become exceptions.

Every filesystem operation, of ``sb.filesystem`` and of the older ``sb.open/ls/mkdir/rm/watch``, is
``/.shoal/bin/shoal-agent fs OP [OPTIONS] PATH`` run *inside* the sandbox through the daemon's attach call, one
request per operation (``agent/fstool.c`` says why that is the security boundary: the tool resolves every path
in the sandbox's own mount namespace).  Nothing in this module resolves, normalizes or checks a sandbox path
against the host; it only refuses paths the kernel could not carry anyway (NUL bytes, over-long names), so that
the caller gets a clear error without a round trip.

Trust: what the tool prints comes from inside the sandbox and is hostile.  JSON is parsed with size bounds and
type checks, error payloads are validated before they shape an exception, collected output is bounded, and a
sandbox can make an operation fail but never make it touch anything outside the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import posixpath
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shoal.exception import (
    ConflictError,
    FilesystemExecutionError,
    InvalidError,
    NotFoundError,
    SandboxFilesystemDirectoryNotEmptyError,
    SandboxFilesystemError,
    SandboxFilesystemFileTooLargeError,
    SandboxFilesystemIsADirectoryError,
    SandboxFilesystemNotADirectoryError,
    SandboxFilesystemNotFoundError,
    SandboxFilesystemPathAlreadyExistsError,
    SandboxFilesystemPermissionError,
)
from shoal.sdk._attach import STDOUT, Attached
from shoal.sdk.transport import Client
from shoal.types import FileInfo, FileType, FileWatchEvent, FileWatchEventType

AGENT_PATH = "/.shoal/bin/shoal-agent"
"""Where every sandbox has the agent binary (read-only); ``shoal-agent fs`` is the filesystem tool."""
PATH_MAX = 4096
NAME_MAX = 255
MAX_LISTING = 256 << 20
"""Most bytes of JSON a listing may produce."""
MAX_STDERR = 64 << 10
MAX_EVENT = 64 << 10
"""Longest watch event line; longer ones are dropped."""
UPLOAD_CHUNK = 1 << 20
UNAVAILABLE = "The Sandbox is unavailable. This Sandbox may have already shut down."


class ToolFailed(Exception):
    """The tool exited non-zero: ``kind``/``errno``/``message`` from its error payload (or empty)."""

    def __init__(self, returncode: int, kind: str, err: int, message: str) -> None:
        super().__init__(message or f"exit code {returncode}")
        self.returncode = returncode
        self.kind = kind
        self.errno = err
        self.message = message


@dataclass
class ToolResult:
    """A successful run of the tool."""

    stdout: bytes
    stdout_bytes: int
    """Bytes seen on stdout, including those handed to a sink."""
    stderr: bytes


# ---------------------------------------------------------------------------------------------------- paths


def path_args(path: object, *, legacy: bool, op: str) -> list[str]:
    """The tool's argv for ``path``, refusing what no kernel accepts with the error the API documents.

    Names that are not UTF-8 (surrogate escapes, as ``os.listdir`` gives them) travel hex-encoded (``-x``).
    """
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, not {type(path).__name__}")

    def bad(err: int, message: str) -> Exception:
        if legacy:
            return ValueError(message) if err == errno.EINVAL else OSError(err, message, path)
        return InvalidError(f"Sandbox.filesystem.{op}(): {message}: {path[:200]!r}")

    if "\x00" in path:
        raise bad(errno.EINVAL, "embedded null byte")
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        raise bad(errno.EINVAL, "path is not valid text (it holds an unpaired surrogate)") from None
    if len(raw) >= PATH_MAX:
        raise bad(errno.ENAMETOOLONG, f"File name too long (the path is {len(raw)} bytes; the limit is 4095)")
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > NAME_MAX:
        raise bad(
            errno.ENAMETOOLONG, f"File name too long (a path component is {longest} bytes; the limit is {NAME_MAX})"
        )
    try:
        return [raw.decode("utf-8")]
    except UnicodeDecodeError:
        return ["-x", raw.hex()]


def check_absolute(path: object, op: str) -> None:
    """``sb.filesystem`` takes absolute paths only (Modal's rule)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidError(f"Sandbox.filesystem.{op}() currently only supports absolute remote_path values")


# ---------------------------------------------------------------------------------------------------- running


async def run_tool(
    client: Client,
    sandbox_id: str,
    args: list[str],
    *,
    stdin: AsyncIterator[bytes | memoryview] | None = None,
    sink: Callable[[memoryview], Awaitable[None]] | None = None,
    max_stdout: int | None = MAX_LISTING,
) -> ToolResult:
    """Run ``shoal-agent fs ARGS`` in the sandbox; raise ``ToolFailed`` if it fails.

    ``stdin`` is sent while output arrives (an error from the tool stops the upload); stdout is collected (up to
    ``max_stdout`` bytes) or handed chunk by chunk to ``sink``.
    """
    att = Attached(client, sandbox_id, [AGENT_PATH, "fs", *args])
    # Input is queued before the request starts, so a small operation's data (or its end) leaves with the
    # request itself instead of a round trip later.
    uploader: asyncio.Task[None] | None = asyncio.create_task(_feed(att, stdin)) if stdin is not None else None
    if uploader is None:
        await att.close_stdin()
    try:
        await att.start()
    except BaseException as exc:
        if uploader is not None:
            uploader.cancel()
        await att.aclose()
        if isinstance(exc, (NotFoundError, ConflictError)):
            raise NotFoundError(UNAVAILABLE) from None
        raise
    try:
        out: list[memoryview] = []
        err = bytearray()
        seen = 0
        async for kind, data in att.records():
            if kind != STDOUT:
                err += data[: MAX_STDERR - len(err)]
                continue
            seen += len(data)
            if sink is not None:
                await sink(data)
            elif max_stdout is not None and seen > max_stdout:
                raise SandboxFilesystemError(f"the sandbox's answer is larger than {max_stdout} bytes")
            else:
                out.append(data)
        if uploader is not None:
            if not uploader.done():
                uploader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await uploader  # an error reading the local source surfaces here, before the tool's own
        await att.finish()
    except BaseException:
        if uploader is not None:
            uploader.cancel()
        await att.aclose()
        raise
    assert att.returncode is not None
    if att.returncode != 0:
        if att.sandbox_finished:
            raise NotFoundError(UNAVAILABLE)
        raise parse_failure(att.returncode, bytes(err))
    return ToolResult(b"".join(out), seen, bytes(err))


async def _feed(att: Attached, source: AsyncIterator[bytes | memoryview]) -> None:
    try:
        async for chunk in source:
            await att.write(chunk)
    finally:
        await att.close_stdin()


def parse_failure(returncode: int, stderr: bytes) -> ToolFailed:
    """The failure a run's stderr describes (its last valid error payload, if any)."""
    for line in reversed(stderr.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("error_kind"), str) and isinstance(obj.get("message"), str):
            err = obj.get("errno")
            return ToolFailed(
                returncode,
                obj["error_kind"][:64],
                err if isinstance(err, int) and 0 < err < 4096 else 0,
                obj["message"][:1000],
            )
    return ToolFailed(returncode, "", 0, "")


def read_trailer(stderr: bytes) -> int | None:
    """The byte count ``read`` reports at its end."""
    for line in reversed(stderr.splitlines()):
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and isinstance(obj.get("bytes"), int):
                return int(obj["bytes"])
    return None


# ---------------------------------------------------------------------------------------------------- errors

_FILESYSTEM_ERRORS: dict[str, type[SandboxFilesystemError]] = {
    "NotFound": SandboxFilesystemNotFoundError,
    "IsDirectory": SandboxFilesystemIsADirectoryError,
    "NotDirectory": SandboxFilesystemNotADirectoryError,
    "PermissionDenied": SandboxFilesystemPermissionError,
    "PathAlreadyExists": SandboxFilesystemPathAlreadyExistsError,
    "DirectoryNotEmpty": SandboxFilesystemDirectoryNotEmptyError,
    "FileTooLarge": SandboxFilesystemFileTooLargeError,
    "NotAFile": SandboxFilesystemError,
}
"""``NotAFile``: read/write/open of a FIFO, socket or device, refused at once (the tool never waits on one)."""


def filesystem_error(failure: ToolFailed, path: str) -> SandboxFilesystemError:
    """``sb.filesystem``'s exception for a failure: Modal's ``SandboxFilesystem*Error`` classes."""
    if not failure.kind:
        return SandboxFilesystemError(f"Operation on '{path}' failed with exit code {failure.returncode}")
    cls = _FILESYSTEM_ERRORS.get(failure.kind, SandboxFilesystemError)
    return cls(f"{failure.message}: {path}")


def legacy_error(failure: ToolFailed, path: str) -> Exception:
    """The older API's exception: the builtin ``OSError`` subclass for the errno, as Modal's FileIO raises
    (a FIFO, socket or device: ``OSError`` with ``EINVAL`` and a message naming what the path is)."""
    if not failure.errno:
        return FilesystemExecutionError(failure.message or f"Operation on '{path}' failed")
    if failure.errno == errno.ENOMEM:
        return MemoryError(failure.message)
    # OSError(errno, ...) builds the subclass: FileNotFoundError, PermissionError, IsADirectoryError, ...
    return OSError(failure.errno, failure.message, path)


# ---------------------------------------------------------------------------------------------------- answers


def _malformed(what: str) -> SandboxFilesystemError:
    return SandboxFilesystemError(f"malformed {what} from the sandbox's filesystem tool")


def parse_json(data: bytes, what: str) -> Any:
    """JSON the tool printed (hostile: any error is 'malformed')."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise _malformed(what) from None


def file_info(entry: Any, path: str) -> FileInfo:
    """A ``FileInfo`` from one entry the tool printed, checked field by field."""
    if not isinstance(entry, dict):
        raise _malformed("entry")
    try:
        target = entry.get("symlink_target")
        info = FileInfo(
            name=_typed(entry["name"], str),
            path=path,
            type=FileType(entry["type"]),
            size=_typed(entry["size"], int),
            mode=_typed(entry["mode"], int),
            permissions=_typed(entry["permissions"], str),
            owner=_typed(entry["owner"], str),
            group=_typed(entry["group"], str),
            modified_time=float(_typed(entry["modified_time"], (int, float))),
            symlink_target=None if target is None else _typed(target, str),
        )
    except (KeyError, ValueError, TypeError):
        raise _malformed("entry") from None
    return info


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind}, got {type(value).__name__}")
    return value


def listing(data: bytes, directory: str) -> list[FileInfo]:
    """The entries of ``ls``; each ``path`` is the directory joined with the entry's name."""
    entries = parse_json(data, "listing")
    if not isinstance(entries, list):
        raise _malformed("listing")
    infos = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise _malformed("listing")
        infos.append(file_info(entry, posixpath.normpath(posixpath.join(directory, name))))
    return infos


# ---------------------------------------------------------------------------------------------------- watch


async def watch_events(
    client: Client,
    sandbox_id: str,
    path: list[str],
    *,
    recursive: bool,
    timeout: int | None,
    filter: list[FileWatchEventType] | None,
    on_failure: Callable[[ToolFailed], Exception],
) -> AsyncGenerator[FileWatchEvent, None]:
    """Events from ``shoal-agent fs watch`` as they happen, until ``timeout``, the sandbox's end, or the caller
    stops iterating (which closes the request, and with it the tool)."""
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0):
        raise InvalidError(f"watch timeout must be a whole number of seconds, got {timeout!r}")
    args = ["watch", *(["-r"] if recursive else []), *(["-t", str(timeout)] if timeout else []), *path]
    att = Attached(client, sandbox_id, [AGENT_PATH, "fs", *args])
    try:
        await att.start()
    except (NotFoundError, ConflictError):
        raise NotFoundError(UNAVAILABLE) from None
    try:
        pending = bytearray()
        err = bytearray()
        async for kind, data in att.records():
            if kind != STDOUT:
                err += data[: MAX_STDERR - len(err)]
                continue
            pending += data
            while (nl := pending.find(b"\n")) >= 0:
                line = bytes(pending[:nl])
                del pending[: nl + 1]
                event = _event(line)
                if event is not None and (filter is None or event.type in filter):
                    yield event
            if len(pending) > MAX_EVENT:
                pending.clear()  # an endless line: drop it
        await att.finish()
    finally:
        await att.aclose()
    if att.returncode and not att.sandbox_finished:
        raise on_failure(parse_failure(att.returncode, bytes(err)))


def _event(line: bytes) -> FileWatchEvent | None:
    if len(line) > MAX_EVENT:
        return None
    try:
        obj = json.loads(line)
        paths = obj["paths"]
        kind = FileWatchEventType(obj["event_type"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None  # the "ready" line, or anything malformed
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        return None
    return FileWatchEvent(paths=paths, type=kind)
