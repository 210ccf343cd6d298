"""The ``shoal`` command."""

from __future__ import annotations

import click

from shoal import __version__
from shoal.cli.serve import serve_cmd
from shoal.cli.setup import setup_cmd


@click.group()
@click.version_option(__version__, prog_name="shoal")
def cli() -> None:
    """shoal: self-hosted sandboxes for untrusted code, with Modal's Sandbox API."""


cli.add_command(serve_cmd)
cli.add_command(setup_cmd)


def main() -> None:
    """Entry point of the ``shoal`` script."""
    cli()
