"""``shoal volume``: create, list (with disk use) and remove volumes; put, get and list their files."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from shoal.cli.status import admin, age, console, print_json, require_daemon
from shoal.exception import Error
from shoal.sdk.admin import AdminClient
from shoal.sdk.volume import Volume
from shoal.types import FileEntryType


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Show shoal's and the file API's errors as one line and exit 1."""
    try:
        yield
    except (Error, FileNotFoundError, FileExistsError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def human_size(n: int | None) -> str:
    """1536 → '1.5 KiB'."""
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@click.group("volume")
def volume_group() -> None:
    """Volumes: persistent directories that sandboxes mount."""


@volume_group.command("create")
@click.argument("name")
def create_cmd(name: str) -> None:
    """Create the volume NAME."""
    admin(lambda a: a.create_volume(name))
    click.echo(name)


@volume_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
def ls_cmd(as_json: bool) -> None:
    """List named volumes with the disk space their files use, newest first."""
    items = admin(AdminClient.volumes)
    if as_json:
        print_json(items)
        return
    table = Table("NAME", "VOLUME", "SIZE", "AGE", box=None, header_style="bold")
    now = time.time()
    for item in items:
        table.add_row(
            Text(str(item["name"])),
            Text(str(item["volume_id"])),
            human_size(item.get("size_bytes")),
            age(now - item["created_at_us"] / 1e6),
        )
    console().print(table)


@volume_group.command("rm")
@click.argument("name")
@click.option("--allow-missing", is_flag=True, help="no error if there is no such volume")
def rm_cmd(name: str, allow_missing: bool) -> None:
    """Delete the volume NAME and every file in it."""
    admin(lambda a: a.delete_volume(name, allow_missing))


@volume_group.command("put")
@click.argument("name")
@click.argument("local_path", type=click.Path(exists=True, path_type=Path))
@click.argument("remote_path", default="/")
@click.option("--force", is_flag=True, help="overwrite files that exist")
def put_cmd(name: str, local_path: Path, remote_path: str, force: bool) -> None:
    """Upload LOCAL_PATH (a file or a directory) into the volume NAME at REMOTE_PATH.

    A REMOTE_PATH ending in '/' (the default, '/') receives the file under its own name.
    """
    require_daemon()
    with _errors():
        vol = Volume.from_name(name)
        with vol.batch_upload(force=force) as batch:
            if local_path.is_dir():
                batch.put_directory(local_path, remote_path)
            else:
                remote = remote_path + local_path.name if remote_path.endswith("/") else remote_path
                batch.put_file(local_path, remote)


@volume_group.command("get")
@click.argument("name")
@click.argument("remote_path")
@click.argument("local_path", default="-")
@click.option("--force", is_flag=True, help="overwrite LOCAL_PATH if it exists")
def get_cmd(name: str, remote_path: str, local_path: str, force: bool) -> None:
    """Download the file REMOTE_PATH of the volume NAME to LOCAL_PATH ('-', the default: standard output)."""
    require_daemon()
    with _errors():
        vol = Volume.from_name(name)
        if local_path == "-":
            out = sys.stdout.buffer
            for chunk in vol.read_file(remote_path):
                out.write(chunk)
            out.flush()
            return
        dest = Path(local_path)
        if dest.is_dir():
            dest = dest / Path(remote_path).name
        if dest.exists() and not force:
            raise click.ClickException(f"{dest} exists; pass --force to overwrite it")
        partial = dest.with_name(f".{dest.name}.partial")
        try:
            with open(partial, "wb") as f:
                vol.read_file_into_fileobj(remote_path, f)
            partial.replace(dest)
        finally:
            partial.unlink(missing_ok=True)


@volume_group.command("ls-files")
@click.argument("name")
@click.argument("path", default="/")
@click.option("-r", "--recursive", is_flag=True, help="list everything below PATH")
@click.option("--json", "as_json", is_flag=True, help="print the entries as JSON")
def ls_files_cmd(name: str, path: str, recursive: bool, as_json: bool) -> None:
    """List the files of the volume NAME under PATH."""
    require_daemon()
    with _errors():
        entries = Volume.from_name(name).listdir(path, recursive=recursive)
    if as_json:
        print_json([{"path": e.path, "type": e.type.name.lower(), "size": e.size, "mtime": e.mtime} for e in entries])
        return
    table = Table("PATH", "TYPE", "SIZE", "MODIFIED", box=None, header_style="bold")
    for e in sorted(entries, key=lambda e: e.path):
        shown = e.path + ("/" if e.type == FileEntryType.DIRECTORY else "")
        table.add_row(
            Text(shown),
            e.type.name.lower(),
            "" if e.type == FileEntryType.DIRECTORY else human_size(e.size),
            datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M"),
        )
    console().print(table)
