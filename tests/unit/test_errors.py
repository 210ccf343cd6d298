"""The error boundary, both ways, and the public surface."""

from __future__ import annotations

import inspect
import json

import pytest

import shoal
from shoal import exception as exc
from shoal.sdk.transport import BY_STATUS, error_from
from shoal.server import errors


@pytest.mark.parametrize("cls", sorted(set(exc.ERRORS.values()), key=lambda c: c.__name__))
def test_every_error_survives_the_round_trip(cls):
    original = cls("what to do next")
    status = errors.status_for(original)
    back = error_from(status, json.dumps(errors.body_for(original)).encode())
    assert type(back) is cls
    assert str(back) == "what to do next"


def test_status_table_is_consistent_both_ways():
    for status, cls in BY_STATUS.items():
        assert errors.status_for(cls("x")) == status
    assert errors.status_for(exc.ConflictError("x")) == 409
    assert errors.status_for(exc.SandboxTimeoutError("x")) == 504
    assert errors.status_for(exc.ExecutionError("x")) == 500


def test_unknown_or_garbled_bodies_fall_back_on_the_status():
    assert type(error_from(404, b"not json")) is exc.NotFoundError
    assert type(error_from(418, b'{"error": {"type": "Nope", "message": "m"}}')) is exc.InternalError
    assert type(error_from(400, b'{"error": {"type": "ValueError", "message": "m"}}')) is exc.InvalidError


def test_foreign_exceptions_never_leak_their_type():
    assert errors.body_for(KeyError("x"))["error"]["type"] == "InternalError"


def test_exception_tree_matches_modal():
    assert issubclass(exc.ConflictError, exc.InvalidError)
    assert issubclass(exc.SandboxTimeoutError, exc.TimeoutError)
    assert issubclass(exc.ImageBuildError, exc.RemoteError)
    assert issubclass(exc.SandboxFilesystemNotFoundError, exc.SandboxFilesystemError)
    assert all(issubclass(c, exc.Error) for c in exc.ERRORS.values())


def test_public_names_are_exactly_the_exported_ones():
    """Everything public that is not a subpackage is in __all__, and everything in __all__ exists."""
    public = {n for n in dir(shoal) if not n.startswith("_") and not inspect.ismodule(getattr(shoal, n))}
    modules = {n for n in shoal.__all__ if inspect.ismodule(getattr(shoal, n, None))}
    assert public == set(shoal.__all__) - {"__version__"} - modules
    assert all(hasattr(shoal, n) for n in shoal.__all__)
    assert shoal.__all__ == sorted(shoal.__all__)
