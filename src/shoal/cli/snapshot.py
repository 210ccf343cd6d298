"""``shoal snapshot``: list and remove memory snapshots of gVisor sandboxes (``sb._experimental_snapshot()``)."""

from __future__ import annotations

import functools
import time

import click
from rich.table import Table
from rich.text import Text

from shoal.cli.status import admin, age, console, print_json
from shoal.cli.volume import human_size
from shoal.sdk.admin import AdminClient


@click.group("snapshot")
def snapshot_group() -> None:
    """Memory snapshots: running gVisor sandboxes saved to be restored (forked) later."""


@snapshot_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
def ls_cmd(as_json: bool) -> None:
    """List memory snapshots, newest first: id, the sandbox it was taken of, age, size, expiry."""
    snapshots = admin(lambda a: a.memory_snapshots())
    if as_json:
        print_json(snapshots)
        return
    table = Table("SNAPSHOT", "SANDBOX", "AGE", "SIZE", "IMAGE", "EXPIRES IN", box=None, header_style="bold")
    now = time.time()
    for item in snapshots:
        expires = item.get("expires_at")
        table.add_row(
            Text(str(item["snapshot_id"])),
            Text(str(item["sandbox_id"])),
            age(now - item["created_at"]),
            human_size(item.get("size")),
            Text(str(item["image_id"])),
            age(expires - now) if expires else "never",
        )
    console().print(table)


@snapshot_group.command("rm")
@click.argument("snapshot_ids", nargs=-1, required=True, metavar="SNAPSHOT...")
def rm_cmd(snapshot_ids: tuple[str, ...]) -> None:
    """Remove memory snapshots (their filesystem images stay until `shoal image rm`)."""
    for snapshot_id in snapshot_ids:
        admin(functools.partial(AdminClient.delete_memory_snapshot, snapshot_id=snapshot_id))
        click.echo(f"removed {snapshot_id}")
