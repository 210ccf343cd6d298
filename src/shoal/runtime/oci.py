"""runc and crun: the :class:`~shoal.runtime.base.ContainerRuntime` that drives an OCI runtime's command line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from shoal.exception import Error, ResourceExhaustedError
from shoal.runtime.base import ContainerRuntime, RuntimeFailure
from shoal.util import spawn


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
            raise start_failure(f"{self.name} run failed (exit {res.returncode})", _tail(log_path))

    async def create(self, container_id: str, bundle: str, ctl_fd: int, log_path: str) -> None:
        """Like ``start``, but stop short of running the init: it waits until ``start_created`` (a warm pool)."""
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            argv = self._argv("create", "--preserve-fds", "1", "--bundle", bundle, container_id)
            res = await spawn.run(argv, fds={1: log_fd, 2: log_fd, 3: ctl_fd})
        finally:
            os.close(log_fd)
        if res.returncode != 0:
            raise start_failure(f"{self.name} create failed (exit {res.returncode})", _tail(log_path))

    async def start_created(self, container_id: str) -> None:
        """Run the init of a container made by ``create``."""
        await self._run("start", container_id)

    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        """Signal a container's init (in a pid namespace, its death ends every process); no error if gone."""
        await self._run("kill", container_id, signal, check=False)

    async def delete(self, container_id: str) -> None:
        """Remove a container, killing it first; no error if it is gone."""
        await self._run("delete", "--force", container_id, check=False)

    async def state(self, container_id: str) -> str | None:
        """``created``/``running``/``stopped``/``paused``, or None if unknown."""
        res = await spawn.run(self._argv("state", container_id))
        if res.returncode != 0:
            return None
        try:
            status = json.loads(res.stdout).get("status")
        except (json.JSONDecodeError, AttributeError):
            return None
        return status if isinstance(status, str) else None

    async def list_ids(self) -> list[str]:
        """Ids of every container in this runtime's state directory."""
        out = await self._run("list", "--format", "json", check=False)
        try:
            items = json.loads(out or "[]") or []
        except json.JSONDecodeError:
            return []
        return [str(i["id"]) for i in items if isinstance(i, dict) and "id" in i]


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


def _tail(path: str, limit: int = 4096) -> str:
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
