"""``Image.pip_install_from_pyproject`` and ``Image.uv_sync``: a local Python project's dependencies in an image."""

from __future__ import annotations

from pathlib import Path

import pytest

import shoal
from shoal.exception import InvalidError, NotFoundError

PYPROJECT = """
[project]
name = "demo"
version = "0.1.0"
requires-python = ">=3.9"
dependencies = ["six"]

[project.optional-dependencies]
extra = ["tomli"]

[dependency-groups]
dev = ["idna"]
"""


def _imports(app: shoal.App, image: shoal.Image, modules: str) -> str:
    sb = shoal.Sandbox.create(app=app, image=image, timeout=300)
    try:
        p = sb.exec("python", "-c", f"import {modules}; print('ok')")
        out = p.stdout.read()
        assert p.wait() == 0, p.stderr.read()
        return out
    finally:
        sb.terminate()


def test_pip_install_from_pyproject_installs_dependencies_and_optional_sections(app, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    image = shoal.Image.debian_slim().pip_install_from_pyproject(str(tmp_path / "pyproject.toml"), ["extra"])
    assert _imports(app, image, "six, tomli") == "ok\n"
    with pytest.raises(InvalidError, match="no optional-dependencies section 'nope'"):
        shoal.Image.debian_slim().pip_install_from_pyproject(str(tmp_path / "pyproject.toml"), ["nope"])
    (tmp_path / "poetry.toml").write_text('[tool.poetry.dependencies]\nsix = "*"\n')
    with pytest.raises(InvalidError, match=r"no \[project.dependencies\]"):
        shoal.Image.debian_slim().pip_install_from_pyproject(str(tmp_path / "poetry.toml"))


def test_uv_sync_installs_the_projects_dependencies_groups_and_extras(app, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    image = shoal.Image.debian_slim().uv_sync(str(tmp_path), groups=["dev"], extras=["extra"])
    assert _imports(app, image, "six, idna, tomli") == "ok\n"
    (tmp_path / "pyproject.toml").write_text(PYPROJECT + '\n[tool.uv.workspace]\nmembers = ["a"]\n')
    with pytest.raises(InvalidError, match="workspaces"):
        shoal.Image.debian_slim().uv_sync(str(tmp_path))
    with pytest.raises(InvalidError, match="not found"):
        shoal.Image.debian_slim().uv_sync(str(tmp_path / "missing"))


POETRY_PROJECT = """
[tool.poetry]
name = "demo"
version = "0.1.0"
description = ""
authors = ["Demo <demo@example.com>"]

[tool.poetry.dependencies]
python = ">=3.9"
six = "*"

[tool.poetry.group.dev.dependencies]
iniconfig = "*"

[tool.poetry.group.docs]
optional = true

[tool.poetry.group.docs.dependencies]
pluggy = "*"
"""

CHECK = """
import importlib.util, sys
print(",".join(m for m in ("six", "iniconfig", "pluggy") if importlib.util.find_spec(m)))
"""
"""Which of the project's dependencies are installed (none of them is a dependency of Poetry itself)."""


def _run(sb: shoal.Sandbox, *argv: str) -> str:
    p = sb.exec(*argv, timeout=240)
    out = p.stdout.read()
    assert p.wait() == 0, p.stderr.read()
    return out


def test_poetry_install_from_file_installs_the_locked_groups_asked_for(app, tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(POETRY_PROJECT)
    with pytest.raises(NotFoundError, match="ignore_lockfile=True"):
        shoal.Image.debian_slim().poetry_install_from_file(str(pyproject))
    with pytest.raises(InvalidError, match="list of group names"):
        shoal.Image.debian_slim().poetry_install_from_file(str(pyproject), with_="docs")  # type: ignore[arg-type]

    # without a lockfile: Poetry resolves; the optional group only when asked, dev left out
    unlocked = shoal.Image.debian_slim().poetry_install_from_file(
        str(pyproject), ignore_lockfile=True, with_=["docs"], without=["dev"]
    )
    sb = shoal.Sandbox.create(app=app, image=unlocked, timeout=300)
    try:
        assert _run(sb, "python", "-c", CHECK) == "six,pluggy\n"
        version = _run(sb, "python", "-m", "poetry", "--version").split()[-1].rstrip(")")
        _run(sb, "sh", "-c", "cd /.poetry-project && POETRY_CACHE_DIR=/tmp/pc poetry lock")
        (tmp_path / "poetry.lock").write_bytes(sb.filesystem.read_bytes("/.poetry-project/poetry.lock"))
    finally:
        sb.terminate()

    # with the lockfile beside the pyproject (inferred), a pinned Poetry, only the main group
    locked = shoal.Image.debian_slim().poetry_install_from_file(str(pyproject), only=["main"], poetry_version=version)
    sb = shoal.Sandbox.create(app=app, image=locked, timeout=300)
    try:
        assert _run(sb, "python", "-c", CHECK) == "six\n"
        assert version in _run(sb, "python", "-m", "poetry", "--version")
        pinned = _run(sb, "sh", "-c", "grep -A1 '^name = \"six\"' /.poetry-project/poetry.lock | tail -1")
        assert _run(sb, "python", "-c", "import six; print(six.__version__)").strip() in pinned
    finally:
        sb.terminate()
