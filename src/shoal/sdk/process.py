"""``ContainerProcess``: a process started by ``sb.exec``."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Generic, TypeVar

from shoal.exception import InvalidError
from shoal.sdk._sync import live_method, sdk_loop
from shoal.sdk._unbuilt import ProcessUnbuilt
from shoal.sdk.streams import StreamReader, StreamType, StreamWriter
from shoal.sdk.transport import Client
from shoal.wire import routes

T = TypeVar("T", str, bytes)
EXEC_STDIN_LIMIT = 16 << 20
WAIT_SECONDS = 10


class ContainerProcess(ProcessUnbuilt, Generic[T]):
    """A running or finished process in a sandbox.

    Examples:
        p = sb.exec("python", "-c", "print(1 + 1)")
        print(p.stdout.read())   # "2\\n"
        print(p.wait())          # 0
    """

    def __init__(
        self,
        client: Client,
        sandbox_id: str,
        exec_id: str,
        *,
        text: bool,
        by_line: bool,
        stdout: StreamType = StreamType.PIPE,
        stderr: StreamType = StreamType.PIPE,
    ) -> None:
        self._client = client
        self._sandbox_id = sandbox_id
        self._exec_id = exec_id
        base = routes.path("sandboxes", sandbox_id, "execs", exec_id)
        self._base = base
        self._stdout: StreamReader[T] = StreamReader(
            client, f"{base}/output/1", 1, text=text, by_line=by_line, stream_type=stdout
        )
        self._stderr: StreamReader[T] = StreamReader(
            client, f"{base}/output/2", 2, text=text, by_line=by_line, stream_type=stderr
        )
        self._stdin = StreamWriter(client, f"{base}/stdin", EXEC_STDIN_LIMIT)
        self._returncode: int | None = None
        self._printers: list[concurrent.futures.Future[None]] = []
        loop = sdk_loop()
        for reader, stype, target in (
            (self._stdout, stdout, "stdout"),
            (self._stderr, stderr, "stdout"),
        ):
            if stype == StreamType.STDOUT:
                self._printers.append(asyncio.run_coroutine_threadsafe(reader._print_to(target), loop))

    def __repr__(self) -> str:
        return f"ContainerProcess(process_id={self._exec_id!r})"

    @property
    def stdout(self) -> StreamReader[T]:
        """The process's standard output."""
        return self._stdout

    @property
    def stderr(self) -> StreamReader[T]:
        """The process's standard error."""
        return self._stderr

    @property
    def stdin(self) -> StreamWriter:
        """The process's standard input."""
        return self._stdin

    @property
    def returncode(self) -> int:
        """The exit code (128+N if killed by signal N, -1 if its timeout passed)."""
        if self._returncode is None:
            raise InvalidError(
                "You must call wait() before accessing the returncode. To poll for the status of a running"
                " process, use poll() instead."
            )
        return self._returncode

    async def _wait_once(self, timeout: float) -> int | None:
        resp = await self._client.request("GET", f"{self._base}/wait", params={"timeout": str(timeout)})
        if resp.get("done"):
            self._returncode = int(resp["returncode"])
        return self._returncode

    @live_method
    async def poll(self) -> int | None:
        """The return code if the process has ended, else None."""
        if self._returncode is not None:
            return self._returncode
        return await self._wait_once(0)

    @live_method
    async def wait(self) -> int:
        """Wait for the process to end; returns its return code."""
        while self._returncode is None:
            await self._wait_once(WAIT_SECONDS)
        if self._printers:
            await asyncio.wait([asyncio.wrap_future(f) for f in self._printers], timeout=5)
        return self._returncode
