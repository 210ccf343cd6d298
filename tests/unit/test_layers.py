"""The direction of imports between shoal's packages (docs/architecture.md).

    cli → sdk → wire ← server → engine → (images, network, volumes, secrets, gpu) → (runtime, store, agent, util)

``gateway`` (Modal's protocol, in front of the same engine) stands where ``server`` does.

Every package may also import ``wire``, ``exception`` and ``types``.  Imports under ``if TYPE_CHECKING:``
count: a type-only import still ties two packages together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from shoal._install import MODAL_MODULES

SRC = Path(__file__).resolve().parents[2] / "src"

BASE = {"wire", "exception", "types"}
SERVICES = {"images", "network", "volumes", "secrets", "gpu", "cluster"}
LOWEST = {"runtime", "store", "agent", "util"}

FACADES = set(MODAL_MODULES) - BASE
"""Modal's module paths (``modal.sandbox``, ...): each re-exports the SDK's objects under Modal's name."""

ALLOWED: dict[str, set[str]] = {
    "exception": set(),
    "types": set(),
    "wire": {"exception", "types"},
    "sdk": BASE,
    **{facade: BASE | {"sdk"} for facade in FACADES},
    "_install": BASE | FACADES,
    "shoal": BASE | {"sdk", "_install"} | FACADES,
    "__main__": {"cli"},
    "cli": BASE | {"sdk", "shoal"} | FACADES,  # the public package is the SDK too
    "server": BASE | {"engine", "gateway"} | SERVICES | LOWEST,
    "gateway": BASE | {"engine"} | SERVICES | LOWEST,  # Modal's protocol in front of the same engine
    "engine": BASE | SERVICES | LOWEST,
    **{service: BASE | LOWEST for service in SERVICES},
    "runtime": BASE | {"util"},
    "store": BASE | {"util"},
    "agent": BASE | {"util"},
    "util": BASE,
}

DAEMON_ENTRY_POINTS = {"shoal.cli.serve", "shoal.cli.setup"}
"""``shoal serve`` and ``shoal setup`` start or prepare the daemon itself: they may reach below the SDK."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "shoal"


def _imports(path: Path) -> set[str]:
    """The shoal modules (or names in them) that a file imports, resolved to dotted names."""
    module = _module_name(path)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != "shoal":
                found.add(target)
            for alias in node.names:
                name = f"{target}.{alias.name}"
                is_module = (SRC / name.replace(".", "/")).is_dir() or (
                    SRC / (name.replace(".", "/") + ".py")
                ).is_file()
                found.add(name if is_module or target != "shoal" else "shoal")
    return {name for name in found if name == "shoal" or name.startswith("shoal.")}


def _edges() -> dict[tuple[str, str], set[str]]:
    """(importing package, imported package) → the modules that import across."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(SRC.joinpath("shoal").rglob("*.py")):
        module = _module_name(path)
        for target in _imports(path):
            pkg = _package(target)
            is_module = (SRC / "shoal" / pkg).is_dir() or (SRC / "shoal" / f"{pkg}.py").is_file()
            if (is_module or pkg == "shoal") and pkg != _package(module):
                edges[(_package(module), pkg)].add(module)
    return edges


def test_every_package_is_placed_in_a_layer():
    packages = {p.name for p in SRC.joinpath("shoal").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in SRC.joinpath("shoal").glob("*.py") if p.stem != "__init__"}
    assert packages - set(ALLOWED) == set(), "a new package needs a place in ALLOWED and docs/architecture.md"


def test_imports_follow_the_layers():
    wrong = []
    for (src, dst), modules in sorted(_edges().items()):
        offenders = sorted(m for m in modules if m not in DAEMON_ENTRY_POINTS)
        if dst not in ALLOWED[src] and offenders:
            wrong.append(f"{src} → {dst}: {', '.join(offenders)}")
    assert wrong == []


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for (src, dst), modules in _edges().items():
        if set(modules) - DAEMON_ENTRY_POINTS:
            graph[src].add(dst)
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(" → ".join([*path[path.index(nxt) :], nxt]))
            elif len(path) < len(ALLOWED):
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert cycles == []


def test_import_shoal_loads_only_the_sdk_side():
    code = (
        "import sys, shoal; print('\\n'.join(sorted(m for m in sys.modules if m == 'shoal' or m.startswith('shoal.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    ).stdout.split()
    outside = [m for m in out if _package(m) not in {"shoal", "sdk", "_install"} | FACADES | BASE]
    assert outside == []
    assert "shoal.sdk.sandbox" in out
