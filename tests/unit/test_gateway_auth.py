"""The gateway's credentials (``shoal.gateway.auth``): the token pair and the signed tokens it hands out."""

from __future__ import annotations

import base64
import json

import pytest

pytest.importorskip("modal_proto", reason="the gateway's extra (modal) is a test dependency: make setup")

from grpclib import GRPCError, Status

from shoal.gateway.auth import GatewayAuth


def test_tokens_are_made_once_private_and_kept(tmp_path):
    first = GatewayAuth(tmp_path)
    assert first.token_id.startswith("ak-") and first.token_secret.startswith("as-")
    assert (tmp_path / "gateway-tokens.json").stat().st_mode & 0o777 == 0o600
    again = GatewayAuth(tmp_path)
    assert (again.token_id, again.token_secret) == (first.token_id, first.token_secret)
    assert again.verify(first.sign("sb-x")) == "sb-x"


def test_the_client_must_show_the_pair(tmp_path):
    auth = GatewayAuth(tmp_path)
    auth.check_client({"x-modal-token-id": auth.token_id, "x-modal-token-secret": auth.token_secret})
    for metadata in ({}, {"x-modal-token-id": auth.token_id, "x-modal-token-secret": "as-wrong"}):
        with pytest.raises(GRPCError) as caught:
            auth.check_client(metadata)
        assert caught.value.status == Status.UNAUTHENTICATED


def test_signed_tokens_are_jwt_shaped_and_checked(tmp_path):
    auth = GatewayAuth(tmp_path)
    token = auth.sign("sb-abc", ttl=60)
    header, payload, _ = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == "sb-abc" and claims["exp"] > 0  # the client reads exp without checking the signature
    forged = header + "." + base64.urlsafe_b64encode(b'{"sub":"sb-other","exp":9999999999}').decode().rstrip("=")
    (tmp_path / "other").mkdir()
    other_daemons = GatewayAuth(tmp_path / "other").sign("sb-abc")
    for bad in (forged + "." + token.split(".")[2], auth.sign("sb-abc", ttl=-1), "opaque", other_daemons):
        with pytest.raises(GRPCError) as caught:
            auth.verify(bad)
        assert caught.value.status == Status.UNAUTHENTICATED
