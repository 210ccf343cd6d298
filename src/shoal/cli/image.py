"""``shoal image``: list, remove and prune the daemon's images; import a root filesystem directory as one."""

from __future__ import annotations

import functools
import shlex
import time
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from shoal.cli.status import admin, age, console, print_json
from shoal.cli.volume import human_size
from shoal.sdk.admin import AdminClient


@click.group("image")
def image_group() -> None:
    """Images that sandboxes start from."""


@image_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
@click.option("-a", "--all", "show_all", is_flag=True, help="also show intermediate images of build steps")
def ls_cmd(as_json: bool, show_all: bool) -> None:
    """List images (id, what made it, age, layers, size) and the image store's disk use."""
    store = admin(AdminClient.image_store)
    images = store["images"]
    if not show_all:
        parents = {i["recipe"].get("parent") for i in images if i["recipe"].get("kind") == "step"}
        images = [i for i in images if i["recipe"].get("kind") != "step" or i["image_id"] not in parents]
    if as_json:
        print_json(images)
        return
    table = Table("IMAGE", "KIND", "AGE", "LAYERS", "SIZE", "IN USE", "SOURCE", box=None, header_style="bold")
    now = time.time()
    for item in images:
        recipe = item.get("recipe") or {}
        source = (
            recipe.get("step") or recipe.get("path") or (f"python {recipe['python']}" if recipe.get("python") else "")
        )
        table.add_row(
            Text(str(item["image_id"])),
            Text(str(recipe.get("kind", "?"))),
            age(now - item["created_at_us"] / 1e6),
            str(len(item.get("layers", []))),
            human_size(item.get("size")),
            "yes" if item.get("in_use") else "",
            Text(str(source)[:80]),
        )
    out = console()
    out.print(table)
    out.print(
        f"{len(store['images'])} images, {store['layers']} layers using {human_size(store['layer_bytes'])}"
        f" in {store['path']}; {human_size(store['reclaimable_bytes'])} reclaimable with `shoal image prune`;"
        f" {human_size(store['disk_free_bytes'])} free on its disk",
        highlight=False,
    )


@image_group.command("rm")
@click.argument("image_ids", nargs=-1, required=True, metavar="IMAGE...")
def rm_cmd(image_ids: tuple[str, ...]) -> None:
    """Remove images, and their layers that no other image or sandbox uses."""
    for image_id in image_ids:
        r = admin(functools.partial(AdminClient.remove_image, image_id=image_id))
        click.echo(f"removed {image_id} ({r['removed_layers']} layers, {human_size(r['freed_bytes'])} freed)")


@image_group.command("prune")
@click.option("--all", "everything", is_flag=True, help="first remove every image that no running sandbox uses")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def prune_cmd(everything: bool, as_json: bool) -> None:
    """Remove layers that no image, sandbox or build uses (and uploaded build files)."""
    r = admin(lambda a: a.prune_images(everything))
    if as_json:
        print_json(r)
        return
    images = f"{r['removed_images']} images, " if everything else ""
    click.echo(
        f"removed {images}{r['removed_layers']} layers and {r['removed_contexts']} build contexts;"
        f" {human_size(r['freed_bytes'])} freed"
    )


@image_group.command("import")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cmd", metavar="COMMAND", help="default command of the image, split like a shell would")
@click.option("--workdir", metavar="DIR", help="default working directory of the image")
def import_cmd(path: Path, cmd: str | None, workdir: str | None) -> None:
    """Import PATH, a root filesystem directory on this host, as a new image; prints its id.

    Example: IMAGE=$(shoal image import ./rootfs --cmd 'sh -c "sleep infinity"')
    """
    argv = None
    if cmd is not None:
        argv = shlex.split(cmd)
        if not argv:
            raise click.BadParameter("must not be empty", param_hint="--cmd")
    click.echo(admin(lambda a: a.import_image(str(path.resolve()), argv, workdir)))
