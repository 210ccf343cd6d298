"""Argument checks shared by the SDK's classes."""

from __future__ import annotations

from shoal.exception import InvalidError


def is_port(value: object) -> bool:
    """Whether ``value`` is a TCP port number (an int in 1-65535, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def check_port(value: object, what: str) -> int:
    """``value`` if it is a port number, else InvalidError naming ``what``."""
    if not is_port(value):
        raise InvalidError(f"{what}: {value!r} is not a port number (1-65535)")
    assert isinstance(value, int)
    return value
