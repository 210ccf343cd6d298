"""The operator's calls that Modal's API has no public form for: the daemon's status, its image store, and
listings and deletions by name for the ``shoal`` command.  Private to shoal's own tools (the CLI); not part
of the Modal-compatible surface.

Unlike the SDK's objects, an admin client never starts a daemon and never waits for one: a one-shot
command answers "not running" at once.
"""

from __future__ import annotations

from typing import Any

from shoal.sdk._sync import run_async
from shoal.sdk.config import ClientConfig
from shoal.sdk.streams import StreamReader
from shoal.sdk.transport import Client, default_client
from shoal.wire import routes
from shoal.wire.base import build
from shoal.wire.images import ImportRootfs
from shoal.wire.secrets import SecretCreate
from shoal.wire.volumes import VolumeCreate


def _flag(on: bool, name: str) -> dict[str, str] | None:
    return {name: "1"} if on else None


class AdminClient:
    """One connection to the configured daemon, for the CLI's operator commands."""

    def __init__(self, client: Client | None = None, *, on_sdk_loop: bool = False) -> None:
        self.client = client or Client(ClientConfig(autostart=False))
        self._on_sdk_loop = on_sdk_loop

    @classmethod
    def of_sdk(cls) -> AdminClient:
        """An admin client on the SDK's own connection (and event loop), to use beside SDK objects such as the
        ``StreamReader`` of ``entrypoint_output``; callable from any event loop."""
        return cls(default_client(), on_sdk_loop=True)

    async def close(self) -> None:
        """Release the connection."""
        await self.client.close()

    async def _call(self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None) -> Any:
        json_body = body.model_dump(exclude_defaults=True) if body is not None else None
        call = self.client.request(method, path, json_body=json_body, params=params, idempotent=False)
        return await (run_async(call) if self._on_sdk_loop else call)

    async def status(self) -> dict[str, Any]:
        """The daemon's version, runtime, paths, sandboxes, pool, images and GPUs."""
        result: dict[str, Any] = await self._call("GET", routes.STATUS)
        return result

    async def dashboard(self) -> dict[str, str]:
        """The web dashboard's ``url`` and the ``login_url`` that signs a browser in."""
        result: dict[str, str] = await self._call("GET", routes.DASHBOARD)
        return result

    async def gateway_env(self) -> dict[str, str]:
        """``MODAL_SERVER_URL``, ``MODAL_TOKEN_ID`` and ``MODAL_TOKEN_SECRET`` for the daemon's gateway."""
        result: dict[str, str] = (await self._call("GET", routes.GATEWAY))["env"]
        return result

    async def cluster(self) -> dict[str, Any]:
        """The cluster this daemon belongs to and its nodes (``GET /v1/cluster``)."""
        result: dict[str, Any] = await self._call("GET", routes.CLUSTER)
        return result

    async def sandboxes(self, app_id: str | None = None, include_finished: bool = False) -> list[dict[str, Any]]:
        """Sandboxes, newest first (running ones; with ``include_finished``, retained finished ones too)."""
        params = {"app_id": app_id} if app_id else {}
        params.update(_flag(include_finished, "include_finished") or {})
        result: list[dict[str, Any]] = (await self._call("GET", routes.SANDBOXES, params=params))["sandboxes"]
        return result

    async def sandbox(self, sandbox_id: str) -> dict[str, Any]:
        """One sandbox as the API shows it."""
        result: dict[str, Any] = await self._call("GET", routes.path("sandboxes", sandbox_id))
        return result

    def entrypoint_output(self, sandbox_id: str, fd: int) -> StreamReader[bytes]:
        """The entrypoint's stdout (1) or stderr (2) as raw bytes, from the start."""
        return StreamReader(
            self.client,
            routes.path("sandboxes", sandbox_id, "execs", "entrypoint", "output", fd),
            fd,
            text=False,
            by_line=False,
        )

    async def image_store(self) -> dict[str, Any]:
        """Images with their sizes, and the image store's disk use."""
        result: dict[str, Any] = await self._call("GET", routes.IMAGE_STORE)
        return result

    async def remove_image(self, image_id: str) -> dict[str, Any]:
        """Remove an image and its layers nothing else uses."""
        result: dict[str, Any] = await self._call("DELETE", routes.path("images", image_id))
        return result

    async def prune_images(self, everything: bool) -> dict[str, Any]:
        """Remove unused layers and build contexts (with ``everything``, first every image no sandbox runs)."""
        result: dict[str, Any] = await self._call(
            "POST", routes.path("image-store", "prune"), params=_flag(everything, "all")
        )
        return result

    async def memory_snapshots(self) -> list[dict[str, Any]]:
        """Memory snapshots of gVisor sandboxes, newest first."""
        result: list[dict[str, Any]] = (await self._call("GET", routes.path("memory_snapshots")))["snapshots"]
        return result

    async def delete_memory_snapshot(self, snapshot_id: str) -> None:
        """Remove a memory snapshot."""
        await self._call("DELETE", routes.path("memory_snapshots", snapshot_id))

    async def import_image(self, path: str, cmd: list[str] | None = None, workdir: str | None = None) -> str:
        """Import a root filesystem directory on the daemon's host; the new image's id."""
        body = build(ImportRootfs, path=path, cmd=cmd, workdir=workdir)
        return str((await self._call("POST", routes.path("images", "import"), body=body))["image_id"])

    async def secrets(self) -> list[dict[str, Any]]:
        """Named secrets (names and dates, never values), newest first."""
        result: list[dict[str, Any]] = (await self._call("GET", routes.SECRETS))["secrets"]
        return result

    async def create_secret(self, name: str, env: dict[str, str]) -> None:
        """Create a named secret."""
        await self._call("POST", routes.SECRETS, body=build(SecretCreate, name=name, env=env))

    async def delete_secret(self, name: str, allow_missing: bool = False) -> None:
        """Delete a named secret."""
        await self._call(
            "DELETE", routes.path("secrets", "by-name", name), params=_flag(allow_missing, "allow_missing")
        )

    async def volumes(self) -> list[dict[str, Any]]:
        """Named volumes with the disk space their files use, newest first."""
        result: list[dict[str, Any]] = (await self._call("GET", routes.VOLUMES, params={"usage": "1"}))["volumes"]
        return result

    async def create_volume(self, name: str) -> None:
        """Create a named volume."""
        await self._call("POST", routes.VOLUMES, body=build(VolumeCreate, name=name))

    async def delete_volume(self, name: str, allow_missing: bool = False) -> None:
        """Delete a named volume and its files."""
        await self._call(
            "DELETE", routes.path("volumes", "by-name", name), params=_flag(allow_missing, "allow_missing")
        )
