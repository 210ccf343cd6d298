"""``shoal sandbox``: list sandboxes, run a command in one, read its entrypoint's output, terminate it."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import BinaryIO

import click
from rich.table import Table
from rich.text import Text

import shoal
from shoal.cli.files import cp_cmd, list_files
from shoal.cli.run import INTERRUPTED_EXIT, MAX_TIMEOUT, copy_stream, exit_code, parse_env, sdk_errors, stream_process
from shoal.cli.status import admin, age, console, print_json, require_daemon
from shoal.cli.terminal import run_interactive
from shoal.sdk.admin import AdminClient
from shoal.wire.sandboxes import INTERACTIVE_SHELL, SandboxState

LOGS_IDLE = 0.5
"""Without --follow: stop once a stream has been quiet this long (the daemon streams until the process ends)."""


@click.group("sandbox")
def sandbox_group() -> None:
    """Sandboxes on this daemon."""


sandbox_group.add_command(cp_cmd)


@sandbox_group.command("ls")
@click.argument("sandbox_id", required=False)
@click.argument("path", required=False)
@click.option("--app-id", help="only this app's sandboxes")
@click.option("--all", "include_finished", is_flag=True, help="include finished sandboxes")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
def ls_cmd(sandbox_id: str | None, path: str | None, app_id: str | None, include_finished: bool, as_json: bool) -> None:
    """List running sandboxes (with --all, finished ones too), newest first; or, given ID [PATH], the files in
    a sandbox's directory PATH (default /)."""
    if sandbox_id is not None:
        list_files(sandbox_id, path or "/", as_json)
        return
    items = admin(lambda a: a.sandboxes(app_id, include_finished))
    if as_json:
        print_json(items)
        return
    clustered = any(item.get("node") for item in items)
    columns = ["SANDBOX", "APP", "NAME", "STATE", "RUNTIME", *(["NODE"] if clustered else []), "AGE", "RETURNCODE"]
    table = Table(*columns, "TAGS", box=None, header_style="bold")
    table.columns[0].no_wrap = True
    now = time.time()
    for item in items:
        rc = item.get("returncode")
        tags = ",".join(f"{k}={v}" for k, v in sorted(item.get("tags", {}).items()))
        table.add_row(
            Text(str(item["sandbox_id"])),
            Text(str(item["app_id"])),
            Text(item.get("name") or ""),
            Text(str(item["state"])),
            Text(str(item.get("runtime", "runc"))),
            *([Text(str(item.get("node") or ""))] if clustered else []),
            age(now - item["created_at_us"] / 1e6),
            "" if rc is None else str(rc),
            Text(tags),
        )
    console().print(table)


@sandbox_group.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("sandbox_id")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--workdir", metavar="DIR", help="absolute working directory for the command")
@click.option("--env", "env", multiple=True, metavar="K=V", callback=parse_env, help="environment (repeatable)")
@click.option("--timeout", type=click.IntRange(1, MAX_TIMEOUT), help="kill the command after this many seconds")
@click.option("-i", "--interactive", "--stdin", "stdin", is_flag=True, help="send our standard input to the command")
@click.option("-t", "--tty", is_flag=True, help="run the command on a terminal sized as ours (with -i: raw keys)")
def exec_cmd(
    sandbox_id: str,
    cmd: tuple[str, ...],
    workdir: str | None,
    env: dict[str, str],
    timeout: int | None,
    stdin: bool,
    tty: bool,
) -> None:
    """Run CMD in a running sandbox, stream its output, and exit with its code.

    Options go before ID; everything after ID is the command.  With -it, CMD gets a terminal and our keys, as
    with docker exec -it.

    Example: shoal sandbox exec --workdir /tmp sb-... -- ls -l
    """
    if cmd[0] == "--":  # options end at ID, so the parser left the separator in
        cmd = cmd[1:]
    if not cmd:
        raise click.UsageError("missing the command to run after ID")
    require_daemon()
    if tty:
        _interactive(sandbox_id, list(cmd), workdir=workdir, env=dict(env), timeout=timeout, stdin=stdin)

    async def main() -> int:
        sb = await shoal.Sandbox.from_id.aio(sandbox_id)
        proc = await sb.exec.aio(*cmd, text=False, workdir=workdir, env=dict(env), timeout=timeout)
        return exit_code(await stream_process(proc, sys.stdin.buffer if stdin else None))

    try:
        with sdk_errors():
            code = asyncio.run(main())
    except KeyboardInterrupt:
        code = INTERRUPTED_EXIT
    sys.exit(code)


