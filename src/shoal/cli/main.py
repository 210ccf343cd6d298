"""The ``shoal`` command."""

from __future__ import annotations

import click

from shoal.cli.cluster import cluster_group
from shoal.cli.dashboard import dashboard_cmd
from shoal.cli.gateway import gateway_group
from shoal.cli.image import image_group
from shoal.cli.run import run_cmd
from shoal.cli.sandbox import sandbox_group
from shoal.cli.secret import secret_group
from shoal.cli.serve import serve_cmd
from shoal.cli.setup import setup_cmd
from shoal.cli.snapshot import snapshot_group
from shoal.cli.status import status_cmd
from shoal.cli.trust import trust_cmd
from shoal.cli.volume import volume_group
from shoal.wire.version import __version__


@click.group()
@click.version_option(__version__, prog_name="shoal")
def cli() -> None:
    """shoal: self-hosted sandboxes for untrusted code, with Modal's Sandbox API."""


cli.add_command(serve_cmd)
cli.add_command(setup_cmd)
cli.add_command(run_cmd)
cli.add_command(sandbox_group)
cli.add_command(image_group)
cli.add_command(snapshot_group)
cli.add_command(status_cmd)
cli.add_command(volume_group)
cli.add_command(secret_group)
cli.add_command(trust_cmd)
cli.add_command(gateway_group)
cli.add_command(dashboard_cmd)
cli.add_command(cluster_group)


def main() -> None:
    """Entry point of the ``shoal`` script."""
    cli()
