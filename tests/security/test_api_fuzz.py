"""A bounded schemathesis run over the daemon's own OpenAPI document: no generated request may get a 5xx.

The daemon under test is this module's own (TCP on 127.0.0.1 with its bearer token, no warm pool), so what the
fuzzer creates (apps, volumes, secrets) never reaches the session daemon's state, and the leak check of
``running_daemon`` runs when the module ends.  Operations that would build images, read host paths or block for
long are left out (``EXCLUDED``), and sandbox creates name an app that does not exist (``NO_SUCH_APP``); image
removal and pruning stay in (they never touch the machine's read-only image cache).  Every other operation gets
schemathesis' coverage cases and ``MAX_EXAMPLES`` generated requests, valid and invalid (positive and negative
modes), under the ``not_a_server_error`` check.  The calls in ``LIVE`` are aimed at a live sandbox (a random id
only ever reaches the 404).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

import shoal
from shoal.wire import ids
from tests.conftest import Daemon, _require_root_and_runtime, running_daemon

MAX_EXAMPLES = 20
EXCLUDED = {
    "resolve_image": "builds images, each step in a build sandbox",
    "import_image": "copies a directory of the host into the image store",
    "terminate_sandbox": "would end the live sandbox the other operations are aimed at",
    "wait_sandbox": "long-polls up to 60 s a call",
    "get_tunnels": "long-polls up to 60 s a call",
    "wait_exec": "long-polls up to 60 s a call",
    "read_output": "streams until the process ends",
    "attach": "runs a process for the length of the request",
}
"""operationId → why the fuzzer leaves it out (``tests/security/test_api_input.py`` covers their bodies' framing)."""

LIVE = {
    "get_sandbox",
    "wait_ready",
    "get_logs",
    "create_connect_token",
    "set_network_policy",
    "set_tags",
    "list_execs",
    "get_exec",
    "write_stdin",
    "list_mounts",
    "mount_image",
    "unmount_image",
    "reload_volumes",
}
"""Operations aimed at the live sandbox instead of the generated id."""

NO_SUCH_APP = ids.new("app")
"""``create_sandbox`` bodies name this app, which does not exist: the whole body is validated, and the create then
stops at its first check (the app), so the fuzzer never makes a sandbox."""


@dataclass
class Target:
    daemon: Daemon
    url: str
    headers: dict[str, str]
    sandbox_id: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for_port(port: int) -> None:
    """Until the TCP listener accepts (a restart's readiness check can see the previous start's log line)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[Target]:
    """This module's daemon, on TCP with its token, and one live sandbox in it."""
    _require_root_and_runtime()
    with running_daemon() as d:
        port = _free_port()
        d.restart_with("--tcp", f"127.0.0.1:{port}", "--warm-pool", "0")
        _wait_for_port(port)
        token = (d.data_dir / "api-token").read_text().strip()
        app = shoal.App.lookup("fuzz", create_if_missing=True)
        sb = shoal.Sandbox.create(app=app, timeout=300)
        try:
            yield Target(d, f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}, sb.object_id)
        finally:
            sb.terminate()


@pytest.fixture(scope="module")
def api_schema(fuzz_target: Target) -> Any:
    doc = requests.get(f"{fuzz_target.url}/openapi.json", headers=fuzz_target.headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(base_url=fuzz_target.url, headers=fuzz_target.headers, request_timeout=30)
    schema.config.phases.update(phases=["coverage", "fuzzing"])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema").exclude(operation_id=list(EXCLUDED))


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_no_request_gets_a_server_error(case: Any, fuzz_target: Target) -> None:
    """Generated requests, valid and not, at every operation that creates nothing unbounded: never a 5xx."""
    operation_id = case.operation.definition.raw.get("operationId")
    assert operation_id not in EXCLUDED
    if operation_id in LIVE and "sandbox_id" in (case.path_parameters or {}):
        case.path_parameters["sandbox_id"] = fuzz_target.sandbox_id
    if operation_id == "create_sandbox" and isinstance(case.body, dict) and "app_id" in case.body:
        case.body["app_id"] = NO_SUCH_APP
    response = case.call(base_url=fuzz_target.url, headers=fuzz_target.headers, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
