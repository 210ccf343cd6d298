"""The egress CA: it signs, for the outbound-policy interceptor (``egress``), a certificate per server name it
stands in for; sandboxes created with an outbound policy trust it (``trust_bundle``).

Kept apart from the tunnels' CA (``tls.LocalCA``), which people add to their own machines' trust stores
(``shoal trust``): that one must never sign names other than the tunnels'.  This one's key stays in the data
directory (0600); the certificates it signs are short-lived and held in memory only.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
import tempfile
import time
from pathlib import Path

from shoal.network.tls import make_ca, sign_server_cert

LEAF_DAYS = 7
"""Lifetime of a certificate signed for one name (re-signed a day before it ends)."""
CACHE = 512
"""Names whose TLS server context is kept (least recently used go first)."""
BUNDLE_MAX = 8 << 20
"""Bytes of an image's own CA bundle carried into a sandbox's trust bundle (a larger one is left out)."""
TRUST_PATH = "/etc/shoal/ca-certificates.crt"
"""Where an outbound-policy sandbox finds its trust bundle (also at the system path when the image allows:
``etc_files.write_trust``)."""
TRUST_ENV = {
    "SSL_CERT_FILE": TRUST_PATH,
    "REQUESTS_CA_BUNDLE": TRUST_PATH,
    "CURL_CA_BUNDLE": TRUST_PATH,
    "NODE_EXTRA_CA_CERTS": TRUST_PATH,
}
"""The environment an outbound-policy sandbox starts with, so that OpenSSL, requests/certifi, curl and Node
trust the bundle (a variable the sandbox or process sets itself wins)."""


class EgressCA:
    """``<dir>/ca.pem`` and ``ca-key.pem``, and the server contexts signed for names on demand."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_path = directory / "ca.pem"
        self.key_path = directory / "ca-key.pem"
        self._contexts: collections.OrderedDict[str, tuple[float, ssl.SSLContext]] = collections.OrderedDict()
        self._lock = asyncio.Lock()

    def ensure(self) -> None:
        """Create the CA once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not (self.ca_path.exists() and self.key_path.exists()):
            make_ca(self.ca_path, self.key_path, f"shoal egress CA ({socket.gethostname()})")

    def pem(self) -> bytes:
        """The CA certificate, as sandboxes trust it."""
        return self.ca_path.read_bytes()

    async def context_for(self, name: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for ``name`` (HTTP/1.1 only)."""
        now = time.time()
        async with self._lock:
            hit = self._contexts.get(name)
            if hit is not None and hit[0] > now:
                self._contexts.move_to_end(name)
                return hit[1]
            ctx = await asyncio.to_thread(self._sign, name)
            self._contexts[name] = (now + (LEAF_DAYS - 1) * 86400, ctx)
            while len(self._contexts) > CACHE:
                self._contexts.popitem(last=False)
            return ctx

    def _sign(self, name: str) -> ssl.SSLContext:
        cert, key = sign_server_cert(self.ca_path, self.key_path, [name], LEAF_DAYS)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        with tempfile.NamedTemporaryFile(dir=self.dir, suffix=".pem") as f:  # 0600 in a 0700 directory
            f.write(key + cert)
            f.flush()
            ctx.load_cert_chain(f.name)
        return ctx


def upstream_context(extra_ca: str = "") -> ssl.SSLContext:
    """How the interceptor checks servers: the host's trust store, plus ``extra_ca`` (a PEM file) when given."""
    ctx = ssl.create_default_context()
    if extra_ca:
        ctx.load_verify_locations(cafile=extra_ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def host_bundle() -> bytes:
    """The host's CA bundle (what ``ssl`` uses by default), or nothing if it has none."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read(BUNDLE_MAX)
    return b""
