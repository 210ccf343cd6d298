"""A container that does not start: a host limit is named as one, anything else keeps the runtime's words."""

from __future__ import annotations

from shoal.exception import InternalError, ResourceExhaustedError
from shoal.runtime.base import RuntimeFailure
from shoal.runtime.oci import start_failure

KEYRING = (
    'time="2026-12-01T10:00:00Z" level=error msg="runc run failed: unable to start container process: error during'
    ' container init: unable to join session keyring: unable to create session key: disk quota exceeded"\n'
)


def test_the_key_quota_is_a_resource_exhausted_error_that_says_how_to_raise_it():
    err = start_failure("runc run failed (exit 1)", KEYRING)
    assert isinstance(err, ResourceExhaustedError)
    message = str(err)
    assert "kernel key quota" in message and "kernel.keys.maxkeys" in message and "sysctl -w" in message
    assert "runc run failed" not in message


def test_other_failures_keep_the_runtime_message():
    err = start_failure("runc run failed (exit 1)", "container_linux.go: some other failure\n")
    assert isinstance(err, RuntimeFailure) and isinstance(err, InternalError)
    assert str(err) == "runc run failed (exit 1): container_linux.go: some other failure"
