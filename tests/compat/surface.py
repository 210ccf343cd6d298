"""The public surface of Modal's sandbox classes, as data: which members each has, and each callable's
parameters (name, kind, whether it has a default).

Run as ``python -m tests.compat.surface modal|shoal`` to print it as JSON; ``modal`` needs the pinned official
client (a dev dependency), imported in a process of its own so that it never meets ``shoal.install_as_modal``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from typing import Any

CLASSES = {
    "Sandbox": ("", "Sandbox"),
    "ContainerProcess": ("container_process", "ContainerProcess"),
    "StreamReader": ("io_streams", "StreamReader"),
    "StreamWriter": ("io_streams", "StreamWriter"),
    "Image": ("", "Image"),
    "Volume": ("", "Volume"),
    "Secret": ("", "Secret"),
    "App": ("", "App"),
    "Probe": ("", "Probe"),
    "Tunnel": ("", "Tunnel"),
    "OutboundPolicy": ("experimental", "OutboundPolicy"),
}
"""Name → (submodule of the package, or "" for the top level; attribute)."""


def _signature(obj: Any) -> inspect.Signature | None:
    for candidate in (obj, getattr(obj, "_fn", None), getattr(getattr(obj, "_live", None), "_fn", None)):
        if candidate is None:
            continue
        try:
            return inspect.signature(candidate)
        except (TypeError, ValueError):
            continue
    return None


def _member(cls: type, name: str) -> dict[str, Any]:
    static = inspect.getattr_static(cls, name)
    if isinstance(static, property):
        return {"kind": "property"}
    target = static.__func__ if isinstance(static, (classmethod, staticmethod)) else static
    if not callable(target) and not hasattr(target, "_fn") and not hasattr(target, "_live"):
        try:
            target = getattr(cls, name)
        except AttributeError:
            return {"kind": "attribute"}
        if not callable(target):
            return {"kind": "attribute"}
    sig = _signature(target) or _signature(getattr(cls, name, None))
    reason = getattr(target, "__shoal_unimplemented__", None)
    extra = {"unimplemented": reason} if reason is not None else {}
    if sig is None:
        return {"kind": "callable", "params": None, **extra}
    params = {}
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        params[p.name] = {"kind": p.kind.name, "default": p.default is not inspect.Parameter.empty}
    return {"kind": "callable", "params": params, **extra}


def dump(package: str) -> dict[str, dict[str, Any]]:
    """Every public member of each class in ``CLASSES``, from ``package`` (``modal`` or ``shoal``)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (sub, attr) in CLASSES.items():
        module = importlib.import_module(f"{package}.{sub}" if sub else package)
        cls = getattr(module, attr)
        out[name] = {m: _member(cls, m) for m in dir(cls) if not m.startswith("_")}
    return out


if __name__ == "__main__":
    json.dump(dump(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
