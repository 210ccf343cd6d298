"""The gateway's credentials: the token pair a Modal client sends on every control-plane call, and the signed,
JWT-shaped tokens the client insists on (its auth token, and the router's per-sandbox bearer token)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from grpclib import GRPCError, Status

TOKEN_FILE = "gateway-tokens.json"
JWT_TTL = 3600
"""Seconds a signed token lasts (the client refreshes its auth token at about half of that)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derived(secret: str, label: str) -> bytes:
    return hmac.new(secret.encode(), b"shoal-gateway:" + label.encode(), hashlib.sha256).digest()


class GatewayAuth:
    """Loads (or makes, 0600) ``<data dir>/gateway-tokens.json``: the token id and secret clients authenticate
    with, and the key that signs the tokens the gateway hands out.

    In a cluster (``cluster_token``: the API token its nodes share) all three derive from that token instead, so
    every node's gateway takes the same client token pair and the tokens any node signed (decision 0081)."""

    def __init__(self, data_dir: Path, cluster_token: str | None = None) -> None:
        self.token_id: str
        self.token_secret: str
        if cluster_token is not None:
            self.token_id = "ak-" + _b64(_derived(cluster_token, "token-id"))[:22]
            self.token_secret = "as-" + _b64(_derived(cluster_token, "token-secret"))[:32]
            self._key = _derived(cluster_token, "signing-key")
            return
        path = data_dir / TOKEN_FILE
        if not path.exists():
            raw = {
                "token_id": "ak-" + secrets.token_urlsafe(16),
                "token_secret": "as-" + secrets.token_urlsafe(24),
                "key": secrets.token_hex(32),
            }
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(raw, f)
        raw = json.loads(path.read_text())
        self.token_id = str(raw["token_id"])
        self.token_secret = str(raw["token_secret"])
        self._key = bytes.fromhex(raw["key"])

    def check_client(self, metadata: Any) -> None:
        """Refuse a control-plane call without this daemon's token pair (``UNAUTHENTICATED``)."""
        token_id = str(metadata.get("x-modal-token-id", "")).encode(errors="replace")
        secret = str(metadata.get("x-modal-token-secret", "")).encode(errors="replace")
        if not (
            hmac.compare_digest(token_id, self.token_id.encode())
            and hmac.compare_digest(secret, self.token_secret.encode())
        ):
            raise GRPCError(
                Status.UNAUTHENTICATED,
                "this shoal gateway does not know that token: set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET from"
                " `shoal gateway env`",
            )

    def mac(self, text: str) -> str:
        """An HMAC of ``text`` under this daemon's key (signed URLs of the block store)."""
        return _b64(hmac.new(self._key, b"url:" + text.encode(), hashlib.sha256).digest())

    def sign(self, subject: str, ttl: int = JWT_TTL) -> str:
        """A JWT (HS256) for ``subject`` that expires in ``ttl`` seconds."""
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps({"sub": subject, "exp": int(time.time()) + ttl}).encode())
        mac = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(mac)}"

    def verify(self, token: str) -> str:
        """The subject of a token this gateway signed and that has not expired; else ``UNAUTHENTICATED``."""
        try:
            header, payload, mac = token.split(".")
            want = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(_unb64(mac), want):
                raise ValueError("bad signature")
            claims = json.loads(_unb64(payload))
            if int(claims["exp"]) < time.time():
                raise ValueError("expired")
            return str(claims["sub"])
        except (ValueError, KeyError, TypeError) as exc:
            raise GRPCError(Status.UNAUTHENTICATED, f"invalid or expired gateway token ({exc})") from None
