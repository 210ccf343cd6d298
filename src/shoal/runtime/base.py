"""What the engine asks of a container runtime: the interface runc and crun implement today.

A runtime knows container ids and OCI bundles, nothing of HTTP or of what a sandbox means.  A second
runtime (gVisor's runsc) or a remote node is a new implementation of :class:`ContainerRuntime` and a
line in :data:`shoal.runtime.registry.RUNTIMES`, not edits across the engine.
"""

from __future__ import annotations

import abc

from shoal.exception import InternalError, UnimplementedError


class RuntimeFailure(InternalError):
    """The container runtime refused or failed an operation; the message carries its own words."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message + (f": {stderr.strip()}" if stderr.strip() else ""))
        self.stderr = stderr


class ContainerRuntime(abc.ABC):
    """One container runtime with its own state directory."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The runtime's short name (``runc``, ``crun``), shown by ``shoal status``."""

    @property
    @abc.abstractmethod
    def binary(self) -> str:
        """What runs the containers (a path), shown by ``shoal status``."""

    @abc.abstractmethod
    async def start(self, container_id: str, bundle: str, ctl_fd: int, log_path: str) -> None:
        """Create and start a container whose init inherits ``ctl_fd`` as fd 3; returns once the init runs.

        The container's own stdio and the runtime's messages go to ``log_path``.
        """

    @abc.abstractmethod
    async def create(self, container_id: str, bundle: str, ctl_fd: int, log_path: str) -> None:
        """Like ``start``, but stop short of running the init until ``start_created`` (the warm pool)."""

    @abc.abstractmethod
    async def start_created(self, container_id: str) -> None:
        """Run the init of a container made by ``create``."""

    def waiting_init_alive(self, container_id: str) -> bool | None:
        """Whether the init of a container made by ``create`` still waits to be started (None: cannot tell
        without asking the runtime, which costs a process)."""
        return None

    @abc.abstractmethod
    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        """Signal a container's init (its death ends every process in it); no error if it is gone."""

    @abc.abstractmethod
    async def delete(self, container_id: str) -> None:
        """Remove a container, killing it first; no error if it is gone."""

    @abc.abstractmethod
    async def state(self, container_id: str) -> str | None:
        """``created``/``running``/``stopped``/``paused``, or None if the runtime does not know it."""

    @abc.abstractmethod
    async def list_ids(self) -> list[str]:
        """Ids of every container this runtime holds (to find strays after a crash)."""

    async def pause(self, container_id: str) -> None:
        """Freeze every process of a container (``resume`` thaws them)."""
        raise UnimplementedError(f"the {self.name} runtime cannot pause a sandbox here")

    async def resume(self, container_id: str) -> None:
        """Thaw a container frozen by ``pause``."""
        raise UnimplementedError(f"the {self.name} runtime cannot resume a sandbox here")

    def frozen(self, container_id: str) -> str | None:
        """Where a ``pause`` the runtime's own state does not record stands (``pausing``, ``paused``, ``resuming``:
        a daemon that died meanwhile left it so), or None."""
        return None

    def clear_frozen(self, container_id: str) -> None:
        """Forget what ``frozen`` says (the container was found running)."""
        return None

    async def checkpoint(self, container_id: str, image_dir: str) -> None:
        """Save a running container's processes and memory to ``image_dir`` (for ``snapshot_memory``)."""
        raise UnimplementedError(f"the {self.name} runtime cannot checkpoint a running sandbox")

    async def restore(self, container_id: str, bundle: str, image_dir: str, ctl_fd: int, log_path: str) -> None:
        """Start a container from a checkpoint made by ``checkpoint``."""
        raise UnimplementedError(f"the {self.name} runtime cannot restore a sandbox from a checkpoint")
