"""The Python versions images can have (``debian_slim(python_version=)``, ``from_registry(add_python=)``): each
is the ``python3`` of a Debian suite (decision 0065).  Known to the SDK too, so a version there is none of is
refused where it is written."""

from __future__ import annotations

from shoal.exception import InvalidError

PYTHON_SUITES = {"3.9": "bullseye", "3.11": "bookworm", "3.13": "trixie", "3.14": "forky"}
"""Python versions debian_slim provides: the Debian suite whose ``python3`` each is (decision 0065).  No suite
carries 3.10 or 3.12, and nothing reachable from a host limited to package mirrors ships them."""
ROLLING_SUITES = frozenset({"forky", "sid"})
"""Debian testing and unstable: their Release files expire within days, and a mirror that is not refreshed
(a snapshot, a frozen proxy) serves them expired, so their expiry is not checked (decision 0065)."""
DEFAULT_PYTHON = "3.11"


def check_python_version(version: str | None) -> str:
    """The Python version to use, or InvalidError naming the ones available."""
    if version is None:
        return DEFAULT_PYTHON
    if not isinstance(version, str):
        raise TypeError(f"python_version must be a string such as '3.11', not {type(version).__name__}")
    parts = version.split(".")
    series = ".".join(parts[:2])
    if series not in PYTHON_SUITES or (len(parts) > 2 and not parts[2].isdigit()):
        available = ", ".join(f"{v} (Debian {s})" for v, s in sorted(PYTHON_SUITES.items(), key=_version_key))
        raise InvalidError(f"Python {version} is not available on this machine; debian_slim can provide: {available}")
    return series


def _version_key(item: tuple[str, str]) -> tuple[int, ...]:
    return tuple(int(p) for p in item[0].split("."))
