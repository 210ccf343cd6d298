"""The SDK's side of the filesystem tool, without a sandbox: argv for paths, modes, and hostile answers."""

from __future__ import annotations

import errno
import json

import pytest

from shoal.exception import (
    FilesystemExecutionError,
    InvalidError,
    SandboxFilesystemError,
    SandboxFilesystemNotFoundError,
    SandboxFilesystemPathAlreadyExistsError,
)
from shoal.sdk import _fstool as tool
from shoal.sdk.file_io import _missing_tail, _parse_mode, _split_lines
from shoal.types import FileType


def test_paths_travel_as_text_or_hex():
    assert tool.path_args("/tmp/ü\n-x", legacy=False, op="stat") == ["/tmp/ü\n-x"]
    assert tool.path_args("/tmp/bad\udcff", legacy=False, op="stat") == ["-x", b"/tmp/bad\xff".hex()]


@pytest.mark.parametrize(
    ("path", "legacy", "error", "match"),
    [
        ("/a\x00b", False, InvalidError, "null byte"),
        ("/a\x00b", True, ValueError, "embedded null byte"),
        ("/" + "x" * 256, False, InvalidError, "component is 256 bytes"),
        ("/d" * 2048, False, InvalidError, "4096 bytes"),
        ("/\ud800", False, InvalidError, "surrogate"),
    ],
)
def test_paths_the_kernel_cannot_take_are_refused(path, legacy, error, match):
    with pytest.raises(error, match=match):
        tool.path_args(path, legacy=legacy, op="stat")


def test_over_long_names_are_enametoolong_for_the_older_api():
    with pytest.raises(OSError) as info:
        tool.path_args("/" + "x" * 300, legacy=True, op="open")
    assert info.value.errno == errno.ENAMETOOLONG


def test_modes():
    assert _parse_mode("r") == (True, False, False)
    assert _parse_mode("ab+") == (True, True, True)
    assert _parse_mode("bx") == (False, True, True)
    for bad in ("", "rw", "rr", "rt", "w++"):
        with pytest.raises(ValueError):
            _parse_mode(bad)


def test_text_helpers():
    assert _missing_tail("añ".encode()[:2]) == 1
    assert _missing_tail("🐟".encode()[:1]) == 3
    assert _missing_tail("🐟".encode()) == 0
    assert _missing_tail(b"abc") == 0
    assert _split_lines("a\nb\n\nc") == ["a\n", "b\n", "\n", "c"]
    assert _split_lines(b"a\n") == [b"a\n"]


def test_error_payloads_map_to_both_apis():
    stderr = b'noise\n{"error_kind":"NotFound","errno":2,"message":"No such file or directory"}\n'
    failure = tool.parse_failure(1, stderr)
    assert isinstance(tool.filesystem_error(failure, "/x"), SandboxFilesystemNotFoundError)
    legacy = tool.legacy_error(failure, "/x")
    assert isinstance(legacy, FileNotFoundError) and legacy.filename == "/x"
    exists = tool.parse_failure(1, b'{"error_kind":"PathAlreadyExists","errno":17,"message":"File exists"}')
    assert isinstance(tool.filesystem_error(exists, "/x"), SandboxFilesystemPathAlreadyExistsError)
    assert isinstance(tool.legacy_error(exists, "/x"), FileExistsError)


@pytest.mark.parametrize(
    "stderr",
    [b"", b"garbage", b'{"error_kind": 5, "message": "x"}', b'["a"]', b'{"error_kind":"NotFound","errno":"2"}'],
)
def test_malformed_error_payloads_give_generic_errors(stderr):
    failure = tool.parse_failure(3, stderr)
    err = tool.filesystem_error(failure, "/x")
    assert type(err) is SandboxFilesystemError
    assert isinstance(tool.legacy_error(failure, "/x"), FilesystemExecutionError)


def _entry(**changes: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "f",
        "type": "file",
        "size": 1,
        "mode": 0o100644,
        "permissions": "0644",
        "owner": "root",
        "group": "root",
        "modified_time": 1.5,
        "symlink_target": None,
    }
    entry.update(changes)
    return entry


def test_listings_are_checked_field_by_field():
    infos = tool.listing(json.dumps([_entry(), _entry(name="l", type="symlink", symlink_target="/x")]).encode(), "/d")
    assert [(i.name, i.path, i.type) for i in infos] == [("f", "/d/f", FileType.FILE), ("l", "/d/l", FileType.SYMLINK)]
    for bad in (
        b"not json",
        b"{}",
        json.dumps([_entry(name="../escape")]).encode(),
        json.dumps([_entry(name="a/b")]).encode(),
        json.dumps([_entry(type="socket")]).encode(),
        json.dumps([_entry(size="1")]).encode(),
        json.dumps([_entry(size=True)]).encode(),
        json.dumps([_entry(owner=None)]).encode(),
        b"[" * 100000,
    ):
        with pytest.raises(SandboxFilesystemError, match="malformed"):
            tool.listing(bad, "/d")


def test_watch_lines_are_checked():
    assert tool._event(b'{"ready":true}') is None
    assert tool._event(b'{"event_type":"Nope","paths":["/a"]}') is None
    assert tool._event(b'{"event_type":"Create","paths":[]}') is None
    assert tool._event(b'{"event_type":"Create","paths":[1]}') is None
    event = tool._event(b'{"event_type":"Modify","paths":["/a","/b"]}')
    assert event is not None and event.paths == ["/a", "/b"]
