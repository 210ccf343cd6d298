"""``shoal status``: is the daemon up, and what does it hold.

Also ``admin``, the one-shot operator call that the listing commands share:
it never starts a daemon and never waits for one, so "not running" is
answered at once.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shoal import exception
from shoal.sdk.admin import AdminClient
from shoal.sdk.config import ClientConfig

T = TypeVar("T")


def admin(call: Callable[[AdminClient], Awaitable[T]]) -> T:
    """One operator call to the configured daemon; its answer, or a ClickException that says what went wrong."""

    async def run() -> T:
        client = AdminClient()
        try:
            return await call(client)
        finally:
            await client.close()

    try:
        return asyncio.run(run())
    except exception.ConnectionError as exc:
        raise click.ClickException(f"the shoal daemon is not running: {exc}") from exc
    except exception.Error as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def require_daemon() -> None:
    """Fail at once with a clear message if no daemon answers and the SDK would not start one.

    Without this, the SDK's calls keep retrying an absent daemon for a while (they
    ride out daemon restarts), which a one-shot command should not do.
    """
    cfg = ClientConfig()
    if cfg.url is None and cfg.autostart and os.geteuid() == 0:
        return  # the SDK starts a local daemon on first use
    admin(AdminClient.status)


class PlainConsole(Console):
    """Output for a pipe or a file (a script reading it): no colour, no width limit, and no padding after the
    last column (a table pads every row to its widest, which made ``shoal status`` lines ~950 columns)."""

    def __init__(self) -> None:
        super().__init__(highlight=False, width=1000, color_system=None)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        with self.capture() as captured:
            super().print(*objects, **kwargs)
        text = captured.get()
        if text:
            click.echo("\n".join(line.rstrip() for line in text.splitlines()))


def console() -> Console:
    """A console for tables: the terminal's width and colours, or plain text when output goes to a file or pipe."""
    out = Console(highlight=False)
    return out if out.is_terminal else PlainConsole()


def age(seconds: float) -> str:
    """A short human age: 42s, 5m, 3h, 2d."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (the ``--json`` form of every command)."""
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def gpu_summary(gpu: dict[str, Any]) -> str:
    """The GPU inventory in a few words: each GPU with its holder, or why there are none."""
    gpus = gpu.get("gpus") or []
    if not gpus:
        return "none" + (f" ({gpu['problem']})" if gpu.get("problem") else "")
    parts = []
    for g in gpus:
        mem = f", {g['memory_mib'] // 1024} GiB" if g.get("memory_mib") else ""
        holder = f"held by {g['held_by']}" if g.get("held_by") else "free"
        parts.append(f"{g['index']}: {g['name']}{mem}, {g['uuid']} ({holder})")
    driver = f"driver {gpu['driver_version']}, " if gpu.get("driver_version") else ""
    return f"{len(gpus)} ({driver}from {gpu.get('source', '?')}): " + "; ".join(parts)


def _capacity_summary(capacity: dict[str, Any]) -> str:
    if not capacity:
        return "?"
    text = f"{capacity['left']} more sandboxes (at most {capacity['max_sandboxes']}, {capacity['live']} live)"
    if "uid_slots_left" in capacity:
        text += f"; uid ranges: {capacity['uid_slots_left']} of {capacity['uid_slots']} free"
    if "key_quota_left" in capacity:
        text += f"; kernel key quota: {capacity['key_quota_left']} left"
    if "pids_left" in capacity:
        text += f"; processes: {capacity['pids_left']} left"
    if "memory_left_mib" in capacity:
        text += f"; memory: {capacity['memory_left_mib']} MiB left"
    if "disk_free_mib" in capacity:
        text += f"; disk: {capacity['disk_free_mib']} MiB free"
    return text


def _uid_summary(ranges: dict[str, Any]) -> str:
    if not ranges:
        return "?"
    if ranges.get("mode") == "per-sandbox":
        return f"one per sandbox ({ranges.get('note', '')})"
    return f"one shared by all sandboxes, from host id {ranges.get('first_host_id')} ({ranges.get('note', '')})"


def _tunnel_summary(tunnels: dict[str, Any]) -> str:
    if not tunnels.get("domain"):
        return "a port of their own each (no --tunnel-domain)"
    return f"<name>.{tunnels['domain']}:{tunnels['port']}, routed by name (listening on {tunnels['bind']})"


def _pool_summary(pool: dict[str, Any]) -> str:
    if not pool.get("size"):
        return "off"
    return f"{pool.get('ready', 0)} of {pool['size']} ready, {pool.get('taken', 0)} taken since start"


def _runtime_summary(runtimes: dict[str, Any]) -> str:
    """``default gvisor; runc (/usr/sbin/runc), gvisor (/usr/bin/runsc)``, or why one is missing."""
    if not runtimes:
        return "runc"
    parts = []
    for kind, about in (runtimes.get("kinds") or {}).items():
        parts.append(f"{kind} ({about['binary']})" if "binary" in about else f"{kind}: {about.get('missing', '?')}")
    return f"default {runtimes.get('default', 'runc')}; " + ", ".join(parts)


def _cluster_summary(cluster: dict[str, Any]) -> str:
    if not cluster.get("enabled"):
        return "none (shoal serve --ray joins one)"
    nodes = cluster.get("nodes") or []
    alive = sum(1 for n in nodes if n.get("alive"))
    text = f"node {cluster.get('node_name')} of {alive} alive ({len(nodes)} known), Ray at {cluster.get('ray_address')}"
    return text + (f"; link down: {cluster['problem']}" if cluster.get("problem") else "")


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="print the daemon's answer as JSON")
def status_cmd(as_json: bool) -> None:
    """Show whether the daemon runs, and its version, runtime, paths, sandboxes and images."""
    info = admin(AdminClient.status)
    if as_json:
        print_json(info)
        return
    images = info.get("images", [])
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("daemon", f"running, version {info['version']}, pid {info['pid']}"),
        ("runtime", f"{info['runtime']} ({info.get('runtime_path', '?')})"),
        ("runtimes", _runtime_summary(info.get("runtimes") or {})),
        ("socket", str(info["socket"])),
        ("data dir", str(info["data_dir"])),
        ("sandboxes", f"{info['sandboxes_running']} running"),
        ("capacity", _capacity_summary(info.get("capacity") or {})),
        ("uid ranges", _uid_summary(info.get("uid_ranges") or {})),
        ("warm pool", _pool_summary(info.get("warm_pool") or {})),
        ("images", f"{len(images)}" + (": " + ", ".join(str(i["image_id"]) for i in images) if images else "")),
        ("gpus", gpu_summary(info.get("gpu") or {})),
        ("tunnel CA", info.get("tunnel_ca") or "none (networking off)"),
        ("tunnels", _tunnel_summary(info.get("tunnels") or {})),
        ("cluster", _cluster_summary(info.get("cluster") or {})),
    ]
    for key, value in rows:
        table.add_row(key, Text(value))
    console().print(table)
