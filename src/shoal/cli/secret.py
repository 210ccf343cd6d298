"""``shoal secret``: create, list and remove named secrets.  Nothing here ever prints a value."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from shoal.cli.status import admin, age, console, print_json
from shoal.sdk.admin import AdminClient
from shoal.sdk.secret import parse_dotenv


@click.group("secret")
def secret_group() -> None:
    """Named secrets: environment variables stored encrypted by the daemon."""


@secret_group.command("create")
@click.argument("name")
@click.argument("pairs", nargs=-1, metavar="KEY=VALUE...")
@click.option(
    "--from-dotenv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="read KEY=VALUE lines from this .env file (keeps values out of the process list)",
)
@click.option("--force", is_flag=True, help="replace the secret if it exists")
def create_cmd(name: str, pairs: tuple[str, ...], from_dotenv: Path | None, force: bool) -> None:
    """Store the secret NAME with KEY=VALUE pairs.

    Values given on the command line are visible to other users in the process
    list while the command runs; prefer --from-dotenv on shared machines.
    """
    env: dict[str, str] = parse_dotenv(from_dotenv.read_text()) if from_dotenv else {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            # Never echo the argument: it may be a value typed in the wrong place.
            raise click.BadParameter("expected KEY=VALUE pairs; one argument has no KEY= before its value")
        env[key] = value
    if not env:
        raise click.UsageError("give at least one KEY=VALUE (or --from-dotenv FILE)")
    if force:
        admin(lambda a: a.delete_secret(name, allow_missing=True))
    admin(lambda a: a.create_secret(name, env))
    click.echo(f"{name} ({len(env)} key{'s' if len(env) != 1 else ''})")


@secret_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
def ls_cmd(as_json: bool) -> None:
    """List named secrets (names and dates; never values), newest first."""
    items = admin(AdminClient.secrets)
    if as_json:
        print_json(items)
        return
    table = Table("NAME", "SECRET", "CREATED", "UPDATED", box=None, header_style="bold")
    now = time.time()
    for item in items:
        table.add_row(
            Text(str(item["name"])),
            Text(str(item["secret_id"])),
            age(now - item["created_at_us"] / 1e6),
            age(now - item["updated_at_us"] / 1e6),
        )
    console().print(table)


@secret_group.command("rm")
@click.argument("name")
@click.option("--allow-missing", is_flag=True, help="no error if there is no such secret")
def rm_cmd(name: str, allow_missing: bool) -> None:
    """Delete the secret NAME (running sandboxes keep the values they started with)."""
    admin(lambda a: a.delete_secret(name, allow_missing))
