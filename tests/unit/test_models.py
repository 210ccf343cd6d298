"""Validation of API requests: what the daemon refuses, and the message it gives."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shoal.wire.sandboxes import CreateSandbox, ExecRequest


def test_exec_argv_limits():
    ExecRequest(args=["x" * 60000])
    with pytest.raises(ValidationError, match="65536"):
        ExecRequest(args=["x" * 70000])
    with pytest.raises(ValidationError, match="NUL"):
        ExecRequest(args=["a\x00b"])
    with pytest.raises(ValidationError):
        ExecRequest(args=[])


@pytest.mark.parametrize("name", ["1ABC", "A-B", "", "A B", "A=B", "é"])
def test_bad_env_names(name):
    with pytest.raises(ValidationError, match="environment variable name"):
        ExecRequest(args=["true"], env={name: "x"})


def test_env_values_may_hold_anything_but_nul():
    ExecRequest(args=["true"], env={"A": "= \n 'quoted' ✓"})
    with pytest.raises(ValidationError, match="NUL"):
        ExecRequest(args=["true"], env={"A": "x\x00y"})


@pytest.mark.parametrize("workdir", ["relative", "./x", "", "/x\x00y"])
def test_workdir_must_be_absolute(workdir):
    with pytest.raises(ValidationError):
        CreateSandbox(app_id="ap-1", workdir=workdir)


def test_limits_and_ranges():
    with pytest.raises(ValidationError, match="below the request"):
        CreateSandbox(app_id="ap-1", cpu=2, cpu_limit=1)
    with pytest.raises(ValidationError, match="below the request"):
        CreateSandbox(app_id="ap-1", memory=512, memory_limit=256)
    with pytest.raises(ValidationError):
        CreateSandbox(app_id="ap-1", timeout=0)
    with pytest.raises(ValidationError):
        CreateSandbox(app_id="ap-1", timeout=24 * 3600 + 1)
    with pytest.raises(ValidationError, match="invalid sandbox name"):
        CreateSandbox(app_id="ap-1", name="x" * 65)


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="Extra inputs"):
        CreateSandbox.model_validate({"app_id": "ap-1", "privileged": True})
