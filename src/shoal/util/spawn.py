"""Run helper programs from the event loop without threads.

``posix_spawn`` maps descriptors exactly where a program expects them (runc
wants the agent's control socket at fd 3), and a pidfd tells the loop when
the program ends.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass


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
    loop = asyncio.get_running_loop()
    fds = dict(fds or {})
    actions: list[tuple[int, ...]] = []
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
        for child_fd, parent_fd in sorted(fds.items()):
            actions.append((os.POSIX_SPAWN_DUP2, parent_fd, child_fd))
        environ = env if env is not None else os.environ
        pid = os.posix_spawnp(argv[0], argv, environ, file_actions=actions)  # noqa: ASYNC221 - returns at once
    finally:
        os.close(devnull)
        for n in pipes:
            os.close(fds[n])

    chunks: dict[int, list[bytes]] = {n: [] for n in pipes}
    done = loop.create_future()
    open_pipes = set(pipes)
    exited: list[int] = []

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

    pidfd = os.pidfd_open(pid)

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
    except asyncio.CancelledError:
        # Still reap the child: never leave a zombie behind.
        await asyncio.shield(done)
        raise
    finally:
        os.close(pidfd)
    return Completed(
        exited[0],
        b"".join(chunks.get(1, [])),
        b"".join(chunks.get(2, [])),
    )
