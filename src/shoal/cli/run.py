"""``shoal run``: create a sandbox, run one command in it, stream its output, exit with its code.

Also home of what ``shoal sandbox exec`` shares with it: copying a process's
stdout and stderr to ours as bytes arrive, feeding it our stdin, and turning
its return code into ours.  Everything runs on one event loop with the SDK's
``.aio`` forms; the sandbox is terminated on every way out (exit, error,
Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, BinaryIO

import click

import shoal
from shoal.cli.status import require_daemon
from shoal.cli.terminal import run_interactive
from shoal.exception import Error
from shoal.sdk import output as shoal_output

TIMEOUT_EXIT = 124
"""What timeout(1) exits with when the command ran out of time."""
INTERRUPTED_EXIT = 130
TERMINATED_EXIT = 143
SANDBOX_GRACE = 30
"""Seconds the sandbox outlives the command's own timeout, so the command's timeout fires first."""
MAX_TIMEOUT = 24 * 3600
CHUNK = 1 << 16


@contextlib.contextmanager
def sdk_errors() -> Iterator[None]:
    """Show shoal's errors as one clear line and exit 1, instead of a traceback."""
    try:
        yield
    except Error as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def parse_env(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """``--env K=V`` options as a dict."""
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx=ctx, param=param)
        env[key] = value
    return env


def exit_code(returncode: int) -> int:
    """Our exit status for a process's return code (-1, its timeout, becomes 124 as with timeout(1))."""
    if returncode == -1:
        return TIMEOUT_EXIT
    return returncode if 0 <= returncode <= 255 else 1


async def copy_stream(reader: AsyncIterator[bytes], out: BinaryIO) -> None:
    """Write chunks to ``out`` as they arrive; once its reader has gone (a closed pipe), drop them."""
    broken = False
    async for chunk in reader:
        if broken:
            continue
        try:
            out.write(chunk)
            out.flush()
        except BrokenPipeError:
            broken = True


def _read_stdin(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes], source: BinaryIO) -> None:
    """Thread body: our stdin into ``queue``, ending with b"" (a thread, as a blocked read cannot be cancelled)."""
    while True:
        try:
            data = source.read1(CHUNK)  # type: ignore[attr-defined]
        except (OSError, ValueError):
            data = b""
        loop.call_soon_threadsafe(queue.put_nowait, bytes(data))
        if not data:
            return


async def _feed(proc: shoal.ContainerProcess[Any], source: BinaryIO) -> None:
    """Forward ``source`` to the process's stdin, then close it."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=0)
    loop = asyncio.get_running_loop()
    threading.Thread(target=_read_stdin, args=(loop, queue, source), name="shoal-stdin", daemon=True).start()
    with contextlib.suppress(Error):  # a process that stopped reading is no error of ours: its code tells
        while True:
            data = await queue.get()
            if data:
                proc.stdin.write(data)
            else:
                proc.stdin.write_eof()
            await proc.stdin.drain.aio()
            if not data:
                return


async def stream_process(proc: shoal.ContainerProcess[Any], stdin: BinaryIO | None = None) -> int:
    """Copy ``proc``'s stdout and stderr to ours as they arrive (and ``stdin`` to it); its return code."""
    copies = [
        asyncio.ensure_future(copy_stream(aiter(proc.stdout), sys.stdout.buffer)),
        asyncio.ensure_future(copy_stream(aiter(proc.stderr), sys.stderr.buffer)),
    ]
    feeder = asyncio.ensure_future(_feed(proc, stdin)) if stdin is not None else None
    try:
        returncode = await proc.wait.aio()
        await asyncio.gather(*copies)
        return returncode
    finally:
        for task in [*copies, feeder]:
            if task is not None and not task.done():
                task.cancel()


