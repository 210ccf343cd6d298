"""``shoal dashboard``: the URL that opens the daemon's web dashboard, signed in."""

from __future__ import annotations

import os
import webbrowser

import click

from shoal.cli.status import admin
from shoal.sdk.admin import AdminClient


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or os.uname().sysname == "Darwin"


@click.command("dashboard")
@click.option("--no-browser", is_flag=True, help="only print the URL, even where a browser could open it")
def dashboard_cmd(no_browser: bool) -> None:
    """Print the URL that opens the web dashboard signed in (and open it in a browser when there is one).

    The URL holds the dashboard's secret token: share it only with whoever may run code in sandboxes.  The
    dashboard listens on loopback; from another machine, forward the port (ssh -L 8720:127.0.0.1:8720 host).
    """
    info = admin(AdminClient.dashboard)
    click.echo(info["login_url"])
    if not no_browser and _has_display():
        webbrowser.open(info["login_url"])
