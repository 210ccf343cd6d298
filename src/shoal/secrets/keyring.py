"""Sealing secrets at rest: AES-256-GCM with one key file in the data dir.

Trust: the key file (``<data>/secrets.key``, 32 random bytes, mode 0600,
owned by the daemon's user) and the ``cryptography`` library's AES-GCM.
Defends against: anyone who reads the state database, its WAL, a backup of
it, or the daemon's logs without also reading the key file: they see only
ciphertext.  Each sealed value carries a fresh 96-bit nonce and is bound to
its context (e.g. the secret's id) as associated data, so a ciphertext moved
to another row fails to open instead of handing its values to the wrong
owner.  Does not defend against root on the host, who can read the key (or
the memory of the daemon, or ``/proc/<pid>/environ`` of the sandbox's
processes, where the values are meant to end up).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shoal.exception import DataLossError

log = logging.getLogger(__name__)

VERSION = b"\x01"
NONCE_BYTES = 12
KEY_BYTES = 32


class Keyring:
    """The daemon's sealing key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._aead = AESGCM(self._load_or_create(path))

    @staticmethod
    def _load_or_create(path: Path) -> bytes:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, secrets.token_bytes(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                log.warning("secret key %s was readable by others (mode %o); setting 0600", path, st.st_mode & 0o777)
                os.fchmod(fd, 0o600)
            key = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != KEY_BYTES:
            raise DataLossError(f"the secret key file {path} is damaged (expected {KEY_BYTES} bytes)")
        return key

    def seal(self, plaintext: bytes, context: str) -> bytes:
        """Encrypt ``plaintext`` bound to ``context``."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return VERSION + nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        """Decrypt what ``seal`` made with the same ``context``; DataLossError if it does not authenticate."""
        if sealed[:1] != VERSION or len(sealed) < 1 + NONCE_BYTES + 16:
            raise DataLossError("a sealed secret has an unknown format")
        nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, context.encode())
        except InvalidTag:
            raise DataLossError(
                f"a sealed secret does not decrypt with the key in {self.path} (wrong key or damaged data)"
            ) from None

    def seal_env(self, env: dict[str, str], context: str) -> str:
        """An environment dict, sealed and base64-encoded for a JSON field."""
        return base64.b64encode(self.seal(json.dumps(env).encode(), context)).decode()

    def open_env(self, sealed: str, context: str) -> dict[str, str]:
        """The environment dict ``seal_env`` sealed."""
        value = json.loads(self.open(base64.b64decode(sealed), context))
        if not isinstance(value, dict):
            raise DataLossError("a sealed environment is not a mapping")
        return {str(k): str(v) for k, v in value.items()}
