"""The local certificate authority that signs the tunnels' certificate.

Trusts: the data directory (root-only).  The CA's private key never leaves
it (0600) and signs one thing: the tunnel listeners' certificate, for the
host names and addresses tunnels are advertised under.  Clients trust tunnels
by trusting ``ca.pem`` (its path is in ``GET /v1/status`` and ``shoal
status``); nothing is added to the host's trust store.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
CERT_DAYS = 397
RENEW_BEFORE = datetime.timedelta(days=30)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def make_ca(ca_path: Path, key_path: Path, common_name: str) -> None:
    """Create a CA certificate (``ca_path``, public) and its key (``key_path``, 0600) that signs server
    certificates only (path length 0)."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(ca_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def sign_server_cert(ca_path: Path, ca_key_path: Path, hosts: list[str], days: int) -> tuple[bytes, bytes]:
    """A server certificate for ``hosts`` (names or addresses) signed by the CA, and its key: both PEM."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


class LocalCA:
    """``<dir>/ca.pem`` (public), ``ca-key.pem``, and the tunnel certificate ``tunnel.pem`` + ``tunnel-key.pem``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_path = directory / "ca.pem"
        self.cert_path = directory / "tunnel.pem"
        self.key_path = directory / "tunnel-key.pem"

    def ensure(self, hosts: list[str]) -> None:
        """Create the CA once, and a tunnel certificate for ``hosts`` when missing, expiring or for other names."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        ca_key_path = self.dir / "ca-key.pem"
        now = datetime.datetime.now(datetime.UTC)
        if not (self.ca_path.exists() and ca_key_path.exists()):
            make_ca(self.ca_path, ca_key_path, f"shoal local CA ({socket.gethostname()})")
            self.cert_path.unlink(missing_ok=True)
        if self._cert_current(hosts, now):
            return
        cert_pem, key_pem = sign_server_cert(self.ca_path, ca_key_path, hosts, CERT_DAYS)
        _write(self.key_path, key_pem, 0o600)
        _write(self.cert_path, cert_pem, 0o644)

    def _cert_current(self, hosts: list[str], now: datetime.datetime) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError):
            return False
        if not self.key_path.exists() or cert.not_valid_after_utc - now < RENEW_BEFORE:
            return False
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        return set(_names(hosts)) <= set(san)

    def server_context(self, alpn: list[str]) -> ssl.SSLContext:
        """A TLS server context with the tunnel certificate, offering ``alpn``."""
        return server_context(self.cert_path, self.key_path, alpn)


def server_context(cert: Path, key: Path, alpn: list[str]) -> ssl.SSLContext:
    """A TLS server context serving ``cert`` (a PEM chain) with ``key``, offering ``alpn``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(alpn)
    return ctx


def check_covers(cert: Path, name: str) -> None:
    """ValueError unless the first certificate in ``cert`` names ``name`` (e.g. ``*.example.com``) and is valid."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the tunnel certificate {cert}: {exc}") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    names = san.get_values_for_type(x509.DNSName)
    if name not in names:
        raise ValueError(f"the tunnel certificate {cert} is not for {name} (its names: {', '.join(names) or 'none'})")
    if leaf.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        raise ValueError(f"the tunnel certificate {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
