"""The compatibility table of ``docs/modal-compat.md``: each public member of modal 1.6.4's sandbox classes and
shoal's status, from the same comparison ``test_modal_surface`` runs.  ``python -m tests.compat.table`` prints it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.compat.modal_differences import DIFFERENCES

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "modal-compat.md"


def modal_surface() -> dict[str, Any]:
    """Modal's surface, introspected in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.compat.surface", "modal"], capture_output=True, text=True, check=True, cwd=REPO
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def render(theirs: dict[str, Any]) -> str:
    """The table as Markdown."""
    lines = [
        "# shoal and modal 1.6.4: the sandbox classes, member by member",
        "",
        "Made by `python -m tests.compat.table > docs/modal-compat.md` from the comparison that",
        "`tests/compat/test_modal_surface.py` runs (every public member, every parameter); the reasons are listed",
        "once in `tests/compat/modal_differences.py`. ✓: present with Modal's parameters.",
        "",
    ]
    summary = ["| class | members | ✓ | differ |", "|---|---|---|---|"]
    body: list[str] = []
    for cls, members in theirs.items():
        rows = []
        same = 0
        for name in sorted(members):
            notes = [_note(d, why) for d, why in DIFFERENCES.items() if _about(d, cls, name)]
            if notes:
                rows.append(f"| `{name}` | " + "; ".join(notes) + " |")
            else:
                same += 1
                rows.append(f"| `{name}` | ✓ |")
        summary.append(f"| `{cls}` | {len(members)} | {same} | {len(members) - same} |")
        body += ["", f"## {cls}", "", "| member | shoal |", "|---|---|", *rows]
    return "\n".join([*lines, *summary, *body, ""])


def _note(difference: str, why: str) -> str:
    head, what = difference.split(": ", 1)
    if what == "unimplemented":
        return f"raises `UnimplementedError`: {why}"
    if what == "missing":
        return f"missing: {why}"
    return f"`{head}`: {what}: {why}"


def _about(difference: str, cls: str, name: str) -> bool:
    head = difference.split(": ", 1)[0]
    return head == f"{cls}.{name}" or head.startswith(f"{cls}.{name}(")


if __name__ == "__main__":
    sys.stdout.write(render(modal_surface()))
