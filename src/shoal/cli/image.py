"""``shoal image``: list the daemon's images and import a root filesystem directory as a new one."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from shoal.cli.status import age, call_daemon, console, print_json


@click.group("image")
def image_group() -> None:
    """Images that sandboxes start from."""


@image_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
def ls_cmd(as_json: bool) -> None:
    """List images: id, kind, age and layers."""
    images = call_daemon("GET", "/v1/images")["images"]
    if as_json:
        print_json(images)
        return
    table = Table("IMAGE", "KIND", "AGE", "LAYERS", "SOURCE", box=None, header_style="bold")
    now = time.time()
    for item in images:
        recipe = item.get("recipe") or {}
        source = recipe.get("path") or (f"python {recipe['python']}" if recipe.get("python") else "")
        table.add_row(
            Text(str(item["image_id"])),
            Text(str(recipe.get("kind", "?"))),
            age(now - float(item["created_at"])),
            str(len(item.get("layers", []))),
            Text(str(source)),
        )
    console().print(table)


@image_group.command("import")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cmd", metavar="COMMAND", help="default command of the image, split like a shell would")
@click.option("--workdir", metavar="DIR", help="default working directory of the image")
def import_cmd(path: Path, cmd: str | None, workdir: str | None) -> None:
    """Import PATH, a root filesystem directory on this host, as a new image; prints its id.

    Example: IMAGE=$(shoal image import ./rootfs --cmd 'sh -c "sleep infinity"')
    """
    body: dict[str, object] = {"path": str(path.resolve())}
    if cmd is not None:
        argv = shlex.split(cmd)
        if not argv:
            raise click.BadParameter("must not be empty", param_hint="--cmd")
        body["cmd"] = argv
    if workdir is not None:
        body["workdir"] = workdir
    click.echo(call_daemon("POST", "/v1/images/import", json_body=body)["image_id"])
