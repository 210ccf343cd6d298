"""``shoal cluster``: the nodes of the cluster the daemon belongs to (``shoal serve --ray``, decision 0077)."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from shoal.cli.status import admin, console, print_json
from shoal.sdk.admin import AdminClient


@click.group("cluster")
def cluster_group() -> None:
    """The cluster of daemons this one belongs to."""


@cluster_group.command("nodes")
@click.option("--json", "as_json", is_flag=True, help="print the nodes as JSON")
def nodes_cmd(as_json: bool) -> None:
    """List the cluster's nodes: alive or not, where their API is, their labels and load."""
    info = admin(AdminClient.cluster)
    if as_json:
        print_json(info)
        return
    if not info.get("enabled"):
        raise click.ClickException("this daemon is not in a cluster: start it with `shoal serve --ray ADDRESS`")
    if info.get("problem"):
        click.echo(f"the link to Ray at {info.get('ray_address')} is down: {info['problem']}", err=True)
    table = Table("NODE", "ALIVE", "URL", "SANDBOXES", "LABELS", box=None, header_style="bold")
    for node in info.get("nodes", []):
        labels = ",".join(f"{k}={v}" for k, v in sorted(node.get("labels", {}).items()))
        table.add_row(
            Text(str(node["name"]) + (" (this)" if node.get("this") else "")),
            "yes" if node.get("alive") else "no",
            Text(str(node.get("url") or "")),
            f"{node.get('live', 0)}/{node.get('slots', 0)}",
            Text(labels),
        )
    console().print(table)
