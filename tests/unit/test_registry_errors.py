"""skopeo's failures become the Modal error a user would act on, whatever port the registry listens on."""

from __future__ import annotations

import pytest

from shoal.exception import NotFoundError, PermissionDeniedError
from shoal.images.registry import _error


@pytest.mark.parametrize("port", [5000, 40131, 14010])
def test_a_missing_manifest_is_not_found_even_on_a_port_with_401_in_it(port: int) -> None:
    message = (
        f'time="2026-12-05T06:36:08Z" level=fatal msg="Error parsing image name \\"docker://127.0.0.1:{port}/no/such:'
        f'image\\": reading manifest image in 127.0.0.1:{port}/no/such: manifest unknown: manifest unknown"'
    )
    assert isinstance(_error(f"127.0.0.1:{port}/no/such:image", message), NotFoundError)


def test_a_401_status_is_permission_denied() -> None:
    err = _error(
        "r.example/x:1", "reading manifest 1 in r.example/x: received unexpected HTTP status: 401 Unauthorized"
    )
    assert isinstance(err, PermissionDeniedError)
    assert isinstance(_error("r.example/x:1", "unexpected HTTP status: 401"), PermissionDeniedError)
