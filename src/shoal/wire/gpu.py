"""Modal's ``gpu=`` strings and how they match the GPU models a machine reports.

Forms (case-insensitive, surrounding spaces ignored):

- ``"any"``: any GPU on this machine.
- a type: ``"T4"``, ``"L4"``, ``"A10G"`` (or ``"A10"``), ``"L40S"``, ``"A100"``, ``"A100-40GB"``,
  ``"A100-80GB"``, ``"RTX-PRO-6000"``, ``"H100"``, ``"H200"``, ``"B200"``.
- ``"TYPE:N"``: N GPUs of that type (N ≥ 1).
- ``"H100!"``: an H100 and nothing else.  Plain ``"H100"`` may be served by an H200, as Modal
  upgrades it; ``"B200+"`` may be served by a B300.

A machine's GPU is sorted into one class by its model name (as NVML reports it, e.g.
``"NVIDIA H100 80GB HBM3"``) and, for the A100, its memory; each request accepts a list of
classes in order of preference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoal.exception import InvalidError

ANY = "ANY"

_CLASS_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("T4", re.compile(r"\bT4\b")),
    ("L4", re.compile(r"\bL4\b")),
    ("L40S", re.compile(r"\bL40S\b")),
    ("A10G", re.compile(r"\bA10G\b")),
    ("A10", re.compile(r"\bA10\b")),
    ("A100", re.compile(r"\bA100\b")),
    ("H100", re.compile(r"\bH100\b")),
    ("H200", re.compile(r"\bH200\b")),
    ("B200", re.compile(r"\bB200\b")),
    ("B300", re.compile(r"\bB300\b")),
    ("RTX-PRO-6000", re.compile(r"\bRTX[ -]PRO[ -]6000\b")),
]
A100_80GB_MIN_MIB = 60 * 1024
"""An A100 reporting at least this much memory is the 80 GB model (the 40 GB one reports ~40 GiB)."""

TYPES: dict[str, tuple[str, ...]] = {
    "T4": ("T4",),
    "L4": ("L4",),
    "A10G": ("A10G", "A10"),
    "A10": ("A10", "A10G"),
    "L40S": ("L40S",),
    "A100": ("A100-40GB", "A100-80GB"),
    "A100-40GB": ("A100-40GB",),
    "A100-80GB": ("A100-80GB",),
    "RTX-PRO-6000": ("RTX-PRO-6000",),
    "H100": ("H100", "H200"),
    "H100!": ("H100",),
    "H200": ("H200",),
    "B200": ("B200",),
    "B200+": ("B200", "B300"),
}
"""Each request type → the GPU classes that may serve it, preferred first."""


@dataclass(frozen=True)
class GpuRequest:
    """A parsed ``gpu=`` value."""

    type: str
    """``ANY`` or a key of ``TYPES`` (upper case, with its ``!``/``+`` suffix)."""
    count: int = 1

    def __str__(self) -> str:
        base = "any" if self.type == ANY else self.type
        return base if self.count == 1 else f"{base}:{self.count}"

    @property
    def accepted(self) -> tuple[str, ...] | None:
        """Classes that may serve this request, preferred first; None for ``any``."""
        return None if self.type == ANY else TYPES[self.type]

    def describe(self) -> str:
        """The request in words: ``2 GPUs of type H100 (or H200)``."""
        n = f"{self.count} GPU" + ("s" if self.count != 1 else "")
        if self.type == ANY:
            return f"{n} of any type"
        classes = TYPES[self.type]
        alts = f" (or {', '.join(classes[1:])})" if len(classes) > 1 else ""
        return f"{n} of type {classes[0]}{alts}"

    def rank(self, gpu_class: str | None) -> int | None:
        """Preference of a GPU of ``gpu_class`` for this request (0 best), or None if it may not serve it."""
        if self.type == ANY:
            return 0
        classes = TYPES[self.type]
        return classes.index(gpu_class) if gpu_class in classes else None


def parse(value: object) -> GpuRequest:
    """Parse a ``gpu=`` value; InvalidError (with what is accepted) for anything else."""
    if isinstance(value, list | tuple):
        raise InvalidError("gpu must be a string such as 'A100' or 'H100:2'; lists are not supported for sandboxes")
    if not isinstance(value, str):
        raise InvalidError(f"Invalid GPU config: {value!r}. Value must be a string such as 'H100' or 'any'.")
    text = value.strip()
    count = 1
    if ":" in text:
        text, count_str = text.split(":", 1)
        try:
            count = int(count_str.strip())
        except ValueError:
            raise InvalidError(f"Invalid GPU count: {count_str}. Value must be an integer.") from None
        if count < 1:
            raise InvalidError(f"Invalid GPU count: {count}. Value must be at least 1.")
        text = text.strip()
    kind = text.upper()
    if kind == ANY:
        return GpuRequest(ANY, count)
    if kind not in TYPES:
        known = ", ".join(["any", *TYPES])
        raise InvalidError(f"Invalid GPU type: {text!r}. Value must be one of {known} (case-insensitive).")
    return GpuRequest(kind, count)


def classify(model: str, memory_mib: int | None) -> str | None:
    """The class of a GPU from its model name and memory, or None for a model no type names."""
    name = model.upper()
    for cls, pattern in _CLASS_PATTERNS:
        if pattern.search(name):
            if cls == "A100":
                if "80GB" in name.replace(" ", ""):
                    return "A100-80GB"
                if "40GB" in name.replace(" ", ""):
                    return "A100-40GB"
                return "A100-80GB" if (memory_mib or 0) >= A100_80GB_MIN_MIB else "A100-40GB"
            return cls
    return None
