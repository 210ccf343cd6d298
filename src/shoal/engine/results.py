"""How a sandbox ended, in Modal's terms (results from exits, return codes), and its lifecycle log lines."""

from __future__ import annotations

import shlex

from shoal.agent import protocol as P
from shoal.runtime import spec
from shoal.wire.sandboxes import Result


def result_for_exit(kind: int, value: int) -> Result:
    """How a sandbox ended, from its entrypoint's exit as the agent reported it."""
    if kind == P.ExitKind.CODE:
        return Result(status="success" if value == 0 else "failure", exitcode=value)
    if kind == P.ExitKind.SIGNAL:
        return Result(status="failure", exitcode=128 + value, message=f"entrypoint killed by signal {value}")
    if kind == P.ExitKind.SPAWN_FAILED:
        return Result(status="failure", exitcode=value, message="entrypoint could not be started")
    return Result(status="failure", exitcode=-1)


def returncode_of(result: Result | None) -> int | None:
    """Modal's mapping: timeout → 124, terminated → 137, else the exit code."""
    if result is None:
        return None
    if result.status == "timeout":
        return 124
    if result.status == "terminated":
        return 137
    return result.exitcode


def describe(result: Result) -> str:
    """A lifecycle log line for how a sandbox ended."""
    what = {
        "success": "exited with code 0",
        "failure": f"exited with code {result.exitcode}",
        "terminated": "was terminated",
        "timeout": "timed out",
        "init_failure": "failed to start",
        "internal_failure": "was lost",
    }[result.status]
    return f"Sandbox {what}" + (f": {result.message}" if result.message else "")


def describe_process(args: list[str], persist: bool) -> str:
    """A ``verbose=True`` log line for a process started in the sandbox."""
    if not persist and args[:2] == [spec.AGENT_PATH, "fs"]:
        return "File operation: " + shlex.join(args[2:])[:1000]
    return "Exec: " + shlex.join(args)[:1000]
