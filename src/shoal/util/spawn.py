"""Run helper programs from the event loop without threads.

``posix_spawn`` maps descriptors exactly where a program expects them (runc
wants the agent's control socket at fd 3), and a pidfd tells the loop when
the program ends.  Each program is collected by its own task, so a caller
that is cancelled never leaves a zombie or a stale loop registration behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)
_collectors: set[asyncio.Task[Completed]] = set()


@dataclass
class Completed:
    """A finished helper program."""

    returncode: int
    stdout: bytes
    stderr: bytes


async def run(
    argv: list[str],
    *,
    fds: dict[int, int] | None = None,
    capture: bool = True,
    env: dict[str, str] | None = None,
) -> Completed:
    """Run ``argv`` to completion.

    ``fds`` maps child descriptor numbers to parent descriptors (e.g.
    ``{1: log, 3: sock}``); mapped standard streams are not captured.
    """
    fds = dict(fds or {})
    pipes: dict[int, int] = {}
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        fds.setdefault(0, devnull)
        for n in (1, 2):
            if n not in fds:
                if capture:
                    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                    pipes[n] = r
                    fds[n] = w
                else:
                    fds[n] = devnull
        actions = [(os.POSIX_SPAWN_DUP2, parent, child) for child, parent in sorted(fds.items())]
        environ = env if env is not None else os.environ
        pid = os.posix_spawnp(argv[0], argv, environ, file_actions=actions)  # noqa: ASYNC221 - returns at once
    finally:
        os.close(devnull)
        for n in pipes:
            os.close(fds[n])
    log.debug("spawned %d: %s", pid, " ".join(argv[:6]))
    task = asyncio.ensure_future(_collect(pid, pipes))
    _collectors.add(task)
    task.add_done_callback(_collectors.discard)
    return await asyncio.shield(task)


async def _collect(pid: int, pipes: dict[int, int]) -> Completed:
    """Wait for ``pid`` to exit and its pipes to close; owns (and always closes) every descriptor."""
    loop = asyncio.get_running_loop()
    chunks: dict[int, list[bytes]] = {n: [] for n in pipes}
    open_pipes = set(pipes)
    exited: list[int] = []
    done = loop.create_future()
    pidfd = os.pidfd_open(pid)

    def check_done() -> None:
        if exited and not open_pipes and not done.done():
            done.set_result(None)

    def on_pipe(n: int) -> None:
        fd = pipes[n]
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(fd)
                os.close(fd)
                open_pipes.discard(n)
                check_done()
                return
            chunks[n].append(data)

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        _, status = os.waitpid(pid, 0)
        exited.append(os.waitstatus_to_exitcode(status))
        check_done()

    for n, fd in pipes.items():
        loop.add_reader(fd, on_pipe, n)
    loop.add_reader(pidfd, on_exit)
    try:
        await done
    finally:
        # Unregister before closing: a closed descriptor left in the loop's map
        # would swallow the next registration of the same number.
        loop.remove_reader(pidfd)
        for n in list(open_pipes):
            loop.remove_reader(pipes[n])
            os.close(pipes[n])
        os.close(pidfd)
    log.debug("exited %d: %d", pid, exited[0])
    return Completed(exited[0], b"".join(chunks.get(1, [])), b"".join(chunks.get(2, [])))
