"""shoal's public surface against the official client's (modal 1.6.4, pinned as a dev dependency).

Each class of ``surface.CLASSES`` is introspected in both packages (Modal's in a process of its own): every public
member Modal has must exist in shoal as the same kind of thing (method or property), and every parameter of a
Modal method must be accepted, with the same kind, and optional where Modal's is.  What differs on purpose, or
is not built yet, is listed once, with the reason, in ``modal_differences.DIFFERENCES``; a new difference, or a
listed one that no longer differs, fails here.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.compat import surface, table
from tests.compat.modal_differences import DIFFERENCES

MODAL_VERSION = "1.6.4"


def _modal_surface() -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-c", f"import modal; assert modal.__version__ == {MODAL_VERSION!r}, modal.__version__"],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.fail(f"the pinned official client (modal=={MODAL_VERSION}) is not installed: `make setup`\n{res.stderr}")
    return table.modal_surface()


def differences(theirs: dict[str, Any], ours: dict[str, Any]) -> set[str]:
    """Each way shoal's surface falls short of Modal's, one line each."""
    found: set[str] = set()
    for cls, members in theirs.items():
        for name, info in members.items():
            mine = ours[cls].get(name)
            if mine is None:
                found.add(f"{cls}.{name}: missing")
                continue
            if "unimplemented" in mine:  # present with Modal's parameters, but raises UnimplementedError
                found.add(f"{cls}.{name}: unimplemented")
            if info["kind"] != mine["kind"]:
                found.add(f"{cls}.{name}: a {mine['kind']} here, a {info['kind']} in modal")
                continue
            if info["kind"] != "callable" or info["params"] is None:
                continue
            if mine["params"] is None:
                found.add(f"{cls}.{name}: no signature here")
                continue
            takes_any_keyword = any(p["kind"] == "VAR_KEYWORD" for p in mine["params"].values())
            for param, p in info["params"].items():
                q = mine["params"].get(param)
                if q is None:
                    if not (takes_any_keyword and p["kind"] in ("KEYWORD_ONLY", "POSITIONAL_OR_KEYWORD")):
                        found.add(f"{cls}.{name}({param}): missing")
                elif q["kind"] != p["kind"] and not {q["kind"], p["kind"]} <= {"KEYWORD_ONLY", "POSITIONAL_OR_KEYWORD"}:
                    found.add(f"{cls}.{name}({param}): {q['kind']} here, {p['kind']} in modal")
                elif p["default"] and not q["default"]:
                    found.add(f"{cls}.{name}({param}): required here, optional in modal")
    return found


def test_shoal_has_modals_surface_but_for_the_listed_differences() -> None:
    found = differences(_modal_surface(), surface.dump("shoal"))
    new = sorted(found - set(DIFFERENCES))
    gone = sorted(set(DIFFERENCES) - found)
    assert not new, "new differences from modal's surface (fix them, or list them with a reason):\n" + "\n".join(new)
    assert not gone, "listed differences that no longer differ (remove them from the list):\n" + "\n".join(gone)


def test_the_comparison_sees_a_missing_member_and_parameter() -> None:
    theirs = {
        "Sandbox": {"exec": {"kind": "callable", "params": {"timeout": {"kind": "KEYWORD_ONLY", "default": True}}}}
    }
    assert differences(theirs, {"Sandbox": {}}) == {"Sandbox.exec: missing"}
    ours = {"Sandbox": {"exec": {"kind": "callable", "params": {}}}}
    assert differences(theirs, ours) == {"Sandbox.exec(timeout): missing"}
    ours = {
        "Sandbox": {"exec": {"kind": "callable", "params": {"timeout": {"kind": "KEYWORD_ONLY", "default": False}}}}
    }
    assert differences(theirs, ours) == {"Sandbox.exec(timeout): required here, optional in modal"}


def test_the_compatibility_table_in_docs_is_current() -> None:
    current = table.render(_modal_surface())
    assert table.DOC.read_text() == current, "docs/modal-compat.md is stale: python -m tests.compat.table > docs/…"
    summary = current[current.index("| class |") : current.index("\n\n## ")]
    assert summary in (table.REPO / "README.md").read_text(), "the README's compatibility summary is stale: copy it"
