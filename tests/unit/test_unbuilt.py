"""Members of Modal's API that shoal does not offer raise ``UnimplementedError`` naming themselves and why, in
their blocking and ``.aio`` forms, and accept Modal's arguments on the way."""

from __future__ import annotations

import asyncio

import pytest

import shoal
from shoal.exception import UnimplementedError


def test_unbuilt_members_say_what_and_why() -> None:
    app = shoal.App("x")
    with pytest.raises(UnimplementedError, match=r"deploy is not available in shoal: Modal Functions"):
        app.deploy(name="x", tag="v1")
    with pytest.raises(UnimplementedError, match="runs sandboxes only"):
        app.function(image=None, gpu="any", timeout=5)
    with pytest.raises(UnimplementedError, match="from_aws_ecr"):
        shoal.Image.from_aws_ecr("1234.dkr.ecr.us-east-1.amazonaws.com/x:1", add_python="3.11")
    with pytest.raises(UnimplementedError, match="deploy"):
        asyncio.run(app.deploy.aio(name="x"))
    assert app.registered_functions == {} and app.registered_web_endpoints == []
    assert app.description == "x"
