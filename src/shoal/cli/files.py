"""``shoal sandbox cp`` and ``shoal sandbox ls ID PATH``: files into, out of and inside a running sandbox.

Both go through the SDK's ``sb.filesystem`` (so every sandbox path resolves inside the sandbox); only the local
path of ``cp`` is this machine's.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import stat
import time

import click
from rich.table import Table
from rich.text import Text

import shoal
from shoal.cli.run import sdk_errors
from shoal.cli.status import console, print_json, require_daemon
from shoal.exception import SandboxFilesystemNotADirectoryError

REMOTE = re.compile(r"\A(sb-[A-Za-z0-9]+):(.*)\Z", re.DOTALL)


def _remote(arg: str) -> tuple[str, str] | None:
    m = REMOTE.match(arg)
    return (m.group(1), m.group(2)) if m else None


@click.command("cp")
@click.argument("source")
@click.argument("destination")
def cp_cmd(source: str, destination: str) -> None:
    """Copy a file into a sandbox (cp LOCAL ID:PATH) or out of one (cp ID:PATH LOCAL).

    PATH is absolute.  A destination that is a directory (locally), or that ends with '/' (in the sandbox),
    receives the file under its own name.  Copies stream, and a local destination appears complete or not at all.

    Example: shoal sandbox cp ./data.csv sb-...:/tmp/data.csv
    """
    src, dst = _remote(source), _remote(destination)
    if (src is None) == (dst is None):
        raise click.UsageError("exactly one of SOURCE and DESTINATION must be ID:PATH (a sandbox id, ':', a path)")
    require_daemon()
    with sdk_errors():
        if dst is not None:
            sandbox_id, path = dst
            if path.endswith("/"):
                path += os.path.basename(source)
            if not os.path.isfile(source):
                raise click.ClickException(f"{source}: not a file")
            shoal.Sandbox.from_id(sandbox_id).filesystem.copy_from_local(source, path)
        else:
            assert src is not None
            sandbox_id, path = src
            local = destination
            if os.path.isdir(local):
                local = os.path.join(local, posixpath.basename(path.rstrip("/")))
            try:
                shoal.Sandbox.from_id(sandbox_id).filesystem.copy_to_local(path, local)
            except OSError as exc:
                raise click.ClickException(str(exc)) from exc


def list_files(sandbox_id: str, path: str, as_json: bool) -> None:
    """``shoal sandbox ls ID PATH``: the entries of a directory in a sandbox (or one file's)."""
    require_daemon()
    with sdk_errors():
        fs = shoal.Sandbox.from_id(sandbox_id).filesystem
        info = fs.stat(path)
        entries = [info]
        if info.is_dir() or info.is_symlink():
            try:
                entries = fs.list_files(path)  # a symlink to a directory lists the directory, as ls does
            except SandboxFilesystemNotADirectoryError:
                if info.is_dir():
                    raise
    if as_json:
        print_json([{**dataclasses.asdict(e), "type": e.type.value} for e in entries])
        return
    table = Table("MODE", "OWNER", "GROUP", "SIZE", "MODIFIED", "NAME", box=None, header_style="bold")
    for e in entries:
        name = Text(e.name)
        if e.symlink_target is not None:
            name.append(f" -> {e.symlink_target}")
        table.add_row(
            stat.filemode(e.mode),
            Text(e.owner),
            Text(e.group),
            str(e.size),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e.modified_time)),
            name,
        )
    console().print(table)
