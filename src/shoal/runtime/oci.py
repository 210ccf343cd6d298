"""runc and crun: the :class:`~shoal.runtime.base.ContainerRuntime` that drives an OCI runtime's command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
from pathlib import Path

from shoal.exception import Error, ResourceExhaustedError
from shoal.runtime.base import ContainerRuntime, RuntimeFailure
from shoal.util import spawn

EXEC_FIFO = "exec.fifo"
"""runc's FIFO in a created container's state dir: the init blocks opening it until ``runc start`` reads it."""
START_CHECK_INTERVAL = 0.1
START_TIMEOUT = 30.0


class OciRuntime(ContainerRuntime):
    """One OCI runtime binary (runc or crun) with its own state directory."""

    def __init__(self, binary: str, state_dir: str) -> None:
        self._binary = binary
        self.state_dir = state_dir

    def __repr__(self) -> str:
        return f"OciRuntime({self._binary!r}, {self.state_dir!r})"

    @property
    def binary(self) -> str:
        """The runtime's executable."""
        return self._binary

    @property
    def name(self) -> str:
        """The runtime's short name (``runc``, ``crun``)."""
        return os.path.basename(self.binary)

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", self.state_dir, *args]

    async def _run(self, *args: str, check: bool = True) -> str:
        res = await spawn.run(self._argv(*args))
        if check and res.returncode != 0:
            raise RuntimeFailure(
                f"{self.name} {args[0]} failed (exit {res.returncode})",
                res.stderr.decode(errors="replace"),
            )
        return res.stdout.decode(errors="replace")

    async def start(self, container_id: str, bundle: str, ctl_fd: int, log_path: str) -> None:
        """Create and start a container whose init inherits ``ctl_fd`` as fd 3.

        The container's own stdio and the runtime's messages go to
        ``log_path``; the call returns once the init process runs.
        """
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            argv = self._argv("run", "--detach", "--preserve-fds", "1", "--bundle", bundle, container_id)
            res = await spawn.run(argv, fds={1: log_fd, 2: log_fd, 3: ctl_fd})
        finally:
            os.close(log_fd)
        if res.returncode != 0:
            raise start_failure(f"{self.name} run failed (exit {res.returncode})", log_tail(log_path))

    async def create(self, container_id: str, bundle: str, ctl_fd: int, log_path: str) -> None:
        """Like ``start``, but stop short of running the init: it waits until ``start_created`` (a warm pool)."""
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            argv = self._argv("create", "--preserve-fds", "1", "--bundle", bundle, container_id)
            res = await spawn.run(argv, fds={1: log_fd, 2: log_fd, 3: ctl_fd})
        finally:
            os.close(log_fd)
        if res.returncode != 0:
            raise start_failure(f"{self.name} create failed (exit {res.returncode})", log_tail(log_path))

    async def start_created(self, container_id: str) -> None:
        """Run the init of a container made by ``create``.

        For runc this opens the container's ``exec.fifo`` as ``runc start`` does (decision 0064), which saves a
        runc process and its read of the host's mount table (longer with every sandbox) on the warm pool's path.
        """
        if self.name == "runc":
            fifo = os.path.join(self.state_dir, container_id, EXEC_FIFO)
            try:
                fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                        raise RuntimeFailure(f"runc start failed: {fifo} is not a FIFO")
                    await self._await_init(container_id, fd)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(fifo)
                finally:
                    os.close(fd)
                return
        await self._run("start", container_id)

    async def _await_init(self, container_id: str, fifo: int) -> None:
        """Wait until a created container's init has written its byte to the open ``exec.fifo``: it runs then.

        Opened read-write, the FIFO never blocks this side and holds the init's open until the byte arrives;
        an init that died before is a failure, found within ``START_CHECK_INTERVAL`` (as ``runc start`` does)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fifo, _resolve_once, ready)  # may fire again before it is removed
            try:
                await asyncio.wait_for(ready, START_CHECK_INTERVAL)
            except TimeoutError:
                if not self._init_alive(container_id) or loop.time() > deadline:
                    raise RuntimeFailure(f"runc start failed: the init of {container_id} did not start") from None
                continue
            finally:
                loop.remove_reader(fifo)
            with contextlib.suppress(BlockingIOError):
                if os.read(fifo, 1):
                    return

    def waiting_init_alive(self, container_id: str) -> bool | None:
        """Whether a created container's init still runs (runc: from its state file and ``/proc``)."""
        return self._init_alive(container_id) if self.name == "runc" else None

    def _init_alive(self, container_id: str) -> bool:
        """Whether the init runc recorded for the container still runs (the same process, not a zombie)."""
        try:
            state = json.loads(Path(self.state_dir, container_id, "state.json").read_text())
            pid, start = int(state["init_process_pid"]), int(state["init_process_start"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        fields = live_stat(pid)
        return fields is not None and len(fields) > 19 and int(fields[19]) == start

    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        """Signal a container's init (in a pid namespace, its death ends every process); no error if gone."""
        await self._run("kill", container_id, signal, check=False)

    async def delete(self, container_id: str) -> None:
        """Remove a container, killing it first; no error if it is gone."""
        await self._run("delete", "--force", container_id, check=False)

    async def state(self, container_id: str) -> str | None:
        """``created``/``running``/``stopped``/``paused``, or None if unknown."""
        res = await spawn.run(self._argv("state", container_id))
        return parse_state(res.returncode, res.stdout)

    async def list_ids(self) -> list[str]:
        """Ids of every container in this runtime's state directory."""
        return parse_list(await self._run("list", "--format", "json", check=False))


def parse_state(returncode: int, stdout: bytes) -> str | None:
    """The ``status`` of an OCI runtime's ``state`` answer (runc and runsc print the same JSON); None if unknown."""
    if returncode != 0:
        return None
    try:
        status = json.loads(stdout).get("status")
    except (json.JSONDecodeError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def parse_list(out: str) -> list[str]:
    """The container ids of an OCI runtime's ``list --format json`` answer."""
    try:
        items = json.loads(out or "[]") or []
    except json.JSONDecodeError:
        return []
    return [str(i["id"]) for i in items if isinstance(i, dict) and "id" in i]


def _resolve_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def start_failure(message: str, output: str) -> Error:
    """The error for a container that did not start: ``ResourceExhaustedError`` naming the host limit when
    one ran out, else ``RuntimeFailure`` with the runtime's own words."""
    if "session key" in output and "quota exceeded" in output:
        return ResourceExhaustedError(
            "the host's kernel key quota for the sandbox's user is used up (runc gives every container its own"
            f" session keyring; kernel.keys.maxkeys = {_sysctl('kernel/keys/maxkeys')}, kernel.keys.maxbytes ="
            f" {_sysctl('kernel/keys/maxbytes')}, counted per host uid, which all sandboxes share when the daemon"
            " runs with `--uid-ranges shared`): end some sandboxes, or raise the limits, e.g."
            " `sysctl -w kernel.keys.maxkeys=20000 kernel.keys.maxbytes=2000000`"
        )
    return RuntimeFailure(message, output)


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return "?"


def log_tail(path: str, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def probe_crun(binary: str) -> bool:
    """Whether crun can run containers on this host (it refuses hybrid cgroup hierarchies)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = f.read()
    except OSError:
        return False
    # crun needs the unified hierarchy at /sys/fs/cgroup with no v1 controllers beside it.
    lines = [ln.split(" - ")[-1] for ln in mounts.splitlines()]
    has_v1 = any(ln.startswith("cgroup ") for ln in lines)
    unified_root = any(
        " /sys/fs/cgroup " in f" {ln.split()[4]} " and ln.split(" - ")[-1].startswith("cgroup2")
        for ln in mounts.splitlines()
        if len(ln.split()) > 4
    )
    return bool(shutil.which(binary)) and unified_root and not has_v1


def live_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None if the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if fields and fields[0] != "Z" else None