def _on_sigterm() -> None:
    """Turn SIGTERM into a cancellation of the running command, so the cleanup runs."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


class _Run:
    """One ``shoal run``: the sandbox it made, so that every way out can terminate it."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        self.app: shoal.App | None = None
        self.sandbox: shoal.Sandbox | None = None
        self.cleaned = False

    async def main(
        self,
        cmd: tuple[str, ...],
        app_name: str,
        image: shoal.Image,
        timeout: int,
        workdir: str | None,
        env: dict[str, str],
        stdin: bool,
        tty: bool = False,
    ) -> int:
        _on_sigterm()
        try:
            self.app = await shoal.App.lookup.aio(app_name, create_if_missing=True)
            with shoal.enable_output():
                self.sandbox = await shoal.Sandbox.create.aio(
                    app=self.app,
                    image=image,
                    timeout=min(timeout + SANDBOX_GRACE, MAX_TIMEOUT),
                    workdir=workdir,
                    env=dict(env),
                    tags={"shoal-run": self.marker},
                )
            if tty:
                returncode = await run_interactive(self.sandbox.object_id, list(cmd), timeout=timeout, stdin=stdin)
            else:
                proc = await self.sandbox.exec.aio(*cmd, text=False, timeout=timeout)
                returncode = await stream_process(proc, sys.stdin.buffer if stdin else None)
            if returncode == 137 and await self.sandbox.poll.aio() == TIMEOUT_EXIT:
                return TIMEOUT_EXIT  # the sandbox's own deadline ended the command
            return exit_code(returncode)
        finally:
            await self.cleanup()

    async def cleanup(self) -> None:
        """Terminate the sandbox (found by its tag if we were stopped while it was being created)."""
        if self.cleaned:
            return
        sandboxes = [self.sandbox] if self.sandbox is not None else []
        if not sandboxes and self.app is not None and self.app.app_id is not None:
            found = shoal.Sandbox.list.aio(app_id=self.app.app_id, tags={"shoal-run": self.marker})
            sandboxes = [sb async for sb in found]
        for sb in sandboxes:
            with contextlib.suppress(Error):
                await sb.terminate.aio()
        self.cleaned = True


@click.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--image-python", metavar="X.Y", help="Python version of the Debian image (default 3.11)")
@click.option("--image", "image_id", metavar="IMAGE_ID", help="run in this image (from `shoal image ls`) instead")
@click.option("--timeout", type=click.IntRange(1, MAX_TIMEOUT), default=300, show_default=True, help="seconds")
@click.option("--workdir", metavar="DIR", help="absolute working directory in the sandbox")
@click.option("--env", "env", multiple=True, metavar="K=V", callback=parse_env, help="environment (repeatable)")
@click.option("--app", "app_name", default="shoal-cli", show_default=True, help="app the sandbox belongs to")
@click.option("-i", "--interactive", "--stdin", "stdin", is_flag=True, help="send our standard input to the command")
@click.option("-t", "--tty", is_flag=True, help="run the command on a terminal sized as ours (with -i: raw keys)")
@click.option("-v", "--verbose", is_flag=True, help="also show image build steps found in the cache")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def run_cmd(
    cmd: tuple[str, ...],
    image_python: str | None,
    image_id: str | None,
    timeout: int,
    workdir: str | None,
    env: dict[str, str],
    app_name: str,
    stdin: bool,
    tty: bool,
    verbose: bool,
) -> None:
    """Run CMD in a fresh sandbox, stream its output, and exit with its code.

    The sandbox is terminated afterwards, also on Ctrl-C.  A command that
    outlives --timeout is killed and shoal exits with 124, as timeout(1) does.

    Options go before CMD; everything from CMD on is the command.  With -it, CMD gets a terminal and our keys
    (shoal run -it -- bash).

    Example: shoal run --timeout 60 -- python -c 'print(6 * 7)'
    """
    if image_python and image_id:
        raise click.UsageError("pass only one of --image-python and --image")
    with sdk_errors():
        image = shoal.Image.from_id(image_id) if image_id else shoal.Image.debian_slim(python_version=image_python)
    require_daemon()
    shoal_output.set_verbose(verbose)
    run = _Run()
    try:
        with sdk_errors():
            code = asyncio.run(run.main(cmd, app_name, image, timeout, workdir, env, stdin, tty))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        # A second Ctrl-C can stop the loop before the cleanup ran: do it now.
        with contextlib.suppress(Error, KeyboardInterrupt):
            asyncio.run(run.cleanup())
        code = INTERRUPTED_EXIT if isinstance(exc, KeyboardInterrupt) else TERMINATED_EXIT
    sys.exit(code)
