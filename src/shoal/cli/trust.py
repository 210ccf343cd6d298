"""``shoal trust``: add the local CA that signs tunnel certificates to this machine's trust store.

Python's ``ssl`` (``urllib``, ``http.client``, ``aiohttp``, ``websockets``), curl and most system tools read
that store; libraries that bring their own CA bundle (``requests`` and ``httpx`` through certifi,
``websocket-client``) are pointed at it with the environment variables the command prints.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import click

from shoal.cli.status import admin
from shoal.sdk.admin import AdminClient

DEBIAN_DIR = Path("/usr/local/share/ca-certificates")
"""Where Debian's ``update-ca-certificates`` takes local CAs from (``.crt`` files)."""
DEBIAN_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
REDHAT_DIR = Path("/etc/pki/ca-trust/source/anchors")
"""Where Fedora's ``update-ca-trust`` takes them from."""
REDHAT_BUNDLE = Path("/etc/pki/tls/certs/ca-bundle.crt")
NAME = "shoal-local-ca.crt"


def _store() -> tuple[Path, list[str], Path]:
    """(anchor directory, refresh command, bundle file) of this system's trust store."""
    if shutil.which("update-ca-certificates"):
        return DEBIAN_DIR, ["update-ca-certificates"], DEBIAN_BUNDLE
    if shutil.which("update-ca-trust"):
        return REDHAT_DIR, ["update-ca-trust", "extract"], REDHAT_BUNDLE
    raise click.ClickException(
        "no system trust store tool found (update-ca-certificates or update-ca-trust): install ca-certificates,"
        " or trust the CA file per client (e.g. REQUESTS_CA_BUNDLE=<ca.pem>)"
    )


def _ca_file(ca: str | None) -> Path:
    if ca:
        return Path(ca)
    path = admin(AdminClient.status).get("tunnel_ca")
    if not path:
        raise click.ClickException("the daemon has networking off, so it has no tunnels and no tunnel CA")
    return Path(path)


@click.command("trust")
@click.option("--ca", type=click.Path(dir_okay=False), help="the CA certificate (default: the daemon's, from status)")
@click.option("--remove", is_flag=True, help="take the CA out of the trust store again")
def trust_cmd(ca: str | None, remove: bool) -> None:
    """Trust shoal's tunnel certificates on this machine (adds the local CA to the system store; as root)."""
    if os.geteuid() != 0:
        raise click.ClickException("changing the system trust store needs root: run it with sudo")
    anchors, refresh, bundle = _store()
    target = anchors / NAME
    if remove:
        target.unlink(missing_ok=True)
        _refresh(refresh)
        click.echo(f"removed shoal's local CA from the system trust store ({target})")
        return
    source = _ca_file(ca)
    try:
        pem = source.read_bytes()
    except OSError as exc:
        raise click.ClickException(
            f"cannot read the tunnel CA at {source}: {exc.strerror} (a daemon on another machine: copy its"
            " ca.pem here and pass --ca FILE)"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise click.ClickException(f"{source} is not a PEM certificate")
    anchors.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(pem)
    tmp.chmod(0o644)
    tmp.replace(target)
    _refresh(refresh)
    click.echo(f"added shoal's local CA to the system trust store ({target}).")
    click.echo("Python's ssl, urllib, aiohttp, curl and other clients of the system store trust tunnels now.")
    click.echo("Clients with a CA bundle of their own read these (put them in your shell profile):")
    click.echo(f"export REQUESTS_CA_BUNDLE={bundle}  # requests (certifi)")
    click.echo(f"export SSL_CERT_FILE={bundle}  # httpx, and OpenSSL-based clients")
    click.echo(f"export WEBSOCKET_CLIENT_CA_BUNDLE={bundle}  # websocket-client")
    click.echo(f"export NODE_EXTRA_CA_CERTS={target}  # Node.js")


def _refresh(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
