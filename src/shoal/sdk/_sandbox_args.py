"""Checks of ``Sandbox.create`` and ``exec`` arguments that must fail in the caller's process, with the
words of Modal's client, before anything is sent."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from typing import Any

from shoal.exception import DeprecationError, InvalidError
from shoal.sdk._checks import check_port
from shoal.sdk.secret import Secret
from shoal.wire.base import check_argv
from shoal.wire.cluster import parse_labels


def check_args(args: Sequence[Any], what: str) -> list[str]:
    """Command arguments as the agent can carry them: strings, no NUL, within the argv size limit."""
    for a in args:
        if not isinstance(a, str):
            raise InvalidError(f"{what} arguments must be strings, got {type(a).__name__}: {a!r}")
    try:
        return check_argv(list(args), what)
    except ValueError as exc:
        raise InvalidError(str(exc)) from None


def check_workdir(workdir: str | None) -> None:
    """Refuse a working directory that is not absolute."""
    if workdir is not None and not (isinstance(workdir, str) and workdir.startswith("/")):
        raise InvalidError(f"workdir must be an absolute path (starting with '/'), got {workdir!r}")


def merge_env(
    env: dict[str, str | None] | None, secrets: Collection[Secret] | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Plain variables (``None`` values dropped) and the secrets' variables, kept apart: (plain, secret)."""
    secret_env: dict[str, str] = {}
    for s in secrets or ():
        if not isinstance(s, Secret):
            raise InvalidError(f"secrets must be shoal.Secret objects, got {type(s).__name__}")
        secret_env.update(s._as_env())
    plain: dict[str, str] = {}
    for k, v in (env or {}).items():
        if v is None:
            continue
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidError(f"env values must be str (or None); {k!r} has {type(v).__name__}")
        plain[k] = v
    return plain, secret_env


def resources(value: float | tuple[float, float] | None, what: str) -> tuple[float | None, float | None]:
    """``cpu=``/``memory=`` as (request, limit): a number is a request, a tuple both."""
    if value is None:
        return None, None
    if isinstance(value, tuple):
        if len(value) != 2:
            raise InvalidError(f"{what} must be a number or a (request, limit) tuple")
        request, limit = value
        if limit < request:
            raise InvalidError(f"{what} limit ({limit}) must not be below the request ({request})")
        return request, limit
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidError(f"{what} must be a number or a (request, limit) tuple, got {type(value).__name__}")
    return value, None


def str_list(value: Sequence[str] | None, what: str) -> list[str] | None:
    """A list of strings (not one string, which would be a list of characters)."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise InvalidError(f"{what} must be a list of strings, e.g. ['10.0.0.0/8'] or ['example.com']")
    return list(value)


def ports(value: Sequence[int], what: str) -> list[int]:
    """Port numbers, each checked."""
    return [check_port(p, what) for p in value]


def not_supported(name: str, why: str) -> InvalidError:
    """The error for a ``Sandbox.create`` argument Modal has and shoal does not."""
    return InvalidError(f"Sandbox.create({name}=...) is not supported by this shoal version: {why}")


def node_labels_option(options: dict[str, Any] | None) -> dict[str, str] | None:
    """``experimental_options``: shoal knows one, ``node_labels`` (``"k=v,k2=v2"`` or a dict: in a cluster, land on a
    node with those labels); any other is refused, since ignoring one could loosen what it was meant to restrict."""
    if not options:
        return None
    unknown = sorted(map(str, set(options) - {"node_labels"}))
    if unknown:
        raise not_supported(
            "experimental_options",
            f"shoal knows one experimental option, node_labels; not {', '.join(unknown)} (ignoring one could loosen"
            " what it was meant to restrict); leave it unset",
        )
    value = options["node_labels"]
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if not isinstance(value, str):
        raise InvalidError(f"experimental_options['node_labels'] must be 'k=v,k2=v2' or a dict, not {value!r}")
    try:
        return parse_labels(value)
    except ValueError as exc:
        raise InvalidError(f"experimental_options['node_labels']: {exc}") from None


def deprecated_create_args(
    environment_name: str | None,
    pty_info: Any,
    cidr_allowlist: Sequence[str] | None,
    pty: bool,
    outbound_cidr_allowlist: Sequence[str] | None,
) -> tuple[bool, Sequence[str] | None]:
    """Warn about Modal's deprecated ``Sandbox.create`` arguments; the (pty, outbound_cidr_allowlist) they mean."""
    if environment_name is not None:
        warnings.warn(
            "Sandbox.create(environment_name=...) is deprecated (2025-01-01): the app decides the environment",
            DeprecationError,
            stacklevel=4,
        )
    if pty_info is not None:
        warnings.warn("pty_info is deprecated (2025-06-01); use pty=True", DeprecationError, stacklevel=4)
        pty = True
    if cidr_allowlist is not None:
        warnings.warn(
            "cidr_allowlist is deprecated (2025-08-01); use outbound_cidr_allowlist",
            DeprecationError,
            stacklevel=4,
        )
        if outbound_cidr_allowlist is not None:
            raise InvalidError("pass only one of cidr_allowlist and outbound_cidr_allowlist")
        outbound_cidr_allowlist = cidr_allowlist
    return pty, outbound_cidr_allowlist


RUNTIMES = ("gvisor", "vm", "runc")
"""What ``Sandbox.create(runtime=...)`` may name: Modal's ``gvisor`` and ``vm``, and shoal's ``runc``; None is the
daemon's default (``shoal serve --default-runtime``)."""


def check_runtime(runtime: object) -> str | None:
    """The runtime to ask the daemon for; InvalidError for one shoal does not have."""
    if runtime is None:
        return None
    if runtime not in RUNTIMES:
        raise InvalidError(f"runtime must be one of {', '.join(map(repr, RUNTIMES))} or None, not {runtime!r}")
    if runtime == "vm":
        raise not_supported(
            "runtime",
            "'vm' needs a virtual-machine runtime (a microVM monitor such as Firecracker or libkrun, and /dev/kvm on"
            " the host), which shoal does not have; use runtime='gvisor' for a kernel between the sandbox and the"
            " host",
        )
    return str(runtime)


def refuse_unsupported(**given: bool) -> None:
    """InvalidError for the first Modal argument that was given and shoal does not implement."""
    for key, was_given in given.items():
        if was_given:
            raise not_supported(key, "this feature is not implemented yet; leave it unset")
