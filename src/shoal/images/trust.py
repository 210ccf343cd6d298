"""Trust the host's extra CA certificates in images (TLS-inspecting proxies, private registries).

Many hosts reach the internet through a proxy that re-signs TLS with its own
CA, installed in the host's trust store (``/usr/local/share/ca-certificates``,
the ``update-ca-certificates`` convention).  Without that CA, ``pip install``
in a sandbox fails with a certificate error.  So, by default, every image the
daemon takes from outside (``debian_slim``, registry images) gets one small
layer on top, built on the host:

* the host's certificates under ``/usr/local/share/ca-certificates/shoal-host/``
  (so a later ``update-ca-certificates`` in the image keeps them);
* appended to each CA bundle the image already has (Debian/Ubuntu/Alpine,
  RHEL/Fedora, SUSE paths), or a new Debian-path bundle when it has none;
* ``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``, ``PIP_CERT`` and
  ``NODE_EXTRA_CA_CERTS`` pointing at that bundle, for clients that carry
  their own (``certifi``, uv, Node).

The layer's cache key is the certificates' names and hashes: a changed host
store gives a new layer.  ``shoal serve --no-host-cas`` (``Config.trust_host_cas``)
turns this off.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from shoal.images import inroot
from shoal.wire.recipe import HostCasStep

DEFAULT_CA_DIR = Path("/usr/local/share/ca-certificates")
BUNDLES = [
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
    "etc/ssl/ca-bundle.pem",
    "etc/ssl/cert.pem",
]
"""CA bundle paths of the common distributions; the first is where a missing bundle is created."""
IMAGE_CA_DIR = "usr/local/share/ca-certificates/shoal-host"
ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS")
MAX_CERT_BYTES = 1 << 20
PEM_MARKER = b"-----BEGIN CERTIFICATE-----"


def host_certs(ca_dir: Path) -> list[tuple[str, bytes]]:
    """``(name, PEM bytes)`` of each ``*.crt`` under ``ca_dir`` (recursively), sorted; unreadable or
    non-PEM files are skipped."""
    out: list[tuple[str, bytes]] = []
    if not ca_dir.is_dir():
        return out
    for path in sorted(ca_dir.rglob("*.crt")):
        try:
            if not path.is_file() or path.stat().st_size > MAX_CERT_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if PEM_MARKER not in data:
            continue
        name = path.relative_to(ca_dir).as_posix().replace("/", "_")
        out.append((name, data))
    return out


def step_for(certs: list[tuple[str, bytes]]) -> HostCasStep:
    """The build step that installs ``certs`` (its key covers their names and hashes)."""
    return HostCasStep(certs=[(name, hashlib.sha256(data).hexdigest()) for name, data in certs])


def install(root_fd: int, certs: list[tuple[str, bytes]], owner: int) -> dict[str, str]:
    """Put ``certs`` into the image mounted at ``root_fd``; returns the environment to add."""
    parts = inroot.split(IMAGE_CA_DIR)
    d = inroot.make_dirs(root_fd, parts, owner, owner)
    try:
        for name, data in certs:
            inroot.write_file(d, name, data, 0o644, owner, owner)
    finally:
        os.close(d)
    extra = b"".join(data if data.endswith(b"\n") else data + b"\n" for _, data in certs)
    primary: str | None = None
    for bundle in BUNDLES:
        bparts = inroot.split(bundle)
        parent = _parent_if_regular(root_fd, bparts)
        if parent is None:
            continue
        try:
            current = inroot.read_file(root_fd, bparts) or b""
            if current and not current.endswith(b"\n"):
                current += b"\n"
            inroot.write_file(parent, bparts[-1], current + extra, 0o644, owner, owner)
        finally:
            os.close(parent)
        primary = primary or bundle
    if primary is None:
        primary = BUNDLES[0]
        bparts = inroot.split(primary)
        parent = inroot.make_dirs(root_fd, bparts[:-1], owner, owner)
        try:
            inroot.write_file(parent, bparts[-1], extra, 0o644, owner, owner)
        finally:
            os.close(parent)
    return dict.fromkeys(ENV_VARS, "/" + primary)


def _parent_if_regular(root_fd: int, parts: list[str]) -> int | None:
    """The parent directory's descriptor if ``parts`` names a regular file there (not a link), else None.

    A bundle that is a symlink is skipped: the file it points to is one of the
    other bundle paths, or is left alone.
    """
    try:
        parent = inroot.open_dir(root_fd, parts[:-1])
    except OSError:
        return None
    st = inroot.lstat_in(parent, parts[-1])
    if st is None or not stat.S_ISREG(st.st_mode):
        os.close(parent)
        return None
    return parent
