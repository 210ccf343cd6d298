"""A terminal into a sandbox: ``shoal sandbox shell``, ``shoal sandbox exec -it``, ``shoal run -it``.

The command runs on a pseudo-terminal in the sandbox, sized as ours.  Our terminal is put in raw mode, so every
key (Ctrl-C, Ctrl-Z, arrows) goes to the sandbox's terminal, whose line discipline turns it into signals for
the command there; when our window changes size (SIGWINCH) the sandbox's terminal is resized; the command's
exit code becomes ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
import uuid
from collections.abc import Iterator

import click

from shoal.exception import Error
from shoal.sdk._sync import run_async
from shoal.sdk.process import ContainerProcess
from shoal.sdk.transport import Client, default_client
from shoal.wire import routes
from shoal.wire.sandboxes import ExecRequest, TerminalSize

DEFAULT_TERM = "xterm-256color"
READ_SIZE = 1 << 14
OUTPUT_DRAIN = 5.0
"""Seconds the output may take to end once the command has exited."""


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Our terminal in raw mode (no echo, no line editing, no signals from keys) until the block ends."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def window_size(*fds: int) -> tuple[int, int] | None:
    """(rows, columns) of the first of ``fds`` that is a terminal, or None."""
    for fd in fds:
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.lines > 0 and size.columns > 0:
                return size.lines, size.columns
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Session:
    """One command on a terminal in a sandbox, wired to ours."""

    def __init__(self, client: Client, sandbox_id: str, exec_id: str, in_fd: int, out_fd: int) -> None:
        self.client = client
        self.sandbox_id = sandbox_id
        self.exec_id = exec_id
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.proc: ContainerProcess[bytes] = ContainerProcess(client, sandbox_id, exec_id, text=False, by_line=False)
        self.input: asyncio.Queue[bytes] = asyncio.Queue()
        self.resizes: set[asyncio.Task[None]] = set()

    def on_input(self) -> None:
        try:
            data = os.read(self.in_fd, READ_SIZE)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.in_fd)
        self.input.put_nowait(data)

    def on_winch(self) -> None:
        size = window_size(self.out_fd, self.in_fd)
        if size is not None:
            task = asyncio.get_running_loop().create_task(self.resize(*size))
            self.resizes.add(task)
            task.add_done_callback(self.resizes.discard)

    async def resize(self, rows: int, cols: int) -> None:
        path = routes.path("sandboxes", self.sandbox_id, "execs", self.exec_id, "resize")
        with contextlib.suppress(Error):  # the command may have ended meanwhile
            await run_async(
                self.client.request("POST", path, json_body=TerminalSize(rows=rows, cols=cols).model_dump())
            )

    async def feed(self) -> None:
        with contextlib.suppress(Error):  # a command that stopped reading is no error of ours: its code tells
            while True:
                data = await self.input.get()
                if data:
                    self.proc.stdin.write(data)
                else:
                    self.proc.stdin.write_eof()
                await self.proc.stdin.drain.aio()
                if not data:
                    return

    async def show(self) -> None:
        async for chunk in self.proc.stdout:
            with contextlib.suppress(BrokenPipeError):
                _write_all(self.out_fd, chunk)


async def run_interactive(
    sandbox_id: str,
    argv: list[str],
    *,
    workdir: str | None = None,
    env: dict[str, str] | None = None,
    timeout: int | None = None,
    stdin: bool = True,
) -> int:
    """Run ``argv`` on a terminal in the sandbox, ours wired to it (our keys to it when ``stdin``); its return
    code."""
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    if stdin and not os.isatty(in_fd):
        raise click.UsageError("the input is not a terminal: run this from one, or drop -t (keep -i) to pipe input")
    client = default_client()
    exec_id = str(uuid.uuid4())
    request = ExecRequest(
        exec_id=exec_id,
        args=argv,
        workdir=workdir,
        env={"TERM": os.environ.get("TERM") or DEFAULT_TERM, **(env or {})},
        timeout=timeout,
        pty=True,
        pty_size=window_size(out_fd, in_fd),
    )
    body = request.model_dump(mode="json", exclude_defaults=True)
    await run_async(client.request("POST", routes.path("sandboxes", sandbox_id, "execs"), json_body=body))
    session = _Session(client, sandbox_id, exec_id, in_fd, out_fd)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGWINCH, session.on_winch)
    show = asyncio.ensure_future(session.show())
    feed: asyncio.Future[None] | None = None
    try:
        with raw_mode(in_fd) if stdin else contextlib.nullcontext():
            if stdin:
                loop.add_reader(in_fd, session.on_input)
                feed = asyncio.ensure_future(session.feed())
            try:
                returncode = await session.proc.wait.aio()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(show), OUTPUT_DRAIN)
            finally:
                if stdin:
                    loop.remove_reader(in_fd)
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        for task in [show, feed, *session.resizes]:
            if task is not None and not task.done():
                task.cancel()
    return returncode
