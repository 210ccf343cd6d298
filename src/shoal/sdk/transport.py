"""The SDK's HTTP client for the daemon, and the client's side of the error boundary.

Errors arrive as ``{"error": {"type", "message"}}``; the type name maps back to
the exception class the daemon raised, else the HTTP status decides.  When no
daemon answers on the local socket and the caller is root, one is started in
the background (the embedded default).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from shoal import exception as exc
from shoal.sdk.config import ClientConfig

BY_STATUS: dict[int, type[exc.Error]] = {
    400: exc.InvalidError,
    401: exc.AuthError,
    403: exc.PermissionDeniedError,
    404: exc.NotFoundError,
    409: exc.ConflictError,
    429: exc.ResourceExhaustedError,
    501: exc.UnimplementedError,
    503: exc.ServiceError,
    504: exc.TimeoutError,
}
AUTOSTART_TIMEOUT = 120.0
RECONNECT_WINDOW = 20.0
"""How long idempotent calls keep retrying while the daemon is unreachable (e.g. restarting)."""


def error_from(status: int, body: bytes) -> exc.Error:
    """The exception for an error response."""
    try:
        err = json.loads(body)["error"]
        name, message = str(err["type"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        name, message = "", body.decode(errors="replace")[:500] or f"HTTP {status}"
    cls = exc.ERRORS.get(name) or BY_STATUS.get(status, exc.InternalError)
    return cls(message)


class Client:
    """A connection pool to one daemon, living on the SDK loop."""

    def __init__(self, cfg: ClientConfig | None = None) -> None:
        self.cfg = cfg or ClientConfig()
        self._session: aiohttp.ClientSession | None = None
        self._started_daemon = False

    @property
    def identity(self) -> str:
        """Which daemon this client talks to."""
        return self.cfg.url or str(self.cfg.socket_path)

    @property
    def base_url(self) -> str:
        """Where requests go."""
        return self.cfg.url.rstrip("/") if self.cfg.url else "http://shoal"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.cfg.token}"} if self.cfg.url and self.cfg.token else {}
            connector: aiohttp.BaseConnector
            if self.cfg.url:
                connector = aiohttp.TCPConnector(limit=0)
            else:
                connector = aiohttp.UnixConnector(path=str(self.cfg.socket_path), limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._session

    async def close(self) -> None:
        """Close pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Any = None,
        data: bytes | None = None,
        idempotent: bool = True,
    ) -> Any:
        """One API call; returns the decoded JSON body or raises the mapped exception.

        An idempotent call whose connection fails is retried for up to
        RECONNECT_WINDOW seconds (a daemon restart); others fail at once.
        """
        attempt = 0
        deadline = asyncio.get_running_loop().time() + RECONNECT_WINDOW
        while True:
            try:
                async with self._get_session().request(
                    method, self.base_url + path, json=json_body, params=params, data=data
                ) as resp:
                    body = await resp.read()
                    if resp.status >= 400:
                        raise error_from(resp.status, body)
                    return json.loads(body) if body else {}
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                attempt += 1
                if attempt == 1 and await self._maybe_start_daemon(e):
                    continue
                if not idempotent or asyncio.get_running_loop().time() > deadline:
                    raise self._unreachable(e) from e
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt))

    async def stream(
        self, method: str, path: str, *, json_body: Any = None, params: Any = None
    ) -> AsyncIterator[bytes]:
        """A streaming call: yields body chunks as they arrive.  Raises the mapped exception on errors."""
        for attempt in (1, 2):
            try:
                async with self._get_session().request(
                    method, self.base_url + path, json=json_body, params=params
                ) as resp:
                    if resp.status >= 400:
                        raise error_from(resp.status, await resp.read())
                    async for chunk in resp.content.iter_any():
                        yield chunk
                    return
            except aiohttp.ClientConnectorError as e:
                if attempt == 1 and await self._maybe_start_daemon(e):
                    continue
                raise self._unreachable(e) from e
            except aiohttp.ClientError as e:  # the connection dropped mid-call (a daemon restarted)
                raise self._unreachable(e) from e

    def _unreachable(self, e: BaseException) -> exc.ConnectionError:
        where = self.cfg.url or str(self.cfg.socket_path)
        hint = (
            "start it with `shoal serve` (as root)"
            if not self.cfg.url
            else "check SHOAL_URL and that the daemon listens there"
        )
        return exc.ConnectionError(f"cannot reach the shoal daemon at {where} ({e}); {hint}")

    async def _maybe_start_daemon(self, e: BaseException) -> bool:
        """Start a local daemon if none runs and we may; True if the caller should retry."""
        if self.cfg.url or not self.cfg.autostart or self._started_daemon:
            return False
        if os.geteuid() != 0:
            raise exc.ConnectionError(
                f"no shoal daemon is running at {self.cfg.socket_path}, and only root can start one:"
                " run `sudo shoal serve`, or set SHOAL_URL to a daemon's address"
            ) from e
        self._started_daemon = True
        await start_local_daemon(str(self.cfg.socket_path))
        return True


async def start_local_daemon(socket_path: str) -> None:
    """Start ``shoal serve --background`` (paths from the same environment as this client) unless one is running."""
    runtime_dir = os.path.dirname(socket_path)
    os.makedirs(runtime_dir, exist_ok=True)
    lock_path = os.path.join(runtime_dir, ".autostart.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        if await _answers(socket_path):
            return
        if _daemon_lock_held(os.path.join(runtime_dir, "shoald.lock")):
            # A daemon is starting or restarting there: wait for it rather than start a second one.
            for _ in range(int(AUTOSTART_TIMEOUT * 10)):
                if await _answers(socket_path):
                    return
                await asyncio.sleep(0.1)
            raise exc.ConnectionError(f"a shoal daemon holds {runtime_dir} but does not answer on {socket_path}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shoal",
            "serve",
            "--background",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), AUTOSTART_TIMEOUT)
        except TimeoutError:
            proc.kill()
            raise exc.ConnectionError("starting a local shoal daemon timed out") from None
        if proc.returncode != 0:
            raise exc.ConnectionError(f"starting a local shoal daemon failed:\n{out.decode(errors='replace')[-2000:]}")
    finally:
        os.close(fd)


def _daemon_lock_held(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def _answers(socket_path: str) -> bool:
    with contextlib.suppress(OSError):
        _, writer = await asyncio.open_unix_connection(socket_path)
        writer.close()
        return True
    return False


_clients: dict[tuple[str, str | None, str | None], Client] = {}


@atexit.register
def _close_clients() -> None:
    """Close pooled connections at exit, if the SDK loop is still running."""
    from shoal.sdk._sync import _loop_thread

    loop = _loop_thread._loop
    if loop is None or not loop.is_running():
        return
    for client in list(_clients.values()):
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=2)


def default_client() -> Client:
    """The process-wide client for the configured daemon."""
    cfg = ClientConfig()
    key = (str(cfg.socket_path), cfg.url, cfg.token)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = Client(cfg)
    return client
