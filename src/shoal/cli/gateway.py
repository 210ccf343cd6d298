"""``shoal gateway``: the daemon's gateway for the official ``modal`` client."""

from __future__ import annotations

import shlex

import click

from shoal.cli.status import admin
from shoal.sdk.admin import AdminClient


@click.group("gateway")
def gateway_group() -> None:
    """The gateway that serves the unmodified official modal client."""


@click.command("env")
def env_cmd() -> None:
    """Print the `export` lines that point the official modal client at this daemon: eval "$(shoal gateway env)"."""
    env = admin(AdminClient.gateway_env)
    for name, value in env.items():
        click.echo(f"export {name}={shlex.quote(value)}")


gateway_group.add_command(env_cmd)