def _interactive(
    sandbox_id: str,
    cmd: list[str],
    *,
    workdir: str | None = None,
    env: dict[str, str] | None = None,
    timeout: int | None = None,
    stdin: bool = True,
) -> None:
    with sdk_errors():
        code = asyncio.run(run_interactive(sandbox_id, cmd, workdir=workdir, env=env, timeout=timeout, stdin=stdin))
    sys.exit(exit_code(code))


@sandbox_group.command("shell")
@click.argument("sandbox_id")
@click.option("--cmd", metavar="COMMAND", help="what to run (a shell command line; default: bash, else sh)")
@click.option("--workdir", metavar="DIR", help="absolute working directory")
@click.option("--env", "env", multiple=True, metavar="K=V", callback=parse_env, help="environment (repeatable)")
def shell_cmd(sandbox_id: str, cmd: str | None, workdir: str | None, env: dict[str, str]) -> None:
    """Open a shell in a running sandbox, on a terminal sized as ours; exit with its code.

    Example: shoal sandbox shell sb-... --cmd 'python3'
    """
    require_daemon()
    argv = list(INTERACTIVE_SHELL) if cmd is None else ["/bin/sh", "-c", cmd]
    _interactive(sandbox_id, argv, workdir=workdir, env=env)


async def _copy_until_quiet(reader: shoal.StreamReader[bytes], out: BinaryIO, idle: float) -> None:
    """Copy what the stream has now: stop at its end or once nothing came for ``idle`` seconds."""
    chunks = aiter(reader)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), idle)
        except (StopAsyncIteration, TimeoutError):
            return
        out.write(chunk)
        out.flush()


async def _logs(sandbox_id: str, follow: bool) -> None:
    client = AdminClient.of_sdk()
    info = await client.sandbox(sandbox_id)
    quiet = not follow and info["state"] != SandboxState.FINISHED
    copies = []
    for fd, out in ((1, sys.stdout.buffer), (2, sys.stderr.buffer)):
        reader = client.entrypoint_output(sandbox_id, fd)
        copies.append(_copy_until_quiet(reader, out, LOGS_IDLE) if quiet else copy_stream(aiter(reader), out))
    await asyncio.gather(*copies)


@sandbox_group.command("logs")
@click.argument("sandbox_id")
@click.option("-f", "--follow", is_flag=True, help="keep printing until the entrypoint ends")
def logs_cmd(sandbox_id: str, follow: bool) -> None:
    """Print the output of a sandbox's entrypoint (stdout to stdout, stderr to stderr)."""
    require_daemon()
    try:
        with sdk_errors():
            asyncio.run(_logs(sandbox_id, follow))
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED_EXIT)


@sandbox_group.command("terminate")
@click.argument("sandbox_id")
def terminate_cmd(sandbox_id: str) -> None:
    """Stop a sandbox now; it finishes with return code 137."""
    require_daemon()
    with sdk_errors():
        sb = shoal.Sandbox.from_id(sandbox_id)
        before = sb.returncode
        code = sb.terminate(wait=True)
    if before is not None:
        click.echo(f"{sandbox_id} had already finished (return code {before})")
    else:
        click.echo(f"{sandbox_id} terminated (return code {code})")
