"""``Image.pip_install_from_pyproject`` and ``Image.uv_sync``: a local Python project's dependencies in an image."""

from __future__ import annotations

from pathlib import Path

import pytest

import shoal
from shoal.exception import InvalidError

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
