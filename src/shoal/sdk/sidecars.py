"""``sb._experimental_sidecars``: containers beside a sandbox, as modal 1.6 has them.

A sidecar runs its own image and command, with its own environment, secrets, volumes and outbound policy (open by
default); the sandbox reaches it by its name (``http://<name>:<port>``) and it reaches the sandbox as ``main``,
whatever their allowlists. It ends with its sandbox.

Examples:
    sb = shoal.Sandbox.create(app=app, outbound_cidr_allowlist=[])   # no way out but its sidecars
    proxy = sb._experimental_sidecars.create("python3", "-m", "http.server", "8080", name="proxy", image=image)
    sb.exec("curl", "http://proxy:8080/").wait()
    proxy.terminate()
"""

from __future__ import annotations

import builtins
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from shoal.exception import InvalidError
from shoal.sdk._sandbox_args import check_args, check_workdir, merge_env, not_supported, str_list
from shoal.sdk._sync import live_method
from shoal.sdk.image import Image
from shoal.sdk.secret import Secret, secret_ids
from shoal.sdk.transport import Client
from shoal.sdk.volume import mounts_body
from shoal.wire import routes
from shoal.wire.base import dump
from shoal.wire.images import ImageRef
from shoal.wire.sandboxes import CreateSidecar

if TYPE_CHECKING:
    from shoal.sdk.sandbox import Sandbox

MAIN = "main"


class SidecarContainer:
    """A sidecar: ``exec``, ``filesystem``, ``wait``, ``poll``, ``terminate`` and snapshots, as on a sandbox."""

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        from shoal.sdk.sandbox import Sandbox

        self._name = str(info["name"])
        self._sandbox_id = str(info["sandbox_id"])
        self._inner = Sandbox(client, str(info["sidecar_id"]))
        self.exec = self._inner.exec
        """Run a command in the sidecar (as ``Sandbox.exec``)."""
        self.wait = self._inner.wait
        """Wait for the sidecar to end (SandboxTerminatedError if it was terminated, unless told otherwise)."""
        self.poll = self._inner.poll
        self.terminate = self._inner.terminate
        self.reload_volumes = self._inner.reload_volumes
        self.snapshot_filesystem = self._inner.snapshot_filesystem
        self.snapshot_directory = self._inner.snapshot_directory
        self.mount_image = self._inner.mount_image
        self.unmount_image = self._inner.unmount_image

    @property
    def object_id(self) -> str:
        """Its id."""
        return self._inner.object_id

    @property
    def name(self) -> str:
        """The name its sandbox reaches it by."""
        return self._name

    @property
    def filesystem(self) -> Any:
        """Its files (as ``Sandbox.filesystem``)."""
        return self._inner.filesystem

    def __repr__(self) -> str:
        return f"SidecarContainer({self.object_id}, name={self._name!r})"


class SidecarManager:
    """``sb._experimental_sidecars``: create, get and list a sandbox's sidecars."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self._client: Client = sandbox._client

    def _path(self, *parts: str) -> str:
        return routes.path("sandboxes", self._sandbox.object_id, "sidecars", *parts)

    @live_method
    async def create(
        self,
        *args: str,
        name: str,
        image: Image,
        env: dict[str, str | None] | None = None,
        secrets: Collection[Secret] | None = None,
        workdir: str | None = None,
        volumes: dict[Any, Any] | None = None,
        outbound_cidr_allowlist: Sequence[str] | None = None,
        outbound_domain_allowlist: Sequence[str] | None = None,
        include_oidc_identity_token: bool = False,
        proxy: Any = None,
        pty: bool = False,
        experimental_memory_reserve_consume_mib: int | None = None,
    ) -> SidecarContainer:
        """Start a sidecar running ``args`` (or its image's command) from ``image``; returns once its container
        runs (before its program is listening: wait for its port)."""
        if name == MAIN:
            raise InvalidError(f"The name {MAIN!r} is reserved for the sandbox's main container.")
        argv = check_args(args, "create")
        check_workdir(workdir)
        if not isinstance(image, Image):
            raise InvalidError(f"image must be a shoal.Image, got {type(image).__name__}")
        if include_oidc_identity_token:
            raise not_supported("include_oidc_identity_token", "shoal has no OIDC identity provider")
        if proxy is not None:
            raise not_supported("proxy", "shoal has no Modal Proxy objects")
        if experimental_memory_reserve_consume_mib is not None and experimental_memory_reserve_consume_mib <= 0:
            raise InvalidError(
                "experimental_memory_reserve_consume_mib must be a positive number of MiB, got:"
                f" {experimental_memory_reserve_consume_mib}"
            )
        plain_env, secret_env = merge_env(env, secrets)
        body = dump(
            CreateSidecar,
            name=name,
            args=argv,
            image=ImageRef(kind="id", image_id=await image._resolve(self._client)),
            env=plain_env,
            secret_env=secret_env,
            secret_ids=await secret_ids(secrets),
            workdir=workdir,
            volumes=await mounts_body(volumes),
            outbound_cidr_allowlist=str_list(outbound_cidr_allowlist, "outbound_cidr_allowlist"),
            outbound_domain_allowlist=str_list(outbound_domain_allowlist, "outbound_domain_allowlist"),
            pty=bool(pty),
        )
        info = await self._client.request("POST", self._path(), json_body=body, idempotent=False)
        return SidecarContainer(self._client, info)

    @live_method
    async def get(self, *, name: str, include_terminated: bool = False) -> SidecarContainer:
        """A sidecar by name (NotFoundError if there is none)."""
        if name == MAIN:
            raise InvalidError(
                "Cannot get the main sandbox container through the sidecars API. Use Sandbox methods directly to"
                " interact with the main container."
            )
        params = {"include_terminated": "1"} if include_terminated else None
        info = await self._client.request("GET", self._path(name), params=params)
        return SidecarContainer(self._client, info)

    @live_method
    async def list(self, include_terminated: bool = False) -> builtins.list[SidecarContainer]:
        """The sandbox's sidecars, oldest first (running ones, unless asked)."""
        params = {"include_terminated": "1"} if include_terminated else None
        resp = await self._client.request("GET", self._path(), params=params)
        return [SidecarContainer(self._client, item) for item in resp["sidecars"]]
