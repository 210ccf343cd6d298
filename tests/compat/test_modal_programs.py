"""Programs written for Modal run unchanged on a machine set up as the README says (``tests.user_machine``):
three that follow modal-labs' public sandbox examples (``tests/compat/programs``) and smolagents' Modal executor,
the library exactly as published, driven by a stub model."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import shoal
from tests.conftest import _require_root_and_runtime
from tests.user_machine import DOMAIN, UserMachine, user_machine

PROGRAMS = Path(__file__).parent / "programs"


@pytest.fixture(scope="module")
def machine() -> Iterator[UserMachine]:
    _require_root_and_runtime()
    with user_machine() as m:
        yield m


def result(done: subprocess.CompletedProcess) -> dict | list:
    """The program's ``RESULT`` line, or a failure showing what it printed."""
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_code_interpreter(machine):
    answers = result(machine.run_as_modal(PROGRAMS / "code_interpreter.py"))
    assert answers[0] == {"stdout": "hello, world!\n", "stderr": ""}
    assert answers[4] == {"stdout": "The total is: 15\n", "stderr": ""}
    assert answers[5]["stdout"] == "" and "Execution Error: division by zero" in answers[5]["stderr"]


def test_multi_language_code_and_rm_rf(machine):
    done = machine.run_as_modal(PROGRAMS / "multi_language.py")
    got = result(done)
    assert got["hellos"] == {
        "bash": "hello from bash\n",
        "python": "hello from python\n",
        "node": "hello from node\n",
        "ruby": "hello from ruby\n",
        "php": "hello from php",
    }
    assert got["sum"] == "sum: 55"
    ticks = got["ticks"]
    assert [t[0] for t in ticks] == ["tick 1", "tick 2", "tick 3", "tick 4"]
    assert ticks[-1][1] - ticks[0][1] > 1.0  # streamed as printed (0.5 s apart), not all at the end
    assert got["ls_after_wipe"] != 0  # the sandbox's own root is gone ...
    assert Path("/usr/bin/ls").exists() and Path("/etc/os-release").exists()  # ... the host's is not
    assert "Sandbox ID: sb-" in done.stdout


def test_jupyter_notebook_through_a_tunnel(machine):
    got = result(machine.run_as_modal(PROGRAMS / "jupyter_notebook.py"))
    assert got["url"].startswith("https://") and got["url"].endswith("." + DOMAIN)  # port 443: none in the URL
    assert got["status"].get("started"), got["status"]
    assert got["contents_type"] == "directory"
    assert got["denied"] == 403


def test_smolagents_modal_executor(machine):
    pytest.importorskip("smolagents", reason="smolagents is a test dependency: pip install -e '.[dev]'")
    got = result(machine.run_as_modal(PROGRAMS / "smolagents_modal.py"))
    assert got["answer"].startswith("ID=debian 3.11.") and got["answer"].endswith(" 45"), got
    assert shoal.Sandbox.from_id(got["sandbox"]).poll() is not None  # the agent's cleanup terminated it
